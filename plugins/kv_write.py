"""Append one decode token's keys and values to the static caches, in one launch.

Indexed assignment (``k_cache[rows, :, pos] = k``) is one or two kernels per tensor, so four
per layer for K and V; this writes both with one program per (row, KV group).

Layouts: ``k``, ``v`` ``[B, Hkv, D]`` (last axis contiguous, other strides free: views into a
fused projection output work); ``k_cache``, ``v_cache`` ``[B', Hkv, S_max, D]`` with B' >= B
(the first B rows are written), same strides; ``positions [B]`` int32, each < S_max.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_util import check_launchable, next_pow2
from .reference import write_kv_reference

__all__ = ["write_kv", "write_kv_reference"]


@triton.jit
def _write_kv_kernel(K, V, K_Cache, V_Cache, Positions,
                     stride_kb, stride_kh, stride_vb, stride_vh, stride_cb, stride_ch, stride_cs,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1).to(tl.int64)
    pos = tl.load(Positions + row).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < HEAD_DIM
    k = tl.load(K + row * stride_kb + group * stride_kh + offs, mask=mask)
    v = tl.load(V + row * stride_vb + group * stride_vh + offs, mask=mask)
    dst = row * stride_cb + group * stride_ch + pos * stride_cs + offs
    tl.store(K_Cache + dst, k, mask=mask)
    tl.store(V_Cache + dst, v, mask=mask)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             positions: torch.Tensor) -> None:
    """Write ``k``, ``v`` [B, Hkv, D] at ``positions`` [B] of the caches (module docstring)."""
    b, hkv, d = k.shape
    if v.shape != k.shape or k_cache.shape != v_cache.shape or k_cache.dim() != 4 or \
            k_cache.shape[0] < b or k_cache.shape[1] != hkv or k_cache.shape[3] != d:
        raise ValueError(f"write_kv: k/v {tuple(k.shape)}/{tuple(v.shape)} do not fit caches "
                         f"{tuple(k_cache.shape)}/{tuple(v_cache.shape)}")
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1 or k.stride(-1) != 1 \
            or v.stride(-1) != 1:
        raise ValueError("write_kv: caches must share strides; all last axes contiguous")
    if k.dtype != k_cache.dtype or v.dtype != k_cache.dtype:
        raise ValueError(f"write_kv: dtypes differ: {k.dtype}, {v.dtype}, cache {k_cache.dtype}")
    if positions.dtype != torch.int32 or tuple(positions.shape) != (b,):
        raise ValueError(f"write_kv: positions must be int32 [{b}]")
    check_launchable(_write_kv_kernel, k.device, "write_kv")
    _write_kv_kernel[(b, hkv)](
        k, v, k_cache, v_cache, positions, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        HEAD_DIM=d, BLOCK_D=next_pow2(d), num_warps=1)
