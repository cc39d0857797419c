"""TensorRT plugin for ``SelectiveHeadAttention``: an ahead-of-time implementation whose kernel
is polarc's Triton selective-attention kernel compiled to PTX, so a plan runs without Python.

TensorRT launches an AOT plugin kernel with its arguments in this order: input pointers, the
extra int32 arguments the implementation returns, output pointers (then null for any hidden
parameters the compiler appended). :func:`selective_attention_plugin_kernel` is a thin entry
point in that order that runs the stage-1 kernel in its one-launch form (``ONE_LAUNCH``, one
split): grid ``(1, k, B)``, one program per (selected group, row), which streams that group's
whole cache, writes its heads, and zeros its share of the row's unselected groups.
No workspace (TensorRT gives AOT plugins none) and no second launch. Tensors are TensorRT's
linear format (contiguous), so strides follow from the shapes; the cache length ``S`` and the
selected count ``k`` are the extra arguments. The float softmax scale is baked in as a
constexpr (TensorRT's extra arguments are integers only).

The same three functions serve TensorRT's ``aot_impl`` and the GPU test that launches the PTX
through the CUDA driver without TensorRT: :func:`compile_plugin_kernel` (the Triton compile
call), :func:`plugin_grid` and :func:`plugin_extra_args` (launch parameters; written with
``*``/``+`` only, so they take ints or TensorRT's symbolic shape expressions alike).
"""

from __future__ import annotations

import math
from typing import Any

import triton
import triton.language as tl

from . import PLUGIN_NAME, PLUGIN_NAMESPACE
from ._triton_util import next_pow2
from .selective_attention import _LOG2E, _selective_attention_kernel

PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}"
TRITON_TYPES = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}
BLOCK_N = 64
NUM_WARPS = 4


@triton.jit
def selective_attention_plugin_kernel(
    Q, K_Cache, V_Cache, Seqlens, Groups,  # inputs
    n_sel, s_max,  # extra int32 arguments
    Out,  # output
    N_KV: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, QK_SCALE_LOG2: tl.constexpr,
    DOT_PRECISION: tl.constexpr, K_PAD: tl.constexpr,
):
    stride_kh = s_max * HEAD_DIM
    stride_kb = N_KV * stride_kh
    stride_qb = N_KV * GROUP * HEAD_DIM
    _selective_attention_kernel(
        Q=Q, K_Cache=K_Cache, V_Cache=V_Cache, Seqlens=Seqlens, Groups=Groups,
        Partials=Out, Out=Out,  # one launch never touches the partials
        qk_scale_log2=QK_SCALE_LOG2, num_splits=1, n_sel=n_sel, n_kv=N_KV,
        stride_qb=stride_qb, stride_qh=HEAD_DIM,
        stride_kb=stride_kb, stride_kh=stride_kh, stride_ks=HEAD_DIM,
        stride_vb=stride_kb, stride_vh=stride_kh, stride_vs=HEAD_DIM, stride_vd=1,
        stride_gb=n_sel, Block_Table=Seqlens, stride_tb=0,  # contiguous: no table read
        K_Scale=Seqlens, V_Scale=Seqlens,  # unquantized: no scales read
        K_Sink=Seqlens, V_Sink=Seqlens, stride_sb=0, stride_sh=0,  # nor sinks
        stride_outb=stride_qb, stride_outh=HEAD_DIM,
        GROUP=GROUP, GROUP_PAD=GROUP_PAD, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N,
        USE_DOT=True, DOT_PRECISION=DOT_PRECISION, ONE_LAUNCH=True, K_PAD=K_PAD, PAGE=0,
    )


def plugin_constexprs(dtype: str, num_heads: int, num_kv_groups: int, head_dim: int,
                      num_selected: int, scale: float) -> dict[str, Any]:
    group = num_heads // num_kv_groups
    return {"N_KV": num_kv_groups, "GROUP": group, "GROUP_PAD": max(16, next_pow2(group)),
            "HEAD_DIM": head_dim, "BLOCK_D": max(16, next_pow2(head_dim)), "BLOCK_N": BLOCK_N,
            "QK_SCALE_LOG2": float(scale) * _LOG2E,
            "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32",
            "K_PAD": next_pow2(num_selected)}


def compile_plugin_kernel(dtype: str, num_heads: int, num_kv_groups: int, head_dim: int,
                          num_selected: int, scale: float | None = None, target: Any = None) -> Any:
    """The Triton compile call of the AOT implementation: returns the compiled kernel
    (``.asm["ptx"]``, ``.metadata.name``, ``.metadata.num_warps``, ``.metadata.shared``)."""
    if dtype not in TRITON_TYPES:
        raise ValueError(f"selective attention plugin: dtype must be one of {list(TRITON_TYPES)}, "
                         f"got {dtype!r}")
    if num_heads % num_kv_groups or not 1 <= num_selected <= num_kv_groups:
        raise ValueError(f"selective attention plugin: need Hq % Hkv == 0 and 1 <= k <= Hkv, got "
                         f"Hq={num_heads}, Hkv={num_kv_groups}, k={num_selected}")
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(head_dim)
    ptr = TRITON_TYPES[dtype]
    consts = plugin_constexprs(dtype, num_heads, num_kv_groups, head_dim, num_selected, scale)
    signature = {"Q": ptr, "K_Cache": ptr, "V_Cache": ptr, "Seqlens": "*i32", "Groups": "*i32",
                 "n_sel": "i32", "s_max": "i32", "Out": ptr, **{k: "constexpr" for k in consts}}
    src = triton.compiler.ASTSource(fn=selective_attention_plugin_kernel, signature=signature,
                                    constexprs=consts)
    compiled = triton.compile(src, target=target, options={"num_warps": NUM_WARPS, "num_stages": 3})
    if getattr(compiled.metadata, "global_scratch_size", 0) or \
            getattr(compiled.metadata, "profile_scratch_size", 0):
        raise RuntimeError("selective attention plugin: the compiled kernel needs scratch memory, "
                           "which TensorRT does not give AOT plugins")
    return compiled


def plugin_grid(batch: Any, num_selected: Any) -> tuple[Any, Any, Any]:
    """Launch grid (x, y, z) = (one split, every selected group, rows): the one-launch form."""
    return 1, num_selected, batch


def plugin_extra_args(num_selected: Any, cache_len: Any) -> list[Any]:
    """The extra int32 kernel arguments, in order: k (groups per row) and S (cache length)."""
    return [num_selected, cache_len]


_REGISTERED = False


def register_plugin() -> None:
    """Register the plugin with TensorRT (``tensorrt.plugin``; TensorRT >= 10.9). Import-time
    free: call it before parsing an ONNX graph that uses SelectiveHeadAttention."""
    global _REGISTERED
    if _REGISTERED:
        return
    import tensorrt as trt
    import tensorrt.plugin as trtp

    trt_types = {trt.float32: "fp32", trt.float16: "fp16", trt.bfloat16: "bf16"}

    @trtp.register(PLUGIN_ID)
    def _describe(q: trtp.TensorDesc, k_cache: trtp.TensorDesc, v_cache: trtp.TensorDesc,
                  cache_seqlens: trtp.TensorDesc, groups: trtp.TensorDesc, num_heads: int,
                  num_kv_groups: int, head_dim: int, num_selected: int, scale: float
                  ) -> trtp.TensorDesc:
        return q.like()

    @trtp.autotune(PLUGIN_ID)
    def _formats(q: trtp.TensorDesc, k_cache: trtp.TensorDesc, v_cache: trtp.TensorDesc,
                 cache_seqlens: trtp.TensorDesc, groups: trtp.TensorDesc,
                 outputs: tuple[trtp.TensorDesc]) -> list[trtp.AutoTuneCombination]:
        float_types = "FP32|FP16|BF16"
        return [trtp.AutoTuneCombination(
            f"{float_types}, {float_types}, {float_types}, INT32, INT32, {float_types}", "LINEAR")]

    @trtp.aot_impl(PLUGIN_ID)
    def _aot(q: trtp.TensorDesc, k_cache: trtp.TensorDesc, v_cache: trtp.TensorDesc,
             cache_seqlens: trtp.TensorDesc, groups: trtp.TensorDesc, num_heads: int,
             num_kv_groups: int, head_dim: int, num_selected: int, scale: float,
             outputs: tuple[trtp.TensorDesc], tactic: int
             ) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymExprs]:
        compiled = compile_plugin_kernel(trt_types[q.dtype], num_heads, num_kv_groups, head_dim,
                                         num_selected, scale)
        launch = trtp.KernelLaunchParams()
        launch.grid_x, launch.grid_y, launch.grid_z = plugin_grid(q.shape_expr[0], num_selected)
        launch.block_x = compiled.metadata.num_warps * 32
        launch.shared_mem = compiled.metadata.shared
        extra = plugin_extra_args(groups.shape_expr[1], k_cache.shape_expr[2])
        args = trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in extra])
        return compiled.metadata.name, compiled.asm["ptx"], launch, args

    _REGISTERED = True


class PtxKernel:
    """A compiled plugin kernel loaded from its PTX by the CUDA driver (ctypes, no TensorRT)
    and launched as TensorRT launches an AOT plugin: the given arguments in TensorRT's order,
    null for each hidden parameter, on the current torch stream. For checking and timing the
    plugin where TensorRT is not installed."""

    def __init__(self, compiled: Any) -> None:
        import ctypes
        import re

        self._ct = ctypes
        self._lib = ctypes.CDLL("libcuda.so.1")
        ptx, name = compiled.asm["ptx"], compiled.metadata.name
        entry = re.search(rf"\.entry\s+{name}\s*\((.*?)\)", ptx, re.S)
        if entry is None:
            raise RuntimeError(f"kernel {name} not found in its PTX")
        self.param_types = [p.split()[1] for p in entry.group(1).split(",")]
        self.block = compiled.metadata.num_warps * 32
        self.shared = compiled.metadata.shared
        self._module, self._func = ctypes.c_void_p(), ctypes.c_void_p()
        self._check(self._lib.cuModuleLoadData(ctypes.byref(self._module),
                                               ctypes.c_char_p(ptx.encode() + b"\0")),
                    "cuModuleLoadData")
        self._check(self._lib.cuModuleGetFunction(ctypes.byref(self._func), self._module,
                                                  name.encode()), "cuModuleGetFunction")
        if self.shared > 48 * 1024:  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8
            self._check(self._lib.cuFuncSetAttribute(self._func, 8, ctypes.c_int(self.shared)),
                        "cuFuncSetAttribute")

    @staticmethod
    def _check(result: int, what: str) -> None:
        if result != 0:
            raise RuntimeError(f"{what} failed with CUDA error {result}")

    def launch(self, grid: tuple[int, int, int], args: list[int], stream: int) -> None:
        """`args`: pointers and int32 values in the kernel's order (hidden ones omitted)."""
        ct = self._ct
        types = {".u64": ct.c_uint64, ".u32": ct.c_int32, ".s32": ct.c_int32}
        values = [types[t](args[i] if i < len(args) else 0) for i, t in enumerate(self.param_types)]
        pointers = (ct.c_void_p * len(values))(*[ct.addressof(v) for v in values])
        self._check(self._lib.cuLaunchKernel(
            self._func, *[ct.c_uint(int(g)) for g in grid], ct.c_uint(self.block), ct.c_uint(1),
            ct.c_uint(1), ct.c_uint(self.shared), ct.c_void_p(stream), pointers, None),
            "cuLaunchKernel")
