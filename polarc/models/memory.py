"""How much memory a run may still take on a device, and an optional cap on the GPU.

Every place that sizes itself from free memory (resident layers, where the calibration's
hidden states live, how many plans one pass measures, whether a batch fits, the KV cache)
asks `free_memory`, so one `limit_gpu_memory` bounds them all; the same cap is handed to
PyTorch's allocator, so an allocation past it is an out-of-memory error, never a larger peak.
On the host, `freed_memory_returned` makes freed buffers go back to the system.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from polarc.errors import PolarcError

_GPU_LIMITS: dict[int, int] = {}  # device index -> bytes this process may take


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def limit_gpu_memory(device: torch.device, nbytes: int) -> None:
    """Take at most `nbytes` of `device`'s memory for the rest of this process."""
    total = torch.cuda.get_device_properties(device).total_memory
    if nbytes <= 0 or nbytes > total:
        raise PolarcError(f"--gpu-memory must be in (0, {total / 1e9:.0f}] GB for this GPU, got "
                          f"{nbytes / 1e9:g}")
    # The allocator's setter wants an index: "cuda" alone is refused there.
    torch.cuda.set_per_process_memory_fraction(nbytes / total, _index(device))
    _GPU_LIMITS[_index(device)] = nbytes


def free_memory(device: torch.device) -> int:
    """Bytes a new allocation can take on `device`: the GPU's free memory (within the cap,
    less what PyTorch already holds), or the host's available memory."""
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        limit = _GPU_LIMITS.get(_index(device))
        if limit is not None:
            free = min(free, max(0, limit - torch.cuda.memory_reserved(device)))
        return free
    import psutil

    return psutil.virtual_memory().available


# glibc's mallopt parameter: the size from which an allocation is mapped on its own
M_MMAP_THRESHOLD = -3
DEFAULT_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling for its own moving threshold (64-bit)


@contextmanager
def freed_memory_returned() -> Iterator[None]:
    """Within: host buffers of 1 MiB and more go back to the system when freed (glibc only).

    By default glibc raises this threshold after each large free (up to 32 MiB), so the plan
    search's many 1-32 MiB tensors are carved from the heap, which fragments and keeps what
    was freed: the default SmolLM2 search peaked at 3.60 GiB of RSS that way, 2.52 GiB with
    the threshold fixed, for the same work. It costs a page fault per fresh page, so only the
    search (the calibration's peak) runs so; afterwards the threshold is glibc's ceiling. A
    user's own MALLOC_MMAP_THRESHOLD_ wins."""
    libc = None
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)
        except (OSError, AttributeError):
            libc = None  # not glibc: its allocator has its own policy
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(M_MMAP_THRESHOLD, DEFAULT_MMAP_THRESHOLD_MAX)
