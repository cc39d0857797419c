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
class LayerSamples:
    """Kept token positions of one layer."""

    attn_in: torch.Tensor  # [n, d] router input, float32
    group_norms: torch.Tensor  # [n, Hkv] label source: each KV group's attention output norm
    mlp_active: torch.Tensor | None  # [n, N] bool, ReLU models only
    mlp_in: torch.Tensor | None  # [n, d] MLP router input, ReLU models only


def collect(
    model: Model,
    seqs: torch.Tensor,
    *,
    batch_size: int = 8,
    max_samples: int = 32768,
    seed: int = 0,
    progress: Progress | None = None,
) -> list[LayerSamples]:
    """Run `seqs` [n, T] through the dense model; return per-layer subsampled observations."""
    gen = torch.Generator().manual_seed(seed)
    keep_frac = min(1.0, max_samples / seqs.numel())
    n_layers = model.spec.n_layers
    parts: list[dict[str, list[torch.Tensor]]] = [
        {"x": [], "norms": [], "active": [], "mlp_in": []} for _ in range(n_layers)]
    picked: torch.Tensor | None = None

    def observe(obs: LayerObservation) -> None:
        B, T, d = obs.attn_in.shape
        store = parts[obs.layer]
        store["x"].append(obs.attn_in.reshape(B * T, d)[picked].float())
        store["norms"].append(obs.group_norms.reshape(B * T, -1)[picked].float())
        if obs.mlp_active is not None:
            store["active"].append(obs.mlp_active.reshape(B * T, -1)[picked])
            store["mlp_in"].append(obs.mlp_in.reshape(B * T, d)[picked].float())

    task = progress.add_task("collecting", total=seqs.shape[0]) if progress else None
    for start in range(0, seqs.shape[0], batch_size):
        batch = seqs[start:start + batch_size]
        n = batch.numel()
        picked = torch.nonzero(torch.rand(n, generator=gen) < keep_frac).squeeze(1)
        forward(model, batch, observe=observe)
        if progress is not None:
            progress.advance(task, batch.shape[0])
    out = []
    for store in parts:
        out.append(LayerSamples(
            attn_in=torch.cat(store["x"]),
            group_norms=torch.cat(store["norms"]),
            mlp_active=torch.cat(store["active"]) if store["active"] else None,
            mlp_in=torch.cat(store["mlp_in"]) if store["mlp_in"] else None,
        ))
    return out
