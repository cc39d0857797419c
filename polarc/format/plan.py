"""Density plans: how many KV groups each layer keeps per row at decode time.

Layer 0 is always dense (the paper's rule: its heads are the least redundant). A uniform plan
keeps round(X * Hkv) groups (at least one) on the other layers.
"""

from __future__ import annotations

import math

from polarc.errors import PolarcError

# ReLU layers whose batch-union neuron count is at most this share of the neurons run the
# selective GEMM pair; above it the gathered GEMMs are no faster than dense cuBLAS.
SPARSE_MLP_MAX_DENSITY = 0.6


def check_density(density: float, option: str = "--density") -> float:
    """A density is a fraction of KV groups in (0, 1]."""
    if not 0.0 < density <= 1.0:  # also false for NaN
        raise PolarcError(f"{option} must be in (0, 1], got {density}")
    return density


def groups_for_density(density: float, n_kv: int) -> int:
    """round(density * n_kv) with halves rounded up, at least one group."""
    check_density(density)
    return max(1, min(n_kv, math.floor(density * n_kv + 0.5)))


def uniform_plan(n_layers: int, n_kv: int, density: float) -> list[int]:
    return [n_kv] + [groups_for_density(density, n_kv)] * (n_layers - 1)


def kv_density(k_per_layer: list[int], n_kv: int) -> float:
    """KV bytes a sparse decode step reads over a dense one (every layer's groups are equal)."""
    return sum(k_per_layer) / (n_kv * len(k_per_layer))


def sparse_mlp_layers(mlp_k: dict[int, int], n_neurons: int) -> dict[int, int]:
    """The ReLU layers that run the selective MLP, with their batch-union k."""
    return {layer: k for layer, k in mlp_k.items() if k / n_neurons <= SPARSE_MLP_MAX_DENSITY}
