"""How much memory a run may still take on a device, and an optional cap on the GPU.

Every place that sizes itself from free memory (resident layers, where the calibration's
hidden states live, how many plans one pass measures, whether a batch fits, the KV cache)
asks `free_memory`, so one `limit_gpu_memory` bounds them all; the same cap is handed to
PyTorch's allocator, so an allocation past it is an out-of-memory error, never a larger peak.
"""

from __future__ import annotations

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
