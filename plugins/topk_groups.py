"""Top-k KV groups per row from router scores, in one launch (the decode step's selection).

``torch.topk`` on a ``[B, Hkv]`` tensor followed by the int32 cast is two to four tiny
kernels per layer; inside a CUDA-graph-captured decode step of a 32-layer model those
launches cost a few hundred microseconds, a visible share of a sparse step. This kernel runs
one program per row: it ranks every group against the others (a ``[Hkv, Hkv]`` comparison in
registers; Hkv is at most a few dozen) and writes the groups of rank < k in rank order.

Layouts: ``scores [B, Hkv]`` (any float dtype, last axis contiguous) → ``groups [B, k]``
int32, highest score first. Ties go to the lower group index (``torch.topk`` leaves tie
order unspecified).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_util import check_launchable, next_pow2
from .reference import topk_groups_reference

__all__ = ["topk_groups", "topk_groups_reference"]


@triton.jit
def _topk_groups_kernel(Scores, Groups, n_kv, stride_sb, stride_gb,
                        K: tl.constexpr, HKV_PAD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, HKV_PAD)
    valid = offs < n_kv
    s = tl.load(Scores + row * stride_sb + offs, mask=valid, other=float("-inf")).to(tl.float32)
    # group i's rank: how many valid groups j beat it (a higher score, or equal and lower index)
    beats = (s[None, :] > s[:, None]) | ((s[None, :] == s[:, None]) & (offs[None, :] < offs[:, None]))
    rank = tl.sum((beats & valid[None, :]).to(tl.int32), axis=1)
    tl.store(Groups + row * stride_gb + rank, offs.to(tl.int32), mask=valid & (rank < K))


def topk_groups(scores: torch.Tensor, k: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """``groups [B, k]`` int32 from ``scores [B, Hkv]`` (see the module docstring)."""
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2 or not scores.is_floating_point():
        raise ValueError("topk_groups: scores must be a float tensor [B, Hkv]")
    b, hkv = scores.shape
    if not 1 <= k <= hkv:
        raise ValueError(f"topk_groups: need 1 <= k <= Hkv={hkv}, got k={k}")
    if scores.stride(-1) != 1:
        scores = scores.contiguous()
    if out is None:
        out = torch.empty(b, k, dtype=torch.int32, device=scores.device)
    elif out.shape != (b, k) or out.dtype != torch.int32 or out.stride(-1) != 1:
        raise ValueError(f"topk_groups: out must be int32 [{b}, {k}] with a contiguous last axis")
    check_launchable(_topk_groups_kernel, scores.device, "topk_groups")
    _topk_groups_kernel[(b,)](scores, out, hkv, scores.stride(0), out.stride(0), K=k,
                              HKV_PAD=max(2, next_pow2(hkv)), num_warps=1)
    return out
