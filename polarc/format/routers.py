"""Routers: what they are and how their tensors are laid out in polarc's files.

A head router ``Linear(d, Hkv)`` scores the KV groups of one token; the top-k scores are the
groups kept. An MLP router (ReLU models) is low-rank ``d → r → N``; at run time its summed
probabilities over the batch pick one neuron index for the whole batch (the union).

Tensor names (the calibration's ``routers.safetensors``, fp32; an engine stores its MLP
routers the same way under ``routers.``, and its head routers as rows of the fused q/k/v
weight, see `engine_file.py`): ``layers.{i}.head.weight [Hkv, d]``, ``layers.{i}.head.bias
[Hkv]``, ``layers.{i}.mlp.w1 [r, d]``, ``layers.{i}.mlp.w2 [N, r]``, ``layers.{i}.mlp.b2 [N]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class HeadRouter:
    weight: torch.Tensor  # [Hkv, d]
    bias: torch.Tensor  # [Hkv]
    k: int  # groups it was trained to keep
    recall: float  # validation recall of its top-k against the true top-k
    # the same per domain of the calibration text (empty when it had no domains)
    recall_by_domain: dict[str, float] = field(default_factory=dict)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias)


@dataclass
class MLPRouter:
    w1: torch.Tensor  # [r, d]
    w2: torch.Tensor  # [N, r]
    b2: torch.Tensor  # [N]
    k: int  # neurons kept by the batch-union top-k (multiple of 128, or all)
    batch: int  # batch size the union k was calibrated for
    union_recall: float
    recall: float  # per-token recall of its top-k among active neurons

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x.to(self.w1.dtype), self.w1), self.w2, self.b2)

    def union(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """The batch-union neuron index ``[k]`` int32: top-k of the summed probabilities."""
        return torch.sigmoid(self.scores(x).float()).sum(0).topk(k).indices.to(torch.int32)


def head_router_tensors(head: dict[int, HeadRouter]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for layer, r in head.items():
        out[f"layers.{layer}.head.weight"] = r.weight.float().contiguous()
        out[f"layers.{layer}.head.bias"] = r.bias.float().contiguous()
    return out


def mlp_router_tensors(mlp: dict[int, MLPRouter]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for layer, m in mlp.items():
        out[f"layers.{layer}.mlp.w1"] = m.w1.float().contiguous()
        out[f"layers.{layer}.mlp.w2"] = m.w2.float().contiguous()
        out[f"layers.{layer}.mlp.b2"] = m.b2.float().contiguous()
    return out


def router_tensors(head: dict[int, HeadRouter], mlp: dict[int, MLPRouter]
                   ) -> dict[str, torch.Tensor]:
    return {**head_router_tensors(head), **mlp_router_tensors(mlp)}
