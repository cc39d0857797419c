"""The TensorRT plugin's kernel, checked without TensorRT.

CPU (interpreter): the plugin entry point (TensorRT's argument order, one launch, strides from
shapes) against the reference. Anywhere: the AOT compile call produces PTX for Hopper with the
parameters TensorRT will pass. GPU (`gpu`): that PTX loaded and launched through the CUDA
driver exactly as TensorRT launches an AOT plugin, against the reference.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from polarc.plugins.reference import selective_attention_reference
from polarc.plugins.tensorrt_plugin import (
    PtxKernel,
    compile_plugin_kernel,
    plugin_constexprs,
    plugin_extra_args,
    plugin_grid,
    selective_attention_plugin_kernel,
)

from tests.test_selective_attention import INTERPRETED, TOL, _inputs, _rel_err

CUDA = torch.cuda.is_available()
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
CASES = [  # b, hq, hkv, s, d, k
    (3, 8, 4, 37, 16, 2),    # GQA, odd length, rows of different lengths (one of length 1)
    (1, 4, 4, 70, 32, 1),    # MHA, B=1, k=1
    (2, 6, 2, 65, 16, 2),    # group of 3 (padded), k = Hkv (dense)
]


@pytest.mark.skipif(CUDA or not INTERPRETED, reason="interpreter check (CPU)")
@pytest.mark.parametrize("case", CASES)
def test_plugin_entry_point_matches_reference(case: tuple[int, ...]) -> None:
    b, hq, hkv, s, d, k = case
    q, kc, vc, seqlens, groups = _inputs(b, hq, hkv, s, d, k, torch.float32)
    out = torch.full_like(q, float("nan"))
    consts = plugin_constexprs("fp32", hq, hkv, d, k, 1 / math.sqrt(d))
    selective_attention_plugin_kernel[plugin_grid(b, k)](
        q, kc, vc, seqlens, groups, *plugin_extra_args(k, s), out, **consts)
    ref = selective_attention_reference(q.double(), kc.double(), vc.double(), seqlens, groups)
    assert not torch.isnan(out).any()
    assert _rel_err(out, ref) <= TOL[torch.float32]


def _entry_params(ptx: str, name: str) -> list[str]:
    body = re.search(rf"\.entry\s+{name}\s*\((.*?)\)", ptx, re.S)
    assert body, "kernel entry not found in the PTX"
    return [p.split()[1] for p in body.group(1).split(",")]  # .u64 / .u32 per parameter


COMPILE_SCRIPT = """
import json, re, sys
from triton.backends.compiler import GPUTarget
from polarc.plugins.tensorrt_plugin import compile_plugin_kernel
res = {}
for dtype in ("bf16", "fp16", "fp32"):
    c = compile_plugin_kernel(dtype, 32, 8, 128, 4, target=GPUTarget("cuda", 90, 32))
    res[dtype] = {"ptx": c.asm["ptx"], "name": c.metadata.name, "warps": c.metadata.num_warps}
json.dump(res, sys.stdout)
"""


def test_aot_compile_gives_hopper_ptx(tmp_path: Path) -> None:
    """The AOT implementation's compile call (run without the interpreter, in a subprocess:
    Triton compiles for a Hopper target here even without a GPU)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], capture_output=True, text=True,
                          env=env, timeout=600, cwd=tmp_path)  # cwd: import the installed polarc
    assert proc.returncode == 0, proc.stderr[-2000:]
    for dtype, res in json.loads(proc.stdout).items():
        assert ".target sm_90" in res["ptx"], dtype
        params = _entry_params(res["ptx"], res["name"])
        # inputs (5 pointers), k and S (int32), output (pointer), then Triton's hidden scratch
        # pointers, which TensorRT passes as null
        assert params[:8] == [".u64"] * 5 + [".u32"] * 2 + [".u64"], (dtype, params)
        assert all(p == ".u64" for p in params[8:])
        assert res["warps"] == 4


def test_plugin_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="1 <= k <= Hkv"):
        compile_plugin_kernel("bf16", 32, 8, 128, 9)
    with pytest.raises(ValueError, match="dtype"):
        compile_plugin_kernel("int8", 32, 8, 128, 4)


# --------------------------------------------------------------------------- GPU: launch the PTX


GPU_CASES = [  # b, hq, hkv, s, d, k
    (4, 32, 8, 1000, 128, 4),   # Llama-3-8B heads, half the groups, rows of different lengths
    (4, 32, 8, 1000, 128, 8),   # all groups (dense)
    (3, 32, 32, 777, 128, 1),   # Llama-2-7B (MHA), k = 1
    (2, 9, 3, 300, 64, 2),      # SmolLM2 heads: group of 3
]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("case", GPU_CASES)
def test_aot_ptx_launched_by_driver_matches_reference(case: tuple[int, ...], dtype) -> None:
    b, hq, hkv, s, d, k = case
    q, kc, vc, seqlens, groups = _inputs(b, hq, hkv, s, d, k, dtype, device="cuda")
    out = torch.full_like(q, float("nan"))
    kernel = PtxKernel(compile_plugin_kernel(DTYPE_NAMES[dtype], hq, hkv, d, k, 1 / math.sqrt(d)))
    assert len(kernel.param_types) >= 8
    args = [q.data_ptr(), kc.data_ptr(), vc.data_ptr(), seqlens.data_ptr(), groups.data_ptr(),
            *plugin_extra_args(k, s), out.data_ptr()]
    kernel.launch(plugin_grid(b, k), args, torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    ref = selective_attention_reference(q.double(), kc.double(), vc.double(), seqlens, groups)
    assert not torch.isnan(out).any()
    assert _rel_err(out, ref) <= TOL[dtype]


# --------------------------------------------------------------------------- without TensorRT


def _has_tensorrt() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(_has_tensorrt(), reason="TensorRT is installed here")
def test_tensorrt_backend_says_what_to_install(tiny_dirs: dict, tmp_path) -> None:
    from polarc.exporters.engine import BuildConfig, build_engine

    from polarc.format.engine_file import read_manifest, write_container
    from polarc.models import load_model
    from tests.conftest import one_line_error, run

    out = tmp_path / "engine.plan"
    code, _, stderr = run("build", "-m", tiny_dirs["llama-gqa"], "--backend", "tensorrt", "-o", out)
    one_line_error(code, stderr, "TensorRT is not installed")
    assert "--backend torch" in stderr and "10.9" in stderr
    assert not out.exists()

    # an engine file of the tensorrt backend (plans are placeholders: never reached)
    torch_engine = tmp_path / "torch.plan"
    build_engine(load_model(str(tiny_dirs["llama-gqa"])), None, BuildConfig(out=torch_engine, max_seq=64))
    manifest = {**read_manifest(torch_engine), "backend": "tensorrt"}
    blob = torch.zeros(16, dtype=torch.uint8)
    write_container({"tensorrt.decode": blob, "tensorrt.prefill": blob.clone()}, manifest, out)
    code, _, stderr = run("run", out, "--max-new-tokens", "2")
    one_line_error(code, stderr, "TensorRT is not installed")

    bare = tmp_path / "bare.plan"
    bare.write_bytes(b"ftrt" + bytes(64))
    code, _, stderr = run("run", bare)
    one_line_error(code, stderr, "bare TensorRT plan")
    code, _, stderr = run("run", tmp_path / "model.onnx")
    one_line_error(code, stderr, "does not exist")
