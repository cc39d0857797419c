"""Append one decode token's keys and values to the static caches, in one launch.

Indexed assignment (``k_cache[rows, :, pos] = k``) is one or two kernels per tensor, so four
per layer for K and V; `write_kv` writes both with one program per (row, KV group).
`rope_write_kv`, the decode step's, also applies the rotary positions (and an FP8 cache's key
rotation) to the queries and the key in the same launch, where the step ran three, and picks
each row's top-k KV groups from the router scores (a launch of its own before).

Layouts: ``k``, ``v`` ``[B, Hkv, D]`` (last axis contiguous, other strides free: views into a
fused projection output work); ``k_cache``, ``v_cache`` ``[B', Hkv, S_max, D]`` with B' >= B
(the first B rows are written), K's last axis contiguous, V's last or position axis (an FP8 pool
keeps V position-major: `selective_attention`'s docstring says why); ``positions [B]`` int32,
each < S_max (a negative position writes nothing: a slot that holds no sequence). Paged
(``block_table [B, M]`` int32 given): the caches are page pools ``[N, Hkv, P, D]`` and position
s of row b lands in page ``block_table[b, s // P]`` at ``s % P``. A float8 e4m3 cache
(``k_scale``, ``v_scale [Hkv]`` float32 given) stores K / k_scale and V / v_scale, saturated at
±448 and rounded to nearest even, NaN written as 0 (so a pool's every byte stays finite),
exactly as `reference.quantize_kv` does; with ``k_offset [Hkv, D]`` keys are stored less it
(computed in fp32, before the sinks and the quantization); with its sinks (``k_sink``, ``v_sink
[N, Hkv, D]``, q's dtype, indexed like the cache's first axis) a position 0 is also stored there
unquantized.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_util import check_launchable, next_pow2, prefetch_l2
from .reference import FP8, write_kv_reference

__all__ = ["rope_write_kv", "write_kv", "write_kv_reference"]


@triton.jit
def _round_to_e4m3(x):
    """x (fp32, |x| <= 448) rounded to the nearest float8 e4m3 value, ties to even, in fp32
    arithmetic: the conversion that follows is then exact everywhere (Triton's interpreter
    truncates instead of rounding, and hardware and torch agree with this)."""
    bits = x.to(tl.int32, bitcast=True)
    biased = (bits >> 23) & 0xFF
    # the spacing of e4m3 values around x: 3 mantissa bits; subnormal below 2**-6
    step = ((tl.maximum(biased - 127, -6) - 3 + 127) << 23).to(tl.float32, bitcast=True)
    big = step * 12582912.0  # 1.5 * 2**23 * step: adding it rounds to a multiple of step
    mag = (tl.abs(x) + big) - big
    return (mag.to(tl.int32, bitcast=True) | (bits & -2147483648)).to(tl.float32, bitcast=True)


@triton.jit
def _append_row(row, pos, Block_Table, stride_tb, PAGE: tl.constexpr):
    """The cache row `_append` writes: the page that holds `pos` when paged."""
    if PAGE > 0:
        return tl.load(Block_Table + row * stride_tb + tl.maximum(pos, 0) // PAGE).to(tl.int64)
    return row


@triton.jit
def _append_operands(group, K_Scale, V_Scale, K_Offset, HEAD_DIM: tl.constexpr,
                     BLOCK_D: tl.constexpr, KV_FP8: tl.constexpr, OFFSET: tl.constexpr):
    """What `_append` reads besides the key, the value and the row: the group's key offset
    and its two scales. Loaded before any of the kernel's stores, which the compiler cannot
    move loads across (they might alias)."""
    offs = tl.arange(0, BLOCK_D)
    k_off = tl.zeros([BLOCK_D], tl.float32)
    if OFFSET:
        k_off = tl.load(K_Offset + group * HEAD_DIM + offs, mask=offs < HEAD_DIM,
                        other=0.0).to(tl.float32)
    k_scale = 1.0
    v_scale = 1.0
    if KV_FP8:
        k_scale = tl.load(K_Scale + group)
        v_scale = tl.load(V_Scale + group)
    return k_off, k_scale, v_scale


@triton.jit
def _append(k, v, group, pos, dst_row, k_off, k_scale, v_scale, K_Cache, V_Cache, K_Sink,
            V_Sink, stride_cb, stride_ch, stride_cs, stride_vcb, stride_vch, stride_vcs,
            stride_vcd, stride_sb, stride_sh, HEAD_DIM: tl.constexpr,
            BLOCK_D: tl.constexpr, PAGE: tl.constexpr, KV_FP8: tl.constexpr,
            SINK: tl.constexpr, OFFSET: tl.constexpr):
    """Key and value [BLOCK_D] of KV group `group` into the caches' row `dst_row` at `pos`
    (`_append_operands` gave the rest)."""
    offs = tl.arange(0, BLOCK_D)
    mask = offs < tl.where(pos >= 0, HEAD_DIM, 0)  # a negative position: nothing
    if OFFSET:  # the key in the cache's basis: less its group's offset
        k = k.to(tl.float32) - k_off
    if SINK:  # a sequence's position 0, unquantized, in the row of its page
        sink = dst_row * stride_sb + group * stride_sh + offs
        first = offs < tl.where(pos == 0, HEAD_DIM, 0)
        tl.store(K_Sink + sink, k.to(K_Sink.dtype.element_ty), mask=first)
        tl.store(V_Sink + sink, v.to(V_Sink.dtype.element_ty), mask=first)
    if PAGE > 0:
        pos = pos % PAGE
    if KV_FP8:  # correctly rounded division, as torch's: the reference's bits exactly
        k = tl.math.div_rn(k.to(tl.float32), k_scale)
        v = tl.math.div_rn(v.to(tl.float32), v_scale)
        k = tl.clamp(tl.where(k == k, k, 0.0), -448.0, 448.0)
        v = tl.clamp(tl.where(v == v, v, 0.0), -448.0, 448.0)
        k = _round_to_e4m3(k)
        v = _round_to_e4m3(v)
    tl.store(K_Cache + dst_row * stride_cb + group * stride_ch + pos * stride_cs + offs,
             k.to(K_Cache.dtype.element_ty), mask=mask)
    tl.store(V_Cache + dst_row * stride_vcb + group * stride_vch + pos * stride_vcs
             + offs * stride_vcd, v.to(V_Cache.dtype.element_ty), mask=mask)


@triton.jit
def _write_kv_kernel(K, V, K_Cache, V_Cache, Positions, Block_Table, K_Scale, V_Scale,
                     K_Sink, V_Sink, K_Offset,
                     stride_kb, stride_kh, stride_vb, stride_vh, stride_cb, stride_ch, stride_cs,
                     stride_vcb, stride_vch, stride_vcs, stride_vcd, stride_tb, stride_sb,
                     stride_sh, HEAD_DIM: tl.constexpr,
                     BLOCK_D: tl.constexpr, PAGE: tl.constexpr, KV_FP8: tl.constexpr,
                     SINK: tl.constexpr = False, OFFSET: tl.constexpr = False):
    row = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1).to(tl.int64)
    pos = tl.load(Positions + row).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < tl.where(pos >= 0, HEAD_DIM, 0)
    k = tl.load(K + row * stride_kb + group * stride_kh + offs, mask=mask)
    v = tl.load(V + row * stride_vb + group * stride_vh + offs, mask=mask)
    k_off, k_scale, v_scale = _append_operands(group, K_Scale, V_Scale, K_Offset, HEAD_DIM,
                                               BLOCK_D, KV_FP8, OFFSET)
    dst_row = _append_row(row, pos, Block_Table, stride_tb, PAGE)
    _append(k, v, group, pos, dst_row, k_off, k_scale, v_scale, K_Cache, V_Cache, K_Sink,
            V_Sink, stride_cb, stride_ch, stride_cs, stride_vcb, stride_vch, stride_vcs,
            stride_vcd, stride_sb, stride_sh, HEAD_DIM, BLOCK_D, PAGE, KV_FP8, SINK, OFFSET)


@triton.jit
def _rope_write_kv_kernel(
    Q, K, V, Q_Out, Cos, Sin, Rotation, K_Cache, V_Cache, Positions, Block_Table, K_Scale,
    V_Scale, K_Sink, V_Sink, K_Offset, Scores, Groups,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh, stride_ob, stride_oh,
    stride_rb, stride_cb, stride_ch, stride_cs, stride_vcb, stride_vch, stride_vcs, stride_vcd,
    stride_tb, stride_sb, stride_sh, stride_scb, stride_gb,
    GROUP: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    ROPE: tl.constexpr, ROTATE: tl.constexpr, DOT_IEEE: tl.constexpr, PAGE: tl.constexpr,
    KV_FP8: tl.constexpr, SINK: tl.constexpr, OFFSET: tl.constexpr, TOPK: tl.constexpr,
    HKV_PAD: tl.constexpr, PREFETCH_PAGES: tl.constexpr = 0,
):
    """One program per (row, KV group): the group's GROUP query heads and its key as ROWS (>=
    16, for the MMA) rows of one tile: rotary positions (fp32, rounded to q's dtype as the
    compiled stage does), the rotation (one MMA, q's dtype in, fp32 accumulated, rounded),
    the queries stored to Q_Out and the key and value appended as `_write_kv_kernel` does.
    TOPK > 0: the group's rank among the row's router scores (how many groups beat it: a
    higher score, or an equal one and a lower index); of rank < TOPK, it is stored to
    Groups[row, rank], so the row's TOPK groups come out highest first. Every load is issued
    before the first store (a load cannot be moved across a store that might alias it, and
    each such wait is a round trip on the step's critical path).
    PREFETCH_PAGES > 0 (a power of 2; paged float8 caches, TOPK > 0): a selected group also
    asks L2 for its first pages of K and V, which the attention that follows reads first."""
    row = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1).to(tl.int64)
    if TOPK > 0:
        offs_g = tl.arange(0, HKV_PAD)
        valid = offs_g < tl.num_programs(1)
        s = tl.load(Scores + row * stride_scb + offs_g, mask=valid, other=float("-inf"))
        mine = tl.load(Scores + row * stride_scb + group)
    pos = tl.load(Positions + row).to(tl.int64)
    offs_r = tl.arange(0, ROWS)
    offs = tl.arange(0, BLOCK_D)
    mask_d = offs < HEAD_DIM
    is_q = (offs_r < GROUP)[:, None] & mask_d[None, :]
    is_k = (offs_r == GROUP)[:, None] & mask_d[None, :]
    q_rows = Q + row * stride_qb + (group * GROUP + offs_r)[:, None] * stride_qh
    k_row = K + row * stride_kb + group * stride_kh + 0 * offs_r[:, None]
    x = tl.load(q_rows + offs[None, :], mask=is_q, other=0.0).to(tl.float32) \
        + tl.load(k_row + offs[None, :], mask=is_k, other=0.0).to(tl.float32)
    if ROPE:
        half = offs < HEAD_DIM // 2
        other = tl.where(half, offs + HEAD_DIM // 2, offs - HEAD_DIM // 2)
        x_other = tl.load(q_rows + other[None, :], mask=is_q, other=0.0).to(tl.float32) \
            + tl.load(k_row + other[None, :], mask=is_k, other=0.0).to(tl.float32)
        # as [ROWS, D] tiles, the layout of x (a vector would be converted through shared
        # memory, a barrier between its load and the next one)
        rope_at = row * stride_rb + 0 * offs_r[:, None] + offs[None, :]
        cos = tl.load(Cos + rope_at, mask=mask_d[None, :], other=0.0).to(tl.float32)
        sin = tl.load(Sin + rope_at, mask=mask_d[None, :], other=0.0).to(tl.float32)
    if ROTATE:
        rot = tl.load(Rotation + offs[:, None] * HEAD_DIM + offs[None, :],
                      mask=mask_d[:, None] & mask_d[None, :], other=0.0)
    # after the tiles: these are converted to another layout, a wait on the load in between;
    # V masked by pos only where it is stored (a load that waits on pos is a round trip more)
    v = tl.load(V + row * stride_vb + group * stride_vh + offs, mask=mask_d)
    k_off, k_scale, v_scale = _append_operands(group, K_Scale, V_Scale, K_Offset, HEAD_DIM,
                                               BLOCK_D, KV_FP8, OFFSET)
    dst_row = _append_row(row, pos, Block_Table, stride_tb, PAGE)
    if PREFETCH_PAGES > 0:  # the row's first pages (pages in use only: the last one again)
        ahead = tl.minimum(tl.arange(0, PREFETCH_PAGES), tl.maximum(pos, 0) // PAGE)
        first = tl.load(Block_Table + row * stride_tb + ahead).to(tl.int64)
    if TOPK > 0:
        s = s.to(tl.float32)
        mine = mine.to(tl.float32)
        beats = ((s > mine) | ((s == mine) & (offs_g < group))) & valid
        rank = tl.sum(beats.to(tl.int32), axis=0)
    if ROPE:  # x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]
        x = x * cos + tl.where(half, -x_other, x_other) * sin
        x = x.to(Q.dtype.element_ty)
    if ROTATE:
        if DOT_IEEE:
            x = tl.dot(x.to(tl.float32), rot.to(tl.float32), input_precision="ieee")
        else:
            x = tl.dot(x.to(Rotation.dtype.element_ty), rot)
        x = x.to(Q.dtype.element_ty)
    k = tl.sum(tl.where(is_k, x.to(tl.float32), 0.0), axis=0).to(Q.dtype.element_ty)
    if TOPK > 0:
        tl.store(Groups + row * stride_gb + rank, group.to(tl.int32), mask=rank < TOPK)
    tl.store(Q_Out + row * stride_ob + (group * GROUP + offs_r)[:, None] * stride_oh
             + offs[None, :], x.to(Q_Out.dtype.element_ty), mask=is_q)
    _append(k, v, group, pos, dst_row, k_off, k_scale, v_scale, K_Cache, V_Cache, K_Sink,
            V_Sink, stride_cb, stride_ch, stride_cs, stride_vcb, stride_vch, stride_vcs,
            stride_vcd, stride_sb, stride_sh, HEAD_DIM, BLOCK_D, PAGE, KV_FP8, SINK, OFFSET)
    if PREFETCH_PAGES > 0:
        if rank < TOPK:
            lines = tl.arange(0, PAGE * HEAD_DIM // 128) * 128
            k_pf = K_Cache + first[:, None] * stride_cb + group * stride_ch + lines[None, :]
            v_pf = V_Cache + first[:, None] * stride_vcb + group * stride_vch + lines[None, :]
            prefetch_l2(k_pf)
            prefetch_l2(v_pf)


# How many of a selected group's first pages of K and V the append asks L2 for, for the
# attention that follows (inline PTX: CUDA only). The fp8-all step on the H100 (2026-12-06,
# Llama-3-8B B=32 S=8192, sparse): 1 page 0.01-0.02 ms shorter than none; 2 and 4 no better.
PREFETCH_PAGES = 1


def _check_write(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, positions: torch.Tensor,
                 block_table: torch.Tensor | None, k_scale: torch.Tensor | None,
                 v_scale: torch.Tensor | None, k_sink: torch.Tensor | None,
                 v_sink: torch.Tensor | None, k_offset: torch.Tensor | None) -> None:
    b, hkv, d = k.shape
    paged = block_table is not None
    if v.shape != k.shape or k_cache.shape != v_cache.shape or k_cache.dim() != 4 or \
            (k_cache.shape[0] < b and not paged) or k_cache.shape[1] != hkv or \
            k_cache.shape[3] != d:
        raise ValueError(f"write_kv: k/v {tuple(k.shape)}/{tuple(v.shape)} do not fit caches "
                         f"{tuple(k_cache.shape)}/{tuple(v_cache.shape)}")
    if k_cache.stride(-1) != 1 or 1 not in v_cache.stride()[2:] or k.stride(-1) != 1 \
            or v.stride(-1) != 1:
        raise ValueError("write_kv: k, v and k_cache need a contiguous last axis, v_cache a "
                         "contiguous last or position axis")
    fp8 = k_cache.dtype == FP8
    if k.dtype != v.dtype or v_cache.dtype != k_cache.dtype or k_cache.dtype not in (k.dtype, FP8):
        raise ValueError(f"write_kv: dtypes differ: {k.dtype}, {v.dtype}, cache {k_cache.dtype}")
    if fp8 != (k_scale is not None) or fp8 != (v_scale is not None) or (fp8 and any(
            t.dtype != torch.float32 or tuple(t.shape) != (hkv,) or t.stride(0) != 1
            for t in (k_scale, v_scale))):
        raise ValueError(f"write_kv: a float8 cache needs k_scale and v_scale, contiguous "
                         f"float32 [{hkv}]; other caches take none")
    sink = k_sink is not None
    if sink != (v_sink is not None) or (sink and not fp8) or (sink and any(
            t.dtype != k.dtype or tuple(t.shape) != (k_cache.shape[0], hkv, d)
            or t.stride() != k_sink.stride() or t.stride(-1) != 1 for t in (k_sink, v_sink))):
        raise ValueError(f"write_kv: sinks go with a float8 cache, both {k.dtype} "
                         f"[{k_cache.shape[0]}, {hkv}, {d}] with one layout")
    if k_offset is not None and (not fp8 or tuple(k_offset.shape) != (hkv, d)
                                 or not k_offset.is_contiguous()):
        raise ValueError(f"write_kv: k_offset goes with a float8 cache, contiguous [{hkv}, {d}]")
    if positions.dtype != torch.int32 or tuple(positions.shape) != (b,):
        raise ValueError(f"write_kv: positions must be int32 [{b}]")
    if paged and (block_table.dtype != torch.int32 or block_table.dim() != 2
                  or block_table.shape[0] < b or block_table.stride(-1) != 1):
        raise ValueError(f"write_kv: block_table must be int32 [>= {b}, pages], contiguous rows")


def _cache_args(k, v, k_cache, v_cache, positions, block_table, k_scale, v_scale, k_sink,
                v_sink, k_offset) -> tuple[list, list, dict]:
    """The caches' pointer and stride arguments and constants, shared by both kernels (a
    tensor stands in for each pointer a call does not use)."""
    paged, fp8, sink = block_table is not None, k_cache.dtype == FP8, k_sink is not None
    pointers = [k_cache, v_cache, positions, block_table if paged else positions,
                k_scale if fp8 else k, v_scale if fp8 else k, k_sink if sink else k,
                v_sink if sink else k, k_offset if k_offset is not None else k]
    strides = [k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), *v_cache.stride(),
               block_table.stride(0) if paged else 0, *(k_sink.stride()[:2] if sink else (0, 0))]
    d = k.shape[-1]
    constants = dict(HEAD_DIM=d, BLOCK_D=max(16, next_pow2(d)),
                     PAGE=k_cache.shape[2] if paged else 0, KV_FP8=fp8, SINK=sink,
                     OFFSET=k_offset is not None)
    return pointers, strides, constants


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             positions: torch.Tensor, block_table: torch.Tensor | None = None,
             k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
             k_sink: torch.Tensor | None = None, v_sink: torch.Tensor | None = None,
             k_offset: torch.Tensor | None = None) -> None:
    """Write ``k``, ``v`` [B, Hkv, D] at ``positions`` [B] of the caches, or of the rows' pages
    with a ``block_table``; a float8 cache quantized by ``k_scale``, ``v_scale`` [Hkv] float32,
    its keys less ``k_offset`` [Hkv, D] when given, a position 0 also to its sinks ``k_sink``,
    ``v_sink`` [N, Hkv, D] (module docstring)."""
    cache = (k_cache, v_cache, positions, block_table, k_scale, v_scale, k_sink, v_sink,
             k_offset)
    _check_write(k, v, *cache)
    check_launchable(_write_kv_kernel, k.device, "write_kv")
    pointers, strides, constants = _cache_args(k, v, *cache)
    _write_kv_kernel[k.shape[:2]](
        k, v, *pointers, k.stride(0), k.stride(1), v.stride(0), v.stride(1), *strides,
        num_warps=1, **constants)


def rope_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, positions: torch.Tensor,
                  block_table: torch.Tensor | None = None, k_scale: torch.Tensor | None = None,
                  v_scale: torch.Tensor | None = None, k_sink: torch.Tensor | None = None,
                  v_sink: torch.Tensor | None = None, k_offset: torch.Tensor | None = None, *,
                  cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                  rotation: torch.Tensor | None = None, scores: torch.Tensor | None = None,
                  groups: torch.Tensor | None = None) -> torch.Tensor:
    """The decode step's rotary stage and KV append in one launch: returns the queries ``q``
    ``[B, Hq, D]`` with rotary positions (``cos``, ``sin`` ``[B, D]``, each row's; None: a
    model without them) and times ``rotation`` ``[D, D]`` (None: none), and writes ``k``
    treated alike, and ``v``, as `write_kv` does. Defined as `polarc.models.layers.apply_rope`
    on q and k (rounded to q's dtype), then ``@ rotation`` (q's dtype), then `write_kv`;
    the CPU runtime runs exactly that composition. With the router's ``scores`` ``[B, Hkv]``
    (float, last axis contiguous), also fills ``groups`` ``[B, k]`` int32 with each row's k
    highest-scoring groups, highest first, ties to the lower index
    (`reference.topk_groups_reference`): the step's selection without a launch of its own;
    on CUDA over a paged float8 cache, each selected group's first `PREFETCH_PAGES` pages of
    K and V are then asked into L2 for the attention that reads them first (results
    unchanged)."""
    cache = (k_cache, v_cache, positions, block_table, k_scale, v_scale, k_sink, v_sink,
             k_offset)
    _check_write(k, v, *cache)
    b, hkv, d = k.shape
    if q.dim() != 3 or q.shape[0] != b or q.shape[2] != d or q.shape[1] % hkv \
            or q.dtype != k.dtype or q.stride(-1) != 1:
        raise ValueError(f"rope_write_kv: q must be {k.dtype} [{b}, a multiple of {hkv}, {d}] "
                         f"with a contiguous last axis, got {q.dtype} {tuple(q.shape)}")
    if (cos is None) != (sin is None) or (cos is not None and any(
            tuple(t.shape) != (b, d) or t.stride(-1) != 1 or t.stride() != cos.stride()
            for t in (cos, sin))):
        raise ValueError(f"rope_write_kv: cos and sin must both be [{b}, {d}] with one layout "
                         "and a contiguous last axis, or both None")
    if rotation is not None and (tuple(rotation.shape) != (d, d) or not rotation.is_contiguous()
                                 or rotation.dtype != q.dtype):
        raise ValueError(f"rope_write_kv: rotation must be contiguous {q.dtype} [{d}, {d}]")
    topk = 0 if groups is None else groups.shape[-1]
    if (scores is None) != (groups is None) or (scores is not None and (
            tuple(scores.shape) != (b, hkv) or not scores.is_floating_point()
            or scores.stride(-1) != 1 or groups.dtype != torch.int32
            or tuple(groups.shape) != (b, topk) or not 1 <= topk <= hkv
            or groups.stride(-1) != 1)):
        raise ValueError(f"rope_write_kv: scores must be float [{b}, {hkv}] and groups int32 "
                         f"[{b}, k], 1 <= k <= {hkv}, each with a contiguous last axis, or "
                         "both None")
    check_launchable(_rope_write_kv_kernel, k.device, "rope_write_kv")
    group = q.shape[1] // hkv
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    pointers, strides, constants = _cache_args(k, v, *cache)
    rope = cos is not None
    _rope_write_kv_kernel[(b, hkv)](
        q, k, v, out, cos if rope else q, sin if rope else q,
        rotation if rotation is not None else q, *pointers,
        scores if topk else q, groups if topk else positions,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), cos.stride(0) if rope else 0, *strides,
        scores.stride(0) if topk else 0, groups.stride(0) if topk else 0,
        GROUP=group, ROWS=max(16, next_pow2(group + 1)), ROPE=rope,
        ROTATE=rotation is not None, DOT_IEEE=q.dtype == torch.float32, TOPK=topk,
        HKV_PAD=max(2, next_pow2(hkv)), num_warps=4,
        PREFETCH_PAGES=PREFETCH_PAGES if topk and block_table is not None and
        k_cache.dtype == FP8 and k.device.type == "cuda" else 0, **constants)
    return out
