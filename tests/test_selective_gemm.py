"""Selective GEMM pair (ReLU MLP) against its plain-torch reference."""

from __future__ import annotations

import pytest
import torch
from polarc.plugins.reference import selective_gemm_down_reference, selective_gemm_up_reference
from polarc.plugins.selective_gemm import (
    GemmWorkspace,
    _selective_gemm_up_kernel,
    plan_selective_gemm,
    selective_gemm_down,
    selective_gemm_up,
    selective_gemm_workspace,
)

CUDA = torch.cuda.is_available()
INTERPRETED = type(_selective_gemm_up_kernel).__name__ == "InterpretedFunction"
DEVICE = "cuda" if CUDA else "cpu"
needs_kernel = pytest.mark.skipif(
    not CUDA and not INTERPRETED,
    reason="triton was imported before TRITON_INTERPRET=1 was set and there is no CUDA")
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 1e-2}


def _inputs(b, d, n_total, n, d_out, dtype, *, bias=True, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g).to(device, dtype)
    w1 = (torch.randn(n_total, d, generator=g) / d**0.5).to(device, dtype)
    b1 = (0.1 * torch.randn(n_total, generator=g)).to(device, dtype) if bias else None
    w2t = (torch.randn(n_total, d_out, generator=g) / n**0.5).to(device, dtype)
    idx = torch.randperm(n_total, generator=g)[:n].int().to(device)  # unsorted
    return x, w1, b1, w2t, idx


def _rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _check(b, d, n_total, n, d_out, dtype, *, bias=True, up_plan=None, down_plan=None, seed=0):
    x, w1, b1, w2t, idx = _inputs(b, d, n_total, n, d_out, dtype, bias=bias, seed=seed)
    h = torch.full((b, n), float("nan"), dtype=dtype, device=x.device)
    assert selective_gemm_up(x, w1, b1, idx, out=h, plan=up_plan) is h
    h_ref = selective_gemm_up_reference(x.double(), w1.double(),
                                        None if b1 is None else b1.double(), idx)
    assert not torch.isnan(h).any()
    assert (h >= 0).all()
    assert _rel_err(h, h_ref) <= TOL[dtype]
    # down-projection on the reference activations, so its error is its own
    h_in = h_ref.to(dtype)
    o = torch.full((b, d_out), float("nan"), dtype=dtype, device=x.device)
    assert selective_gemm_down(h_in, w2t, idx, out=o, plan=down_plan) is o
    o_ref = selective_gemm_down_reference(h_in.double(), w2t.double(), idx)
    assert not torch.isnan(o).any()
    assert _rel_err(o, o_ref) <= TOL[dtype]
    # the definition with the nn.Linear layout of the down weight
    w2 = w2t.T
    torch.testing.assert_close(o_ref, h_in.double() @ w2[:, idx.long()].double().T)


def _plan(m, n_out, k, **kw):
    kw = {"block_m": 16, "block_n": 16, "block_k": 16, **kw}
    return plan_selective_gemm(m, n_out, k, sms=4, **kw)


@needs_kernel
@pytest.mark.parametrize(
    "b, d, n_total, n, d_out, bias, split",
    [
        (1, 40, 100, 37, 24, True, 1),    # B=1, odd sizes, no split
        (5, 64, 96, 20, 48, True, 3),     # split-K with bias + ReLU in the reduce
        (17, 48, 80, 9, 40, False, 2),    # B over one M tile, no bias
        (3, 32, 64, 64, 32, True, 1),     # all neurons selected (dense)
        (2, 24, 50, 1, 16, True, 2),      # a single neuron
    ],
)
def test_matches_reference_fp32(b, d, n_total, n, d_out, bias, split):
    _check(b, d, n_total, n, d_out, torch.float32, bias=bias,
           up_plan=_plan(b, n, d, split_k=split), down_plan=_plan(b, d_out, n, split_k=split))


@needs_kernel
def test_fp16_default_plan():
    _check(4, 64, 128, 48, 64, torch.float16)


@needs_kernel
def test_custom_ops_and_strided_down_weight():
    x, w1, b1, w2t, idx = _inputs(3, 32, 64, 20, 24, torch.float32, seed=4)
    h = torch.ops.polarc.selective_gemm_up(x, w1, b1, idx)
    torch.testing.assert_close(h, selective_gemm_up_reference(x, w1, b1, idx))
    # a transposed view of the nn.Linear weight computes the same (slower) result
    w2 = w2t.T.contiguous()
    o = torch.ops.polarc.selective_gemm_down(h, w2.T, idx)
    torch.testing.assert_close(o, selective_gemm_down_reference(h, w2t, idx))


@needs_kernel
def test_workspace_reused_across_calls():
    """Split-K counters are reset by the kernel, so one workspace serves call after call."""
    x, w1, b1, w2t, idx = _inputs(3, 64, 96, 40, 48, torch.float32, seed=6)
    up_plan = _plan(3, 40, 64, split_k=3)
    down_plan = _plan(3, 48, 40, split_k=2)
    ws = selective_gemm_workspace(3, 48, up_plan, x.device)
    assert isinstance(ws, GemmWorkspace)
    for _ in range(3):
        h = selective_gemm_up(x, w1, b1, idx, workspace=ws, plan=up_plan)
        torch.testing.assert_close(h, selective_gemm_up_reference(x, w1, b1, idx))
        o = selective_gemm_down(h, w2t, idx, workspace=ws, plan=down_plan)
        torch.testing.assert_close(o, selective_gemm_down_reference(h, w2t, idx))
        assert (ws.counters == 0).all()
    small = selective_gemm_workspace(1, 8, up_plan, x.device)
    with pytest.raises(ValueError, match="workspace too small"):
        selective_gemm_up(x, w1, b1, idx, workspace=small, plan=up_plan)


def test_plan_splits_small_problems():
    p = plan_selective_gemm(1, 1664, 4096, sms=132)
    assert p.split_k > 1 and p.block_m == 16
    assert plan_selective_gemm(256, 16384, 4096, sms=132).split_k == 1


def _args(**change):
    x, w1, b1, w2t, idx = _inputs(2, 16, 32, 8, 16, torch.float32, device="cpu")
    args = dict(x=x, w1=w1, b1=b1, idx=idx)
    args.update(change)
    return args


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(idx=torch.tensor([0, 32], dtype=torch.int32)), "outside \\[0, N=32\\)"),
        (dict(idx=torch.tensor([-1], dtype=torch.int32)), "outside"),
        (dict(idx=torch.tensor([0, 1])), "int32"),
        (dict(x=torch.randn(2, 16).double()), "dtype"),
        (dict(w1=torch.randn(32, 16).half()), "share one dtype"),
        (dict(w1=torch.randn(32, 15)), "neuron-major"),
        (dict(b1=torch.randn(31)), "b1 must be"),
    ],
)
def test_up_wrong_inputs(change, message):
    with pytest.raises(ValueError, match=message):
        selective_gemm_up(**_args(**change))


def test_down_wrong_inputs():
    h = torch.randn(2, 8)
    w2t = torch.randn(32, 16)
    with pytest.raises(ValueError, match="idx has 3"):
        selective_gemm_down(h, w2t, torch.arange(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="outside"):
        selective_gemm_down(h, w2t, torch.arange(25, 33, dtype=torch.int32))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("b", [1, 16, 64, 256])
@pytest.mark.parametrize("density", [0.1, 0.5, 1.0])
def test_gpu_opt_shapes_bf16(b, density):
    n = int(16384 * density)
    _check(b, 4096, 16384, n, 4096, torch.bfloat16, seed=b)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_gpu_odd_shapes(dtype):
    _check(7, 1000, 3000, 777, 999, dtype, seed=2)


@needs_kernel
def test_custom_ops_fake_and_compile():
    """The torch.library ops have working fakes; torch.compile traces through the wrappers."""
    x, w1, b1, w2t, idx = _inputs(3, 16, 32, 5, 8, torch.float32, seed=8)
    h = selective_gemm_up_reference(x, w1, b1, idx)
    torch.library.opcheck(torch.ops.polarc.selective_gemm_up.default, (x, w1, b1, idx))
    torch.library.opcheck(torch.ops.polarc.selective_gemm_down.default, (h, w2t, idx))

    def mlp(x):
        h = selective_gemm_up(x, w1, b1, idx, check_indices=False)
        return selective_gemm_down(h, w2t, idx, check_indices=False)

    compiled = torch.compile(mlp, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), selective_gemm_down_reference(h, w2t, idx))
