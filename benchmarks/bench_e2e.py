"""End-to-end decode benchmark (BENCHMARKS.md §3); needs a CUDA GPU.

    python benchmarks/bench_e2e.py --json e2e.json
"""

import argparse
from pathlib import Path

from polarc.runtime.bench import run_e2e_benchmarks

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    args = ap.parse_args()
    run_e2e_benchmarks(args.json, with_hf=not args.no_hf)
