"""Weight-only FP8 linear kernel against its plain-torch reference (interpreter on the CPU in
fp32; real shapes in bf16 on CUDA)."""

from __future__ import annotations

import pytest
import torch
from polarc.plugins.fp8_linear import (
    _fp8_linear_kernel,
    fp8_linear,
    fp8_linear_reference,
    plan_fp8_linear,
)

from polarc.format.engine_file import quantize_rows

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
needs_kernel = pytest.mark.skipif(
    not CUDA and type(_fp8_linear_kernel).__name__ != "InterpretedFunction",
    reason="triton was imported before TRITON_INTERPRET=1 was set and there is no CUDA")


def _inputs(m, n, k, dtype, *, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(DEVICE, dtype)
    w, scale = quantize_rows(torch.randn(n, k, generator=g) / k ** 0.5)
    b = torch.randn(n, generator=g).to(DEVICE, dtype) if bias else None
    return x, w.to(DEVICE), scale.to(DEVICE), b


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@needs_kernel
@pytest.mark.parametrize("m, n, k, bias", [
    (1, 40, 64, False),     # one row (decode, one sequence), N not a multiple of the block
    (5, 96, 200, True),     # K not a multiple of BLOCK_K, bias
    (33, 20, 130, False),   # rows over two blocks
])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_matches_reference(m, n, k, bias, dtype, tol):
    """fp32 computes in fp32; fp16 (like bf16 on the GPU) widens the weights to fp16 for the
    tensor cores (bf16 dots are wrong in Triton's interpreter: bf16 runs on the GPU only)."""
    x, w, scale, b = _inputs(m, n, k, dtype, bias=bias)
    out = torch.full((m, n), float("nan"), device=DEVICE, dtype=dtype)
    fp8_linear(x, w, scale, b, out=out)
    assert not torch.isnan(out).any()
    assert _rel(out, fp8_linear_reference(x.double(), w, scale, b)) < tol


@needs_kernel
def test_quantized_weights_stay_close_to_the_originals():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 64, generator=g).to(DEVICE)
    w_full = torch.randn(48, 64, generator=g) / 8
    w, scale = quantize_rows(w_full)
    got = fp8_linear(x, w.to(DEVICE), scale.to(DEVICE))
    assert _rel(got, x @ w_full.to(DEVICE).T) < 0.06  # e4m3 keeps 3 mantissa bits


def test_plan_fills_the_gpu_with_few_rows():
    assert plan_fp8_linear(1, 4096, 4096, sms=132).block_n == 16  # 256 programs
    assert plan_fp8_linear(1, 28672, 4096, sms=132).block_n == 64
    assert plan_fp8_linear(256, 28672, 4096, sms=132) == plan_fp8_linear(
        256, 28672, 4096, sms=132)  # deterministic
    assert plan_fp8_linear(256, 28672, 4096, sms=132).block_m == 64


@needs_kernel
@pytest.mark.parametrize(("change", "message"), [
    (dict(x=torch.randn(3, 8, 64)), r"x must be \[M, K\]"),
    (dict(w=torch.randn(16, 64)), "w must be contiguous float8_e4m3fn"),
    (dict(w=torch.zeros(16, 32).to(torch.float8_e4m3fn)), r"\[N, K=64\]"),
    (dict(scale=torch.ones(16, dtype=torch.float64)), "scale must be contiguous float32"),
    (dict(bias=torch.ones(15)), r"bias must be contiguous \[N=16\]"),
])
def test_wrong_inputs_raise_clear_errors(change, message):
    args = dict(x=torch.randn(3, 64), w=torch.zeros(16, 64).to(torch.float8_e4m3fn),
                scale=torch.ones(16), bias=None)
    args.update(change)
    with pytest.raises(ValueError, match=message):
        fp8_linear(args["x"], args["w"], args["scale"], args["bias"])


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("m", [1, 16, 100, 256])
@pytest.mark.parametrize(("n", "k"), [(6144, 4096), (4096, 14336)])
def test_gpu_llama_shapes_bf16(m, n, k):
    x, w, scale, _ = _inputs(m, n, k, torch.bfloat16)
    got = fp8_linear(x, w, scale)
    assert _rel(got, fp8_linear_reference(x.double(), w, scale)) < 1e-2
