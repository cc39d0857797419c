"""Small helpers shared by the Triton kernels in this package (not public)."""

from __future__ import annotations

import functools
from typing import Any

import torch
import triton
import triton.language as tl


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
def _properties(index: int) -> Any:
    return torch.cuda.get_device_properties(index)


def _cuda_properties(device: torch.device) -> Any:
    return _properties(device.index if device.index is not None else torch.cuda.current_device())


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; a small fixed number elsewhere."""
    return _cuda_properties(device).multi_processor_count if device.type == "cuda" else 4


def has_wgmma(device: torch.device) -> bool:
    """Hopper (sm_90): float8 x float8 products on wgmma."""
    return device.type == "cuda" and _cuda_properties(device).major == 9


def has_tma(device: torch.device) -> bool:
    """sm_90 and later: tensor-memory-accelerator (TMA) bulk copies into shared memory."""
    return device.type == "cuda" and _cuda_properties(device).major >= 9


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@triton.jit
def prefetch_l2(ptrs):
    """Asks L2 for the 128-byte lines holding `ptrs` (a tensor of pointers, any shape); no
    wait, results unchanged (inline PTX: CUDA only, the interpreter cannot run it)."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs],
                              dtype=tl.int32, is_pure=False, pack=1)
