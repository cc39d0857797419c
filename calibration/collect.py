"""Collection: dense forward passes with an observer that keeps, per layer, a random subset
of token positions' router inputs and labels.

Memory is bounded by `max_samples` per layer whatever `--tokens` is: each batch keeps the
same fraction of its positions (max_samples / calibration tokens), so the kept set is a
uniform subsample of all calibration tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from rich.progress import Progress

from polarc.models.forward import LayerObservation, forward
from polarc.models.load import Model


@dataclass
class Samples:
    """Kept token positions (the same positions at every layer), stacked over layers."""

    attn_in: torch.Tensor  # [L, n, d] router input, float32
    group_norms: torch.Tensor  # [L, n, Hkv] label source: each KV group's attention output norm
    mlp_active: torch.Tensor | None  # [L, n, N] bool, ReLU models only
    mlp_in: torch.Tensor | None  # [L, n, d] MLP router input, ReLU models only


def collect(
    model: Model,
    seqs: torch.Tensor,
    *,
    batch_size: int = 8,
    max_samples: int = 32768,
    seed: int = 0,
    progress: Progress | None = None,
) -> Samples:
    """Run `seqs` [n, T] through the dense model; return subsampled observations per layer."""
    gen = torch.Generator().manual_seed(seed)
    keep_frac = min(1.0, max_samples / seqs.numel())
    n_layers = model.spec.n_layers
    parts: dict[str, list[list[torch.Tensor]]] = {
        key: [[] for _ in range(n_layers)] for key in ("x", "norms", "active", "mlp_in")}
    picked: torch.Tensor | None = None

    def observe(obs: LayerObservation) -> None:
        B, T, d = obs.attn_in.shape
        i = obs.layer
        parts["x"][i].append(obs.attn_in.reshape(B * T, d)[picked].float())
        parts["norms"][i].append(obs.group_norms.reshape(B * T, -1)[picked].float())
        if obs.mlp_active is not None:
            parts["active"][i].append(obs.mlp_active.reshape(B * T, -1)[picked])
            parts["mlp_in"][i].append(obs.mlp_in.reshape(B * T, d)[picked].float())

    task = progress.add_task("collecting", total=seqs.shape[0]) if progress else None
    for start in range(0, seqs.shape[0], batch_size):
        batch = seqs[start:start + batch_size]
        n = batch.numel()
        picked = torch.nonzero(torch.rand(n, generator=gen) < keep_frac).squeeze(1)
        forward(model, batch, observe=observe)
        if progress is not None:
            progress.advance(task, batch.shape[0])

    def stacked(key: str) -> torch.Tensor | None:
        if not parts[key][0]:
            return None
        out = torch.stack([torch.cat(chunks) for chunks in parts[key]])
        parts[key] = []
        return out

    return Samples(attn_in=stacked("x"), group_norms=stacked("norms"),
                   mlp_active=stacked("active"), mlp_in=stacked("mlp_in"))
