"""Weight-only FP8 linear layer: ``y = x @ (w * scale[:, None]).T (+ bias)``, the weight
streamed as float8 e4m3 (one byte a value) and widened in registers.

Decode GEMMs have 1-256 rows and are bound by the weight bytes they read, so halving those
bytes halves their floor; the activations stay in their dtype (no activation quantization).

Layouts:

- ``x``      ``[M, K]`` bf16/fp16/fp32, last axis contiguous (any row stride).
- ``w``      ``[N, K]`` float8_e4m3fn, contiguous: ``nn.Linear(K, N).weight`` quantized row by
  row (row n = output channel n), as `polarc.format.engine_file.quantize_rows` stores it.
- ``scale``  ``[N]`` float32: output channel n's weights are ``w[n] * scale[n]``.
- ``bias``   ``[N]`` x's dtype, or None.
- out        ``[M, N]`` x's dtype.

Algorithm: one program per (block of BLOCK_N output channels, block of BLOCK_M rows); it
streams its weight rows once over K in blocks of BLOCK_K, widens each float8 block to fp16
(one conversion instruction per two values on sm_89+; bf16 would take three) and accumulates
``x_block @ w_block.T`` in fp32 on the tensor cores with the rows of x cast to fp16 (fp32 x:
fp32 math throughout). The scale, the bias and the cast to x's dtype are the epilogue.
BLOCK_N shrinks until the output blocks fill the GPU (two programs per SM), so a decode-size
GEMM still keeps every SM streaming. The plan depends on shapes only (CUDA-graph safe).
fp16 holds every e4m3 value exactly; activations must stay within fp16's range (|x| < 65504),
true of the normalised inputs and MLP products of the models polarc builds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._triton_util import cdiv, check_launchable, next_pow2, num_sms
from .reference import FP8, fp8_linear_reference

__all__ = ["Fp8LinearPlan", "fp8_linear", "fp8_linear_reference", "plan_fp8_linear"]

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _fp8_linear_kernel(
    X, W, Scale, Bias, Y,
    M, N, K,
    stride_xm, stride_ym,
    HAS_BIAS: tl.constexpr, DOT_FP16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Grid (cdiv(N, BLOCK_N), cdiv(M, BLOCK_M)): one output block per program."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_ptrs = X + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
    w_ptrs = W + offs_n[:, None].to(tl.int64) * K + offs_k[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = (k0 + offs_k) < K
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        if DOT_FP16:
            acc = tl.dot(x.to(tl.float16), tl.trans(w.to(tl.float16)), acc)
        else:
            acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc,
                         input_precision="ieee")
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    acc = acc * tl.load(Scale + offs_n, mask=mask_n, other=0.0)[None, :]
    if HAS_BIAS:
        acc = acc + tl.load(Bias + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :],
             acc.to(Y.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@dataclass(frozen=True)
class Fp8LinearPlan:
    """Tiles of one fp8_linear call; a pure function of the shapes."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def plan_fp8_linear(m: int, n: int, k: int, *, sms: int) -> Fp8LinearPlan:
    """Rows in blocks of 16-64 (the MMA's smallest M is 16), BLOCK_K 128, and the largest
    BLOCK_N of 128, 64, 32, 16 whose output blocks make at least two programs per SM (the
    smallest when none does), so a few-row GEMM still spreads its weight over every SM."""
    block_m = min(64, max(16, next_pow2(m)))
    row_blocks = cdiv(m, block_m)
    block_n = next((bn for bn in (128, 64, 32) if cdiv(n, bn) * row_blocks >= 2 * sms), 16)
    return Fp8LinearPlan(block_m=block_m, block_n=block_n, block_k=128, num_warps=4,
                         num_stages=4)


def _check(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor,
           bias: torch.Tensor | None) -> None:
    if not all(isinstance(t, torch.Tensor) for t in (x, w, scale)):
        raise ValueError("fp8_linear: x, w and scale must be torch.Tensors")
    if x.dim() != 2 or x.dtype not in _DTYPES or x.stride(-1) != 1:
        raise ValueError(f"fp8_linear: x must be [M, K] bf16/fp16/fp32 with a contiguous last "
                         f"axis, got {x.dtype} {tuple(x.shape)}")
    if w.dim() != 2 or w.dtype != FP8 or not w.is_contiguous() or w.shape[1] != x.shape[1]:
        raise ValueError(f"fp8_linear: w must be contiguous float8_e4m3fn [N, K={x.shape[1]}], "
                         f"got {w.dtype} {tuple(w.shape)}")
    n = w.shape[0]
    if scale.dtype != torch.float32 or tuple(scale.shape) != (n,) or scale.stride(0) != 1:
        raise ValueError(f"fp8_linear: scale must be contiguous float32 [N={n}], got "
                         f"{scale.dtype} {tuple(scale.shape)}")
    if bias is not None and (tuple(bias.shape) != (n,) or bias.stride(0) != 1):
        raise ValueError(f"fp8_linear: bias must be contiguous [N={n}], got {tuple(bias.shape)}")
    devices = {t.device for t in (x, w, scale, bias) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"fp8_linear: all tensors must be on one device, got {devices}")


def fp8_linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor,
               bias: torch.Tensor | None = None, *, out: torch.Tensor | None = None,
               plan: Fp8LinearPlan | None = None) -> torch.Tensor:
    """``x @ (w * scale[:, None]).T + bias`` (layouts: module docstring); returns ``[M, N]``.

    Example::

        y = fp8_linear(x, w8, scale)  # x [B, 4096] bf16, w8 [14336, 4096] float8_e4m3fn
    """
    _check(x, w, scale, bias)
    check_launchable(_fp8_linear_kernel, x.device, "fp8_linear")
    m, k = x.shape
    n = w.shape[0]
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    elif out.shape != (m, n) or out.dtype != x.dtype or out.stride(-1) != 1:
        raise ValueError(f"fp8_linear: out must be {x.dtype} [{m}, {n}] with a contiguous last "
                         "axis")
    if m == 0:
        return out
    plan = plan or plan_fp8_linear(m, n, k, sms=num_sms(x.device))
    _fp8_linear_kernel[(cdiv(n, plan.block_n), cdiv(m, plan.block_m))](
        x, w, scale, bias if bias is not None else scale, out, m, n, k, x.stride(0),
        out.stride(0), HAS_BIAS=bias is not None, DOT_FP16=x.dtype != torch.float32,
        BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, BLOCK_K=plan.block_k,
        num_warps=plan.num_warps, num_stages=plan.num_stages)
    return out
