"""Llama-3-8B's five decode GEMMs through `fp8_linear` on tiled float8 weights, each once
inside an NVTX range ``profile``, for Nsight Compute to profile (compiles and warm-up outside
the range). Run by `gpu_check.sh fp8-ncu`:

    ncu --nvtx --nvtx-include "profile/" --section MemoryWorkloadAnalysis ... \\
        python -m polarc.benchmarks.profile_fp8_linear --rows 32
"""

from __future__ import annotations

import argparse

import torch
from polarc.benchmarks.bench_kernels import LINEAR_SHAPES
from polarc.plugins.fp8_linear import fp8_linear

from polarc.format.engine_file import quantize_rows, tile_fp8


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=32, help="rows of x (default: %(default)s)")
    args = ap.parse_args()
    calls = []
    for name, n, k in LINEAR_SHAPES:
        w, scale = quantize_rows(torch.randn(n, k, device="cuda") / k ** 0.5)
        x = torch.randn(args.rows, k, device="cuda", dtype=torch.bfloat16)
        calls.append((name, x, tile_fp8(w, swiglu=name == "gate_up"), scale))
    for name, x, w, scale in calls:  # compile and warm up outside the profiled range
        fp8_linear(x, w, scale, swiglu=name == "gate_up")
    torch.cuda.synchronize()
    for name, x, w, scale in calls:
        torch.cuda.nvtx.range_push("profile")
        fp8_linear(x, w, scale, swiglu=name == "gate_up")
        torch.cuda.nvtx.range_pop()
        torch.cuda.synchronize()
        print(f"profiled {name} at {args.rows} rows")


if __name__ == "__main__":
    main()
