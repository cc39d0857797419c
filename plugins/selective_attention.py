"""Selective head attention for decode: read K/V only for the KV groups each row selected.

Layouts (one decode step, one layer):

- ``q``            ``[B, Hq, D]``          query of the new token, last axis contiguous.
- ``k_cache``      ``[B, Hkv, S_max, D]``  keys; each (row, group) is one contiguous
  ``v_cache``                              ``[S_max, D]`` stream (last axis contiguous; other
                                           strides free, so a ``[:B]`` slice of a larger cache
                                           works). V may instead be stored position-major
                                           (its position axis contiguous: a transposed view
                                           of ``[B, Hkv, D, S_max]``), as an FP8 cache keeps
                                           it (below).
- ``cache_seqlens`` ``[B]`` int32          valid positions per row (0 gives a zero output row).
- paged (``block_table`` given): ``k_cache`` / ``v_cache`` are page pools ``[N, Hkv, P, D]``,
  each (page, group) one contiguous ``[P, D]`` stream, and ``block_table [B, M]`` int32 lists
  each row's pages: position s of row b is ``pool[block_table[b, s // P], :, s % P]``. The
  kernel is the same; each block of positions looks up its page first (P a multiple of the
  block, so a block never straddles two pages).
- ``groups``       ``[B, k]`` int32        selected KV groups per row, any order, no repeats.
- out              ``[B, Hq, D]``          heads of unselected groups are exact zeros.

Query head ``h`` belongs to group ``h // (Hq // Hkv)``; MHA is ``Hkv == Hq``; all groups
selected is the dense path (same kernel, same code).

Algorithm (flash-decoding): stage 1 runs one program per (split, selected group, row); it
streams that group's K/V over its share of the row's positions once and computes every query
head of the group from that one read (``tl.dot`` with the heads padded to 16 rows, the
default for any group size, MHA included; a broadcast multiply-reduce is the constexpr
alternative, ``AttentionPlan.use_dot=False``).
It writes a normalised partial output and a log2-sum-exp per head into an fp32 workspace.
Stage 2 runs one program per (query head, row): it finds the head's group among the row's
selection, merges the splits, and writes the output row (zeros for unselected groups), so
every output element is written exactly once and no memset is needed. With one split there
is nothing to merge: stage 1 can write the output itself, and the zeros of the unselected
groups, in one launch (``AttentionPlan.one_launch``; also the TensorRT plugin's form).

Float8 V blocks feed the P·V product as its right operand, which the MMA wants with the
positions (its reduction axis) adjacent; from a D-major block the kernel gathers single bytes
from shared memory (counted in the sm_90 code of one stage-1 kernel, not timed: 169 shared
loads against 41 + 16 ldmatrix for a position-major block, and 201 registers against 120),
so an FP8 page pool keeps V position-major, and a paged float8 call loads whole blocks
unmasked (a per-position mask would cut the copy to single bytes and stop its pipelining):
positions past a row's length must then hold finite values, as a zeroed pool written by
`write_kv` does (it writes NaN as 0). A float8 block's softmax runs on the group's own rows
(tl.dot pads the MMA's rows itself), not on 16.

The split count and tile sizes come from the shapes alone (:func:`plan_selective_attention`):
the launch reads nothing from the device, so it can be captured in a CUDA graph.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._triton_util import cdiv, check_launchable, next_pow2, num_sms
from .reference import FP8, selective_attention_reference

__all__ = [
    "AttentionPlan",
    "AttentionWorkspace",
    "plan_selective_attention",
    "selective_attention",
    "selective_attention_reference",
    "selective_attention_workspace",
]

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_LOG2E = 1.4426950408889634
# Query heads per group from which tl.dot (heads padded to 16 rows) is the default; below it a
# broadcast multiply-reduce. 1 = always tl.dot: measured faster for MHA too (KERNEL_NOTES.md).
DOT_MIN_GROUP = 1


# --------------------------------------------------------------------------- kernels


@triton.jit
def _selective_attention_kernel(
    Q, K_Cache, V_Cache, Seqlens, Groups, Partials, Out, Block_Table, K_Scale, V_Scale,
    K_Sink, V_Sink,
    qk_scale_log2, num_splits, n_sel, n_kv,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_gb, stride_tb, stride_sb, stride_sh,
    stride_outb, stride_outh,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ONE_LAUNCH: tl.constexpr, K_PAD: tl.constexpr, PAGE: tl.constexpr,
    KV_FP8: tl.constexpr = False, FP8_DOT_FP16: tl.constexpr = False, SINK: tl.constexpr = False,
):
    """Stage 1: one program per (split, selected group j, row b), grid (splits, k, B).

    Two launches (ONE_LAUNCH=False): every program writes a partial output and its
    log2-sum-exp into `Partials`, laid out ``o [B, k, splits, GROUP, HEAD_DIM]`` then ``lse
    [B, k, splits, GROUP]``; the reduce kernel merges them and writes zeros for unselected
    groups. One launch (ONE_LAUNCH=True, one split): a program writes its group's heads
    directly, and zeros for the unselected groups g with g % k == j, so each unselected group
    is zeroed by exactly one program and no program exists only to write zeros (such
    programs would hold an SM slot, with this kernel's shared memory, that streaming needs);
    `Partials` is not touched.

    PAGE > 0: the caches are page pools (stride_kb / stride_vb step over pages) and each
    block of positions reads its page from `Block_Table` (the next block's page is fetched
    while the current block streams in, so the K/V loads never wait on the table); PAGE == 0:
    contiguous rows.

    KV_FP8: the caches hold float8 e4m3 K / k_scale and V / v_scale (`K_Scale`, `V_Scale`
    [Hkv] fp32). The bytes read halve; each block is widened in registers and the group's
    scales are applied once, K's to the logits' scale and V's to the output (both are per
    group, so they factor out of the dot products). FP8_DOT_FP16 (bf16/fp16 queries): the
    blocks widen to fp16, one conversion instruction per two values (bf16 takes three: the
    hardware converts e4m3 to fp16 only), and the query is cast to fp16 for the dots, which
    still accumulate in fp32; fp16 holds every e4m3 value exactly and queries far beyond
    any model's (|q| < 65504). SINK: position 0 comes from `K_Sink` / `V_Sink` ``[N, Hkv, D]``
    (unquantized, in the row of the page that holds it): the split that starts at 0 begins its
    running softmax with it, and the blocks skip it.
    """
    pid_s = tl.program_id(0)
    pid_j = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    mask_g = offs_g < GROUP
    mask_d = offs_d < HEAD_DIM
    mask_gd = mask_g[:, None] & mask_d[None, :]

    # Every load the loop's first block waits on is issued before any of them is used: an
    # instruction that waits on a load stalls its warp, so each use in between would add a
    # round trip to the ramp of every launch (eight of them, in an earlier order).
    seqlen = tl.load(Seqlens + pid_b)
    grp = tl.load(Groups + pid_b * stride_gb + pid_j).to(tl.int64)
    if PAGE > 0:  # the row's first page: its sink's row, and the one split's first block
        first_page = tl.load(Block_Table + pid_b * stride_tb).to(tl.int64)
    if ONE_LAUNCH:  # the row's selection, for the unselected groups' zeros at the end
        offs_k = tl.arange(0, K_PAD)
        sel = tl.load(Groups + pid_b * stride_gb + offs_k, mask=offs_k < n_sel, other=-1)
    # Each row's own length is cut into num_splits pieces of whole blocks.
    split_len = tl.cdiv(tl.cdiv(seqlen, num_splits), BLOCK_N) * BLOCK_N
    lo = pid_s * split_len
    hi = tl.minimum(lo + split_len, seqlen)

    heads = grp * GROUP + offs_g
    q = tl.load(Q + pid_b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask_gd, other=0.0)
    if KV_FP8:
        k_scale = tl.load(K_Scale + grp)
        v_scale = tl.load(V_Scale + grp)
    if PAGE > 0:
        if ONE_LAUNCH:  # lo = 0
            page = first_page
        else:
            page = tl.load(Block_Table + pid_b * stride_tb + lo // PAGE, mask=lo < hi,
                           other=0).to(tl.int64)
    if SINK:
        sink_row = pid_b
        if PAGE > 0:
            sink_row = first_page
        has_sink = (lo == 0) & (hi > 0)
        sink = sink_row * stride_sb + grp * stride_sh + offs_d
        # [1, D]: the layout of their use (a vector would be converted, through shared
        # memory and a barrier, between its load and the next one)
        mask_s = (offs_d < tl.where(has_sink, HEAD_DIM, 0))[None, :]
        k0 = tl.load(K_Sink + sink[None, :], mask=mask_s, other=0.0).to(tl.float32)
        v0 = tl.load(V_Sink + sink[None, :], mask=mask_s, other=0.0).to(tl.float32)
    if not USE_DOT:
        q = q.to(tl.float32)
    elif FP8_DOT_FP16:
        q = q.to(tl.float16)

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], tl.float32)
    if SINK:
        if has_sink:
            m_i = tl.sum(q.to(tl.float32) * k0, axis=1) * qk_scale_log2
            l_i = tl.full([GROUP_PAD], 1.0, tl.float32)
            if KV_FP8:  # the output is scaled by V's scale at the end
                v0 = v0 / v_scale
            acc = tl.zeros([GROUP_PAD, BLOCK_D], tl.float32) + v0
    if KV_FP8:
        qk_scale_log2 = qk_scale_log2 * k_scale
    k_base = K_Cache + pid_b * stride_kb + grp * stride_kh
    v_base = V_Cache + pid_b * stride_vb + grp * stride_vh

    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < hi
        if SINK:
            mask_n = mask_n & (offs_n > 0)
        mask_kv = mask_n[:, None] & mask_d[None, :]
        if PAGE > 0:
            k_blk = K_Cache + page * stride_kb + grp * stride_kh
            v_blk = V_Cache + page * stride_vb + grp * stride_vh
            offs_r = tl.multiple_of(start % PAGE, BLOCK_N) + tl.arange(0, BLOCK_N)
            # the next block's page (the last one again at the end: always a page in use)
            nxt = tl.minimum(start + BLOCK_N, hi - 1) // PAGE
            page = tl.load(Block_Table + pid_b * stride_tb + nxt).to(tl.int64)
        else:
            k_blk = k_base
            v_blk = v_base
            offs_r = offs_n
        k_ptrs = k_blk + offs_r[:, None] * stride_ks + offs_d[None, :]
        v_ptrs = v_blk + offs_r[:, None] * stride_vs + offs_d[None, :] * stride_vd
        if KV_FP8 and PAGE > 0 and HEAD_DIM == BLOCK_D:
            # whole blocks inside the page, unmasked: a position-contiguous V block is then
            # copied in 16-byte vectors (a per-position mask allows single bytes only);
            # positions past hi are finite (zeroed pool, finite writes) and get p = 0
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            k = tl.load(k_ptrs, mask=mask_kv, other=0.0)
            v = tl.load(v_ptrs, mask=mask_kv, other=0.0)
        if KV_FP8:
            k = k.to(q.dtype)
            v = v.to(q.dtype)
        if USE_DOT:
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        else:
            qk = tl.sum(q[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)
        qk = tl.where(mask_n[None, :], qk * qk_scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if USE_DOT:
            pv = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        else:
            pv = tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    has = l_i > 0.0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    if KV_FP8:
        o = o * v_scale
    if ONE_LAUNCH:
        out_row = Out + pid_b * stride_outb
        tl.store(out_row + heads[:, None] * stride_outh + offs_d[None, :],
                 o.to(Out.dtype.element_ty), mask=mask_gd)
        zeros = tl.zeros([GROUP_PAD, BLOCK_D], tl.float32).to(Out.dtype.element_ty)
        for g in range(pid_j, n_kv, n_sel):
            if tl.sum((sel == g).to(tl.int32), axis=0) == 0:  # an unselected group of ours
                zheads = g * GROUP + offs_g
                tl.store(out_row + zheads[:, None] * stride_outh + offs_d[None, :], zeros,
                         mask=mask_gd)
    else:
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        # (row, slot, split) -> its place in the contiguous partial layout (docstring)
        part = (pid_b * n_sel + pid_j) * num_splits + pid_s
        o_words = tl.num_programs(2).to(tl.int64) * n_sel * num_splits * GROUP * HEAD_DIM  # B
        tl.store(Partials + part * GROUP * HEAD_DIM + offs_g[:, None] * HEAD_DIM
                 + offs_d[None, :], o, mask=mask_gd)
        tl.store(Partials + o_words + part * GROUP + offs_g, lse, mask=mask_g)


@triton.jit
def _selective_attention_reduce_kernel(
    Out, Partials, Groups,
    num_splits, n_sel,
    stride_outb, stride_outh,
    stride_gb,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    SPLITS_PAD: tl.constexpr, K_PAD: tl.constexpr,
):
    """Stage 2: one program per (query head h, row b); merges splits, zeros unselected."""
    pid_h = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    grp = pid_h // GROUP
    r = pid_h % GROUP

    offs_k = tl.arange(0, K_PAD)
    sel = tl.load(Groups + pid_b * stride_gb + offs_k, mask=offs_k < n_sel, other=-1)
    j = tl.max(tl.where(sel == grp, offs_k, -1), axis=0)
    n_live = tl.where(j >= 0, num_splits, 0)  # no live splits when the group is unselected
    j = tl.maximum(j, 0).to(tl.int64)

    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < n_live
    mask_d = offs_d < HEAD_DIM
    part = (pid_b * n_sel + j) * num_splits + offs_s  # this (row, slot)'s splits
    o_words = tl.num_programs(1).to(tl.int64) * n_sel * num_splits * GROUP * HEAD_DIM
    lse = tl.load(Partials + o_words + part * GROUP + r, mask=mask_s, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)
    denom = tl.sum(w, axis=0)
    o = tl.load(Partials + part[:, None] * GROUP * HEAD_DIM + r * HEAD_DIM + offs_d[None, :],
                mask=mask_s[:, None] & mask_d[None, :], other=0.0)
    out = tl.sum(w[:, None] * o, axis=0) / tl.where(denom > 0.0, denom, 1.0)
    tl.store(Out + pid_b * stride_outb + pid_h * stride_outh + offs_d,
             out.to(Out.dtype.element_ty), mask=mask_d)


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class AttentionPlan:
    """Launch parameters of one selective-attention call; a pure function of the shapes.
    ``one_launch`` (one split only): stage 1 writes the output and zeroes the unselected
    heads itself; otherwise a second launch merges the splits and zeroes."""

    num_splits: int
    block_n: int
    num_warps: int
    num_stages: int
    use_dot: bool
    one_launch: bool = False

    def __post_init__(self) -> None:
        if self.one_launch and self.num_splits != 1:
            raise ValueError(f"AttentionPlan: one_launch needs one split, got {self.num_splits}")


def plan_selective_attention(
    batch: int,
    n_selected: int,
    group_size: int,
    max_seqlen: int,
    head_dim: int,
    *,
    sms: int,
    block_n: int | None = None,
    num_splits: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    use_dot: bool | None = None,
    one_launch: bool | None = None,
    page_size: int | None = None,
    kv_fp8: bool = False,
) -> AttentionPlan:
    """Split count and tiles from (B, k, S_max, SM count): deterministic, no device reads.
    For a paged cache (`page_size` P; S_max = the block table's pages x P) the block of
    positions is the largest of 64, 32, 16 that divides P. A float8 cache (`kv_fp8`) streams
    blocks of 128 positions: the same bytes as 64 in bf16, with half the loop overhead per
    byte (measured 10-20% faster at B x S >= 32k, benchmarks/RESULTS.md).

    Tiles: 64 positions x head dim per step, 4 warps, 3 pipeline stages, ``tl.dot`` with the
    group's heads padded to 16 rows (also for MHA: the padded MMA is still far below the
    memory time, and it beat the broadcast multiply-reduce by 1.1-1.6x on the H100).
    Splits (measured on the H100, KERNEL_NOTES.md): two stage-1 programs stay resident per
    SM, so with ``slots = 2 * sms``: when the (row, group) pairs fit in one wave
    (``pairs <= slots``), split up to one program per SM (``sms // pairs``, at least one);
    when they need a little more than one wave, split to at least three waves, so the
    partial last wave idles few SMs; at least four blocks of positions per split. One
    program per SM, not two: in the decode steps of Llama-3-8B and Llama-2-7B on the H100
    (bf16 and float8 caches, B=16-64, S=4096-8192, 64-256 pairs) it was the best of 1-4
    splits at every point, up to 1% of the step ahead of filling two per SM, which the
    kernel timed alone had preferred (2026-12-06, `sweep_step_attention`; fewer than 64 pairs
    take the same rule unmeasured). Rows shorter than
    ``S_max`` cut their own length into the same number of splits. Explicit arguments
    override the heuristic (benchmarks, tests).
    """
    if use_dot is None:
        use_dot = group_size >= DOT_MIN_GROUP
    if block_n is None:
        block_n = (128 if kv_fp8 else 64) if use_dot else 32
        if page_size is not None:
            block_n = next((n for n in (128, 64, 32, 16) if n <= block_n and page_size % n == 0),
                           16)
    if page_size is not None and (page_size < 16 or page_size % block_n):
        raise ValueError(f"selective_attention: page size {page_size} must be a multiple of "
                         f"16 and of the block of positions ({block_n})")
    if num_warps is None:
        num_warps = 4 if use_dot else 2
    if num_stages is None:
        num_stages = 3 if use_dot else 2
    if num_splits is None:
        pairs = max(1, batch * n_selected)
        slots = 2 * sms  # resident stage-1 programs: 2 per SM at these tiles
        if pairs <= slots:  # one wave: splits up to one program per SM
            num_splits = max(1, sms // pairs)
        elif pairs < 3 * slots:  # a partial last wave would idle SMs: go to >= 3 waves
            num_splits = cdiv(3 * slots, pairs)
        else:
            num_splits = 1
        most = max(1, cdiv(max_seqlen, 4 * block_n))
        num_splits = max(1, min(num_splits, most, 256))
    if one_launch is None:
        one_launch = num_splits == 1
    return AttentionPlan(num_splits=num_splits, block_n=block_n, num_warps=num_warps,
                         num_stages=num_stages, use_dot=use_dot, one_launch=one_launch)


def _workspace_numel(batch: int, n_selected: int, num_splits: int, group: int, d: int) -> int:
    return batch * n_selected * num_splits * group * (d + 1)


@dataclass(frozen=True)
class AttentionWorkspace:
    """Scratch of selective_attention for one (B, Hkv): the splits' fp32 partial outputs and
    log-sum-exps. Reuse it across layers and steps (a CUDA graph captures calls with it);
    give each concurrent stream its own."""

    partials: torch.Tensor
    batch: int
    n_kv: int


def selective_attention_workspace(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    max_selected: int | None = None,
    plan: AttentionPlan | None = None,
    block_table: torch.Tensor | None = None,
) -> AttentionWorkspace:
    """Scratch big enough for calls with these q / cache (and block table) shapes and up to
    ``max_selected`` groups per row (default Hkv), under ``plan`` or, by default, under
    whichever default plan a call with k <= max_selected gets."""
    b, hq, d = q.shape
    hkv = k_cache.shape[1]
    s_max, page = _positions(k_cache, block_table)
    group = hq // hkv
    k = max_selected or hkv
    if plan is None:
        # the most splits any k <= max_selected can ask for
        splits = max(plan_selective_attention(b, kk, group, s_max, d, sms=num_sms(q.device),
                                              page_size=page,
                                              kv_fp8=k_cache.dtype == FP8).num_splits * kk
                     for kk in range(1, k + 1))
        n = b * splits * group * (d + 1)
    else:
        n = _workspace_numel(b, k, plan.num_splits, group, d)
    return AttentionWorkspace(partials=torch.empty(n, dtype=torch.float32, device=q.device),
                              batch=b, n_kv=hkv)


def _positions(k_cache: torch.Tensor, block_table: torch.Tensor | None) -> tuple[int, int | None]:
    """(S_max, page size or None): the positions a row can hold, contiguous or paged."""
    if block_table is None:
        return k_cache.shape[2], None
    return block_table.shape[1] * k_cache.shape[2], k_cache.shape[2]


def _default_plan(q: torch.Tensor, k_cache: torch.Tensor, groups: torch.Tensor,
                  block_table: torch.Tensor | None = None) -> AttentionPlan:
    b, hq, d = q.shape
    s_max, page = _positions(k_cache, block_table)
    return plan_selective_attention(b, groups.shape[1], hq // k_cache.shape[1], s_max, d,
                                    sms=num_sms(q.device), page_size=page,
                                    kv_fp8=k_cache.dtype == FP8)


# --------------------------------------------------------------------------- checks


def _check_inputs(q, k_cache, v_cache, cache_seqlens, groups, block_table=None, k_scale=None,
                  v_scale=None, k_sink=None, v_sink=None) -> None:
    tensors = [("q", q), ("k_cache", k_cache), ("v_cache", v_cache),
               ("cache_seqlens", cache_seqlens), ("groups", groups)]
    tensors += [(name, t) for name, t in (("block_table", block_table), ("k_scale", k_scale),
                                          ("v_scale", v_scale), ("k_sink", k_sink),
                                          ("v_sink", v_sink)) if t is not None]
    for name, t in tensors:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"selective_attention: {name} must be a torch.Tensor, got {type(t)}")
    if q.dim() != 3:
        raise ValueError(f"selective_attention: q must be [B, Hq, D], got shape {tuple(q.shape)}")
    layout = "[B, Hkv, S_max, D]" if block_table is None else "page pools [N, Hkv, P, D]"
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"selective_attention: k_cache and v_cache must both be {layout}, got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    b, hq, d = q.shape
    kb, hkv, s_max, kd = k_cache.shape
    if block_table is not None:
        if block_table.dtype != torch.int32 or block_table.dim() != 2 or \
                block_table.shape[0] != b or block_table.stride(-1) != 1:
            raise ValueError(f"selective_attention: block_table must be int32 [{b}, pages] with "
                             f"a contiguous last axis, got {block_table.dtype} "
                             f"{tuple(block_table.shape)}")
        kb = b  # any number of pages
    if kb != b or kd != d:
        raise ValueError(f"selective_attention: cache shape {tuple(k_cache.shape)} does not match "
                         f"q shape {tuple(q.shape)} (batch and head dim must agree)")
    if hkv < 1 or hq % hkv != 0:
        raise ValueError(f"selective_attention: Hq={hq} is not a multiple of Hkv={hkv}")
    if s_max < 1 or d < 1 or b < 1:
        raise ValueError(f"selective_attention: empty shapes q {tuple(q.shape)}, "
                         f"cache {tuple(k_cache.shape)}")
    fp8 = k_cache.dtype == FP8
    if q.dtype not in _DTYPES or v_cache.dtype != k_cache.dtype or k_cache.dtype not in (q.dtype, FP8):
        raise ValueError("selective_attention: q must be bf16/fp16/fp32 and k_cache, v_cache "
                         "share its dtype or are both float8_e4m3fn, got "
                         f"{q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if fp8 != (k_scale is not None) or fp8 != (v_scale is not None):
        raise ValueError("selective_attention: k_scale and v_scale go with a float8 cache, "
                         "and only with one")
    if fp8 and any(t.dtype != torch.float32 or tuple(t.shape) != (hkv,) or t.stride(0) != 1
                   for t in (k_scale, v_scale)):
        raise ValueError(f"selective_attention: k_scale and v_scale must be contiguous float32 "
                         f"[Hkv={hkv}], got {k_scale.dtype} {tuple(k_scale.shape)} and "
                         f"{v_scale.dtype} {tuple(v_scale.shape)}")
    if (k_sink is not None) != (v_sink is not None) or (k_sink is not None and not fp8):
        raise ValueError("selective_attention: k_sink and v_sink go together, with a float8 "
                         "cache")
    sink_shape = (k_cache.shape[0], hkv, d)
    if k_sink is not None and any(t.dtype != q.dtype or tuple(t.shape) != sink_shape
                                  or t.stride() != k_sink.stride() or t.stride(-1) != 1
                                  for t in (k_sink, v_sink)):
        raise ValueError(f"selective_attention: k_sink and v_sink must be {q.dtype} "
                         f"{list(sink_shape)} with one layout and a contiguous last axis, got "
                         f"{k_sink.dtype} {tuple(k_sink.shape)} and {v_sink.dtype} "
                         f"{tuple(v_sink.shape)}")
    if cache_seqlens.dtype != torch.int32 or tuple(cache_seqlens.shape) != (b,):
        raise ValueError(f"selective_attention: cache_seqlens must be int32 [{b}], got "
                         f"{cache_seqlens.dtype} {tuple(cache_seqlens.shape)}")
    if groups.dtype != torch.int32 or groups.dim() != 2 or groups.shape[0] != b:
        raise ValueError(f"selective_attention: groups must be int32 [{b}, k], got "
                         f"{groups.dtype} {tuple(groups.shape)}")
    if not 1 <= groups.shape[1] <= hkv:
        raise ValueError(f"selective_attention: groups selects k={groups.shape[1]} per row; "
                         f"need 1 <= k <= Hkv={hkv}")
    devs = {t.device for _, t in tensors}
    if len(devs) != 1:
        raise ValueError(f"selective_attention: all tensors must be on one device, got {devs}")
    if k_cache.stride(-1) != 1 or 1 not in v_cache.stride()[2:]:
        raise ValueError("selective_attention: k_cache needs a contiguous last axis, v_cache a "
                         "contiguous last or position axis")


def _check_indices(
    k_cache: torch.Tensor, cache_seqlens: torch.Tensor, groups: torch.Tensor,
    block_table: torch.Tensor | None = None,
) -> None:
    """Value checks; they read the device (one sync), so the hot path turns them off."""
    hkv = k_cache.shape[1]
    s_max, page = _positions(k_cache, block_table)
    lo, hi = int(groups.min()), int(groups.max())
    if lo < 0 or hi >= hkv:
        raise ValueError(f"selective_attention: groups holds {lo if lo < 0 else hi}, "
                         f"outside [0, Hkv={hkv})")
    if groups.shape[1] > 1:
        srt = torch.sort(groups, dim=1).values
        if bool((srt[:, 1:] == srt[:, :-1]).any()):
            raise ValueError("selective_attention: a row of groups repeats a group")
    smin, smax = int(cache_seqlens.min()), int(cache_seqlens.max())
    if smin < 0 or smax > s_max:
        raise ValueError(f"selective_attention: cache_seqlens holds {smin if smin < 0 else smax}, "
                         f"outside [0, S_max={s_max}]")
    if block_table is not None and smax > 0:
        used = block_table[:, :-(-smax // page)]
        lens = cache_seqlens.long()[:, None]
        in_use = torch.arange(used.shape[1], device=used.device)[None, :] * page < lens
        bad = in_use & ((used < 0) | (used >= k_cache.shape[0]))
        if bool(bad.any()):
            raise ValueError(f"selective_attention: block_table names a page outside "
                             f"[0, {k_cache.shape[0]}) for a position in use")


# --------------------------------------------------------------------------- wrapper


@functools.lru_cache(maxsize=256)
def _stage1_constants(plan: AttentionPlan, group: int, d: int, n_sel: int, fp32: bool,
                      page: int, kv_fp8: bool, sink: bool) -> dict[str, object]:
    # tl.dot pads a small M itself; a float8 block's softmax then runs on the group's own rows
    # (sm_90 code: an eighth fewer instructions per block); the bf16 kernel was timed with 16
    pad = next_pow2(group) if kv_fp8 or not plan.use_dot else max(16, next_pow2(group))
    return dict(GROUP=group, GROUP_PAD=pad,
                HEAD_DIM=d, BLOCK_D=max(16, next_pow2(d)), BLOCK_N=plan.block_n,
                USE_DOT=plan.use_dot, DOT_PRECISION="ieee" if fp32 else "tf32",
                ONE_LAUNCH=plan.one_launch, K_PAD=next_pow2(n_sel), PAGE=page,
                KV_FP8=kv_fp8, FP8_DOT_FP16=kv_fp8 and not fp32, SINK=sink,
                num_warps=plan.num_warps, num_stages=plan.num_stages)


@functools.lru_cache(maxsize=256)
def _reduce_constants(num_splits: int, group: int, d: int, n_sel: int) -> dict[str, object]:
    return dict(GROUP=group, HEAD_DIM=d, BLOCK_D=max(16, next_pow2(d)),
                SPLITS_PAD=next_pow2(num_splits), K_PAD=next_pow2(n_sel),
                num_warps=4 if d >= 128 else 2)


def _launch(q, k_cache, v_cache, cache_seqlens, groups, scale, out, workspace, plan,
            block_table=None, k_scale=None, v_scale=None, k_sink=None, v_sink=None):
    b, hq, d = q.shape
    hkv = k_cache.shape[1]
    group = hq // hkv
    n_sel = groups.shape[1]
    if q.stride(-1) != 1:
        q = q.contiguous()
    if groups.stride(-1) != 1:
        groups = groups.contiguous()
    if out is None:
        out = torch.empty_like(q)
    one_launch = plan.one_launch
    need = 0 if one_launch else _workspace_numel(b, n_sel, plan.num_splits, group, d)
    if workspace is None and not one_launch:
        workspace = AttentionWorkspace(
            partials=torch.empty(need, dtype=torch.float32, device=q.device), batch=b, n_kv=hkv)
    if workspace is not None:
        if not isinstance(workspace, AttentionWorkspace):
            raise ValueError("selective_attention: workspace must come from "
                             "selective_attention_workspace()")
        if workspace.batch != b or workspace.n_kv != hkv or workspace.partials.numel() < need:
            raise ValueError(f"selective_attention: this workspace serves B={workspace.batch}, "
                             f"Hkv={workspace.n_kv} and {workspace.partials.numel()} partial "
                             f"words; the call needs B={b}, Hkv={hkv} and {need}")
        if workspace.partials.device != q.device:
            raise ValueError(f"selective_attention: workspace is on "
                             f"{workspace.partials.device}, tensors on {q.device}")
    # one launch never touches the partials: any pointer stands in
    partials = out if one_launch else workspace.partials
    # Positional arguments and cached constants: an eager call's host time is mostly this
    # launch (a few microseconds less per call than keywords built afresh).
    paged = block_table is not None
    fp8 = k_scale is not None
    sink = k_sink is not None
    # a contiguous call never reads the table, nor an unquantized one the scales, nor one
    # without sinks the sinks: any pointer stands in
    _selective_attention_kernel[(plan.num_splits, n_sel, b)](
        q, k_cache, v_cache, cache_seqlens, groups, partials, out,
        block_table if paged else cache_seqlens, k_scale if fp8 else q, v_scale if fp8 else q,
        k_sink if sink else q, v_sink if sink else q,
        float(scale) * _LOG2E, plan.num_splits, n_sel, hkv, *q.stride()[:2],
        *k_cache.stride()[:3], *v_cache.stride(), groups.stride(0),
        block_table.stride(0) if paged else 0, *(k_sink.stride()[:2] if sink else (0, 0)),
        *out.stride()[:2],
        **_stage1_constants(plan, group, d, n_sel, q.dtype == torch.float32,
                            k_cache.shape[2] if paged else 0, fp8, sink))
    if not one_launch:
        _selective_attention_reduce_kernel[(hq, b)](
            out, partials, groups, plan.num_splits, n_sel, *out.stride()[:2], groups.stride(0),
            **_reduce_constants(plan.num_splits, group, d, n_sel))
    return out


def selective_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    groups: torch.Tensor,
    scale: float | None = None,
    *,
    out: torch.Tensor | None = None,
    workspace: AttentionWorkspace | None = None,
    plan: AttentionPlan | None = None,
    check_indices: bool = True,
    block_table: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    k_sink: torch.Tensor | None = None,
    v_sink: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention over the selected KV groups of each row (layouts: module docstring).

    Args:
        q: ``[B, Hq, D]`` bf16/fp16/fp32.
        k_cache, v_cache: ``[B, Hkv, S_max, D]``, q's dtype or both float8_e4m3fn, last axis
            contiguous (V: or its position axis); with ``block_table``, page pools
            ``[N, Hkv, P, D]`` (P a multiple of 16; a float8 pool's positions past each row's
            length finite).
        cache_seqlens: ``[B]`` int32, each in ``[0, S_max]`` (paged: S_max = pages x P).
        groups: ``[B, k]`` int32, ``1 <= k <= Hkv``, values in ``[0, Hkv)``, any order.
        scale: softmax scale, default ``1/sqrt(D)``.
        out: optional ``[B, Hq, D]`` output (same dtype and device as q).
        workspace: optional :class:`AttentionWorkspace` from
            :func:`selective_attention_workspace` (needed for allocation-free calls).
        plan: optional :class:`AttentionPlan`; default from :func:`plan_selective_attention`.
        check_indices: check values of ``groups``, ``cache_seqlens`` and the pages in use
            (one device sync); turn off in the decode hot path and under CUDA-graph capture.
        block_table: ``[B, M]`` int32, each row's pages in order (paged caches only).
        k_scale, v_scale: ``[Hkv]`` float32, a float8 cache's scales (it holds K / k_scale
            and V / v_scale); given exactly when the cache is float8.
        k_sink, v_sink: ``[N, Hkv, D]`` in q's dtype (N: the cache's first axis), a float8
            cache's position 0 unquantized, in the row of the page that holds it
            (`polarc.plugins.reference`); optional.

    Returns ``[B, Hq, D]``: heads of unselected groups are exact zeros.

    Example::

        out = selective_attention(q, k_cache, v_cache, seqlens, groups)  # groups [B, k]
    """
    if torch.compiler.is_compiling():  # traced: go through the registered custom op
        return torch.ops.polarc.selective_attention(
            q, k_cache, v_cache, cache_seqlens, groups,
            float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1]), block_table,
            k_scale, v_scale, k_sink, v_sink)
    _check_inputs(q, k_cache, v_cache, cache_seqlens, groups, block_table, k_scale, v_scale,
                  k_sink, v_sink)
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.device != q.device
                            or out.stride(-1) != 1):
        raise ValueError(f"selective_attention: out must be {q.dtype} {tuple(q.shape)} on "
                         f"{q.device} with a contiguous last axis")
    if check_indices:
        _check_indices(k_cache, cache_seqlens, groups, block_table)
    check_launchable(_selective_attention_kernel, q.device, "selective_attention")
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    plan = plan or _default_plan(q, k_cache, groups, block_table)
    if block_table is not None and k_cache.shape[2] % plan.block_n:
        raise ValueError(f"selective_attention: page size {k_cache.shape[2]} is not a multiple "
                         f"of the plan's block of {plan.block_n} positions")
    return _launch(q, k_cache, v_cache, cache_seqlens, groups, scale, out, workspace, plan,
                   block_table, k_scale, v_scale, k_sink, v_sink)


# --------------------------------------------------------------------------- torch.library


@torch.library.custom_op("polarc::selective_attention", mutates_args=())
def _selective_attention_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    groups: torch.Tensor,
    scale: float,
    block_table: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    k_sink: torch.Tensor | None = None,
    v_sink: torch.Tensor | None = None,
) -> torch.Tensor:
    _check_inputs(q, k_cache, v_cache, cache_seqlens, groups, block_table, k_scale, v_scale,
                  k_sink, v_sink)
    return _launch(q, k_cache, v_cache, cache_seqlens, groups, scale, None, None,
                   _default_plan(q, k_cache, groups, block_table), block_table, k_scale, v_scale,
                   k_sink, v_sink)


@_selective_attention_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, groups, scale, block_table=None, k_scale=None,
      v_scale=None, k_sink=None, v_sink=None):
    return torch.empty_like(q)
