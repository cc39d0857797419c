"""The static KV cache: per layer K and V ``[B, Hkv, S_max, D]`` (each (row, group) one
contiguous stream, the layout the selective attention kernel reads) and ``seqlens [B]``
int32, each row's valid positions.

Rows are slots: a decode step for a batch bucket of ``b`` rows runs on the first ``b`` slots;
`compact` moves live rows to the front so that finished ones stop costing anything, and
`release` empties slots in place (length zero: the kernel reads nothing for them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from polarc.errors import PolarcError
from polarc.models.memory import free_memory
from polarc.models.presets import ModelSpec

# Share of the free memory a cache may take (the rest: activations, graphs, the allocator).
MEMORY_SHARE = 0.95


def kv_bytes_per_row(spec: ModelSpec, max_seq: int, dtype: torch.dtype) -> int:
    return 2 * spec.n_layers * spec.n_kv_heads * max_seq * spec.head_dim * \
        torch.finfo(dtype).bits // 8


def check_fits(spec: ModelSpec, batch: int, max_seq: int, dtype: torch.dtype,
               device: torch.device) -> None:
    """Stop with the largest batch that fits when a cache for `batch` rows does not."""
    per_row = kv_bytes_per_row(spec, max_seq, dtype)
    free = free_memory(device)
    if per_row * batch > free * MEMORY_SHARE:
        fits = int(free * MEMORY_SHARE // per_row)
        where = "GPU" if device.type == "cuda" else "host"
        raise PolarcError(f"a KV cache for batch {batch} x {max_seq} positions needs "
                          f"{per_row * batch / 2**30:.1f} GiB, {free / 2**30:.1f} GiB of "
                          f"{where} memory free", hint=f"the largest batch that fits is {fits}")


@dataclass
class KVCache:
    k: list[torch.Tensor]  # per layer [B, Hkv, S_max, D]
    v: list[torch.Tensor]
    seqlens: torch.Tensor  # [B] int32

    @classmethod
    def allocate(cls, spec: ModelSpec, batch: int, max_seq: int, dtype: torch.dtype,
                 device: torch.device) -> KVCache:
        """A zeroed cache, or a one-line error naming the largest batch that fits."""
        check_fits(spec, batch, max_seq, dtype, device)
        shape = (batch, spec.n_kv_heads, max_seq, spec.head_dim)
        return cls(k=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(spec.n_layers)],
                   v=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(spec.n_layers)],
                   seqlens=torch.zeros(batch, dtype=torch.int32, device=device))

    def compact(self, live: list[int], bucket: int) -> None:
        """Move rows `live` (slots, in order) to the front; slots past them up to `bucket`
        get length zero."""
        n = len(live)
        idx = torch.tensor(live, device=self.seqlens.device)
        for cache in (*self.k, *self.v):
            cache[:n] = cache[idx]  # the gather copies first, so overlapping rows are safe
        self.seqlens[:n] = self.seqlens[idx]
        self.seqlens[n:bucket] = 0

    def release(self, slots: list[int]) -> None:
        """Empty `slots` in place (length zero)."""
        if slots:
            self.seqlens[torch.tensor(slots, device=self.seqlens.device)] = 0
