"""The one-launch KV append against indexed assignment."""

from __future__ import annotations

import pytest
import torch
from polarc.plugins.kv_write import write_kv, write_kv_reference
from polarc.plugins.reference import FP8, FP8_MAX

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize(("b", "cache_rows", "hkv", "s", "d"), [(1, 1, 3, 5, 64), (3, 4, 2, 9, 16),
                                                              (4, 4, 8, 33, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_indexed_assignment(b, cache_rows, hkv, s, d, dtype) -> None:
    g = torch.Generator().manual_seed(0)
    fused = torch.randn(b, 3 * hkv * d, generator=g).to(DEVICE, dtype)  # v is a strided view
    k = torch.randn(b, hkv, d, generator=g).to(DEVICE, dtype)
    v = fused[:, hkv * d: 2 * hkv * d].view(b, hkv, d)
    caches = [torch.randn(cache_rows, hkv, s, d, generator=g).to(DEVICE, dtype) for _ in range(2)]
    expected = [c.clone() for c in caches]
    pos = torch.randint(0, s, (b,), generator=g, dtype=torch.int32).to(DEVICE)
    write_kv(k, v, caches[0], caches[1], pos)
    write_kv_reference(k, v, expected[0], expected[1], pos)
    assert torch.equal(caches[0], expected[0]) and torch.equal(caches[1], expected[1])


def test_bad_input() -> None:
    k = torch.zeros(2, 2, 4, device=DEVICE)
    cache = torch.zeros(2, 3, 5, 4, device=DEVICE)
    with pytest.raises(ValueError, match="do not fit"):
        write_kv(k, k, cache, cache, torch.zeros(2, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="int32"):
        fits = torch.zeros(2, 2, 5, 4, device=DEVICE)
        write_kv(k, k, fits, fits.clone(), torch.zeros(2, device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_write_lands_in_the_rows_pages(dtype) -> None:
    g = torch.Generator().manual_seed(1)
    b, hkv, d, page, pages = 3, 2, 16, 16, 7
    k = torch.randn(b, hkv, d, generator=g).to(DEVICE, dtype)
    v = torch.randn(b, hkv, d, generator=g).to(DEVICE, dtype)
    pools = [torch.randn(pages, hkv, page, d, generator=g).to(DEVICE, dtype) for _ in range(2)]
    expected = [p.clone() for p in pools]
    originals = [p.clone() for p in pools]
    table = torch.tensor([[4, 1, 0], [2, 6, 3], [5, 0, 0]], dtype=torch.int32, device=DEVICE)
    pos = torch.tensor([17, 40, -1], dtype=torch.int32, device=DEVICE)  # pages 1, 3; none
    write_kv(k, v, pools[0], pools[1], pos, block_table=table)
    write_kv_reference(k, v, expected[0], expected[1], pos, block_table=table)
    assert torch.equal(pools[0], expected[0]) and torch.equal(pools[1], expected[1])
    # the reference's own definition: row 0's position 17 is page 1, offset 1
    assert torch.equal(expected[0][1, :, 1], k[0]) and torch.equal(expected[1][3, :, 8], v[1])
    # row 2's negative position writes nothing: only pages 1 and 3 changed
    changed = [(pool != before).flatten(1).any(1).nonzero()[:, 0].tolist()
               for pool, before in zip(pools, originals, strict=True)]
    assert changed == [[1, 3], [1, 3]]


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("v_position_major", [False, True])
def test_fp8_write_is_the_reference_quantization(paged, dtype, v_position_major) -> None:
    """Into a float8 cache the kernel writes the reference's bytes exactly (correctly
    rounded K / scale, saturated at ±448, NaN as 0), contiguous and paged, V stored either
    way (an FP8 page pool keeps it position-major)."""
    g = torch.Generator().manual_seed(2)
    b, hkv, d, page, pages = 4, 3, 32, 16, 9
    k = (torch.randn(b, hkv, d, generator=g) * 4).to(DEVICE, dtype)
    v = (torch.randn(b, hkv, d, generator=g) * 4).to(DEVICE, dtype)
    k[0, 0, :3] = torch.tensor([1e4, -1e4, 0.0])  # beyond ±448 after scaling: saturates
    v[3, 1, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    k_scale = torch.tensor([0.01, 0.02, 0.05], device=DEVICE)
    v_scale = torch.tensor([0.03, 0.01, 0.02], device=DEVICE)
    shape = (pages, hkv, page, d) if paged else (b, hkv, page, d)
    caches = [torch.zeros(shape, device=DEVICE).to(FP8) for _ in range(2)]
    if v_position_major:
        n = shape[0]
        caches[1] = torch.zeros(n, hkv, d, page, device=DEVICE).to(FP8).transpose(2, 3)
    expected = [c.clone() for c in caches]
    table = torch.tensor([[4, 1], [2, 6], [5, 0], [3, 7]], dtype=torch.int32, device=DEVICE) \
        if paged else None
    pos = torch.tensor([17, 3, -1, 30] if paged else [5, 3, -1, 15], dtype=torch.int32,
                       device=DEVICE)
    write_kv(k, v, caches[0], caches[1], pos, table, k_scale, v_scale)
    write_kv_reference(k, v, expected[0], expected[1], pos, table, k_scale, v_scale)
    for got, want in zip(caches, expected, strict=True):
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    assert caches[0].float().abs().max() == FP8_MAX
    assert caches[1].float().isfinite().all()  # NaN written as 0, ±inf saturated
    at = (table[3, 30 // page].item(), 1, 30 % page) if paged else (3, 1, 15)
    assert caches[1][at][:3].float().tolist() == [0.0, FP8_MAX, -FP8_MAX]
    with pytest.raises(ValueError, match="needs k_scale and v_scale"):
        write_kv(k, v, caches[0], caches[1], pos, table)


@pytest.mark.parametrize("paged", [False, True])
def test_fp8_write_keeps_position_zero_in_the_sinks(paged) -> None:
    """With sinks, a position 0 also goes unquantized to the sink row of its page (or row),
    keys less the offset; other positions leave the sinks alone; the cache bytes are the
    reference's either way."""
    g = torch.Generator().manual_seed(3)
    b, hkv, d, page, pages = 4, 2, 16, 16, 9
    k = torch.randn(b, hkv, d, generator=g).to(DEVICE)
    v = torch.randn(b, hkv, d, generator=g).to(DEVICE)
    scales = torch.tensor([0.01, 0.02], device=DEVICE)
    n = pages if paged else b
    caches = [torch.zeros((n, hkv, page, d), device=DEVICE).to(FP8) for _ in range(2)]
    sinks = [torch.full((n, hkv, d), 7.0, device=DEVICE) for _ in range(2)]
    expected = [c.clone() for c in caches + sinks]
    table = torch.tensor([[4, 1], [2, 6], [5, 0], [3, 7]], dtype=torch.int32, device=DEVICE) \
        if paged else None
    pos = torch.tensor([0, 16 if paged else 3, -1, 0], dtype=torch.int32, device=DEVICE)
    offset = torch.randn(hkv, d, generator=g).to(DEVICE)
    write_kv(k, v, *caches, pos, table, scales, scales, *sinks, k_offset=offset)
    write_kv_reference(k, v, expected[0], expected[1], pos, table, scales, scales,
                       expected[2], expected[3], k_offset=offset)
    for got, want in zip(caches, expected[:2], strict=True):
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    for got, want in zip(sinks, expected[2:], strict=True):
        assert torch.equal(got, want)
    first = [4, 3] if paged else [0, 3]  # rows 0 and 3 wrote position 0
    assert torch.equal(sinks[0][first], k[[0, 3]] - offset)  # keys in the cache's basis
    assert torch.equal(sinks[1][first], v[[0, 3]])
    untouched = [r for r in range(n) if r not in first]
    assert (sinks[0][untouched] == 7.0).all()
    with pytest.raises(ValueError, match="sinks go with a float8 cache"):
        write_kv(k, v, *caches, pos, table, scales, scales, sinks[0][:1], sinks[1][:1])
    with pytest.raises(ValueError, match="k_offset goes with a float8 cache"):
        write_kv(k, v, *caches, pos, table, scales, scales, *sinks, k_offset=offset[:1])


def test_fp8_rounding_over_every_e4m3_interval() -> None:
    """Every float8 e4m3 value, the midpoints between neighbours (ties go to even) and points
    just beside them, subnormals included: the kernel's quantization is torch's, bit for bit."""
    grid = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    grid = grid[torch.isfinite(grid)].unique()  # sorted, -448 .. 448
    mids = (grid[1:] + grid[:-1]) / 2
    x = torch.cat([grid, mids, mids.nextafter(torch.tensor(1e9)),
                   mids.nextafter(torch.tensor(-1e9)), torch.tensor([500.0, -1e6])])
    n = x.numel()
    k = x.view(n, 1, 1).expand(n, 1, 16).contiguous().to(DEVICE)
    caches = [torch.zeros(n, 1, 1, 16, device=DEVICE).to(FP8) for _ in range(2)]
    one = torch.ones(1, device=DEVICE)
    write_kv(k, k, caches[0], caches[1], torch.zeros(n, dtype=torch.int32, device=DEVICE),
             None, one, one)
    want = x.clamp(-FP8_MAX, FP8_MAX).to(FP8).view(torch.uint8)
    assert torch.equal(caches[0][:, 0, 0, 0].view(torch.uint8).cpu(), want)


@pytest.mark.parametrize("kind", ["fp8 paged, rotated, offset, sinks", "plain cache, rotary",
                                  "no rotary positions, rotated"])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_rope_write_kv_is_rotary_rotation_then_write(kind, dtype, tol) -> None:
    """The fused rotary stage and KV append: the queries it returns and the caches it writes
    against the step's stages one by one (fp32 exactly; fp16 up to its rounding). Row 2 holds
    no sequence (position -1): its queries are still computed, nothing is written."""
    from polarc.plugins.kv_write import rope_write_kv
    from polarc.plugins.reference import dequantize_kv, hadamard

    from polarc.runtime.kernels import rope_write_kv_reference

    g = torch.Generator().manual_seed(4)
    b, hkv, group, d, page, pages = 3, 2, 3, 32, 16, 8
    fp8, paged = kind.startswith("fp8"), kind.startswith("fp8")
    q = torch.randn(b, hkv * group, d, generator=g).to(DEVICE, dtype)
    qkv = torch.randn(b, 2 * hkv * d + 5, generator=g).to(DEVICE, dtype)  # k, v as views
    k = qkv[:, :hkv * d].view(b, hkv, d)
    v = qkv[:, hkv * d:2 * hkv * d].view(b, hkv, d)
    ang = torch.rand(b, d // 2, generator=g) * 6
    cos, sin = (f(torch.cat([ang, ang], -1)).to(DEVICE, dtype) for f in (torch.cos, torch.sin))
    if kind.startswith("no rotary"):
        cos = sin = None
    rot = hadamard(d, dtype, DEVICE) if "rotated" in kind else None
    rows = pages if paged else b
    cache_dtype = FP8 if fp8 else dtype
    caches = [torch.zeros(rows, hkv, page, d, device=DEVICE).to(cache_dtype) for _ in range(2)]
    expected = [c.clone() for c in caches]
    table = torch.tensor([[4, 1], [2, 6], [5, 0]], dtype=torch.int32, device=DEVICE) \
        if paged else None
    pos = torch.tensor([17, 0, -1] if paged else [3, 0, -1], dtype=torch.int32, device=DEVICE)
    scales = (torch.tensor([0.02, 0.05], device=DEVICE),) * 2 if fp8 else ()
    sinks = [torch.zeros(rows, hkv, d, device=DEVICE, dtype=dtype) for _ in range(2)] \
        if fp8 else []
    sinks_expected = [s.clone() for s in sinks]
    offset = torch.randn(hkv, d, generator=g).to(DEVICE, dtype) if fp8 else None
    # the paged float8 step selects a group too (and, on CUDA, prefetches its first pages)
    scores = torch.randn(b, hkv, generator=g).to(DEVICE) if fp8 else None
    groups, groups_expected = ([torch.full((b, 1), -1, dtype=torch.int32, device=DEVICE)
                                for _ in range(2)] if fp8 else (None, None))
    got_q = rope_write_kv(q, k, v, *caches, pos, table, *scales, *sinks, k_offset=offset,
                          cos=cos, sin=sin, rotation=rot, scores=scores, groups=groups)
    want_q = rope_write_kv_reference(q, k, v, *expected, pos, table, *scales,
                                     *sinks_expected, k_offset=offset, cos=cos, sin=sin,
                                     rotation=rot, scores=scores, groups=groups_expected)
    if fp8:
        assert torch.equal(groups, groups_expected)

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()

    assert rel(got_q, want_q) < tol
    for got, want, scale in zip(caches, expected, scales or (None, None), strict=True):
        if fp8:  # compared as values: fp16 rounding may move a byte by one step
            got = dequantize_kv(got, scale)
            want = dequantize_kv(want, scale)
        assert rel(got, want) < (tol if not fp8 or dtype == torch.float32 else 0.02)
    for got, want in zip(sinks, sinks_expected, strict=True):
        assert rel(got, want) < tol


def test_rope_write_kv_bad_input() -> None:
    from polarc.plugins.kv_write import rope_write_kv

    k = torch.zeros(2, 2, 16, device=DEVICE)
    cache = torch.zeros(2, 2, 5, 16, device=DEVICE)
    pos = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="q must be"):
        rope_write_kv(torch.zeros(2, 3, 16, device=DEVICE), k, k, cache, cache.clone(), pos)
    with pytest.raises(ValueError, match="cos and sin must both be"):
        rope_write_kv(torch.zeros(2, 4, 16, device=DEVICE), k, k, cache, cache.clone(), pos,
                      cos=torch.zeros(2, 16, device=DEVICE))
    with pytest.raises(ValueError, match="rotation must be"):
        rope_write_kv(torch.zeros(2, 4, 16, device=DEVICE), k, k, cache, cache.clone(), pos,
                      rotation=torch.zeros(8, 8, device=DEVICE))


def _append_with_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The groups rope_write_kv selects from `scores` [B, Hkv] (2 query heads a group, D 16)."""
    from polarc.plugins.kv_write import rope_write_kv

    b, hkv = scores.shape
    q = torch.randn(b, 2 * hkv, 16, device=DEVICE)
    kv = torch.randn(b, hkv, 16, device=DEVICE)
    cache = torch.zeros(b, hkv, 4, 16, device=DEVICE)
    pos = torch.zeros(b, dtype=torch.int32, device=DEVICE)
    groups = torch.full((b, k), -7, dtype=torch.int32, device=DEVICE)  # poisoned
    rope_write_kv(q, kv, kv, cache, cache.clone(), pos, scores=scores.to(DEVICE), groups=groups)
    return groups.cpu()


@pytest.mark.parametrize(("b", "hkv", "k"), [(1, 3, 1), (5, 3, 2), (4, 8, 4), (3, 8, 8),
                                             (2, 32, 16), (6, 12, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_write_kv_selects_the_top_k_groups(b, hkv, k, dtype) -> None:
    """The step's group selection inside the KV append: each row's k highest-scoring groups,
    highest first (distinct scores in every dtype, so the order is fully defined)."""
    from polarc.plugins.reference import topk_groups_reference

    scores = torch.stack([torch.randperm(hkv) for _ in range(b)]).to(dtype) - hkv / 2
    assert torch.equal(_append_with_topk(scores, k), topk_groups_reference(scores, k))


def test_rope_write_kv_top_k_ties_go_to_the_lower_group() -> None:
    from polarc.plugins.reference import topk_groups_reference

    scores = torch.tensor([[1.0, 2.0, 2.0, 0.5], [3.0, 3.0, 3.0, 3.0]])
    assert _append_with_topk(scores, 2).tolist() == [[1, 2], [0, 1]]
    assert topk_groups_reference(scores, 2).tolist() == [[1, 2], [0, 1]]


def test_rope_write_kv_top_k_bad_input() -> None:
    from polarc.plugins.kv_write import rope_write_kv

    q, k = torch.zeros(2, 4, 16, device=DEVICE), torch.zeros(2, 2, 16, device=DEVICE)
    cache = torch.zeros(2, 2, 5, 16, device=DEVICE)
    pos = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    scores = torch.zeros(2, 2, device=DEVICE)
    for bad in ({"scores": scores},
                {"scores": scores, "groups": torch.zeros(2, 3, dtype=torch.int32, device=DEVICE)},
                {"scores": scores, "groups": torch.zeros(2, 1, device=DEVICE)},
                {"scores": scores.int(), "groups": torch.zeros(2, 1, dtype=torch.int32,
                                                               device=DEVICE)}):
        with pytest.raises(ValueError, match="scores must be float"):
            rope_write_kv(q, k, k, cache, cache.clone(), pos, **bad)
