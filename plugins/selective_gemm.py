"""Selective GEMM pair for ReLU MLPs: only the neurons in a shared index are computed.

One decode step of a ReLU MLP (OPT) with ``idx`` the union of neurons the rows need:

    h   = relu(x @ w1[idx].T + b1[idx])       selective_gemm_up      [B, n]
    out = h @ w2[:, idx].T                      selective_gemm_down    [B, d_out]

Stored layouts (both weights *neuron-major*, so each selected neuron is one contiguous row
and the kernels stream whole rows):

- ``w1``  ``[N, d]``: ``nn.Linear(d, N).weight`` as is (row i = neuron i's input weights).
- ``w2t`` ``[N, d_out]``: the down-projection stored transposed,
  ``w2t = nn.Linear(N, d_out).weight.T.contiguous()`` (row i = neuron i's output weights).
  ``selective_gemm_down(h, w2t, idx) == h @ w2[:, idx].T``. Any strides give the right
  answer; only a contiguous ``w2t`` streams at full speed.
- ``b1`` ``[N]`` or None; ``idx`` ``[n]`` int32 in ``[0, N)`` (order is free; output column
  ``i`` of the up-projection is neuron ``idx[i]``).

Both kernels tile (rows of x/h) × (output columns) and loop over the reduction axis; when
there are too few output tiles to fill the GPU (small n or d_out, small batch), the
reduction is split over programs (split-K): each writes an fp32 partial into the workspace
and the last split of each output tile to finish (an atomic counter that it resets) adds
the pieces and applies bias and ReLU, so each GEMM is one launch. Without split-K the bias
and ReLU are applied in the GEMM's epilogue directly. Plans depend on shapes only
(CUDA-graph safe).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._triton_util import cdiv, check_launchable, num_sms
from .reference import selective_gemm_down_reference, selective_gemm_up_reference

__all__ = [
    "GemmPlan",
    "GemmWorkspace",
    "plan_selective_gemm",
    "selective_gemm_down",
    "selective_gemm_down_reference",
    "selective_gemm_up",
    "selective_gemm_up_reference",
    "selective_gemm_workspace",
]

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# --------------------------------------------------------------------------- kernels


@triton.jit
def _selective_gemm_up_kernel(
    X, W, Bias, Idx, Out, Part, Counters,
    M, N_SEL, K, k_per_split, split_k,
    stride_xm, stride_wn, stride_om, stride_pk, stride_pm,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """C[m, i] = sum_k X[m, k] * W[Idx[i], k] over this program's K range (+ bias, ReLU)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N_SEL
    rows = tl.load(Idx + offs_n, mask=mask_n, other=0).to(tl.int64)
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_hi
        x = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(W + rows[:, None] * stride_wn + offs_k[None, :],
                    mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
    _gemm_epilogue(acc, Out, Part, Counters, Bias, rows, offs_m, offs_n, mask_m, mask_n,
                   pid_m * tl.num_programs(0) + pid_n, pid_k, split_k,
                   stride_om, stride_pk, stride_pm, HAS_BIAS, True, SPLIT)


@triton.jit
def _selective_gemm_down_kernel(
    H, W, Idx, Out, Part, Counters,
    M, N_OUT, N_SEL, k_per_split, split_k,
    stride_hm, stride_wk, stride_wn, stride_om, stride_pk, stride_pm,
    SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """C[m, o] = sum_i H[m, i] * W[Idx[i], o] over this program's range of selected neurons."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N_OUT
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, N_SEL)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_hi
        rows = tl.load(Idx + offs_k, mask=mask_k, other=0).to(tl.int64)
        h = tl.load(H + offs_m[:, None] * stride_hm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(W + rows[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)
    _gemm_epilogue(acc, Out, Part, Counters, Out, offs_n, offs_m, offs_n, mask_m, mask_n,
                   pid_m * tl.num_programs(0) + pid_n, pid_k, split_k,
                   stride_om, stride_pk, stride_pm, False, False, SPLIT)


@triton.jit
def _gemm_finish(acc, Out, Bias, bias_rows, offs_m, offs_n, mask_m, mask_n, stride_om,
                 HAS_BIAS: tl.constexpr, RELU: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(Bias + bias_rows, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if RELU:
        acc = tl.maximum(acc, 0.0)
    tl.store(Out + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(Out.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _gemm_epilogue(acc, Out, Part, Counters, Bias, bias_rows, offs_m, offs_n, mask_m, mask_n,
                   tile, pid_k, split_k, stride_om, stride_pk, stride_pm,
                   HAS_BIAS: tl.constexpr, RELU: tl.constexpr, SPLIT: tl.constexpr):
    """Without split-K: bias, ReLU, store. With it: store this split's fp32 partial; the last
    split of the output tile to arrive (an atomic counter, reset after use) adds them up and
    finishes, so no second launch is needed."""
    if SPLIT:
        mask = mask_m[:, None] & mask_n[None, :]
        part = Part + offs_m[:, None] * stride_pm + offs_n[None, :]
        tl.store(part + pid_k * stride_pk, acc, mask=mask)
        tl.debug_barrier()  # every thread's partial stores precede the release below
        done = tl.atomic_add(Counters + tile, 1, sem="acq_rel", scope="gpu")
        if done == split_k - 1:
            total = tl.zeros_like(acc)
            for s in range(0, split_k):
                total += tl.load(part + s * stride_pk, mask=mask, other=0.0,
                                 cache_modifier=".cg")
            _gemm_finish(total, Out, Bias, bias_rows, offs_m, offs_n, mask_m, mask_n, stride_om,
                         HAS_BIAS, RELU)
            tl.atomic_xchg(Counters + tile, 0, sem="relaxed", scope="gpu")
    else:
        _gemm_finish(acc, Out, Bias, bias_rows, offs_m, offs_n, mask_m, mask_n, stride_om,
                     HAS_BIAS, RELU)


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class GemmPlan:
    """Tiles and split-K of one selective GEMM call; a pure function of the shapes."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int


def plan_selective_gemm(
    m: int,
    n_out: int,
    k: int,
    *,
    sms: int,
    kind: str = "down",
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    split_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> GemmPlan:
    """Tiles for an ``[m, k] x [k, n_out]`` product; split-K when the tiles underfill the GPU.

    Small ``m`` (decode) is weight-streaming: narrow M tiles, long K tiles, split-K until
    there are about two programs per SM, keeping each split at least four K tiles long.
    For ``m > 16`` the up-projection (``kind="up"``) takes K tiles of 128 and splits only
    when its tiles fill less than half the SMs: measured on the H100, the split partials'
    traffic cost more there than the idle SMs (KERNEL_NOTES.md). Explicit arguments
    override the heuristic (benchmarks and tests).
    """
    big_up = kind == "up" and m > 16
    if block_m is None:
        block_m = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128
    if block_n is None:
        block_n = 64 if block_m <= 64 else 128
    if block_k is None:
        block_k = 128 if block_m <= 32 or big_up or (kind == "down" and block_m <= 64) else 64
    if num_warps is None:
        num_warps = 4 if block_m * block_n <= 64 * 64 else 8
    if num_stages is None:
        num_stages = 6 if block_m <= 16 else 4 if block_m <= 64 else 3
    if split_k is None:
        tiles = cdiv(m, block_m) * cdiv(n_out, block_n)
        want = max(1, (2 * sms) // tiles)
        if big_up:
            want = 1 if tiles >= sms // 2 else max(1, sms // tiles)
        most = max(1, k // (4 * block_k))
        split_k = max(1, min(want, most, 32))
    return GemmPlan(block_m=block_m, block_n=block_n, block_k=block_k, split_k=split_k,
                    num_warps=num_warps, num_stages=num_stages)


@dataclass(frozen=True)
class GemmWorkspace:
    """Scratch of a split-K selective GEMM: fp32 partials and int32 tile counters that the
    kernel leaves at zero after every call. Calls in sequence on one stream may share one
    (if big enough); concurrent calls need their own."""

    partials: torch.Tensor
    counters: torch.Tensor


def selective_gemm_workspace(m: int, n_out: int, plan: GemmPlan,
                             device: torch.device | str) -> GemmWorkspace:
    """Scratch for an ``[m, n_out]`` output under ``plan`` (tiny when it does not split)."""
    parts = plan.split_k * m * n_out if plan.split_k > 1 else 1
    tiles = cdiv(m, plan.block_m) * cdiv(n_out, plan.block_n)
    return GemmWorkspace(partials=torch.empty(parts, dtype=torch.float32, device=device),
                         counters=torch.zeros(tiles, dtype=torch.int32, device=device))


# --------------------------------------------------------------------------- checks


def _check_common(op: str, a: torch.Tensor, w: torch.Tensor, idx: torch.Tensor,
                  a_name: str, w_name: str) -> None:
    for name, t in ((a_name, a), (w_name, w), ("idx", idx)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t)}")
    if a.dim() != 2 or w.dim() != 2:
        raise ValueError(f"{op}: {a_name} and {w_name} must be 2-D, got {tuple(a.shape)} and "
                         f"{tuple(w.shape)}")
    if a.dtype not in _DTYPES or w.dtype != a.dtype:
        raise ValueError(f"{op}: {a_name} and {w_name} must share one dtype of bf16/fp16/fp32, "
                         f"got {a.dtype} and {w.dtype}")
    if idx.dtype != torch.int32 or idx.dim() != 1 or idx.numel() < 1:
        raise ValueError(f"{op}: idx must be a non-empty 1-D int32 tensor, got {idx.dtype} "
                         f"{tuple(idx.shape)}")
    if len({a.device, w.device, idx.device}) != 1:
        raise ValueError(f"{op}: all tensors must be on one device, got {a.device}, {w.device}, "
                         f"{idx.device}")


def _check_idx(op: str, idx: torch.Tensor, n_total: int) -> None:
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= n_total:
        raise ValueError(f"{op}: idx holds {lo if lo < 0 else hi}, outside [0, N={n_total})")


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


# --------------------------------------------------------------------------- up


def selective_gemm_up(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    idx: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    workspace: GemmWorkspace | None = None,
    plan: GemmPlan | None = None,
    check_indices: bool = True,
) -> torch.Tensor:
    """``relu(x @ w1[idx].T + b1[idx])`` reading only rows ``idx`` of ``w1``.

    Args:
        x: ``[B, d]``; w1: ``[N, d]`` (neuron-major, last axis contiguous); b1: ``[N]`` or None.
        idx: ``[n]`` int32 in ``[0, N)``.
        out: optional ``[B, n]``; workspace: optional :class:`GemmWorkspace` from
            ``selective_gemm_workspace(B, n, plan, device)`` (allocation-free calls).
        check_indices: check idx's range (one device sync); off in the hot path.
    Returns ``[B, n]`` in x's dtype.
    """
    op = "selective_gemm_up"
    if torch.compiler.is_compiling():  # traced: go through the registered custom op
        return torch.ops.polarc.selective_gemm_up(x, w1, b1, idx)
    _check_common(op, x, w1, idx, "x", "w1")
    m, d = x.shape
    n_total = w1.shape[0]
    if w1.shape[1] != d:
        raise ValueError(f"{op}: w1 must be [N, d={d}] (neuron-major), got {tuple(w1.shape)}")
    if b1 is not None and (b1.shape != (n_total,) or b1.dtype != x.dtype or b1.device != x.device):
        raise ValueError(f"{op}: b1 must be {x.dtype} [{n_total}] on {x.device}, got "
                         f"{b1.dtype} {tuple(b1.shape)}")
    if check_indices:
        _check_idx(op, idx, n_total)
    check_launchable(_selective_gemm_up_kernel, x.device, op)
    x = x if x.stride(1) == 1 else x.contiguous()
    w1 = w1 if w1.stride(1) == 1 else w1.contiguous()
    idx = idx.contiguous()
    n_sel = idx.numel()
    plan = plan or plan_selective_gemm(m, n_sel, d, sms=num_sms(x.device), kind="up")
    if out is None:
        out = torch.empty(m, n_sel, dtype=x.dtype, device=x.device)
    elif out.shape != (m, n_sel) or out.dtype != x.dtype or out.stride(1) != 1:
        raise ValueError(f"{op}: out must be {x.dtype} [{m}, {n_sel}] with a contiguous last axis")
    part, counters = _scratch(op, plan, m, n_sel, x.device, workspace)
    k_per_split = cdiv(cdiv(d, plan.split_k), plan.block_k) * plan.block_k
    split = plan.split_k > 1
    bias = b1 if b1 is not None else x  # dummy pointer when HAS_BIAS is off
    _selective_gemm_up_kernel[(cdiv(n_sel, plan.block_n), cdiv(m, plan.block_m), plan.split_k)](
        x, w1, bias, idx, out, part, counters,
        M=m, N_SEL=n_sel, K=d, k_per_split=k_per_split, split_k=plan.split_k,
        stride_xm=x.stride(0), stride_wn=w1.stride(0), stride_om=out.stride(0),
        stride_pk=part.stride(0), stride_pm=part.stride(1),
        HAS_BIAS=b1 is not None, SPLIT=split,
        BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, BLOCK_K=plan.block_k,
        DOT_PRECISION=_precision(x.dtype), num_warps=plan.num_warps, num_stages=plan.num_stages,
    )
    return out


# --------------------------------------------------------------------------- down


def selective_gemm_down(
    h: torch.Tensor,
    w2t: torch.Tensor,
    idx: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    workspace: GemmWorkspace | None = None,
    plan: GemmPlan | None = None,
    check_indices: bool = True,
) -> torch.Tensor:
    """``h @ w2[:, idx].T == h @ w2t[idx]`` reading only rows ``idx`` of ``w2t``.

    Args:
        h: ``[B, n]`` (column i belongs to neuron ``idx[i]``, as selective_gemm_up returns it).
        w2t: ``[N, d_out]``, the down weight stored neuron-major (``w2.T.contiguous()``).
        idx: ``[n]`` int32 in ``[0, N)``.
        out: optional ``[B, d_out]``; workspace: optional :class:`GemmWorkspace` from
            ``selective_gemm_workspace(B, d_out, plan, device)`` (allocation-free calls).
        check_indices: check idx's range (one device sync); off in the hot path.
    Returns ``[B, d_out]`` in h's dtype.
    """
    op = "selective_gemm_down"
    if torch.compiler.is_compiling():
        return torch.ops.polarc.selective_gemm_down(h, w2t, idx)
    _check_common(op, h, w2t, idx, "h", "w2t")
    m, n_sel = h.shape
    n_total, d_out = w2t.shape
    if idx.numel() != n_sel:
        raise ValueError(f"{op}: h has {n_sel} columns but idx has {idx.numel()} entries")
    if check_indices:
        _check_idx(op, idx, n_total)
    check_launchable(_selective_gemm_down_kernel, h.device, op)
    h = h if h.stride(1) == 1 else h.contiguous()
    idx = idx.contiguous()
    plan = plan or plan_selective_gemm(m, d_out, n_sel, sms=num_sms(h.device))
    if out is None:
        out = torch.empty(m, d_out, dtype=h.dtype, device=h.device)
    elif out.shape != (m, d_out) or out.dtype != h.dtype or out.stride(1) != 1:
        raise ValueError(f"{op}: out must be {h.dtype} [{m}, {d_out}] with a contiguous last axis")
    part, counters = _scratch(op, plan, m, d_out, h.device, workspace)
    k_per_split = cdiv(cdiv(n_sel, plan.split_k), plan.block_k) * plan.block_k
    split = plan.split_k > 1
    _selective_gemm_down_kernel[(cdiv(d_out, plan.block_n), cdiv(m, plan.block_m), plan.split_k)](
        h, w2t, idx, out, part, counters,
        M=m, N_OUT=d_out, N_SEL=n_sel, k_per_split=k_per_split, split_k=plan.split_k,
        stride_hm=h.stride(0), stride_wk=w2t.stride(0), stride_wn=w2t.stride(1),
        stride_om=out.stride(0), stride_pk=part.stride(0), stride_pm=part.stride(1),
        SPLIT=split, BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, BLOCK_K=plan.block_k,
        DOT_PRECISION=_precision(h.dtype), num_warps=plan.num_warps, num_stages=plan.num_stages,
    )
    return out


# --------------------------------------------------------------------------- shared


def _scratch(op: str, plan: GemmPlan, m: int, n: int, device: torch.device,
             workspace: GemmWorkspace | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(partials [split_k, m, n] fp32, counters int32) for this call."""
    split = plan.split_k > 1
    need = plan.split_k * m * n if split else 1
    tiles = cdiv(m, plan.block_m) * cdiv(n, plan.block_n)
    if workspace is None:
        workspace = selective_gemm_workspace(m, n, plan, device)
    if not isinstance(workspace, GemmWorkspace):
        raise ValueError(f"{op}: workspace must come from selective_gemm_workspace()")
    if (workspace.partials.device != device or workspace.partials.numel() < need
            or workspace.counters.numel() < tiles):
        raise ValueError(f"{op}: workspace too small or on another device: need {need} partial "
                         f"words and {tiles} counters on {device}; see selective_gemm_workspace()")
    parts = workspace.partials[:need].view(plan.split_k, m, n) if split \
        else workspace.partials[:1].view(1, 1, 1)
    return parts, workspace.counters


# --------------------------------------------------------------------------- torch.library


@torch.library.custom_op("polarc::selective_gemm_up", mutates_args=())
def _selective_gemm_up_op(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None,
                          idx: torch.Tensor) -> torch.Tensor:
    return selective_gemm_up(x, w1, b1, idx, check_indices=False)


@_selective_gemm_up_op.register_fake
def _(x, w1, b1, idx):
    return x.new_empty(x.shape[0], idx.shape[0])


@torch.library.custom_op("polarc::selective_gemm_down", mutates_args=())
def _selective_gemm_down_op(h: torch.Tensor, w2t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return selective_gemm_down(h, w2t, idx, check_indices=False)


@_selective_gemm_down_op.register_fake
def _(h, w2t, idx):
    return h.new_empty(h.shape[0], w2t.shape[1])
