"""Small helpers shared by the Triton kernels in this package (not public)."""

from __future__ import annotations

import functools
import os
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


# ------------------------------------------------------------- programmatic dependent launch
# A kernel launched with PDL may start while the kernel before it in the stream finishes (its
# programs take SM slots as the other's retire); it must wait (`gdc_wait`) before it touches
# memory that an earlier kernel writes or reads: every polarc kernel waits before its first
# such access, the FP8 linear kernel after prefetching its weight rows into L2 (weights are
# never written during a step). So the launch gap and a GEMM's first weight bytes overlap the
# previous kernel's tail. Measured end to end before it is the default (RESULTS.md).


@functools.lru_cache(maxsize=16)
def _capability(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def pdl_enabled(device: torch.device) -> bool:
    """Whether polarc's kernels (and the runtime's compiled stages) launch with PDL on
    `device`: POLARC_PDL=1 in the environment, and a CUDA device of compute capability 9.0+
    (the interpreter and older GPUs launch as before)."""
    if device.type != "cuda" or os.environ.get("POLARC_PDL") != "1":
        return False
    return _capability(device.index if device.index is not None
                       else torch.cuda.current_device()) >= 9


def pdl_options(on: bool) -> dict[str, Any]:
    """The launch options for a kernel with a ``PDL`` constexpr (only with PDL: the
    interpreter takes no `launch_pdl`)."""
    return {"PDL": True, "launch_pdl": True} if on else {}


@triton.jit
def gdc_wait(PDL: tl.constexpr):
    """Wait for the kernels before this one (PDL only; a no-op otherwise)."""
    if PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def gdc_launch_dependents(PDL: tl.constexpr):
    """Let the next kernel launch once every program of this one has passed here (PDL only)."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def prefetch_l2(ptrs, nbytes):
    """Bring `nbytes` bytes from each of `ptrs` (16-byte aligned, nbytes a multiple of 16)
    into L2, one bulk prefetch per element (sm_90+)."""
    tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2; // $0",
                              "=r,l,r", [ptrs.to(tl.int64), nbytes], dtype=tl.int32,
                              is_pure=False, pack=1)
