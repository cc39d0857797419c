"""BENCHMARKS.md §1–2: selective attention and selective GEMM against SDPA / cuBLAS.

    python benchmarks/bench_kernels.py [--json OUT] [--quick]    # same as `polarc bench kernels`
    python benchmarks/bench_kernels.py --sweep --json OUT        # tile/split sweeps (tuning)
    python benchmarks/bench_kernels.py --gpu-check               # correctness spot check first
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

# Plan variants timed by --sweep: (model, block_n, num_warps, num_stages, use_dot, split x,
# fused). The defaults' history is in KERNEL_NOTES.md.
ATTN_VARIANTS = [
    ("llama3-8b", bn, nw, ns, True, mul, False)
    for bn, nw, ns in [(64, 4, 3), (64, 4, 2), (128, 4, 2), (128, 8, 2), (32, 4, 3), (32, 4, 4),
                       (64, 8, 3), (64, 2, 3)]
    for mul in (0.5, 1, 2)
]
ATTN_SWEEP_SHAPES = [(1, 8192), (16, 4096), (64, 1024), (64, 8192)]
# GEMM: (block_m, block_n, block_k, num_warps, num_stages, split_k or None = heuristic)
GEMM_VARIANTS = {
    1: [None] + [(16, 64, 128, 4, 6, sk) for sk in (1, 2, 4, 8, 16)]
    + [(16, 32, 256, 4, 5, sk) for sk in (2, 4, 8)],
    64: [None] + [(64, 64, 128, 4, 4, sk) for sk in (1, 2, 4, 8)],
}


def sweep(json_path: str | None, what: str = "all") -> list[dict]:
    """Time plan variants at key shapes (developer tuning; the CLI runs the default plans)."""
    from polarc.plugins import bench
    from polarc.plugins.selective_attention import AttentionPlan, plan_selective_attention
    from polarc.plugins.selective_gemm import plan_selective_gemm

    device = torch.device("cuda")
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    bw = bench.copy_bandwidth(device)
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s, read {bench.read_bandwidth(device) / 1e9:.0f}",
          flush=True)
    records: list[dict] = []
    seen_sdpa: set[str] = set()
    for model, bn, nw, ns, dot, mul, fused in ATTN_VARIANTS if what in ("all", "attention") else []:
        def override(b, k, g, s, d, bn=bn, nw=nw, ns=ns, dot=dot, mul=mul, fused=fused):
            p = plan_selective_attention(b, k, g, s, d, sms=sms, block_n=bn, num_warps=nw,
                                         num_stages=ns, use_dot=dot)
            return AttentionPlan(max(1, int(p.num_splits * mul)), bn, nw, ns, dot, fused)

        t = time.time()
        recs = bench.attention_cases(
            bw=bw, device=device, plan_override=override,
            shapes=[(model, b, s) for b, s in ATTN_SWEEP_SHAPES], densities=(0.25, 0.5, 1.0),
            ragged=False, sdpa=True)
        name = f"bn{bn}_w{nw}_s{ns}_{'dot' if dot else 'bcast'}_x{mul}_{'fused' if fused else '2k'}"
        for r in recs:
            r["variant"] = name
        records += recs
        print(f"{model} {name}: " + " ".join(
            f"{r['B']}/{r['S']}/{r['density']:g}:{r['ms'] * 1e3:.0f}us({r['vs_sdpa']:.2f}x)"
            for r in recs if r["kernel"] != "sdpa_dense") + f"  [{time.time() - t:.0f}s]",
            flush=True)
        sd = [r for r in recs if r["kernel"] == "sdpa_dense"]
        if model not in seen_sdpa:
            seen_sdpa.add(model)
            print("  sdpa: " + " ".join(f"{r['B']}/{r['S']}:{r['ms'] * 1e3:.0f}us"
                                        f"({r['bw_frac'] * 100:.0f}%)" for r in sd))
    for b, variants in GEMM_VARIANTS.items() if what in ("all", "gemm") else []:
        for var in variants:
            def override(kind, m, n_out, k, var=var):
                if var is None:
                    return None
                bm, bn, bk, nw, ns, split = var
                return plan_selective_gemm(m, n_out, k, sms=sms, block_m=bm, block_n=bn,
                                           block_k=bk, num_warps=nw, num_stages=ns,
                                           split_k=split)

            recs = bench.gemm_cases(bw=bw, device=device, plan_override=override,
                                    batches=(b,), densities=(0.1, 0.3, 0.5))
            for r in recs:
                r["variant"] = str(var)
            records += recs
            print(f"gemm B={b} {var}: " + " ".join(
                f"{r['kernel'][10:]}/{r['density']:.1g}:{r['ms'] * 1e3:.0f}us"
                f"(s{r.get('split_k')},{r['vs_cublas']:.2f}x)" for r in recs
                if r["kernel"].startswith("selective")), flush=True)
            if var is None:
                print("  cublas: " + " ".join(
                    f"{r['kernel'][7:]}:{r['ms'] * 1e3:.0f}us({r['bw_frac'] * 100:.0f}%)"
                    for r in recs if r["kernel"].startswith("cublas")))
    if json_path:
        Path(json_path).write_text(json.dumps(records, indent=1))
    return records


def read_probe() -> None:
    """How long a plain contiguous read of N bytes takes here (graph replays, rotated sets):
    the practical floor for a kernel of that size, ramp-up and tail included."""
    from polarc.plugins import bench

    device = torch.device("cuda")
    bw = bench.copy_bandwidth(device)
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s")
    for mb in (17, 34, 67, 134, 201, 268, 536, 1073):
        n = mb * 10**6 // 2
        sets = [torch.randn(n, device=device, dtype=torch.bfloat16)
                for _ in range(bench._n_sets(n * 2))]
        outs = [torch.empty((), device=device, dtype=torch.float32) for _ in sets]
        ms = bench.time_graph([lambda x=x, o=o: torch.sum(x, 0, dtype=torch.float32, out=o)
                               for x, o in zip(sets, outs, strict=True)])
        print(f"read {mb:>5} MB: {ms * 1e3:8.1f} us = {n * 2 / (ms * 1e-3) / 1e9:6.0f} GB/s "
              f"({n * 2 / (ms * 1e-3) / bw * 100:.0f}% of copy); copy floor "
              f"{n * 2 / bw * 1e6:.1f} us", flush=True)
        del sets, outs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write one record per case to this file")
    ap.add_argument("--quick", action="store_true", help="a subset of the shapes")
    ap.add_argument("--sweep", choices=["all", "attention", "gemm"],
                    help="time plan variants instead (developer tuning)")
    ap.add_argument("--read-probe", action="store_true",
                    help="time plain reads of 17 MB..1 GB (what a kernel of that size can reach)")
    ap.add_argument("--no-attention", action="store_true")
    ap.add_argument("--no-gemm", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("Error: kernel benchmarks need a CUDA GPU (none is visible here).", file=sys.stderr)
        return 1
    if args.read_probe:
        read_probe()
        return 0
    if args.sweep:
        sweep(args.json, args.sweep)
        return 0
    from polarc.plugins.bench import run_kernel_benchmarks

    run_kernel_benchmarks(args.json, args.quick, attention=not args.no_attention,
                          gemm=not args.no_gemm)
    return 0


if __name__ == "__main__":
    sys.exit(main())
