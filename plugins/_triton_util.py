"""Small helpers shared by the Triton kernels in this package (not public)."""

from __future__ import annotations

import functools
from typing import Any

import torch


def check_launchable(kernel: Any, device: torch.device, op: str) -> None:
    """Raise a one-line ValueError when `kernel` cannot run on tensors of `device`.

    CUDA tensors run the compiled kernel. CPU tensors run only through Triton's interpreter,
    which must be switched on (TRITON_INTERPRET=1) before triton is first imported.
    """
    if device.type == "cuda":
        return
    if device.type == "cpu" and type(kernel).__name__ == "InterpretedFunction":
        return
    if device.type == "cpu":
        raise ValueError(f"{op}: CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 "
                         "before triton is imported (or move the tensors to a CUDA device)")
    raise ValueError(f"{op}: tensors on {device} are not supported (use CUDA, or CPU with "
                     "TRITON_INTERPRET=1)")


@functools.lru_cache(maxsize=16)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; a small fixed number elsewhere."""
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


_COUNTERS: dict[torch.device, torch.Tensor] = {}


def split_counters(device: torch.device, n: int) -> torch.Tensor:
    """At least `n` int32 counters on `device`, all zero, for kernels whose last split of a
    piece of work finishes it (the FP8 linear's split-K, attention's splits); each kernel
    resets the counters it uses, so kernels in sequence on one stream share them. Allocated
    once per device and grown when needed: a per-call torch.zeros would cost a memset launch
    per call. Under CUDA-graph capture a too-small cache is not
    replaced (the new buffer would live in the graph's private pool and its memset runs only
    on replay): that graph gets its own zeroed buffer, its memset captured with it."""
    have = _COUNTERS.get(device)
    if have is not None and have.numel() >= n:
        return have
    fresh = torch.zeros(max(1024, next_pow2(n)), dtype=torch.int32, device=device)
    if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        _COUNTERS[device] = fresh
    return fresh
