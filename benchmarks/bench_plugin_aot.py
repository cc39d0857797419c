"""The TensorRT plugin's ahead-of-time kernel, checked and timed without TensorRT (GPU).

    python -m polarc.benchmarks.bench_plugin_aot [--json OUT]

Compiles the kernel with the AOT implementation's own call (`compile_plugin_kernel`), loads
the PTX through the CUDA driver and launches it as TensorRT does (`PtxKernel`: TensorRT's
argument order, null hidden parameters), checks it against the reference, then times it
against the torch backend's selective attention (split-K, two launches) and SDPA dense at
decode shapes (bf16, head dim 128). The plugin kernel has no split-K (TensorRT gives an AOT
plugin no workspace), so it needs B·k programs to fill the GPU.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from polarc.benchmarks.timing import copy_bandwidth, time_graph

from polarc.outputs import write_json

SHAPES = [  # model, Hq, Hkv, B, S
    ("llama3-8b", 32, 8, 16, 4096), ("llama3-8b", 32, 8, 64, 1024), ("llama3-8b", 32, 8, 32, 8192),
    ("llama3-8b", 32, 8, 4, 8192), ("llama2-7b", 32, 32, 16, 4096), ("llama2-7b", 32, 32, 4, 8192),
]
DENSITIES = (0.5, 1.0)


def run_shape(model: str, hq: int, hkv: int, b: int, s: int, bw: float,
              gen: torch.Generator) -> list[dict]:
    from polarc.plugins.reference import selective_attention_reference
    from polarc.plugins.selective_attention import selective_attention
    from polarc.plugins.tensorrt_plugin import (
        PtxKernel,
        compile_plugin_kernel,
        plugin_extra_args,
        plugin_grid,
    )

    dev, d = torch.device("cuda"), 128
    q = torch.randn(b, hq, d, device=dev, dtype=torch.bfloat16)
    kc = torch.randn(b, hkv, s, d, device=dev, dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    lens = torch.full((b,), s, dtype=torch.int32, device=dev)
    sdpa_ms = time_graph([lambda: F.scaled_dot_product_attention(q.unsqueeze(2), kc, vc,
                                                                 enable_gqa=True)])
    records = []
    for rho in DENSITIES:
        k = max(1, round(rho * hkv))
        groups = torch.stack([torch.randperm(hkv, generator=gen)[:k] for _ in range(b)]).int().to(dev)
        kernel = PtxKernel(compile_plugin_kernel("bf16", hq, hkv, d, k, 1 / math.sqrt(d)))
        out = torch.full_like(q, float("nan"))
        args = [q.data_ptr(), kc.data_ptr(), vc.data_ptr(), lens.data_ptr(), groups.data_ptr(),
                *plugin_extra_args(k, s), out.data_ptr()]
        grid = plugin_grid(b, k)

        def plugin(kernel=kernel, args=args, grid=grid) -> None:
            kernel.launch(grid, args, torch.cuda.current_stream().cuda_stream)

        plugin()
        torch.cuda.synchronize()
        ref = selective_attention_reference(q[:2], kc[:2], vc[:2], lens[:2], groups[:2]).float()
        err = ((out[:2].float() - ref).norm() / ref.norm()).item()
        plugin_ms = time_graph([plugin])
        split_out = torch.empty_like(q)
        split_ms = time_graph([lambda g=groups, o=split_out: selective_attention(
            q, kc, vc, lens, g, out=o, check_indices=False)])
        floor_ms = 2 * b * k * s * d * 2 / bw * 1e3
        records.append({"model": model, "B": b, "S": s, "Hq": hq, "Hkv": hkv, "D": d,
                        "density": k / hkv, "plugin_ms": plugin_ms, "split_k_ms": split_ms,
                        "sdpa_dense_ms": sdpa_ms, "floor_ms": floor_ms, "rel_err": err,
                        "device": torch.cuda.get_device_name()})
    return records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="write the records here")
    args = ap.parse_args()
    bw = copy_bandwidth(torch.device("cuda"))
    gen = torch.Generator().manual_seed(0)
    records = []
    print(f"{torch.cuda.get_device_name()}; copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)
    print(f"{'model':10} {'B':>3} {'S':>5} {'rho':>4} | {'plugin ms':>9} {'split-K ms':>10} "
          f"{'sdpa ms':>8} | {'plugin/floor':>12} {'err':>8}")
    for shape in SHAPES:
        for r in run_shape(*shape, bw, gen):
            records.append(r)
            print(f"{r['model']:10} {r['B']:>3} {r['S']:>5} {r['density']:>4.2f} | "
                  f"{r['plugin_ms']:>9.3f} {r['split_k_ms']:>10.3f} {r['sdpa_dense_ms']:>8.3f} | "
                  f"{r['plugin_ms'] / r['floor_ms']:>12.2f} {r['rel_err']:>8.1e}", flush=True)
            if not r["rel_err"] < 1e-2:
                print(f"FAILED: plugin kernel error {r['rel_err']:.2e}", file=sys.stderr)
                sys.exit(1)
        torch.cuda.empty_cache()
    if args.json is not None:
        write_json(args.json, records, force=True)


if __name__ == "__main__":
    main()
