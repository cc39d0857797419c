"""The paged KV cache: per layer a pool of K pages and one of V pages ``[N, Hkv, P, D]`` (each
(page, group) one contiguous ``[P, D]`` stream, so the selective attention kernel still reads
only the selected groups), a block table ``[slots, M]`` int32 naming each slot's pages in
order, and ``seqlens [slots]`` int32, each slot's valid positions.

Pages are handed out as a slot grows (`grow`) and come back when it is freed (`free`). A slot
whose length on the device is zero takes no part in decode steps (it writes and reads
nothing): a free slot, or one whose prompt is still being prefilled (`lengths` counts the
positions written; `set_length` makes the device agree, and the slot joins the steps).
Moving a sequence to another slot (`move`) moves a table row and a length, never K or V. The
host keeps the truth (each slot's pages and lengths); the device's block table is refreshed
from it before a step (`sync`) when it changed, and `advance` counts a step's new token.

An FP8 cache keeps V position-major (each (page, group) a ``[D, P]`` stream, exposed as the
same ``[N, Hkv, P, D]`` view): the attention kernel's P·V product then reads float8 V blocks
with a third of the shared-memory loads (`selective_attention`'s docstring). It also keeps,
per layer, K and V sinks ``[N, Hkv, D]`` in the compute dtype: each sequence's position 0
unquantized, in the row of the page that holds it (`polarc.plugins.reference`), so moving or
freeing a sequence moves or frees its sink with its pages.

Memory: one page of one layer is ``2 (K, V) x Hkv x P x D x element size`` bytes (plus
``2 x Hkv x D`` sink values of an FP8 cache); a sequence of n positions takes
``ceil(n / P)`` pages of every layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from polarc.errors import PolarcError
from polarc.models.memory import free_memory
from polarc.models.presets import ModelSpec

# Share of the free memory a cache may take (the rest: activations, graphs, the allocator).
MEMORY_SHARE = 0.95
DEFAULT_PAGE_SIZE = 64


def cache_dtype(engine: Any) -> torch.dtype:
    """The dtype an engine's KV cache holds: float8 e4m3 for an FP8 cache (K / scale and
    V / scale, one scale per layer and group), else the engine's compute dtype."""
    return torch.float8_e4m3fn if engine.kv_dtype == "fp8_e4m3" else engine.model.dtype


def default_page_size(kv_dtype: torch.dtype) -> int:
    """Positions a page holds by default: 64, or 128 for a one-byte (float8) cache, so a page
    is the same bytes either way and the attention kernel reads a float8 page in one block of
    128 positions (measured faster than two of 64, benchmarks/RESULTS.md)."""
    return 2 * DEFAULT_PAGE_SIZE if kv_dtype.itemsize == 1 else DEFAULT_PAGE_SIZE


def sink_dtype(engine: Any) -> torch.dtype | None:
    """The dtype of an FP8 cache's sinks (the engine's compute dtype); None for other caches."""
    return engine.model.dtype if engine.kv_dtype == "fp8_e4m3" else None


def page_bytes(spec: ModelSpec, page_size: int, dtype: torch.dtype,
               sinks: torch.dtype | None = None) -> int:
    """Bytes of one page position range across all layers, K and V (and their sinks)."""
    per_position = page_size * torch.finfo(dtype).bits // 8
    per_sink = torch.finfo(sinks).bits // 8 if sinks is not None else 0
    return 2 * spec.n_layers * spec.n_kv_heads * spec.head_dim * (per_position + per_sink)


def pages_for(positions: int, page_size: int) -> int:
    return -(-positions // page_size)


def pages_that_fit(spec: ModelSpec, page_size: int, dtype: torch.dtype, device: torch.device,
                   memory_share: float = MEMORY_SHARE, sinks: torch.dtype | None = None) -> int:
    """How many pages (of every layer) the device's free memory holds."""
    return int(free_memory(device) * memory_share // page_bytes(spec, page_size, dtype, sinks))


def check_fits(spec: ModelSpec, pages: int, page_size: int, dtype: torch.dtype,
               device: torch.device, *, what: str, hint: Callable[[int], str],
               sinks: torch.dtype | None = None) -> None:
    """Stop, before allocating, when `pages` pages do not fit the device's free memory;
    `hint(pages that fit)` says what would."""
    per_page = page_bytes(spec, page_size, dtype, sinks)
    free = free_memory(device)
    if pages * per_page > free * MEMORY_SHARE:
        where = "GPU" if device.type == "cuda" else "host"
        raise PolarcError(f"a KV cache for {what} needs {pages * per_page / 2**30:.1f} GiB, "
                          f"{free / 2**30:.1f} GiB of {where} memory free",
                          hint=hint(int(free * MEMORY_SHARE // per_page)))


@dataclass
class PagedKVCache:
    k: list[torch.Tensor]  # per layer [N, Hkv, P, D]
    v: list[torch.Tensor]
    block_table: torch.Tensor  # [slots, M] int32, on the device
    seqlens: torch.Tensor  # [slots] int32, on the device
    page_size: int
    k_sink: list[torch.Tensor] | None = None  # per layer [N, Hkv, D]: an FP8 cache's position 0
    v_sink: list[torch.Tensor] | None = None
    free_pages: list[int] = field(default_factory=list)
    slot_pages: list[list[int]] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)  # positions written, per slot
    decoding: list[bool] = field(default_factory=list)  # its device length is its length
    _table: torch.Tensor | None = None  # host copy of block_table
    _dirty: bool = False

    @classmethod
    def allocate(cls, spec: ModelSpec, *, slots: int, max_seq: int, pages: int, page_size: int,
                 dtype: torch.dtype, device: torch.device,
                 sinks: torch.dtype | None = None) -> PagedKVCache:
        """A cache of `pages` pages for `slots` sequences of up to `max_seq` positions each;
        with `sinks` (an FP8 cache's compute dtype), position 0 sinks in that dtype."""
        if page_size < 16 or page_size % 16:
            raise PolarcError(f"--page-size must be a positive multiple of 16, got {page_size}")
        shape = (pages, spec.n_kv_heads, page_size, spec.head_dim)
        per_row = pages_for(max_seq, page_size)
        table = torch.zeros((slots, per_row), dtype=torch.int32)

        def layers(shape: tuple[int, ...], dtype: torch.dtype) -> list[torch.Tensor]:
            # zeroed: a float8 pool's unwritten positions are read (finite, weighted 0)
            return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(spec.n_layers)]

        sink_shape = (pages, spec.n_kv_heads, spec.head_dim)
        if dtype.itemsize == 1:  # V position-major (module docstring), same logical shape
            position_major = (pages, spec.n_kv_heads, spec.head_dim, page_size)
            v = [t.transpose(2, 3) for t in layers(position_major, dtype)]
        else:
            v = layers(shape, dtype)
        cache = cls(k=layers(shape, dtype), v=v,
                    k_sink=layers(sink_shape, sinks) if sinks is not None else None,
                    v_sink=layers(sink_shape, sinks) if sinks is not None else None,
                    block_table=table.to(device), seqlens=torch.zeros(slots, dtype=torch.int32,
                                                                      device=device),
                    page_size=page_size, free_pages=list(range(pages - 1, -1, -1)),
                    slot_pages=[[] for _ in range(slots)], lengths=[0] * slots,
                    decoding=[False] * slots,
                    _table=table.pin_memory() if device.type == "cuda" else table)
        return cache

    @property
    def max_seq(self) -> int:
        return self.block_table.shape[1] * self.page_size

    @property
    def pages_free(self) -> int:
        return len(self.free_pages)

    @property
    def pages_used(self) -> int:
        return self.k[0].shape[0] - len(self.free_pages)

    def grow(self, slot: int, positions: int) -> None:
        """Give `slot` the pages to hold `positions` positions (callers make sure enough are
        free: the scheduler reserves them when it admits a request)."""
        if positions > self.max_seq:
            raise ValueError(f"slot {slot}: {positions} positions exceed the cache's {self.max_seq}")
        have = self.slot_pages[slot]
        while len(have) * self.page_size < positions:
            if not self.free_pages:
                raise RuntimeError("the KV cache is out of pages (admission should prevent this)")
            page = self.free_pages.pop()
            self._table[slot, len(have)] = page
            have.append(page)
            self._dirty = True

    def set_length(self, slot: int, n: int) -> None:
        """The slot holds `n` positions, on the host and the device: with n > 0 it takes part
        in decode steps."""
        self.lengths[slot] = n
        self.decoding[slot] = n > 0
        self.seqlens[slot] = n

    def advance(self, rows: int) -> None:
        """A decode step over the first `rows` slots appended one token to each decoding one."""
        for slot in range(rows):
            if self.decoding[slot]:
                self.lengths[slot] += 1

    def free(self, slot: int) -> None:
        """Return the slot's pages; the slot holds nothing (length zero)."""
        self.free_pages.extend(reversed(self.slot_pages[slot]))
        self.slot_pages[slot] = []
        self._table[slot] = 0
        self._dirty = True
        if self.lengths[slot] or self.decoding[slot]:
            self.set_length(slot, 0)

    def move(self, src: int, dst: int) -> None:
        """Move the sequence in slot `src` to the empty slot `dst` (a table row, no K/V)."""
        if self.slot_pages[dst]:
            raise ValueError(f"slot {dst} is not empty")
        self.slot_pages[dst], self.slot_pages[src] = self.slot_pages[src], []
        self._table[dst] = self._table[src]
        self._table[src] = 0
        self._dirty = True
        self.lengths[dst], self.decoding[dst] = self.lengths[src], self.decoding[src]
        self.seqlens[dst] = self.seqlens[src]
        self.lengths[src], self.decoding[src] = 0, False
        self.seqlens[src] = 0

    def sync(self) -> None:
        """Copy the host's block table to the device if it changed (before a step)."""
        if self._dirty:
            self.block_table.copy_(self._table, non_blocking=True)
            self._dirty = False

    def host_row(self, slot: int) -> torch.Tensor:
        """The slot's row of the host block table [M] (its pages, then unused entries)."""
        return self._table[slot]

    def positions(self, slot: int, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(page, offset) of positions start..stop-1 of `slot`, as device index tensors."""
        pos = torch.arange(start, stop)
        pages = self._table[slot, pos // self.page_size].long()
        return pages.to(self.seqlens.device), (pos % self.page_size).to(self.seqlens.device)
