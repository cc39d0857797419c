"""The one timing method and the one bandwidth probe behind every benchmark table.

`time_graph`: warm up on a side stream (compilation, plans, workspaces), capture enough
copies of every call in one CUDA graph that a replay takes about `target_ms`, replay it
`reps` times; the time is the median replay divided by the calls in it. Several callables
are several input sets of one measured call, rotated so that together they exceed L2.

`copy_bandwidth`: a large device-to-device copy timed the same way, counting bytes read +
written; the best of torch's copy and a plain Triton copy kernel, so the floor of a table
(bytes a case must read ÷ this bandwidth) is not set by one slow copy routine.

Importing this module needs no GPU and no triton; calling anything here needs CUDA.
"""

from __future__ import annotations

import functools
import math
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

ROTATE_BYTES = 200 << 20  # input sets of one timed call add up to at least this (L2: 50 MB)


def time_graph(fns: list[Callable[[], Any]], *, reps: int = 15, target_ms: float = 3.0) -> float:
    """Median ms per call of `fns` (each a call on its own input set), timed as graph replays."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns:  # compile and warm up outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for fn in fns:
        fn()
    end.record()
    end.synchronize()
    once = max(start.elapsed_time(end), 1e-3)
    inner = max(1, min(64, math.ceil(target_ms / once)))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            for fn in fns:
                fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    return statistics.median(times) / (inner * len(fns))


def kernel_breakdown(fn: Callable[[], Any], *, replays: int = 5) -> list[dict[str, Any]]:
    """Where one call of `fn` spends its GPU time: the call captured in a CUDA graph, replayed
    under torch's profiler; per kernel name the launches and microseconds per call, largest
    first. Kernel time only: the sum falls short of `time_graph`'s by the gaps between
    kernels."""
    from torch.profiler import ProfilerActivity, profile

    fn()  # warm up (compilation) outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    rows = [dict(kernel=e.key[:80], launches=e.count / replays,
                 us=e.self_device_time_total / replays)
            for e in prof.key_averages() if e.self_device_time_total > 0]
    del graph
    return sorted(rows, key=lambda r: -r["us"])


def sets_to_rotate(bytes_per_set: int, most: int = 32) -> int:
    """Input sets to rotate so that their reads together exceed L2."""
    return max(1, min(most, math.ceil(ROTATE_BYTES / max(1, bytes_per_set))))


@functools.cache
def _copy_kernel() -> Any:
    import triton.language as tl  # here, so that importing this module needs no triton
    from triton import jit

    @jit
    def copy_kernel(Src, Dst, n, BLOCK: tl.constexpr):  # tl: a closure (triton >= 3.4)
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(Dst + offs, tl.load(Src + offs, mask=mask), mask=mask)

    return copy_kernel


def copy_bandwidth(device: torch.device, nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read + written."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    n, block, kernel = src.numel(), 8192, _copy_kernel()
    best = min(time_graph([fn], reps=20, target_ms=20.0) for fn in (
        lambda: dst.copy_(src),
        lambda: kernel[(math.ceil(n / block),)](src, dst, n, BLOCK=block, num_warps=8)))
    if not torch.equal(src, dst):
        raise RuntimeError("copy bandwidth probe: the copy is wrong")
    src = dst = None
    torch.cuda.empty_cache()
    return 2 * nbytes / (best * 1e-3)


def read_bandwidth(device: torch.device, nbytes: int = 2 << 30) -> float:
    """Read-only bandwidth in bytes/s (a large fp32 sum), for reference."""
    src = torch.randn(nbytes // 4, device=device)
    out = torch.empty((), device=device)
    ms = time_graph([lambda: torch.sum(src, 0, out=out)], reps=20, target_ms=20.0)
    src = None
    torch.cuda.empty_cache()
    return nbytes / (ms * 1e-3)


def environment(bw: float, device: torch.device | None = None) -> dict[str, Any]:
    """What every table states: date, GPU, versions, dtype and the run's copy bandwidth."""
    import triton

    props = torch.cuda.get_device_properties(device or torch.cuda.current_device())
    return dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), device=props.name,
                sms=props.multi_processor_count, torch=torch.__version__, triton=triton.__version__,
                cuda=torch.version.cuda, python=platform.python_version(),
                copy_bandwidth_gbps=bw / 1e9, dtype="bf16")
