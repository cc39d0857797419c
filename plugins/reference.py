"""The definitions of polarc's kernels, in plain torch (no triton): what each Triton kernel in
this package must compute, and what the runtime runs where there is no GPU.

Layouts are the kernels' (see each kernel module's docstring):

- selective attention: ``q [B, Hq, D]``, ``k_cache`` / ``v_cache [B', Hkv, S_max, D]``
  (B' >= B; the first B rows are read), ``cache_seqlens [B]`` int32 (valid positions, this
  token included), ``groups [B, k]`` int32 → ``[B, Hq, D]``, heads of unselected groups zero;
- the same over a **paged** cache: ``k_cache`` / ``v_cache`` are page pools ``[N, Hkv, P, D]``
  (each (page, group) one contiguous ``[P, D]`` stream) and ``block_table [B, M]`` int32 names
  each row's pages in order: position s of row b is ``pool[block_table[b, s // P], :, s % P]``
  (`gather_pages` turns that back into the contiguous layout, which defines it);
- an FP8 cache (float8 e4m3) holds K / scale and V / scale, one scale per KV group (``k_scale``,
  ``v_scale [Hkv]`` float32, per layer): written by `quantize_kv` (saturating at ±448), read
  back times the scale; the math stays fp32. Its **sinks** ``k_sink``, ``v_sink [N, Hkv, D]``
  (the compute dtype) hold each sequence's position 0 unquantized, indexed like the cache's
  first axis (the page that holds position 0, or the row of a contiguous cache): the
  attention sink most heads put much of their weight on, whose rounding would move every
  later query's softmax. Appends write them too; attention reads position 0 from them;
- top-k groups: ``scores [B, Hkv]`` → ``groups [B, k]`` int32, highest first, ties to the lower
  group;
- KV append: ``k``, ``v [B, Hkv, D]`` written at ``positions [B]`` of the caches (or of the
  rows' pages, with a block table); a negative position writes nothing;
- selective GEMM pair: ``relu(x @ w1[idx].T + b1[idx])`` and ``h @ w2t[idx]``;
- FP8 linear: ``x [M, K] @ (w [N, K] float8 * scale [N]).T + bias`` → ``[M, N]``; x may be
  taken as two float8 terms with a scale per row (`split_rows_fp8`).

Math is fp32 (fp64 for fp64 inputs); results come back in the input dtype.
"""

from __future__ import annotations

import math

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite float8 e4m3fn


def _acc(t: torch.Tensor) -> torch.Tensor:
    """At least fp32 (fp64 stays fp64, for references computed in double)."""
    return t if t.dtype == torch.float64 else t.float()


def quantize_kv(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float8 e4m3 of x / scale: x ``[..., Hkv, D]``, scale ``[Hkv]`` (saturating; NaN as 0, so
    that a pool holds finite values only: the paged float8 kernel reads whole blocks)."""
    s = scale.to(x.device, torch.float32)[:, None]
    return (x.float() / s).nan_to_num(nan=0.0).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def hadamard(n: int, dtype: torch.dtype = torch.float32,
             device: torch.device | str = "cpu") -> torch.Tensor:
    """The orthonormal Hadamard matrix ``[n, n]`` (n a power of two; Sylvester's order).

    An FP8 cache stores keys rotated by it, and queries are rotated alike: q.k is unchanged,
    but keys' and queries' large channels (often the same few) are spread over every
    channel, so e4m3's relative rounding no longer lands on the products that dominate the
    logits (on SmolLM2, 27% less attention-output error than keys stored as they are)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"hadamard: n must be a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / n ** 0.5).to(dtype=dtype, device=device)


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 of a cache ``[B, Hkv, S, D]`` stored as float8: q times each group's scale."""
    return q.float() * scale.to(q.device, torch.float32)[None, :, None, None]


def split_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows ``x [M, K]`` as two float8 e4m3 terms and a scale per row, ``x ~ s[:, None] * (hi +
    lo)``: hi rounds x / s (s = the row's largest magnitude / 448), lo rounds what hi left
    (fp32 math). Returns (hi, lo ``[M, K]`` float8_e4m3fn, s ``[M]`` float32). Each term keeps 3
    mantissa bits and lo starts where hi's rounding error does, so together they hold x to
    about bf16's precision, and a product with a float8 weight needs no widening."""
    t = x.float()
    amax = t.abs().amax(-1).clamp_min(1e-30)
    # a true division (`FP8_MAX / amax` would be reciprocal-then-multiply, torch's __rtruediv__,
    # one ulp off the kernel's IEEE division; lo keeps that ulp)
    t = (t * (torch.full_like(amax, FP8_MAX) / amax)[:, None]).clamp(-FP8_MAX, FP8_MAX)
    hi = t.to(FP8)
    return hi, (t - hi.float()).to(FP8), amax / FP8_MAX


def fp8_linear_reference(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor,
                         bias: torch.Tensor | None = None, swiglu: bool = False,
                         x_pair: bool = False) -> torch.Tensor:
    """``x @ (w * scale[:, None]).T + bias`` for a float8 weight ``w [N, K]`` with a scale per
    output channel ``scale [N]`` (fp32 math, x's dtype out). `swiglu`: w's rows are a SwiGLU
    MLP's gate then up (N = 2F): ``silu(gate) * up`` ``[.., F]``, rounded once at the end.
    `x_pair`: x ``[M, K]`` first rounded to its two float8 terms (`split_rows_fp8`)."""
    if x_pair:
        hi, lo, s = split_rows_fp8(x)
        x_used = (s[:, None] * (hi.float() + lo.float())).to(_acc(x).dtype)
    else:
        x_used = _acc(x)
    y = x_used @ (w.to(_acc(x).dtype) * scale.to(_acc(x).dtype)[:, None]).T
    if bias is not None:
        y = y + _acc(bias)
    if swiglu:
        gate, up = y.chunk(2, dim=-1)
        y = torch.nn.functional.silu(gate) * up
    return y.to(x.dtype)


def gather_pages(pool: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` positions of each row's pages as a contiguous cache: pool
    ``[N, Hkv, P, D]``, block_table ``[B, M]`` → ``[B, Hkv, length, D]``."""
    b = block_table.shape[0]
    _, hkv, page, d = pool.shape
    n = -(-length // page)
    rows = pool[block_table[:, :n].long()]  # [B, n, Hkv, P, D]
    return rows.permute(0, 2, 1, 3, 4).reshape(b, hkv, n * page, d)[:, :, :length]


def sink_rows(b: int, block_table: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """Where rows 0..b-1 keep position 0 in the cache's first axis: their first page, or
    themselves in a contiguous cache."""
    if block_table is not None:
        return block_table[:b, 0].long()
    return torch.arange(b, device=device)


def read_cache(cache: torch.Tensor, scale: torch.Tensor | None, sink: torch.Tensor | None,
               length: int, block_table: torch.Tensor | None = None, rows: int | None = None,
               dtype: torch.dtype | None = None) -> torch.Tensor:
    """The first `length` positions of the first `rows` rows of a cache (contiguous, or pages
    with a block table) as ``[rows, Hkv, length, D]`` in `dtype` (default: at least fp32): a
    float8 one times its scales, its position 0 from `sink` when given."""
    rows = cache.shape[0] if rows is None else rows
    if block_table is not None:
        x = gather_pages(cache, block_table[:rows], length)
    else:
        x = cache[:rows, :, :length]
    dtype = dtype or (torch.float64 if x.dtype == torch.float64 else torch.float32)
    x = dequantize_kv(x, scale).to(dtype) if x.dtype == FP8 else x.to(dtype)
    if sink is not None and length > 0:
        x = x if cache.dtype == FP8 else x.clone()  # not a view of the cache: written below
        x[:, :, 0] = sink[sink_rows(rows, block_table, cache.device)].to(x.dtype)
    return x


def selective_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    groups: torch.Tensor,
    scale: float | None = None,
    block_table: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    k_sink: torch.Tensor | None = None,
    v_sink: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention over each row's selected KV groups (module docstring for layouts),
    over a contiguous cache or, with `block_table`, a paged one; a float8 cache is read back
    times `k_scale` / `v_scale`, position 0 from its sinks when given."""
    b, hq, d = q.shape
    hkv = k_cache.shape[1]
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(d)
    s = int(cache_seqlens.max().item()) if b else 0
    qg = _acc(q).view(b, hkv, hq // hkv, d)
    k, v = (read_cache(c, sc, sink, s, block_table, b, qg.dtype)
            for c, sc, sink in ((k_cache, k_scale, k_sink), (v_cache, v_scale, v_sink)))
    scores = torch.einsum("bhgd,bhsd->bhgs", qg, k) * scale
    valid = torch.arange(s, device=q.device)[None, :] < cache_seqlens[:, None].to(q.device)
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row of length 0 gives zeros
    o = torch.einsum("bhgs,bhsd->bhgd", p, v)
    keep = torch.zeros(b, hkv, dtype=torch.bool, device=q.device).scatter_(1, groups.long(), True)
    return (o * keep[:, :, None, None]).reshape(b, hq, d).to(q.dtype)


def topk_groups_reference(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k highest-scoring groups per row, highest first, ties to the lower index; int32."""
    order = scores.float().sort(dim=-1, descending=True, stable=True).indices
    return order[:, :k].to(torch.int32)


def write_kv_reference(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, positions: torch.Tensor,
                       block_table: torch.Tensor | None = None,
                       k_scale: torch.Tensor | None = None,
                       v_scale: torch.Tensor | None = None,
                       k_sink: torch.Tensor | None = None,
                       v_sink: torch.Tensor | None = None,
                       k_offset: torch.Tensor | None = None) -> None:
    """cache[b, :, positions[b]] = new[b] for K and V (in place); with a block table, the
    row's page that holds the position; a float8 cache gets them quantized by the scales,
    keys less `k_offset` [Hkv, D] (in fp32) when given, and a position 0 also goes
    unquantized to the sinks when given."""
    pos = positions.long()
    rows = torch.nonzero(pos >= 0)[:, 0]
    pos, k, v = pos[rows], k[rows], v[rows]
    if k_offset is not None:
        k = k.float() - k_offset.float()
    first = pos == 0
    if block_table is not None:
        page = k_cache.shape[2]
        rows, pos = block_table[rows, pos // page].long(), pos % page
    if k_sink is not None:
        k_sink[rows[first]] = k[first].to(k_sink.dtype)
        v_sink[rows[first]] = v[first].to(v_sink.dtype)
    if k_cache.dtype == FP8:
        k, v = quantize_kv(k, k_scale), quantize_kv(v, v_scale)
    k_cache[rows, :, pos] = k
    v_cache[rows, :, pos] = v


def selective_gemm_up_reference(
    x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, idx: torch.Tensor
) -> torch.Tensor:
    """``relu(x @ w1[idx].T + b1[idx])``: only the neurons in ``idx`` (output column i is
    neuron ``idx[i]``)."""
    y = _acc(x) @ _acc(w1[idx.long()]).T
    if b1 is not None:
        y = y + _acc(b1[idx.long()])
    return torch.relu(y).to(x.dtype)


def selective_gemm_down_reference(
    h: torch.Tensor, w2t: torch.Tensor, idx: torch.Tensor
) -> torch.Tensor:
    """``h @ w2t[idx]`` (= ``h @ w2[:, idx].T``): the down projection over neurons ``idx``,
    with the down weight stored neuron-major (``w2t [N, d_out]``)."""
    return (_acc(h) @ _acc(w2t[idx.long()])).to(h.dtype)
