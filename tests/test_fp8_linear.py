"""Weight-only FP8 linear kernel against its plain-torch reference (interpreter on the CPU in
fp32; real shapes in bf16 on CUDA)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from polarc.plugins._triton_util import cdiv, next_pow2
from polarc.plugins.fp8_linear import (
    Fp8LinearPlan,
    RmsNormParts,
    _fp8_linear_kernel,
    _tile_counters,
    fp8_linear,
    fp8_linear_reference,
    launch_plan,
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
@pytest.mark.parametrize("split", [1, 2, 4])
@pytest.mark.parametrize("m, n, k, bias", [
    (5, 40, 200, True),     # K = 7 blocks of 32 (not whole): ranges 128+72, 64x3+8
    (33, 20, 256, False),   # rows over three blocks, N over two; K whole blocks (no K mask)
    (1, 24, 64, True),      # two K blocks: split 4 leaves two ranges empty (zero partials)
])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_split_k_matches_reference(split, m, n, k, bias, dtype, tol):
    """Every split writes its partial; the last of each tile adds them and runs the
    epilogue."""
    x, w, scale, b = _inputs(m, n, k, dtype, bias=bias, seed=split)
    plan = Fp8LinearPlan(block_m=16, block_n=16, block_k=32, num_warps=4, num_stages=2,
                         split_k=split)
    out = torch.full((m, n), float("nan"), device=DEVICE, dtype=dtype)
    fp8_linear(x, w, scale, b, out=out, plan=plan)
    assert not torch.isnan(out).any()
    assert _rel(out, fp8_linear_reference(x.double(), w, scale, b)) < tol


@needs_kernel
@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("m, f, k, bias", [
    (5, 20, 200, True),     # F = 20: the last block holds 4 channels of 8 (masked pairs)
    (33, 24, 96, False),    # rows over three blocks, F over three
])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_swiglu_epilogue_matches_reference(split, m, f, k, bias, dtype, tol):
    """w = [gate; up] ``[2F, K]``: each block pairs gate and up rows of the same channels and
    writes silu(gate) * up ``[M, F]`` (split-K: after the last split's sum)."""
    x, w, scale, b = _inputs(m, 2 * f, k, dtype, bias=bias, seed=split)
    plan = Fp8LinearPlan(block_m=16, block_n=16, block_k=32, num_warps=4, num_stages=2,
                         split_k=split)
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
    assert (_tile_counters(x.device, 1) == 0).all()


@needs_kernel
def test_planned_split_matches_reference():
    """A few rows over a long K on 4 (CPU) SMs: the planner's own plan splits K."""
    x, w, scale, _ = _inputs(2, 64, 2048, torch.float16, seed=6)
    plan = plan_fp8_linear(2, 64, 2048, sms=4)
    assert plan.split_k > 1
    assert _rel(fp8_linear(x, w, scale), fp8_linear_reference(x.double(), w, scale)) < 2e-3


def test_tile_counters_grow_and_start_at_zero():
    small = _tile_counters(torch.device("cpu"), 3)
    big = _tile_counters(torch.device("cpu"), small.numel() + 1)
    assert big.numel() > small.numel() and big.dtype == torch.int32 and (big == 0).all()
    assert _tile_counters(torch.device("cpu"), 3) is big  # cached


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


def test_plan_streams_deeper_where_a_gemm_has_one_program_per_sm():
    """3 pipeline stages for decode rows, 4 where the programs do not outnumber the SMs (at 32
    rows Llama-3-8B's o and down: 32 tiles x 4 splits on 132 SMs) and above decode rows."""
    assert plan_fp8_linear(32, 4096, 14336, sms=132).num_stages == 4
    assert plan_fp8_linear(32, 4096, 4096, sms=132).num_stages == 4
    assert plan_fp8_linear(32, 6144, 4096, sms=132).num_stages == 3  # 48 tiles x 4 splits
    assert plan_fp8_linear(16, 4096, 14336, sms=132).num_stages == 3  # 8 splits: 256
    assert plan_fp8_linear(256, 4096, 4096, sms=132).num_stages == 4


@pytest.mark.parametrize(("m", "stages"), [(32, 4), (64, 3), (128, 3), (256, 3)])
def test_tiled_weights_cap_the_planned_stages_at_three(m, stages):
    """Tiles of 128 x 128 bytes hold twice the planned K block's bytes a stage above decode
    rows, so the launched plan pipelines 3 stages there (the decode rows' planning stands);
    an explicit plan is launched as given, with the tile as its block."""
    tiles = torch.zeros(32, 32, 128, 128, dtype=torch.float8_e4m3fn)  # [4096, 4096] as tiles
    plan = launch_plan(None, tiles, m, 4096, 4096, sms=132)
    assert (plan.num_stages, plan.block_n, plan.block_k) == (stages, 128, 128)
    # above 64 rows: 128 rows a program, 8 warps, the product transposed
    assert (plan.swap_ab, plan.block_m, plan.num_warps) == ((True, 128, 8) if m > 64 else (
        False, plan_fp8_linear(m, 4096, 4096, sms=132).block_m, 4))
    given = Fp8LinearPlan(64, 96, 64, num_warps=8, num_stages=4, split_k=2)
    assert launch_plan(given, tiles, m, 4096, 4096, sms=132) == Fp8LinearPlan(
        64, 128, 128, num_warps=8, num_stages=4, split_k=2)
    rows = torch.zeros(4096, 4096, dtype=torch.float8_e4m3fn)
    assert launch_plan(None, rows, m, 4096, 4096, sms=132) == plan_fp8_linear(m, 4096, 4096,
                                                                              sms=132)


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
    (dict(w=torch.randn(16, 64)), "w must be float8_e4m3fn"),
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


@needs_kernel
@pytest.mark.parametrize("prefetch", [
    torch.zeros(2, 2, 128, 128),  # fp32, neither float8 nor 16-bit
    torch.zeros(256, 256).to(torch.float8_e4m3fn),  # rows, not tiles
])
def test_prefetch_must_be_float8_tiles(prefetch):
    x, w, scale, _ = _inputs(3, 16, 64, torch.float32)
    with pytest.raises(ValueError, match=r"prefetch must be a contiguous float8_e4m3fn \(or "
                                         r"16-bit\) tiled"):
        fp8_linear(x, w, scale, prefetch=prefetch.to(DEVICE))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize(("m", "n", "k", "n_next", "swiglu"), [
    (32, 6144, 4096, 4096, False),    # qkv, then o-sized tiles (4 splits each)
    (1, 2 * 14336, 4096, 4096, True),  # gate_up with SwiGLU, then down-sized
    (32, 4096, 14336, 6144, False),   # down, then the next layer's qkv
    (7, 4096, 4096, 2 * 14336, False),  # o, then gate_up (a larger next weight)
    (32, 64, 4096, 128, False),       # a next weight under the prefetch budget: all of it
])
def test_gpu_prefetching_the_next_weight_leaves_results_unchanged(m, n, k, n_next, swiglu):
    """The L2 prefetch of the next GEMM's tiles changes no bit of this one's product."""
    from polarc.format.engine_file import tile_fp8

    x, w, scale, _ = _inputs(m, n, k, torch.bfloat16)
    nxt = tile_fp8(quantize_rows(torch.randn(n_next, 4096))[0].to(DEVICE))
    tiled = tile_fp8(w, swiglu=swiglu)
    want = fp8_linear(x, tiled, scale, swiglu=swiglu)
    got = fp8_linear(x, tiled, scale, swiglu=swiglu, prefetch=nxt)
    assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("m", [1, 16, 32, 100, 256])
@pytest.mark.parametrize(("n", "k"), [(6144, 4096), (4096, 14336)])
def test_gpu_llama_shapes_bf16(m, n, k):
    x, w, scale, _ = _inputs(m, n, k, torch.bfloat16)
    got = fp8_linear(x, w, scale, plan=plan_fp8_linear(m, n, k, sms=132))
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
def test_gpu_split_k_graph_replays_match_eager_bitwise():
    """Split-K in a CUDA graph: counters stay zero across replays, the sum order is fixed."""
    x, w, scale, b = _inputs(16, 4096, 4096, torch.bfloat16, bias=True)
    plan = Fp8LinearPlan(block_m=16, block_n=64, block_k=256, num_warps=4, num_stages=4,
                         split_k=8)
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
@pytest.mark.parametrize("block_n", [24, 16])
@pytest.mark.parametrize("swiglu", [False, True])
@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("m, n, k", [(5, 40, 200), (17, 48, 300), (3, 256, 128)])
def test_tiled_weight_matches_reference(block_n, swiglu, split, m, n, k):
    """The weight laid out tile by tile as a loaded engine keeps it on CUDA (each program's K
    block one contiguous run, padded past N and K; SwiGLU's gate and up rows interleaved in
    the layout): the same products; `untile_fp8` gives the weight back. A plan's block_n that
    divides the tile's rows (16) reads slices of each tile (8 of a 128-row tile, 2 of a
    32-row one); any other (24) reads whole tiles."""
    from polarc.format.engine_file import tile_fp8, untile_fp8

    x, w, scale, b = _inputs(m, n, k, torch.float32, bias=True, seed=split)
    tiled = tile_fp8(w, swiglu=swiglu)
    assert tiled.shape == (cdiv(n, 128), cdiv(k, 128), 128, 128)
    assert torch.equal(untile_fp8(tiled, n, k, swiglu=swiglu).view(torch.uint8),
                       w.view(torch.uint8))
    plan = Fp8LinearPlan(block_m=16, block_n=block_n, block_k=32, num_warps=4, num_stages=2,
                         split_k=split)  # (the tiles set BLOCK_K)
    assert launch_plan(plan, tiled, m, n, k, sms=4).block_n == (16 if block_n == 16 else 128)
    want = fp8_linear_reference(x.double(), w, scale, b, swiglu=swiglu)
    assert _rel(fp8_linear(x, tiled, scale, b, plan=plan, swiglu=swiglu), want) < 1e-5
    other = tile_fp8(w, swiglu=swiglu, tile=(32, 64))  # a benchmark's other tile shape
    assert _rel(fp8_linear(x, other, scale, b, plan=plan, swiglu=swiglu), want) < 1e-5


@needs_kernel
@pytest.mark.parametrize("swiglu", [False, True])
@pytest.mark.parametrize("split", [1, 2])
def test_transposed_product_matches_reference(swiglu, split):
    """Above 64 rows on tiles the planned product is formed transposed (`swap_ab`): the same
    sums as the untransposed plan and the reference, with split-K and SwiGLU epilogues."""
    from polarc.format.engine_file import tile_fp8

    m, n, k = 100, 256, 256
    x, w, scale, b = _inputs(m, n, k, torch.float16, bias=True, seed=split)
    tiled = tile_fp8(w, swiglu=swiglu)
    plan = launch_plan(None, tiled, m, n, k, sms=132)
    assert plan.swap_ab and plan.block_m == 128
    plan = dataclasses.replace(plan, split_k=split)
    want = fp8_linear_reference(x.double(), w, scale, b, swiglu=swiglu)
    got = fp8_linear(x, tiled, scale, b, plan=plan, swiglu=swiglu)
    assert _rel(got, want) < 2e-3  # fp16 products and output
    plain = fp8_linear(x, tiled, scale, b, plan=dataclasses.replace(plan, swap_ab=False),
                       swiglu=swiglu)
    assert _rel(got, plain) < 1e-3


@needs_kernel
@pytest.mark.parametrize("group_m, split", [(2, 1), (3, 2), (8, 1)])
def test_grouped_program_order_gives_the_same_products(group_m, split):
    """The program order of GEMMs with several row blocks (`Fp8LinearPlan.group_m`: GROUP_M
    row blocks of one weight block before the next, the last group shorter where the row
    blocks do not divide): every output block computed once, the same sums as the plain
    order, on rows and on tiles."""
    from polarc.format.engine_file import tile_fp8

    m, n, k = 80, 72, 96  # 5 row blocks of 16, 9 weight blocks of 8 (rows) or 1 tile of 128
    x, w, scale, b = _inputs(m, n, k, torch.float32, bias=True, seed=group_m)
    want = fp8_linear_reference(x.double(), w, scale, b)
    for weight, block_n in ((w, 8), (tile_fp8(w, tile=(16, 32)), 16)):
        plan = Fp8LinearPlan(block_m=16, block_n=block_n, block_k=32, num_warps=4,
                             num_stages=2, split_k=split)
        plain = fp8_linear(x, weight, scale, b, plan=plan)
        grouped = fp8_linear(x, weight, scale, b, plan=dataclasses.replace(plan, group_m=group_m))
        assert torch.equal(grouped, plain)
        assert _rel(grouped, want) < 1e-5


def test_plans_group_row_blocks_where_there_are_several():
    assert all(plan_fp8_linear(m, 14336, 4096, sms=132).group_m > 1 for m in (65, 256, 2048))
    assert all(plan_fp8_linear(m, 14336, 4096, sms=132).group_m == 1 for m in (1, 32, 64))
    x, w, scale, _ = _inputs(4, 8, 32, torch.float32)
    bad = Fp8LinearPlan(block_m=16, block_n=8, block_k=32, num_warps=4, num_stages=2,
                        group_m=0)
    with pytest.raises(ValueError, match="group_m"):
        fp8_linear(x, w, scale, plan=bad)


def test_16_bit_tiles_take_prefill_plans_above_decode_rows():
    """Above 256 rows 16-bit tiles run untransposed with wider row blocks (128 rows and 4
    warps a program, 256 and 8 from 1,024 rows); up to 256 rows, and float8 tiles at any row
    count, the transposed plan as before."""
    from polarc.format.engine_file import tile_fp8

    w, _ = quantize_rows(torch.randn(256, 256))
    fp8_tiles, wide_tiles = tile_fp8(w), tile_fp8(w.to(torch.bfloat16), tile=(128, 64))

    def plan(m, tiles):
        p = launch_plan(None, tiles, m, 256, 256, sms=132)
        return p.block_m, p.num_warps, p.num_stages, p.swap_ab, p.block_k

    assert plan(256, wide_tiles) == (128, 8, 3, True, 64)
    assert plan(300, wide_tiles) == (128, 4, 4, False, 64)
    assert plan(1024, wide_tiles) == plan(5000, wide_tiles) == (256, 8, 3, False, 64)
    assert plan(300, fp8_tiles) == plan(1024, fp8_tiles) == (128, 8, 3, True, 128)


@needs_kernel
@pytest.mark.parametrize("m", [300, 1030])
def test_16_bit_tiles_at_prefill_rows_match_the_reference(m):
    """The kernel on 16-bit tiles with the planner's prefill plan, a last row block partly
    past the rows: the reference product up to the output's fp16 rounding (fp16 here: the
    interpreter has no bf16)."""
    from polarc.format.engine_file import tile_fp8

    x, _, _, b = _inputs(m, 24, 48, torch.float16, bias=True, seed=m)
    w = torch.randn(24, 48, generator=torch.Generator().manual_seed(1)).to(DEVICE, torch.float16)
    ones = torch.ones(24, device=DEVICE)
    got = fp8_linear(x, tile_fp8(w, tile=(16, 16)), ones, b)
    assert _rel(got, x.double() @ w.double().T + b.double()) < 2e-3


@needs_kernel
@pytest.mark.parametrize(("tile", "block_n", "split", "swiglu"), [
    ((32, 32), 32, 1, False), ((32, 32), 16, 3, True), ((16, 32), 16, 2, False)])
def test_tiles_read_by_tma_give_the_same_products(tile, block_n, split, swiglu):
    """`Fp8LinearPlan.tma` (a tile's K block as one bulk copy through a TMA descriptor): the
    same products bit for bit as the tiles read thread by thread, slices of tiles and split-K
    included; on 16-bit tiles too, with the transposed product on 256-row blocks."""
    from polarc.format.engine_file import tile_fp8

    x, w, scale, b = _inputs(20, 64, 96, torch.float16, bias=True, seed=split)
    tiles = tile_fp8(w, tile=tile, swiglu=swiglu)
    plan = Fp8LinearPlan(block_m=16, block_n=block_n, block_k=32, num_warps=4, num_stages=2,
                         split_k=split)
    plain = fp8_linear(x, tiles, scale, b, plan=plan, swiglu=swiglu)
    tma = fp8_linear(x, tiles, scale, b, plan=dataclasses.replace(plan, tma=True), swiglu=swiglu)
    assert torch.equal(tma, plain)
    assert _rel(tma, fp8_linear_reference(x.double(), w, scale, b, swiglu=swiglu)) < 2e-3
    x16 = torch.randn(300, 96, generator=torch.Generator().manual_seed(2)).to(DEVICE,
                                                                              torch.float16)
    wide = tile_fp8(w.to(DEVICE).to(torch.float16), tile=(16, 16))
    ones = torch.ones(64, device=DEVICE)
    plan = Fp8LinearPlan(block_m=256, block_n=16, block_k=16, num_warps=8, num_stages=3,
                         swap_ab=True, group_m=8)
    assert torch.equal(fp8_linear(x16, wide, ones, plan=dataclasses.replace(plan, tma=True)),
                       fp8_linear(x16, wide, ones, plan=plan))


def test_tma_reads_tiles_only():
    x, w, scale, _ = _inputs(4, 8, 32, torch.float32)
    plan = Fp8LinearPlan(block_m=16, block_n=8, block_k=32, num_warps=4, num_stages=2, tma=True)
    with pytest.raises(ValueError, match="plan.tma reads tiles"):
        fp8_linear(x, w, scale, plan=plan)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or torch.cuda.get_device_capability() < (9, 0),
                    reason="needs CUDA sm_90+")
@pytest.mark.parametrize("m", [32, 300])
def test_gpu_tiles_read_by_tma_match_the_plain_reads(m):
    """Llama-3-8B's gate_up at decode and prefill rows: float8 tiles with the planner's plan,
    16-bit tiles with the transposed product on 256-row blocks; TMA reads give the same
    products bit for bit."""
    from polarc.format.engine_file import tile_fp8

    x, w, scale, _ = _inputs(m, 28672, 4096, torch.bfloat16)
    tiles = tile_fp8(w, swiglu=True)
    plan = launch_plan(None, tiles, m, 28672, 4096, sms=torch.cuda.get_device_properties(0)
                       .multi_processor_count)
    assert torch.equal(fp8_linear(x, tiles, scale, plan=dataclasses.replace(plan, tma=True),
                                  swiglu=True),
                       fp8_linear(x, tiles, scale, plan=plan, swiglu=True))
    wide = tile_fp8(torch.randn(14336, 4096, device="cuda", dtype=torch.bfloat16),
                    tile=(128, 64))
    ones = torch.ones(14336, device="cuda")
    plan = Fp8LinearPlan(block_m=256, block_n=128, block_k=64, num_warps=8, num_stages=3,
                         swap_ab=True, group_m=8)
    assert torch.equal(fp8_linear(x, wide, ones, plan=dataclasses.replace(plan, tma=True)),
                       fp8_linear(x, wide, ones, plan=plan))


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
    with pytest.raises(ValueError, match="fp8_widen: w must be contiguous float8_e4m3fn"):
        fp8_widen(w, scale, 64, torch.float32)


@needs_kernel
@pytest.mark.parametrize("wide", [False, True])
def test_row_strided_weights_match_contiguous_ones(wide):
    """``[N, K]`` rows with a row stride past K (a view of ``[N, K + pad]``, float8 or x's
    16-bit dtype): the same products as the contiguous weight, bit for bit."""
    m, n, k = 5, 48, 200
    g = torch.Generator().manual_seed(4)
    x = torch.randn(m, k, generator=g).to(DEVICE, torch.float16)
    w = torch.randn(n, k, generator=g) / k ** 0.5
    w = w.to(DEVICE, torch.float16) if wide else w.to(torch.float8_e4m3fn).to(DEVICE)
    padded = torch.zeros(n, k + 24, dtype=w.dtype, device=DEVICE)[:, :k]
    padded.copy_(w)
    scale = torch.rand(n, generator=g).to(DEVICE) + 0.5
    plan = Fp8LinearPlan(16, 32, 32, num_warps=4, num_stages=2, split_k=2)
    want = fp8_linear(x, w, scale, plan=plan)
    assert torch.equal(fp8_linear(x, padded, scale, plan=plan), want)
    with pytest.raises(ValueError, match="rows with a contiguous last axis"):
        fp8_linear(x, torch.zeros(k, n, dtype=w.dtype, device=DEVICE).T, scale)


@pytest.mark.parametrize("tied", [True, False])
def test_16_bit_linear_weights_tiled_with_unit_scales(tied):
    """`tile_fp8_weights(wide=True)`: each 16-bit linear layer's weight in `WIDE_TILE` tiles
    (gate_up's rows paired) with a ``_scale`` of ones, the rows back by `untile_fp8`; an LM
    head that is the embedding table, the table itself and norms stay as they are; without
    `wide` nothing 16-bit moves."""
    from polarc.format.engine_file import WIDE_TILE, tile_fp8_weights, untile_fp8

    g = torch.Generator().manual_seed(0)
    w = {name: torch.randn(*shape, generator=g).half() for name, shape in (
        ("embed.weight", (50, 64)), ("layers.0.qkv.weight", (200, 64)),
        ("layers.0.gate_up.weight", (256, 64)), ("layers.0.down.weight", (64, 128)),
        ("layers.0.attn_norm.weight", (64,)))}
    w["lm_head.weight"] = w["embed.weight"] if tied else torch.randn(50, 64, generator=g).half()
    before = dict(w)
    tile_fp8_weights(w)
    assert all(w[n] is t for n, t in before.items()) and len(w) == len(before)
    tile_fp8_weights(w, wide=True)
    tiled = ["layers.0.qkv.weight", "layers.0.gate_up.weight", "layers.0.down.weight"]
    tiled += [] if tied else ["lm_head.weight"]
    for name in tiled:
        n, k = before[name].shape
        assert w[name].shape[2:] == WIDE_TILE and w[name].dtype == torch.float16
        assert torch.equal(w[name + "_scale"], torch.ones(n))
        swiglu = name.endswith("gate_up.weight")
        assert torch.equal(untile_fp8(w[name], n, k, swiglu=swiglu), before[name])
    for name in {"embed.weight", "layers.0.attn_norm.weight", "lm_head.weight"} - set(tiled):
        assert w[name] is before[name]


@needs_kernel
@pytest.mark.parametrize("swiglu", [False, True])
def test_widen_of_16_bit_tiles_is_the_weight(swiglu):
    """16-bit weights kept tile by tile (`tile_fp8_weights(wide=True)`: scale ones) come back
    as the ``[N, K]`` weight, bit for bit (padded tiles included); in another dtype, refused."""
    from polarc.plugins.fp8_linear import fp8_widen

    from polarc.format.engine_file import tile_fp8

    w = torch.randn(96, 200, generator=torch.Generator().manual_seed(3)).to(DEVICE, torch.float16)
    tiles = tile_fp8(w, swiglu=swiglu, tile=(64, 64))
    ones = torch.ones(96, device=DEVICE)
    assert torch.equal(fp8_widen(tiles, ones, 200, torch.float16, swiglu=swiglu), w)
    with pytest.raises(ValueError, match=r"float8_e4m3fn \(or torch.bfloat16\) tiles"):
        fp8_widen(tiles, ones, 200, torch.bfloat16)


@needs_kernel
@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize("m, tiles", [(5, False), (100, True)])
def test_residual_add_and_norm_inside_the_gemms_are_add_then_norm(split, dtype, tol, m, tiles):
    """A decoder layer's seam as two GEMMs: ``residual=h`` adds the product into h (bitwise
    ``h + y``) and returns the next RMS norm of h in parts (h times its weight, the rows' sums
    of squares); the next GEMM with ``norm`` takes them: the add, the norm and the linear of
    the unfused stages. 100 rows on tiles: the transposed product."""
    from polarc.format.engine_file import tile_fp8
    from polarc.models.layers import norm

    hidden, k1, n2, eps = 256, 128, 136, 1e-5
    x, w1, s1, _ = _inputs(m, hidden, k1, dtype, seed=split)
    _, w2, s2, _ = _inputs(m, n2, hidden, dtype, seed=split + 1)
    if tiles:
        w1, w2 = tile_fp8(w1), tile_fp8(w2)
    g = torch.Generator().manual_seed(5)
    h = torch.randn(m, hidden, generator=g).to(DEVICE, dtype) * 3
    weight = (1 + 0.2 * torch.randn(hidden, generator=g)).to(DEVICE, dtype)
    plan = launch_plan(None, w1, m, hidden, k1, sms=4)
    plan = dataclasses.replace(plan, split_k=split) if tiles else Fp8LinearPlan(
        16, 32, 32, num_warps=4, num_stages=2, split_k=split)
    want_h = h + fp8_linear(x, w1, s1, plan=plan)
    want = fp8_linear(norm(want_h, weight, None, eps), w2, s2, plan=plan)
    parts = fp8_linear(x, w1, s1, plan=plan, residual=h, norm_weight=weight, eps=eps)
    # (on the GPU fp32 sums may contract into an FMA: equal to rounding, not bitwise)
    assert torch.equal(h, want_h) if DEVICE == "cpu" else _rel(h, want_h) < 1e-6
    assert parts.sumsq.shape == (m, cdiv(hidden, plan.block_n if not tiles else 128))
    torch.testing.assert_close(parts.sumsq.sum(1), h.float().pow(2).sum(1), rtol=1e-5, atol=0)
    assert torch.equal(parts.scaled, h * weight)
    got = fp8_linear(parts.scaled, w2, s2, plan=plan, norm=parts)
    assert _rel(got, want) < tol
    # a SwiGLU consumer (gate_up): the rows scaled before the gate and up are paired
    _, w3, s3, _ = _inputs(m, n2, hidden, dtype, seed=split + 2)
    w3 = tile_fp8(w3, swiglu=True) if tiles else w3
    want = fp8_linear(norm(want_h, weight, None, eps), w3, s3, plan=plan, swiglu=True)
    assert _rel(fp8_linear(parts.scaled, w3, s3, plan=plan, norm=parts, swiglu=True),
                want) < tol


def test_residual_and_norm_inputs_are_checked():
    x, w, s, _ = _inputs(4, 32, 64, torch.float32)
    g = torch.ones(32, device=DEVICE)
    with pytest.raises(ValueError, match="residual must be"):
        fp8_linear(x, w, s, residual=torch.zeros(4, 31, device=DEVICE), norm_weight=g)
    with pytest.raises(ValueError, match="residual takes neither"):
        fp8_linear(x, w, s, residual=torch.zeros(4, 32, device=DEVICE), swiglu=True)
    with pytest.raises(ValueError, match="the next norm's weight"):
        fp8_linear(x, w, s, residual=torch.zeros(4, 32, device=DEVICE), norm_weight=g[:31])
    bad = RmsNormParts(x, torch.zeros(3, 2, device=DEVICE), 1e-5)
    with pytest.raises(ValueError, match="norm.sumsq must be"):
        fp8_linear(x, w, s, norm=bad)


@needs_kernel
@pytest.mark.parametrize("m, k", [(3, 200), (17, 64)])
def test_split_rows_fp8_matches_reference(m, k):
    """Two float8 terms and a scale per row hold x to about bf16's precision (3 + 3 mantissa
    bits, the second starting where the first's rounding error does); a zero row stays zero."""
    from polarc.plugins.fp8_linear import split_rows_fp8, split_rows_fp8_reference

    g = torch.Generator().manual_seed(m)
    x = (torch.randn(m, k, generator=g) * torch.logspace(-3, 3, m)[:, None]).to(DEVICE)
    x[:, 5] *= 50  # an outlier channel
    x[1] = 0
    hi, lo, s = split_rows_fp8(x)
    want = split_rows_fp8_reference(x)
    assert hi.dtype == lo.dtype == torch.float8_e4m3fn and s.shape == (m,)
    torch.testing.assert_close(s, want[2], rtol=1e-6, atol=0)
    if DEVICE == "cuda":  # (the interpreter's float8 rounding can miss a carry into the
        # exponent, 7.76 -> 4.0: lo then holds the rest, so the pair still holds x)
        assert torch.equal(hi.view(torch.uint8), want[0].view(torch.uint8))
        assert torch.equal(lo.view(torch.uint8), want[1].view(torch.uint8))
    got = s[:, None] * (hi.float() + lo.float())
    assert not got[1].any()
    assert _rel(got, x) < (3e-3 if DEVICE == "cuda" else 2e-2)
    ref = want[2][:, None] * (want[0].float() + want[1].float())
    # relative to x, down to half of float8's smallest step (2^-9) in units of s
    assert ((ref - x).abs() <= 2 ** -7 * x.abs() + 2 ** -10 * want[2][:, None]).all()


@needs_kernel
@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("swiglu", [False, True])
@pytest.mark.parametrize("m, tiles", [(5, False), (40, True), (40, "halves")])
def test_x_pair_product_matches_reference(split, swiglu, m, tiles):
    """`Fp8LinearPlan.x_pair`: x as two float8 terms times the stored float8 weight, no
    widening: the reference on the same terms (fp32 products), and within bf16's precision of
    the unrounded x; split-K, SwiGLU, the residual / norm seam and ragged K as the fp16 path."""
    from polarc.format.engine_file import tile_fp8
    from polarc.models.layers import norm

    n, k = 64, 200
    x, w, s, b = _inputs(m, n, k, torch.float16, bias=True, seed=split)
    wt = tile_fp8(w, swiglu=swiglu, tile=(32, 64)) if tiles else w
    # "halves": each program reads half a tile, the split partials in x's dtype, as planned
    plan = Fp8LinearPlan(16, {False: 16, True: 32, "halves": 16}[tiles], 64 if tiles else 32,
                         num_warps=4, num_stages=2, split_k=split, x_pair=True,
                         narrow_partials=tiles == "halves")
    want = fp8_linear_reference(x, w, s, b, swiglu=swiglu, x_pair=True)
    got = fp8_linear(x, wt, s, b, plan=plan, swiglu=swiglu)
    # (looser in the interpreter, whose float8 rounding can miss a carry: see above)
    assert _rel(got, want) < (4e-3 if DEVICE == "cuda" else 1e-2)
    assert _rel(got, fp8_linear_reference(x.double(), w, s, b, swiglu=swiglu)) < 1e-2
    if swiglu:
        return
    # the seam: the product added into h, then the next GEMM on the norm of h
    h = torch.randn(m, n, generator=torch.Generator().manual_seed(3)).to(DEVICE, x.dtype) * 3
    weight = torch.ones(n, device=DEVICE, dtype=x.dtype)
    want_h = h + fp8_linear(x, wt, s, b, plan=plan)
    parts = fp8_linear(x, wt, s, b, plan=plan, residual=h, norm_weight=weight, eps=1e-5)
    assert torch.equal(h, want_h) if DEVICE == "cpu" else _rel(h, want_h) < 1e-6
    _, w2, s2, _ = _inputs(m, 48, n, torch.float16, seed=9)
    plan2 = dataclasses.replace(plan, block_k=32 if tiles else plan.block_k)
    w2t = tile_fp8(w2, tile=(32, 32)) if tiles else w2
    got = fp8_linear(parts.scaled, w2t, s2, plan=plan2, norm=parts)
    want = fp8_linear_reference(norm(want_h, weight, None, 1e-5), w2, s2)
    assert _rel(got, want) < 1e-2


def test_x_pair_is_planned_for_33_to_64_rows_on_hopper_tiles():
    tiles = torch.zeros(32, 32, 128, 128, dtype=torch.float8_e4m3fn)
    rows = torch.zeros(4096, 4096, dtype=torch.float8_e4m3fn)
    for m in (1, 16, 32, 33, 48, 64, 65, 128):
        plan = launch_plan(None, tiles, m, 4096, 4096, sms=132, fp8_products=True)
        assert plan.x_pair == (32 < m <= 64), m
        assert not launch_plan(None, tiles, m, 4096, 4096, sms=132).x_pair
        assert not launch_plan(None, rows, m, 4096, 4096, sms=132, fp8_products=True).x_pair
    assert plan_fp8_linear(33, 4096, 4096, sms=132).narrow_partials
    assert not plan_fp8_linear(256, 28672, 4096, sms=132).narrow_partials  # no split
    with pytest.raises(ValueError, match="x_pair needs bf16 / fp16 x"):
        x, w, s, _ = _inputs(4, 32, 64, torch.float32)
        fp8_linear(x, w, s, plan=Fp8LinearPlan(16, 16, 32, 4, 2, x_pair=True))


@pytest.mark.parametrize("m", [33, 48, 64])
def test_x_pair_plans_take_half_tiles_and_half_the_splits(m):
    """At 33-64 rows a split GEMM's programs each take half a tile's channels and the split is
    halved (as many programs, half the partials each); an unsplit one keeps whole tiles, and
    32 rows (no float8 products) keep the planner's split."""
    tiles = torch.zeros(32, 32, 128, 128, dtype=torch.float8_e4m3fn)  # o: [4096, 4096]
    planned = plan_fp8_linear(m, 4096, 4096, sms=132)
    assert planned.split_k > 1
    plan = launch_plan(None, tiles, m, 4096, 4096, sms=132, fp8_products=True)
    assert (plan.block_n, plan.split_k, plan.x_pair) == (64, planned.split_k // 2, True)
    # a half tile's K block holds the planned stage's bytes (64 x 128): the planned stages
    assert plan.num_stages == planned.num_stages == 4
    gate_up = torch.zeros(224, 32, 128, 128, dtype=torch.float8_e4m3fn)  # [28672, 4096]
    assert plan_fp8_linear(m, 28672, 4096, sms=132).split_k == 1
    assert launch_plan(None, gate_up, m, 28672, 4096, sms=132, fp8_products=True).block_n == 128
    plan = launch_plan(None, tiles, 32, 4096, 4096, sms=132, fp8_products=True)
    assert (plan.block_n, plan.split_k) == (128, plan_fp8_linear(32, 4096, 4096, sms=132).split_k)


@needs_kernel
@pytest.mark.parametrize("swiglu", [False, True])
def test_narrow_partials_stay_within_a_rounding_of_fp32_partials(swiglu):
    """`Fp8LinearPlan.narrow_partials`: each split's partial rounded once to x's dtype before
    the merge; the sum moves by about one rounding of x's dtype, and an fp32 x keeps fp32."""
    m, n, k, split = 9, 64, 512, 4
    for dtype, tol in ((torch.float16, 2e-3), (torch.float32, 0.0)):
        x, w, scale, b = _inputs(m, n, k, dtype, bias=True, seed=5)
        plan = Fp8LinearPlan(16, 32, 64, num_warps=4, num_stages=2, split_k=split)
        wide = fp8_linear(x, w, scale, b, plan=plan, swiglu=swiglu)
        narrow = fp8_linear(x, w, scale, b, swiglu=swiglu,
                            plan=dataclasses.replace(plan, narrow_partials=True))
        assert _rel(narrow, wide) <= tol
        want = fp8_linear_reference(x.double(), w, scale, b, swiglu=swiglu)
        assert _rel(narrow, want) < (3e-3 if dtype == torch.float16 else 1e-5)


@needs_kernel
@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("swiglu", [False, True])
@pytest.mark.parametrize("tile", [None, (128, 64), (32, 32)])
def test_wide_weights_match_reference(split, swiglu, tile):
    """A 16-bit weight in x's dtype (fp16 here: the interpreter's bf16 dots are wrong; bf16 on
    the GPU), as rows or tiles: no widening, the same split-K, SwiGLU and residual / norm
    seam as float8 weights."""
    from polarc.format.engine_file import tile_fp8, untile_fp8
    from polarc.models.layers import norm

    m, n, k = 7, 64, 200
    g = torch.Generator().manual_seed(split)
    x = torch.randn(m, k, generator=g).to(DEVICE, torch.float16)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(DEVICE, torch.float16)
    b = torch.randn(n, generator=g).to(DEVICE, torch.float16)
    ones = torch.ones(n, device=DEVICE)
    wt = w if tile is None else tile_fp8(w, swiglu=swiglu, tile=tile)
    if tile is not None:
        assert torch.equal(untile_fp8(wt, n, k, swiglu=swiglu), w)
    plan = Fp8LinearPlan(16, 32, 32, num_warps=4, num_stages=2, split_k=split,
                         narrow_partials=True)
    want = fp8_linear_reference(x.double(), w, ones, b, swiglu=swiglu)
    assert _rel(fp8_linear(x, wt, ones, b, plan=plan, swiglu=swiglu), want) < 2e-3
    if swiglu:
        return
    h = torch.randn(m, n, generator=g).to(DEVICE, torch.float16) * 3
    weight = torch.ones(n, device=DEVICE, dtype=x.dtype)
    want_h = h + fp8_linear(x, wt, ones, b, plan=plan)
    parts = fp8_linear(x, wt, ones, b, plan=plan, residual=h, norm_weight=weight, eps=1e-5)
    assert _rel(h, want_h) < 1e-3
    w2 = (torch.randn(48, n, generator=g) / n ** 0.5).to(DEVICE, torch.float16)
    w2t = w2 if tile is None else tile_fp8(w2, tile=tile)
    got = fp8_linear(parts.scaled, w2t, torch.ones(48, device=DEVICE), plan=plan, norm=parts)
    want = fp8_linear_reference(norm(want_h, weight, None, 1e-5), w2, torch.ones(48, device=DEVICE))
    assert _rel(got, want) < 1e-2


def test_wide_weight_plans_and_bad_dtypes():
    """bf16 tiles of 128 x 64 values: never x as float8 terms, 3 stages where a tile's K block
    holds more bytes than the planned stage; 16-bit weights only in x's own dtype."""
    tiles = torch.zeros(32, 64, 128, 64, dtype=torch.bfloat16)  # [4096, 4096]
    for m in (16, 32, 64):
        plan = launch_plan(None, tiles, m, 4096, 4096, sms=132, fp8_products=True)
        planned = plan_fp8_linear(m, 4096, 4096, sms=132)
        assert not plan.x_pair and (plan.block_n, plan.block_k) == (128, 64)
        assert plan.split_k == planned.split_k
        assert plan.num_stages == (min(planned.num_stages, 3) if m > 32 else planned.num_stages)
    x = torch.randn(4, 64)
    for xd, wd in ((torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16)):
        with pytest.raises(ValueError, match="w must be float8_e4m3fn"):
            fp8_linear(x.to(xd), torch.zeros(8, 64, dtype=wd), torch.ones(8))
