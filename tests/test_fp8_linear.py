"""Weight-only FP8 linear kernel against its plain-torch reference (interpreter on the CPU in
fp32; real shapes in bf16 on CUDA)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from polarc.plugins._triton_util import cdiv, next_pow2, split_counters
from polarc.plugins.fp8_linear import (
    Fp8LinearPlan,
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


@needs_kernel
@pytest.mark.parametrize("swap_ab", [False, True])
@pytest.mark.parametrize("split", [1, 2, 4])
@pytest.mark.parametrize("m, n, k, bias", [
    (5, 40, 200, True),     # K = 7 blocks of 32 (not whole): ranges 128+72, 64x3+8
    (33, 20, 256, False),   # rows over three blocks, N over two; K whole blocks (no K mask)
    (1, 24, 64, True),      # two K blocks: split 4 leaves two ranges empty (zero partials)
])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_split_k_matches_reference(swap_ab, split, m, n, k, bias, dtype, tol):
    """Every split writes its partial; the last of each tile adds them and runs the epilogue;
    the same with the product formed transposed (weight tile on the left)."""
    x, w, scale, b = _inputs(m, n, k, dtype, bias=bias, seed=split)
    plan = Fp8LinearPlan(block_m=16, block_n=16, block_k=32, num_warps=4, num_stages=2,
                         split_k=split, swap_ab=swap_ab)
    out = torch.full((m, n), float("nan"), device=DEVICE, dtype=dtype)
    fp8_linear(x, w, scale, b, out=out, plan=plan)
    assert not torch.isnan(out).any()
    assert _rel(out, fp8_linear_reference(x.double(), w, scale, b)) < tol


@needs_kernel
@pytest.mark.parametrize("swap_ab", [False, True])
@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("m, f, k, bias", [
    (5, 20, 200, True),     # F = 20: the last block holds 4 channels of 8 (masked pairs)
    (33, 24, 96, False),    # rows over three blocks, F over three
])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_swiglu_epilogue_matches_reference(swap_ab, split, m, f, k, bias, dtype, tol):
    """w = [gate; up] ``[2F, K]``: each block pairs gate and up rows of the same channels and
    writes silu(gate) * up ``[M, F]`` (split-K: after the last split's sum)."""
    x, w, scale, b = _inputs(m, 2 * f, k, dtype, bias=bias, seed=split)
    plan = Fp8LinearPlan(block_m=16, block_n=16, block_k=32, num_warps=4, num_stages=2,
                         split_k=split, swap_ab=swap_ab)
    out = torch.full((m, f), float("nan"), device=DEVICE, dtype=dtype)
    fp8_linear(x, w, scale, b, out=out, plan=plan, swiglu=True)
    assert not torch.isnan(out).any()
    assert _rel(out, fp8_linear_reference(x.double(), w, scale, b, swiglu=True)) < tol
    plain = fp8_linear_reference(x.double(), w, scale, b)  # the two-step way, for meaning
    gate, up = plain[:, :f], plain[:, f:]
    assert _rel(out, torch.nn.functional.silu(gate) * up) < tol


@needs_kernel
def test_split_k_counters_reset_so_calls_repeat_exactly():
    """The last split of each tile resets its counter: a second call (same cached counters)
    gives the same bits, and the counters are all zero afterwards."""
    x, w, scale, b = _inputs(20, 48, 160, torch.float16, bias=True, seed=5)
    plan = Fp8LinearPlan(block_m=16, block_n=16, block_k=32, num_warps=4, num_stages=2,
                         split_k=4)
    first = fp8_linear(x, w, scale, b, plan=plan)
    second = fp8_linear(x, w, scale, b, plan=plan)
    assert torch.equal(first, second)
    assert (split_counters(x.device, 1) == 0).all()


@needs_kernel
def test_planned_split_matches_reference():
    """A few rows over a long K on 4 (CPU) SMs: the planner's own plan splits K."""
    x, w, scale, _ = _inputs(2, 64, 2048, torch.float16, seed=6)
    plan = plan_fp8_linear(2, 64, 2048, sms=4)
    assert plan.split_k > 1
    assert _rel(fp8_linear(x, w, scale), fp8_linear_reference(x.double(), w, scale)) < 2e-3


def test_split_counters_grow_and_start_at_zero():
    small = split_counters(torch.device("cpu"), 3)
    big = split_counters(torch.device("cpu"), small.numel() + 1)
    assert big.numel() > small.numel() and big.dtype == torch.int32 and (big == 0).all()
    assert split_counters(torch.device("cpu"), 3) is big  # cached


LLAMA_DECODE = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096)]


@pytest.mark.parametrize("n, k", LLAMA_DECODE)
@pytest.mark.parametrize("m", [1, 8, 16, 32])
def test_plan_decode_keeps_every_sm_streaming(m, n, k):
    """Llama-3-8B decode GEMMs on an H100/H200 (132 SMs): 1.5 programs per SM (the rule in
    plan_fp8_linear's docstring), with the fewest K splits that reach it; above 16 rows at
    most 4 splits."""
    p = plan_fp8_linear(m, n, k, sms=132)
    tiles = cdiv(n, p.block_n) * cdiv(m, p.block_m)
    most = 8 if m <= 16 else 4
    assert tiles * p.split_k >= 1.5 * 132 or p.split_k == most
    assert p.split_k == 1 or tiles * (p.split_k // 2) < 1.5 * 132


def test_plan_splits_decode_but_not_large_batches():
    assert plan_fp8_linear(1, 4096, 4096, sms=132).split_k > 1
    assert plan_fp8_linear(256, 28672, 4096, sms=132).split_k == 1
    assert plan_fp8_linear(256, 28672, 4096, sms=132).block_m == 64


def test_plans_are_valid_for_many_shapes():
    """Pure function of the shapes; tiles the kernel takes; no split beyond K's blocks."""
    for sms in (4, 108, 132):
        for m in (1, 2, 7, 16, 17, 32, 33, 64, 100, 256, 1000):
            for n in (16, 40, 4096, 28672, 128256):
                for k in (16, 64, 200, 4096, 14336):
                    p = plan_fp8_linear(m, n, k, sms=sms)
                    assert p == plan_fp8_linear(m, n, k, sms=sms)
                    assert p.block_m == min(64, max(16, next_pow2(m)))
                    assert p.block_n == 128 and p.block_k == (128 if m <= 32 else 64)
                    assert p.split_k in ((1, 2, 4, 8) if m <= 16 else (1, 2, 4))
                    assert p.split_k == 1 or p.split_k <= cdiv(k, p.block_k)


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
@pytest.mark.parametrize("m", [1, 16, 32, 100, 256])
@pytest.mark.parametrize(("n", "k"), [(6144, 4096), (4096, 14336)])
@pytest.mark.parametrize("swap_ab", [False, True])
def test_gpu_llama_shapes_bf16(m, n, k, swap_ab):
    x, w, scale, _ = _inputs(m, n, k, torch.bfloat16)
    plan = dataclasses.replace(plan_fp8_linear(m, n, k, sms=132), swap_ab=swap_ab)
    got = fp8_linear(x, w, scale, plan=plan)
    assert _rel(got, fp8_linear_reference(x.double(), w, scale)) < 1e-2


@needs_kernel
def test_swiglu_needs_gate_and_up_rows():
    x, w, scale, _ = _inputs(2, 7, 32, torch.float32)
    with pytest.raises(ValueError, match="swiglu needs gate and up rows, an even N, got N=7"):
        fp8_linear(x, w, scale, swiglu=True)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("m", [1, 32, 256])
def test_gpu_swiglu_llama_gate_up_bf16(m):
    """Llama-3-8B's gate_up (F = 14336) with the SwiGLU epilogue, at the planner's plans."""
    x, w, scale, _ = _inputs(m, 2 * 14336, 4096, torch.bfloat16)
    got = fp8_linear(x, w, scale, swiglu=True)
    assert _rel(got, fp8_linear_reference(x.double(), w, scale, swiglu=True)) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("swap_ab", [False, True])
def test_gpu_split_k_graph_replays_match_eager_bitwise(swap_ab):
    """Split-K in a CUDA graph: counters stay zero across replays, the sum order is fixed."""
    x, w, scale, b = _inputs(16, 4096, 4096, torch.bfloat16, bias=True)
    plan = Fp8LinearPlan(block_m=16, block_n=64, block_k=256, num_warps=4, num_stages=4,
                         split_k=8, swap_ab=swap_ab)
    eager = fp8_linear(x, w, scale, b, plan=plan)
    out = torch.empty_like(eager)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fp8_linear(x, w, scale, b, out=out, plan=plan)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fp8_linear(x, w, scale, b, out=out, plan=plan)
    for _ in range(3):
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager)


@needs_kernel
@pytest.mark.parametrize("swiglu", [False, True])
@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("m, n, k", [(5, 40, 200), (17, 48, 300), (3, 256, 128)])
def test_tiled_weight_matches_reference(swiglu, split, m, n, k):
    """The weight laid out tile by tile as a loaded engine keeps it on CUDA (each program's K
    block one contiguous run, padded past N and K; SwiGLU's gate and up rows interleaved in
    the layout): the same products; `untile_fp8` gives the weight back."""
    from polarc.format.engine_file import tile_fp8, untile_fp8

    x, w, scale, b = _inputs(m, n, k, torch.float32, bias=True, seed=split)
    tiled = tile_fp8(w, swiglu=swiglu)
    assert tiled.shape == (cdiv(n, 128), cdiv(k, 128), 128, 128)
    assert torch.equal(untile_fp8(tiled, n, k, swiglu=swiglu).view(torch.uint8),
                       w.view(torch.uint8))
    plan = Fp8LinearPlan(block_m=16, block_n=16, block_k=32, num_warps=4, num_stages=2,
                         split_k=split)  # (the tiles set BLOCK_N and BLOCK_K)
    want = fp8_linear_reference(x.double(), w, scale, b, swiglu=swiglu)
    assert _rel(fp8_linear(x, tiled, scale, b, plan=plan, swiglu=swiglu), want) < 1e-5
    other = tile_fp8(w, swiglu=swiglu, tile=(32, 64))  # a benchmark's other tile shape
    assert _rel(fp8_linear(x, other, scale, b, plan=plan, swiglu=swiglu), want) < 1e-5


@pytest.mark.parametrize("swiglu", [False, True])
@pytest.mark.parametrize("n, k, tile", [(48, 300, (128, 128)), (256, 384, (128, 128)),
                                        (128, 192, (32, 64))])
def test_widen_fp8_from_rows_and_tiles(swiglu, n, k, tile):
    """Prefill's widened weight, from the rows or from the tiles (in place through strided
    views where the tiles cover the weight exactly, else through `untile_fp8`): bitwise the
    fp32 product rounded once to the dtype."""
    from polarc.format.engine_file import tile_fp8, widen_fp8

    _, w, scale, _ = _inputs(1, n, k, torch.float32, bias=False, seed=n)
    for dtype in (torch.bfloat16, torch.float32):
        want = (w.float() * scale[:, None]).to(dtype)
        assert torch.equal(widen_fp8(w, scale, k, dtype), want)
        tiled = tile_fp8(w, swiglu=swiglu, tile=tile)
        assert torch.equal(widen_fp8(tiled, scale, k, dtype, swiglu=swiglu), want)


def _stream_and_norm(m, k, dtype, parts, seed=0):
    """A residual stream x [M, K], an RMSNorm weight and x's sums of squares in `parts` column
    ranges (as a producing GEMM's tiles leave them)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) * 3).to(DEVICE, dtype)
    weight = (1 + torch.randn(k, generator=g) / 4).to(DEVICE, dtype)
    sumsq = torch.stack([c.float().pow(2).sum(-1) for c in x.tensor_split(parts, dim=1)])
    return x, weight, sumsq.contiguous()


@needs_kernel
@pytest.mark.parametrize("tiled", [False, True])
@pytest.mark.parametrize("swap_ab", [False, True])
@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("m, n, k, bias", [(5, 40, 200, True), (17, 48, 96, False)])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_residual_epilogue_matches_reference(tiled, swap_ab, split, m, n, k, bias, dtype, tol):
    """``residual + x @ W.T`` and each output tile's per-row sums of squares of the sum (what
    the next RMSNorm needs): the tiles' sums add up to the rows'."""
    from polarc.format.engine_file import tile_fp8

    x, w, scale, b = _inputs(m, n, k, dtype, bias=bias, seed=split)
    residual = torch.randn(m, n, generator=torch.Generator().manual_seed(9)).to(DEVICE, dtype)
    plan = Fp8LinearPlan(block_m=16, block_n=16, block_k=32, num_warps=4, num_stages=2,
                         split_k=split, swap_ab=swap_ab)
    weight = tile_fp8(w, tile=(16, 32)) if tiled else w
    h, sumsq = fp8_linear(x, weight, scale, b, plan=plan, residual=residual)
    want_h, want_sumsq = fp8_linear_reference(x, w, scale, b, residual=residual)
    assert sumsq.shape == (cdiv(n, 16), m) and sumsq.dtype == torch.float32
    assert _rel(h, want_h) < tol
    assert _rel(sumsq.sum(0), want_sumsq[0]) < tol
    assert _rel(want_h, residual.double() + fp8_linear_reference(x.double(), w, scale, b)) < tol
    assert torch.allclose(want_sumsq[0], want_h.float().pow(2).sum(-1))


@needs_kernel
@pytest.mark.parametrize("swiglu", [False, True])
@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("parts", [1, 3, 5])
@pytest.mark.parametrize("m, n, k", [(5, 40, 200), (17, 48, 96)])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_norm_prologue_matches_reference(swiglu, split, parts, m, n, k, dtype, tol):
    """x is the residual stream and the kernel RMS-normalizes it as it reads, from sums of
    squares in parts: the same as normalizing first (`polarc.models.layers.norm`)."""
    from polarc.models.layers import norm

    x, w, scale, _ = _inputs(m, n, k, dtype, seed=split)
    stream, weight, sumsq = _stream_and_norm(m, k, dtype, parts)
    plan = Fp8LinearPlan(block_m=16, block_n=16, block_k=32, num_warps=4, num_stages=2,
                         split_k=split)
    got = fp8_linear(stream, w, scale, plan=plan, swiglu=swiglu, norm_weight=weight,
                     norm_sumsq=sumsq, norm_eps=1e-5)
    want = fp8_linear_reference(stream, w, scale, swiglu=swiglu, norm_weight=weight,
                                norm_sumsq=sumsq, norm_eps=1e-5)
    assert _rel(got, want) < tol
    normed = norm(stream, weight, None, 1e-5)
    assert _rel(want, fp8_linear_reference(normed, w, scale, swiglu=swiglu)) < tol


@needs_kernel
def test_residual_then_norm_chain_matches_the_unfused_layer():
    """o with the add, then gate_up reading the normed stream: the two-launch form of ``h +=
    o(a); y = gate_up(norm(h))``, against the three stages apart."""
    from polarc.models.layers import norm

    a, w_o, s_o, _ = _inputs(6, 64, 48, torch.float32, seed=1)
    _, w_up, s_up, _ = _inputs(6, 80, 64, torch.float32, seed=2)
    h = torch.randn(6, 64, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    weight = torch.rand(64, generator=torch.Generator().manual_seed(4)).to(DEVICE) + 0.5
    plan = Fp8LinearPlan(block_m=16, block_n=16, block_k=32, num_warps=4, num_stages=2)
    h2, sumsq = fp8_linear(a, w_o, s_o, plan=plan, residual=h)
    got = fp8_linear(h2, w_up, s_up, plan=plan, swiglu=True, norm_weight=weight,
                     norm_sumsq=sumsq, norm_eps=1e-6)
    h_want = h + fp8_linear_reference(a, w_o, s_o)
    want = fp8_linear_reference(norm(h_want, weight, None, 1e-6), w_up, s_up, swiglu=True)
    assert _rel(h2, h_want) < 1e-5 and _rel(got, want) < 1e-5


@needs_kernel
@pytest.mark.parametrize(("change", "message"), [
    (dict(swiglu=True), "residual and swiglu do not combine"),
    (dict(residual=torch.zeros(3, 15)), r"residual must be torch.float32 \[3, 16\]"),
    (dict(residual=None, norm_weight=torch.ones(64)), "norm_weight and norm_sumsq go together"),
    (dict(residual=None, norm_weight=torch.ones(63), norm_sumsq=torch.ones(2, 3)),
     r"norm_weight must be contiguous \[K=64\]"),
    (dict(residual=None, norm_weight=torch.ones(64), norm_sumsq=torch.ones(2, 4)),
     r"norm_sumsq contiguous float32 \[P, M=3\]"),
])
def test_fused_norm_inputs_raise_clear_errors(change, message):
    args = dict(residual=torch.zeros(3, 16))
    args.update(change)
    with pytest.raises(ValueError, match=message):
        fp8_linear(torch.randn(3, 64), torch.zeros(16, 64).to(torch.float8_e4m3fn),
                   torch.ones(16), **args)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("m", [1, 32, 256])
def test_gpu_llama_o_residual_then_normed_gate_up_bf16(m):
    """Llama-3-8B's o with the residual add, then its gate_up reading the normed stream, at
    the planner's plans on tiled weights, against the references."""
    from polarc.format.engine_file import tile_fp8

    a, w_o, s_o, _ = _inputs(m, 4096, 4096, torch.bfloat16, seed=1)
    _, w_up, s_up, _ = _inputs(m, 2 * 14336, 4096, torch.bfloat16, seed=2)
    h = (torch.randn(m, 4096, generator=torch.Generator().manual_seed(3)) * 4).to(
        DEVICE, torch.bfloat16)
    weight = (torch.rand(4096, generator=torch.Generator().manual_seed(4)) + 0.5).to(
        DEVICE, torch.bfloat16)
    h2, sumsq = fp8_linear(a, tile_fp8(w_o), s_o, residual=h)
    h_want, sumsq_want = fp8_linear_reference(a, w_o, s_o, residual=h)
    assert _rel(h2, h_want) < 1e-2 and _rel(sumsq.sum(0), sumsq_want[0]) < 1e-2
    got = fp8_linear(h2, tile_fp8(w_up, swiglu=True), s_up, swiglu=True, norm_weight=weight,
                     norm_sumsq=sumsq, norm_eps=1e-5)
    want = fp8_linear_reference(h2, w_up, s_up, swiglu=True, norm_weight=weight,
                                norm_sumsq=sumsq, norm_eps=1e-5)
    assert _rel(got, want) < 1e-2


@needs_kernel
@pytest.mark.parametrize("swiglu", [False, True])
@pytest.mark.parametrize("n, k, tile", [(48, 300, (16, 32)), (64, 256, (32, 128)),
                                        (256, 128, (128, 128))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_widen_matches_its_torch_form_bitwise(swiglu, n, k, tile, dtype):
    """The Triton widen of a tiled float8 weight (prefill's, for cuBLAS) against
    `widen_fp8`, which defines it: bitwise, padded tiles and SwiGLU's paired rows included."""
    from polarc.plugins.fp8_linear import fp8_widen

    from polarc.format.engine_file import tile_fp8, widen_fp8

    _, w, scale, _ = _inputs(1, n, k, torch.float32)
    tiles = tile_fp8(w, swiglu=swiglu, tile=tile)
    got = fp8_widen(tiles, scale, k, dtype, swiglu=swiglu)
    assert torch.equal(got, widen_fp8(tiles, scale, k, dtype, swiglu=swiglu))


@needs_kernel
def test_widen_refuses_weights_that_are_not_tiles():
    from polarc.plugins.fp8_linear import fp8_widen

    _, w, scale, _ = _inputs(1, 16, 64, torch.float32)
    with pytest.raises(ValueError, match="fp8_widen: w must be contiguous float8_e4m3fn tiles"):
        fp8_widen(w, scale, 64, torch.float32)
