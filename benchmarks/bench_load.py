"""What verifying an engine costs when it loads: `load_engine` with its checksum and shape
checks, and the hashing's own time (xxh3 of every tensor's bytes, on worker threads that
overlap the loading, so it is not a share of the load time).

    python -m polarc.benchmarks.bench_load ENGINE [--device cuda] [--json OUT]

Each load reads the file twice: once cold-ish (whatever the page cache holds) and once warm;
both are reported.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from polarc.format import engine_file
from polarc.outputs import write_json


def timed_load(path: Path, device: str) -> dict[str, float]:
    spent = {"hash_s": 0.0}
    digest = engine_file._digest

    def counting(t: torch.Tensor) -> str:
        start = time.perf_counter()
        try:
            return digest(t)
        finally:
            spent["hash_s"] += time.perf_counter() - start

    engine_file._digest = counting
    try:
        start = time.perf_counter()
        engine = engine_file.load_engine(path, device=device)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        spent["load_s"] = time.perf_counter() - start
    finally:
        engine_file._digest = digest
    spent["gb"] = sum(t.numel() * t.element_size() for t in engine.model.weights.values()
                      if t._base is None) / 1e9
    del engine
    return spent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("engine", type=Path)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    runs = [timed_load(args.engine, args.device) for _ in range(2)]
    for name, r in zip(("first", "second"), runs, strict=True):
        print(f"{name} load of {args.engine} ({r['gb']:.1f} GB of weights) on {args.device}: "
              f"{r['load_s']:.1f} s; hashing's own time {r['hash_s']:.1f} s, overlapped",
              flush=True)
    if args.json is not None:
        write_json(args.json, runs, force=True)


if __name__ == "__main__":
    main()
