"""Selective attention kernel against its plain-torch reference.

On the CPU the kernel runs through Triton's interpreter at small shapes; with CUDA the
``gpu`` tests run real shapes in bf16/fp16/fp32.
"""

from __future__ import annotations

import pytest
import torch
from polarc.plugins.reference import (
    FP8,
    FP8_MAX,
    dequantize_kv,
    quantize_kv,
    selective_attention_reference,
)
from polarc.plugins.selective_attention import (
    _selective_attention_kernel,
    plan_selective_attention,
    selective_attention,
    selective_attention_workspace,
)

CUDA = torch.cuda.is_available()
INTERPRETED = type(_selective_attention_kernel).__name__ == "InterpretedFunction"
DEVICE = "cuda" if CUDA else "cpu"
needs_kernel = pytest.mark.skipif(
    not CUDA and not INTERPRETED,
    reason="triton was imported before TRITON_INTERPRET=1 was set and there is no CUDA")
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 1e-2}


def _inputs(b, hq, hkv, s, d, k, dtype, *, seed=0, lens="mixed", device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, d, generator=g).to(device, dtype)
    kc = torch.randn(b, hkv, s, d, generator=g).to(device, dtype)
    vc = torch.randn(b, hkv, s, d, generator=g).to(device, dtype)
    if lens == "full":
        seqlens = torch.full((b,), s, dtype=torch.int32)
    else:  # rows of different lengths, one full row, one of length 1 when b > 2
        seqlens = torch.randint(1, s + 1, (b,), generator=g, dtype=torch.int32)
        seqlens[0] = s
        if b > 2:
            seqlens[1] = 1
    groups = torch.stack([torch.randperm(hkv, generator=g)[:k] for _ in range(b)]).int()
    return q, kc, vc, seqlens.to(device), groups.to(device)


def _rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _check(b, hq, hkv, s, d, k, dtype, *, plan=None, lens="mixed", seed=0):
    q, kc, vc, seqlens, groups = _inputs(b, hq, hkv, s, d, k, dtype, seed=seed, lens=lens)
    out = torch.full_like(q, float("nan"))  # poisoned: every element must be written
    got = selective_attention(q, kc, vc, seqlens, groups, out=out, plan=plan)
    assert got is out
    ref = selective_attention_reference(q.double(), kc.double(), vc.double(), seqlens, groups)
    assert not torch.isnan(out).any()
    err = _rel_err(out, ref)
    assert err <= TOL[dtype], f"relative error {err:.2e} > {TOL[dtype]:.0e}"
    # heads of unselected groups are exact zeros
    group = hq // hkv
    sel = torch.zeros(b, hkv, dtype=torch.bool, device=q.device)
    sel.scatter_(1, groups.long(), True)
    head_sel = sel.repeat_interleave(group, dim=1)
    assert (out[~head_sel] == 0).all()


def _plan(b, k, group, s, d, **kw):
    return plan_selective_attention(b, k, group, s, d, sms=4, **kw)


# ----------------------------------------------------------------------------- interpreter


@needs_kernel
@pytest.mark.parametrize(
    "b, hq, hkv, s, d, k, block_n, splits",
    [
        (3, 8, 2, 37, 16, 1, 16, 3),     # GQA 4 heads/group (tl.dot), k=1, odd S, 3 splits
        (2, 8, 2, 37, 16, 2, 16, 2),     # k = Hkv (dense through the same kernel)
        (3, 4, 4, 21, 32, 3, 16, 2),     # MHA, unsorted groups
        (1, 4, 4, 19, 16, 4, 16, 1),     # B=1, MHA dense, one split
        (2, 6, 3, 17, 16, 2, 16, 2),     # 2 heads/group
        (2, 16, 2, 23, 24, 1, 16, 4),    # 8 heads/group, head dim not a power of two
        (3, 8, 2, 1, 16, 2, 16, 2),      # S_max = 1, more splits than positions
    ],
)
@pytest.mark.parametrize("one_launch", [True, False])
def test_matches_reference_fp32(b, hq, hkv, s, d, k, block_n, splits, one_launch):
    plan = _plan(b, k, hq // hkv, s, d, block_n=block_n, num_splits=1 if one_launch else splits)
    _check(b, hq, hkv, s, d, k, torch.float32, plan=plan)


@needs_kernel
@pytest.mark.parametrize("b, hq, hkv, s, k", [(3, 4, 4, 21, 3), (2, 6, 3, 17, 2), (2, 8, 2, 30, 1)])
def test_broadcast_path_fp32(b, hq, hkv, s, k):
    """The constexpr alternative to tl.dot (use_dot=False) computes the same function."""
    plan = _plan(b, k, hq // hkv, s, 16, block_n=16, num_splits=2, use_dot=False)
    _check(b, hq, hkv, s, 16, k, torch.float32, plan=plan)


@needs_kernel
def test_fp16_and_equal_lengths():
    plan = _plan(2, 2, 4, 40, 16, block_n=16, num_splits=2)
    _check(2, 8, 2, 40, 16, 2, torch.float16, plan=plan, lens="full")


@needs_kernel
def test_default_plan_and_workspace_and_zero_length_row():
    q, kc, vc, seqlens, groups = _inputs(3, 8, 2, 33, 16, 1, torch.float32, seed=3)
    seqlens[2] = 0  # an empty row gives zeros
    ws = selective_attention_workspace(q, kc)  # sized for any k <= Hkv
    for k in (1, 2, 1):  # reused across calls and k
        groups = torch.stack([torch.randperm(2)[:k] for _ in range(3)]).int().to(q.device)
        plan = _plan(3, k, 4, 33, 16, block_n=16, num_splits=3)
        ws_k = selective_attention_workspace(q, kc, k, plan)
        for workspace, p in ((ws, None), (ws_k, plan)):
            out = selective_attention(q, kc, vc, seqlens, groups, workspace=workspace, plan=p)
            ref = selective_attention_reference(q, kc, vc, seqlens, groups)
            assert (out[2] == 0).all()
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="serves B=3"):
        selective_attention(q[:2], kc[:2], vc[:2], seqlens[:2], groups[:2], workspace=ws)


@needs_kernel
def test_sliced_cache_and_custom_op():
    q, kc, vc, seqlens, groups = _inputs(4, 8, 2, 24, 16, 1, torch.float32, seed=5)
    # a [:B] slice of a larger cache (non-contiguous batch stride) works
    out = selective_attention(q[:2], kc[:2], vc[:2], seqlens[:2], groups[:2])
    ref = selective_attention_reference(q[:2], kc[:2], vc[:2], seqlens[:2], groups[:2])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    via_op = torch.ops.polarc.selective_attention(q, kc, vc, seqlens, groups, 0.25)
    ref = selective_attention_reference(q, kc, vc, seqlens, groups, 0.25)
    torch.testing.assert_close(via_op, ref, rtol=1e-5, atol=1e-5)


def test_plan_is_deterministic_and_splits_long_caches():
    a = plan_selective_attention(1, 8, 4, 8192, 128, sms=132)
    assert a == plan_selective_attention(1, 8, 4, 8192, 128, sms=132)
    assert a.num_splits > 1 and a.use_dot
    big = plan_selective_attention(256, 8, 4, 1024, 128, sms=132)
    assert big.num_splits == 1
    assert plan_selective_attention(4, 32, 1, 4096, 128, sms=132).use_dot  # MHA: dot is faster
    assert plan_selective_attention(64, 8, 4, 8192, 128, sms=132).num_splits == 2
    # splits fill the wave to one program per SM, not two
    splits = {(b, k, fp8): plan_selective_attention(b, k, 4, 8192, 128, sms=132, page_size=128,
                                                    kv_fp8=fp8).num_splits
              for b, k in ((16, 4), (32, 4), (32, 8), (64, 8)) for fp8 in (False, True)}
    assert splits == {(16, 4, False): 2, (32, 4, False): 1, (32, 8, False): 1, (64, 8, False): 2,
                      (16, 4, True): 2, (32, 4, True): 1, (32, 8, True): 1, (64, 8, True): 2}


# ----------------------------------------------------------------------------- wrong inputs


def _bad(**change):
    q, kc, vc, seqlens, groups = _inputs(2, 8, 2, 16, 16, 1, torch.float32, device="cpu")
    args = dict(q=q, k_cache=kc, v_cache=vc, cache_seqlens=seqlens, groups=groups)
    args.update(change)
    return args


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(groups=torch.tensor([[0], [2]], dtype=torch.int32)), "outside \\[0, Hkv=2\\)"),
        (dict(groups=torch.tensor([[0], [-1]], dtype=torch.int32)), "outside"),
        (dict(groups=torch.tensor([[0, 0], [0, 1]], dtype=torch.int32)), "repeats"),
        (dict(cache_seqlens=torch.tensor([16, 17], dtype=torch.int32)), "S_max=16"),
        (dict(cache_seqlens=torch.tensor([16, 3], dtype=torch.int64)), "int32"),
        (dict(groups=torch.tensor([[0], [1]], dtype=torch.int64)), "int32"),
        (dict(groups=torch.zeros(2, 3, dtype=torch.int32)), "k=3"),
        (dict(q=torch.randn(2, 8, 16, dtype=torch.float64)), "dtype"),
        (dict(q=torch.randn(2, 8, 16).half()), "share its dtype"),
        (dict(q=torch.randn(2, 5, 16)), "multiple of Hkv"),
        (dict(q=torch.randn(3, 8, 16)), "does not match"),
        (dict(v_cache=torch.randn(2, 2, 15, 16)), "v_cache"),
    ],
)
def test_wrong_inputs_raise_clear_errors(change, message):
    with pytest.raises(ValueError, match=message):
        selective_attention(**_bad(**change))


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize(
    "b, hq, hkv, s, k, dtype, lens",
    [
        (1, 32, 8, 8192, 4, torch.bfloat16, "full"),
        (16, 32, 8, 4097, 2, torch.bfloat16, "mixed"),
        (64, 32, 8, 1024, 8, torch.bfloat16, "mixed"),
        (3, 32, 8, 1, 1, torch.bfloat16, "full"),
        (8, 32, 32, 2049, 16, torch.bfloat16, "mixed"),
        (2, 32, 32, 4096, 32, torch.bfloat16, "full"),
        (4, 32, 8, 999, 3, torch.float16, "mixed"),
        (4, 32, 32, 777, 5, torch.float32, "mixed"),
        (4, 32, 8, 1500, 6, torch.float32, "mixed"),
        (5, 9, 3, 300, 2, torch.bfloat16, "mixed"),   # SmolLM2: 3 heads/group, D=64
    ],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_gpu_real_shapes(b, hq, hkv, s, k, dtype, lens, seed):
    d = 64 if hq == 9 else 128
    _check(b, hq, hkv, s, d, k, dtype, lens=lens, seed=seed)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_cuda_graph_capture():
    q, kc, vc, seqlens, groups = _inputs(8, 32, 8, 2048, 128, 4, torch.bfloat16, seed=7)
    ws = selective_attention_workspace(q, kc, groups.shape[1])
    out = torch.empty_like(q)

    def step():
        selective_attention(q, kc, vc, seqlens, groups, out=out, workspace=ws, check_indices=False)

    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    out.fill_(float("nan"))
    q.copy_(torch.randn_like(q))
    groups.copy_(torch.stack([torch.randperm(8)[:4] for _ in range(8)]).int())
    graph.replay()
    torch.cuda.synchronize()
    ref = selective_attention_reference(q, kc, vc, seqlens, groups)
    assert _rel_err(out, ref) <= 1e-2


@needs_kernel
def test_custom_op_fake_and_compile():
    """The torch.library op has a working fake; torch.compile traces through the wrapper."""
    q, kc, vc, seqlens, groups = _inputs(2, 8, 2, 20, 16, 1, torch.float32, seed=9)
    torch.library.opcheck(torch.ops.polarc.selective_attention.default,
                          (q, kc, vc, seqlens, groups, 0.25))

    def step(q, kc, vc, seqlens, groups):
        return 2 * selective_attention(q, kc, vc, seqlens, groups, check_indices=False)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, kc, vc, seqlens, groups),
                               2 * selective_attention_reference(q, kc, vc, seqlens, groups))


# ----------------------------------------------------------------------------- paged caches


def _paged(kc: torch.Tensor, vc: torch.Tensor, page: int, seed: int = 0):
    """The contiguous caches scattered into page pools in a shuffled order (and spare pages of
    noise), with the block table that reads them back."""
    g = torch.Generator().manual_seed(seed)
    b, hkv, s, d = kc.shape
    per_row = -(-s // page)
    n = b * per_row + 3
    order = torch.randperm(n, generator=g)[: b * per_row].view(b, per_row)
    pools = []
    for c in (kc, vc):
        pool = torch.randn(n, hkv, page, d, generator=g).to(c.device, c.dtype)
        padded = torch.zeros(b, hkv, per_row * page, d, dtype=c.dtype, device=c.device)
        padded[:, :, :s] = c
        pool[order.to(c.device)] = padded.view(b, hkv, per_row, page, d).transpose(1, 2)
        pools.append(pool)
    return pools[0], pools[1], order.int().to(kc.device)


def test_paged_reference_is_the_contiguous_one() -> None:
    q, kc, vc, seqlens, groups = _inputs(3, 8, 2, 37, 16, 1, torch.float64, device="cpu")
    kp, vp, table = _paged(kc, vc, 16)
    ref = selective_attention_reference(q, kc, vc, seqlens, groups)
    got = selective_attention_reference(q, kp, vp, seqlens, groups, block_table=table)
    assert torch.equal(got, ref)


@needs_kernel
@pytest.mark.parametrize(
    "b, hq, hkv, s, d, k, page, splits",
    [
        (3, 8, 2, 37, 16, 1, 16, 3),    # GQA, several pages per split, odd S
        (2, 8, 2, 70, 16, 2, 32, 2),    # dense through the same kernel, blocks of 32
        (3, 4, 4, 21, 32, 3, 16, 1),    # MHA, one split (one launch)
        (2, 6, 3, 64, 16, 2, 64, 2),    # one page per row
    ])
def test_paged_matches_reference_fp32(b, hq, hkv, s, d, k, page, splits):
    q, kc, vc, seqlens, groups = _inputs(b, hq, hkv, s, d, k, torch.float32)
    kp, vp, table = _paged(kc, vc, page)
    plan = plan_selective_attention(b, k, hq // hkv, table.shape[1] * page, d, sms=4,
                                    num_splits=splits, page_size=page)
    out = torch.full_like(q, float("nan"))
    selective_attention(q, kp, vp, seqlens, groups, out=out, plan=plan, block_table=table)
    ref = selective_attention_reference(q.double(), kc.double(), vc.double(), seqlens, groups)
    assert not torch.isnan(out).any()
    assert _rel_err(out, ref) <= TOL[torch.float32]


@needs_kernel
def test_paged_default_plan_and_bad_tables():
    q, kc, vc, seqlens, groups = _inputs(2, 4, 2, 40, 16, 1, torch.float32)
    kp, vp, table = _paged(kc, vc, 16)
    out = selective_attention(q, kp, vp, seqlens, groups, block_table=table)
    ref = selective_attention_reference(q.double(), kc.double(), vc.double(), seqlens, groups)
    assert _rel_err(out, ref) <= TOL[torch.float32]
    with pytest.raises(ValueError, match="block_table must be int32"):
        selective_attention(q, kp, vp, seqlens, groups, block_table=table.long())
    bad = table.clone()
    bad[0, 0] = kp.shape[0]
    with pytest.raises(ValueError, match="names a page outside"):
        selective_attention(q, kp, vp, seqlens, groups, block_table=bad)
    with pytest.raises(ValueError, match="multiple of 16"):
        plan_selective_attention(2, 1, 2, 40, 16, sms=4, page_size=8)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("page", [16, 64, 256])
def test_gpu_paged_real_shapes(dtype, page):
    q, kc, vc, seqlens, groups = _inputs(16, 32, 8, 1000, 128, 4, dtype)
    kp, vp, table = _paged(kc, vc, page)
    out = selective_attention(q, kp, vp, seqlens, groups, block_table=table)
    ref = selective_attention_reference(q.double(), kc.double(), vc.double(), seqlens, groups)
    assert _rel_err(out, ref) <= TOL[dtype]
    contiguous = selective_attention(q, kc, vc, seqlens, groups)
    assert _rel_err(out, contiguous.double()) <= TOL[dtype]


# ----------------------------------------------------------------------------- FP8 caches


def _fp8(kc: torch.Tensor, vc: torch.Tensor):
    """float8 e4m3 copies of the caches with per-group scales (what calibration would give)."""
    scales = [c.abs().amax(dim=(0, 2, 3)).float() / FP8_MAX for c in (kc, vc)]
    return (*(quantize_kv(c.transpose(1, 2), s).transpose(1, 2).contiguous()
              for c, s in zip((kc, vc), scales, strict=True)), *scales)


def _position_major(c: torch.Tensor) -> torch.Tensor:
    """The same values stored with the position axis contiguous, as an FP8 page pool keeps V."""
    return c.transpose(2, 3).contiguous().transpose(2, 3)


@needs_kernel
@pytest.mark.parametrize(
    "b, hq, hkv, s, d, k, page, splits",
    [
        (3, 8, 2, 37, 16, 1, None, 3),  # GQA, contiguous, several splits
        (3, 8, 2, 37, 16, 2, 16, 2),    # dense through the same kernel, paged
        (3, 4, 4, 21, 32, 3, 16, 1),    # MHA, one launch
    ])
# bf16 dots are wrong in Triton's interpreter (the bf16 path is checked on the GPU only)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16] if CUDA else [torch.float32])
@pytest.mark.parametrize("v_position_major", [False, True])
def test_fp8_cache_matches_reference(b, hq, hkv, s, d, k, page, splits, dtype, v_position_major):
    """The kernel over a float8 cache against the reference over the same float8 bytes (so
    only the kernel's arithmetic differs), contiguous and paged, V stored either way;
    unselected heads are zeros."""
    q, kc, vc, seqlens, groups = _inputs(b, hq, hkv, s, d, k, torch.float32)
    k8, v8, k_scale, v_scale = _fp8(kc, vc)
    table = None
    if page is not None:
        k8, v8, table = _paged(k8.view(torch.uint8), v8.view(torch.uint8), page)
        k8, v8 = k8.view(FP8), v8.view(FP8)
    if v_position_major:
        v8 = _position_major(v8)
    s_max = s if page is None else table.shape[1] * page
    plan = plan_selective_attention(b, k, hq // hkv, s_max, d, sms=4, num_splits=splits,
                                    page_size=page)
    q = q.to(dtype)
    out = torch.full_like(q, float("nan"))
    selective_attention(q, k8, v8, seqlens, groups, out=out, plan=plan, block_table=table,
                        k_scale=k_scale, v_scale=v_scale)
    ref = selective_attention_reference(q.double(), k8, v8, seqlens, groups, block_table=table,
                                        k_scale=k_scale, v_scale=v_scale)
    assert not torch.isnan(out).any()
    assert _rel_err(out, ref) <= TOL[dtype]
    unquantized = selective_attention_reference(q.double(), kc.double(), vc.double(), seqlens,
                                                groups)
    assert _rel_err(out, unquantized) <= 0.06  # e4m3 keeps 3 bits of mantissa


def _sinks(kc, vc, table, dtype, n):
    """Each row's position 0 unquantized in `dtype`, indexed like the cache's first axis of n
    rows or pages (its first page with a table)."""
    sinks = [torch.zeros(n, kc.shape[1], kc.shape[3], dtype=dtype, device=kc.device)
             for _ in range(2)]
    rows = torch.arange(kc.shape[0]) if table is None else table[:, 0].long().cpu()
    for sink, c in zip(sinks, (kc, vc), strict=True):
        sink[rows.to(c.device)] = c[:, :, 0].to(dtype)
    return sinks


@needs_kernel
@pytest.mark.parametrize(
    "b, hq, hkv, s, d, k, page, splits",
    [
        (3, 8, 2, 37, 16, 1, None, 3),  # contiguous, several splits: one of them holds 0
        (3, 8, 2, 37, 16, 2, 16, 2),    # dense, paged
        (3, 4, 4, 21, 32, 3, 16, 1),    # MHA, one launch
    ])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16] if CUDA else [torch.float32])
@pytest.mark.parametrize("v_position_major", [False, True])
def test_fp8_cache_sinks_match_reference(b, hq, hkv, s, d, k, page, splits, dtype,
                                         v_position_major):
    """With sinks, position 0 is read unquantized from them (rows of length 0 and 1
    included): the kernel against the reference, and the reference against plain attention
    over the dequantized cache whose position 0 is the unquantized one."""
    q, kc, vc, seqlens, groups = _inputs(b, hq, hkv, s, d, k, torch.float32)
    seqlens[0], seqlens[1] = 1, 0
    k8, v8, k_scale, v_scale = _fp8(kc, vc)
    table = None
    if page is not None:
        k8, v8, table = _paged(k8.view(torch.uint8), v8.view(torch.uint8), page)
        k8, v8 = k8.view(FP8), v8.view(FP8)
    if v_position_major:
        v8 = _position_major(v8)
    q = q.to(dtype)
    k_sink, v_sink = _sinks(kc, vc, table, dtype, k8.shape[0])
    s_max = s if page is None else table.shape[1] * page
    plan = plan_selective_attention(b, k, hq // hkv, s_max, d, sms=4, num_splits=splits,
                                    page_size=page)
    out = torch.full_like(q, float("nan"))
    selective_attention(q, k8, v8, seqlens, groups, out=out, plan=plan, block_table=table,
                        k_scale=k_scale, v_scale=v_scale, k_sink=k_sink, v_sink=v_sink)
    ref = selective_attention_reference(q.double(), k8, v8, seqlens, groups, block_table=table,
                                        k_scale=k_scale, v_scale=v_scale, k_sink=k_sink,
                                        v_sink=v_sink)
    assert not torch.isnan(out).any()
    assert _rel_err(out, ref) <= TOL[dtype]
    assert (out[1] == 0).all()  # length 0: nothing
    # the definition: the dequantized cache with position 0 as it was
    k_back, v_back = (dequantize_kv(c, sc) for c, sc in
                      zip(_fp8(kc, vc)[:2], (k_scale, v_scale), strict=True))
    k_back[:, :, 0], v_back[:, :, 0] = kc[:, :, 0], vc[:, :, 0]
    plain = selective_attention_reference(q.double(), k_back.double(), v_back.double(), seqlens,
                                          groups)
    assert _rel_err(ref, plain) <= (1e-6 if dtype == torch.float32 else 1e-2)
    without = selective_attention_reference(q.double(), k8, v8, seqlens, groups,
                                            block_table=table, k_scale=k_scale, v_scale=v_scale)
    row0 = [h for h in range(hq) if (groups[0] == h // (hq // hkv)).any()]
    assert not torch.allclose(without[0, row0], ref[0, row0])  # the sink is what row 0 reads


@needs_kernel
def test_fp8_cache_bad_inputs():
    q, kc, vc, seqlens, groups = _inputs(2, 4, 2, 20, 16, 1, torch.float32)
    k8, v8, k_scale, v_scale = _fp8(kc, vc)
    with pytest.raises(ValueError, match="k_scale and v_scale go with a float8 cache"):
        selective_attention(q, k8, v8, seqlens, groups)
    with pytest.raises(ValueError, match="k_scale and v_scale go with a float8 cache"):
        selective_attention(q, kc, vc, seqlens, groups, k_scale=k_scale, v_scale=v_scale)
    with pytest.raises(ValueError, match=r"contiguous float32 \[Hkv=2\]"):
        selective_attention(q, k8, v8, seqlens, groups, k_scale=k_scale.double(),
                            v_scale=v_scale)
    with pytest.raises(ValueError, match="both float8_e4m3fn"):
        selective_attention(q, k8, vc, seqlens, groups, k_scale=k_scale, v_scale=v_scale)
    sink = torch.zeros(2, 2, 16)
    with pytest.raises(ValueError, match="k_sink and v_sink go together, with a float8"):
        selective_attention(q, kc, vc, seqlens, groups, k_sink=sink, v_sink=sink)
    with pytest.raises(ValueError, match="k_sink and v_sink go together"):
        selective_attention(q, k8, v8, seqlens, groups, k_scale=k_scale, v_scale=v_scale,
                            k_sink=sink)
    with pytest.raises(ValueError, match=r"must be torch.float32 \[2, 2, 16\]"):
        selective_attention(q, k8, v8, seqlens, groups, k_scale=k_scale, v_scale=v_scale,
                            k_sink=sink[:1], v_sink=sink[:1])
    scattered = v8.transpose(0, 3).contiguous().transpose(0, 3)  # neither D nor S adjacent
    with pytest.raises(ValueError, match="v_cache a contiguous last or position axis"):
        selective_attention(q, k8, scattered, seqlens, groups, k_scale=k_scale, v_scale=v_scale)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("page", [None, 64, 128])
@pytest.mark.parametrize("v_position_major", [False, True])
def test_gpu_fp8_real_shapes(page, v_position_major):
    q, kc, vc, seqlens, groups = _inputs(16, 32, 8, 1000, 128, 4, torch.bfloat16)
    k8, v8, k_scale, v_scale = _fp8(kc.float(), vc.float())
    table = None
    if page is not None:
        k8, v8, table = _paged(k8.view(torch.uint8), v8.view(torch.uint8), page)
        k8, v8 = k8.view(FP8), v8.view(FP8)
    if v_position_major:
        v8 = _position_major(v8)
    plan = plan_selective_attention(16, 4, 4, table.shape[1] * page if page else 1000, 128,
                                    sms=torch.cuda.get_device_properties(0).multi_processor_count,
                                    page_size=page, kv_fp8=True)
    out = selective_attention(q, k8, v8, seqlens, groups, block_table=table, k_scale=k_scale,
                              v_scale=v_scale, plan=plan)
    ref = selective_attention_reference(q.double(), k8, v8, seqlens, groups, block_table=table,
                                        k_scale=k_scale, v_scale=v_scale)
    assert _rel_err(out, ref) <= TOL[torch.bfloat16]
