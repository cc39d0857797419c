"""The decode step's kernels for a device: polarc's Triton kernels on CUDA, their plain-torch
definitions (`polarc.plugins.reference`) elsewhere, behind one set of calls.

Selective attention follows plan/run: a plan per (batch bucket, k) and a workspace per batch
bucket are made once (they depend on shapes only) and every layer's call reuses them, so the
calls capture into CUDA graphs and an eager call does no planning or allocation.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from polarc.format.engine_file import untile_fp8, widen_fp8
from polarc.models.layers import apply_rope, next_linear, norm_after
from polarc.plugins import reference

# Rows up to which a float8-weight GEMM runs the FP8 linear kernel (decode: bound by the
# weight bytes); beyond, a prefill, the weight is widened for cuBLAS (bound by arithmetic).
FP8_KERNEL_ROWS = 256
# ... and a 16-bit one (`Kernels.wide_linears`): at 16 and 32 rows the kernel's steps are
# 0.15-0.35 ms shorter than cuBLAS's, at 64 rows 0.04-0.07 ms longer (H200, RESULTS.md s51)
WIDE_KERNEL_ROWS = 32
# 16-bit weights kept as tiles (`Runtime(tile_linears=True)`) run the kernel at every row
# count: at prefill's 512-2,048 rows it took a step's GEMMs 0-14% longer than cuBLAS on rows,
# and 16-42% shorter than widening the tiles back for cuBLAS (H100, RESULTS.md session 55)


def rope_write_kv_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            k_cache: torch.Tensor, v_cache: torch.Tensor,
                            positions: torch.Tensor, block_table: torch.Tensor | None = None,
                            k_scale: torch.Tensor | None = None,
                            v_scale: torch.Tensor | None = None,
                            k_sink: torch.Tensor | None = None,
                            v_sink: torch.Tensor | None = None,
                            k_offset: torch.Tensor | None = None, *,
                            cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                            rotation: torch.Tensor | None = None,
                            scores: torch.Tensor | None = None,
                            groups: torch.Tensor | None = None) -> torch.Tensor:
    """What `polarc.plugins.kv_write.rope_write_kv` computes in one launch, stage by stage:
    the model's rotary positions on q ``[B, Hq, D]`` and k ``[B, Hkv, D]`` (``cos``, ``sin``
    ``[B, D]``; None: none), both times ``rotation`` (None: none), k and v written as
    `write_kv_reference` does, and ``groups`` ``[B, k]`` (given with ``scores``) filled by
    `topk_groups_reference`; returns q. Here, beside the model's rotary definition, because
    the kernel package does not import the model."""
    if groups is not None:
        groups.copy_(reference.topk_groups_reference(scores, groups.shape[1]))
    if cos is not None:
        q, k = apply_rope(q, cos[:, None], sin[:, None]), apply_rope(k, cos[:, None], sin[:, None])
    if rotation is not None:
        q, k = q @ rotation, k @ rotation
    reference.write_kv_reference(k, v, k_cache, v_cache, positions, block_table, k_scale,
                                 v_scale, k_sink, v_sink, k_offset)
    return q


@dataclass(frozen=True)
class AddedDelta:
    """A linear layer's delta that `Kernels.linear_residual` already added into the residual
    stream, with the next RMS norm of the new rows in parts (its `weight` times the rows, and
    their sums of squares)."""

    norm: Any  # polarc.plugins.fp8_linear.RmsNormParts (the plugin imports triton)
    weight: torch.Tensor


@dataclass(frozen=True)
class NormedRows:
    """An RMS norm in parts, not yet applied: the next GEMM applies it to its rows'
    products (`fp8_linear(norm=)`); `h`: the residual rows it is the norm of."""

    h: torch.Tensor
    norm: Any  # RmsNormParts


def deferred_add_norm(add_norm: Callable) -> Callable:
    """`add_norm` that, given an `AddedDelta`, leaves the norm to the next GEMM (`NormedRows`):
    the residual add and the norm then cost no launch of their own."""

    def add_norm_or_defer(h: torch.Tensor, delta: Any, weight: torch.Tensor,
                          bias: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, Any]:
        if not isinstance(delta, AddedDelta):
            return add_norm(h, delta, weight, bias, eps)
        if bias is not None or delta.weight is not weight or delta.norm.eps != eps:
            raise ValueError("a deferred norm must be the RMS norm its GEMM prepared")
        return h, NormedRows(h, delta.norm)

    return add_norm_or_defer


@dataclass
class Kernels:
    """attention(q, k_pool, v_pool, cache_seqlens, groups, block_table[, scales, sinks]) ->
    [B, Hq, D]; rope_write_kv(q, k, v, k_pool, v_pool, positions, block_table[, scales,
    sinks][, k_offset=], cos=, sin=, rotation=[, scores=, groups=]) -> q: the rotary stage,
    the KV append and the top-k group selection in one;
    gemm_up / gemm_down: the selective GEMM pair. Layouts (paged caches):
    `polarc.plugins.reference`."""

    device: torch.device
    scale: float
    rope_write_kv: Callable
    gemm_up: Callable
    gemm_down: Callable
    # 16-bit [N, K] weights through the FP8 linear kernel too, with its fusions (SwiGLU,
    # residual add and RMS norm), not cuBLAS: `_kernel_weight`
    wide_linears: bool = True
    _plans: dict = field(default_factory=dict)
    _workspaces: dict = field(default_factory=dict)
    _ones: dict = field(default_factory=dict)

    def linear(self, model: Any, x: torch.Tensor, name: str) -> torch.Tensor:
        """`model`'s linear layer `name` on x [..., K] (`layers.linear`'s contract): through
        the FP8 linear kernel where `_kernel_weight` gives it one, else float8 weights (with
        `<name>.weight_scale` rows; in `load_engine`'s tiles or ``[N, K]``) and 16-bit tiles
        (`tile_fp8_weights(wide=True)`, scales ones) widened for cuBLAS on CUDA, through
        their reference elsewhere, and 16-bit ``[N, K]`` weights by F.linear."""
        if isinstance(x, NormedRows):
            return self._linear_of_norm(model, x, name)
        w = model.weights[name + ".weight"]
        bias = model.weights.get(name + ".bias")
        x2 = x.reshape(-1, x.shape[-1])
        # (a tiled gate_up pairs gate and up rows for `linear_swiglu`: read alone, it is
        # widened back in order, as prefill's are)
        paired = w.dim() == 4 and name.endswith("gate_up")
        operands = None if paired else self._kernel_weight(model, name, x2)
        if operands is not None:
            from polarc.plugins.fp8_linear import fp8_linear

            y = fp8_linear(x2 if x2.stride(-1) == 1 else x2.contiguous(), *operands, bias,
                           prefetch=_next_fp8_tiles(model, name))
        elif w.dim() == 2 and w.dtype != reference.FP8:
            return F.linear(x, w, bias)
        elif self.device.type != "cuda":
            scale = model.weights[name + ".weight_scale"]
            if w.dim() == 4:
                w = untile_fp8(w, scale.shape[0], x.shape[-1], swiglu=paired)
            y = reference.fp8_linear_reference(x2, w, scale, bias)
        else:
            from polarc.plugins.fp8_linear import fp8_widen

            widen = fp8_widen if w.dim() == 4 else widen_fp8
            y = F.linear(x2, widen(w, model.weights[name + ".weight_scale"], x.shape[-1],
                                   x.dtype, swiglu=paired), bias)
        return y.view(*x.shape[:-1], y.shape[-1])

    def _kernel_weight(self, model: Any, name: str, x2: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The weight and per-channel scale with which the FP8 linear kernel runs linear layer
        `name` on the rows x2 (CUDA; up to `FP8_KERNEL_ROWS` rows, any number on 16-bit
        tiles): float8 weights or tiles of any dtype
        (`tile_fp8_weights`), or, with `wide_linears`, 16-bit ``[N, K]`` rows in x's dtype
        (any row stride; not a transposed view; scale: ones); None where the kernel does not."""
        if self.device.type != "cuda":
            return None
        w = model.weights[name + ".weight"]
        if x2.shape[0] > FP8_KERNEL_ROWS and (w.dim() == 2 or w.dtype == reference.FP8):
            return None
        if w.dtype == reference.FP8 or w.dim() == 4:
            return w, model.weights[name + ".weight_scale"]
        if not (self.wide_linears and w.dtype == x2.dtype and w.dim() == 2
                and w.stride(1) == 1 and w.stride(0) >= w.shape[1] and x2.dtype != torch.float32
                and x2.shape[0] <= WIDE_KERNEL_ROWS):
            return None
        ones = self._ones.get(w.shape[0])
        if ones is None:  # made in the eager warm-up before a capture, as the workspaces are
            ones = self._ones[w.shape[0]] = torch.ones(w.shape[0], device=self.device)
        return w, ones

    def linear_swiglu(self, model: Any, x: torch.Tensor, name: str) -> torch.Tensor | None:
        """`Ops.linear_swiglu`: a ``gate_up`` layer and its SwiGLU as one FP8 linear launch
        (the epilogue pairs gate and up) where `_kernel_weight` gives the kernel its weight;
        None otherwise (the CPU, prefill)."""
        if isinstance(x, NormedRows):
            return self._linear_of_norm(model, x, name, swiglu=True)
        x2 = x.reshape(-1, x.shape[-1])
        operands = self._kernel_weight(model, name, x2)
        if operands is None:
            return None
        from polarc.plugins.fp8_linear import fp8_linear

        y = fp8_linear(x2 if x2.stride(-1) == 1 else x2.contiguous(), *operands,
                       model.weights.get(name + ".bias"), swiglu=True,
                       prefetch=_next_fp8_tiles(model, name))
        return y.view(*x.shape[:-1], y.shape[-1])

    def linear_residual(self, model: Any, x: torch.Tensor, name: str, h: torch.Tensor
                        ) -> AddedDelta | None:
        """`Ops.linear_residual`: a linear layer added into the residual stream h by its GEMM's
        epilogue where `_kernel_weight` gives the kernel its weight (the next norm then reads
        the sums of squares it leaves: `deferred_add_norm`); None otherwise."""
        x2 = x.reshape(-1, x.shape[-1])
        operands = self._kernel_weight(model, name, x2)
        if operands is None or _fp8_rows(operands[0]) or not h.is_contiguous() \
                or h.dtype != x.dtype:
            return None
        after = norm_after(model, name)
        if after + ".bias" in model.weights:  # a LayerNorm: not an RMS norm in parts
            return None
        weight = model.weights[after + ".weight"]
        from polarc.plugins.fp8_linear import fp8_linear

        parts = fp8_linear(
            x2 if x2.stride(-1) == 1 else x2.contiguous(), *operands,
            model.weights.get(name + ".bias"),
            residual=h.view(-1, h.shape[-1]), norm_weight=weight, eps=model.spec.norm_eps,
            prefetch=_next_fp8_tiles(model, name))
        return AddedDelta(parts, weight)

    def _linear_of_norm(self, model: Any, x: NormedRows, name: str, *,
                    swiglu: bool = False) -> torch.Tensor:
        """Linear layer `name` (through the kernel) of the RMS norm `x` stands for."""
        parts = x.norm
        operands = self._kernel_weight(model, name, parts.scaled)
        if operands is None or _fp8_rows(operands[0]):
            # no kernel takes the parts: the norm they stand for, here
            rms = torch.rsqrt(parts.sumsq.sum(1, keepdim=True) / parts.scaled.shape[-1]
                              + parts.eps)
            normed = (parts.scaled.float() * rms).to(x.h.dtype).view(x.h.shape)
            return self.linear_swiglu(model, normed, name) if swiglu else \
                self.linear(model, normed, name)
        from polarc.plugins.fp8_linear import fp8_linear

        y = fp8_linear(parts.scaled, *operands, model.weights.get(name + ".bias"),
                       swiglu=swiglu, prefetch=_next_fp8_tiles(model, name), norm=parts)
        return y.view(*x.h.shape[:-1], y.shape[-1])

    def attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  cache_seqlens: torch.Tensor, groups: torch.Tensor,
                  block_table: torch.Tensor, k_scale: torch.Tensor | None = None,
                  v_scale: torch.Tensor | None = None, k_sink: torch.Tensor | None = None,
                  v_sink: torch.Tensor | None = None) -> torch.Tensor:
        if self.device.type != "cuda":
            return reference.selective_attention_reference(q, k_cache, v_cache, cache_seqlens,
                                                           groups, self.scale, block_table,
                                                           k_scale, v_scale, k_sink, v_sink)
        from polarc.plugins._triton_util import num_sms
        from polarc.plugins.selective_attention import (
            plan_selective_attention,
            selective_attention,
            selective_attention_workspace,
        )

        b, hq, d = q.shape
        n_kv, page = k_cache.shape[1], k_cache.shape[2]
        s_max = block_table.shape[1] * page
        k = groups.shape[1]
        key = (b, k, hq // n_kv, s_max, d)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = plan_selective_attention(
                *key, sms=num_sms(q.device), page_size=page, kv_fp8=k_scale is not None)
        ws_key = (b, hq, n_kv, s_max, d)
        workspace = self._workspaces.get(ws_key)
        if workspace is None:
            workspace = self._workspaces[ws_key] = selective_attention_workspace(
                q, k_cache, block_table=block_table)
        return selective_attention(q, k_cache, v_cache, cache_seqlens, groups, self.scale,
                                   plan=plan, workspace=workspace, check_indices=False,
                                   block_table=block_table, k_scale=k_scale, v_scale=v_scale,
                                   k_sink=k_sink, v_sink=v_sink)


def _fp8_rows(w: torch.Tensor) -> bool:
    """Float8 weights left ``[N, K]`` (not `load_engine`'s tiles): no residual or norm fusion
    (the runtime tiles every float8 weight it runs)."""
    return w.dtype == reference.FP8 and w.dim() != 4


def _next_fp8_tiles(model: Any, name: str) -> torch.Tensor | None:
    """The next linear layer's weight where it is tiles (`tile_fp8_weights`), which
    `fp8_linear` prefetches into L2 (the fp8-all step 1% shorter on the H100, RESULTS.md
    2026-12-06)."""
    after = next_linear(model, name)
    w = model.weights.get(after + ".weight") if after else None
    return w if w is not None and w.dim() == 4 else None


def kernels_for(device: torch.device, head_dim: int) -> Kernels:
    scale = 1.0 / math.sqrt(head_dim)
    if device.type == "cuda":
        from polarc.plugins.kv_write import rope_write_kv
        from polarc.plugins.selective_gemm import selective_gemm_down, selective_gemm_up

        return Kernels(device, scale, rope_write_kv=rope_write_kv,
                       gemm_up=functools.partial(selective_gemm_up, check_indices=False),
                       gemm_down=functools.partial(selective_gemm_down, check_indices=False))
    return Kernels(device, scale, rope_write_kv=rope_write_kv_reference,
                   gemm_up=reference.selective_gemm_up_reference,
                   gemm_down=reference.selective_gemm_down_reference)
