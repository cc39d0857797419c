"""The decode step's small kernels against the torch ops they replace (GPU).

    python -m polarc.benchmarks.bench_step_kernels [--json OUT]

`topk_groups` (router scores → top-k groups, int32) against `torch.topk` + cast, and
`write_kv` (append one token's K and V) against indexed assignment, at decode shapes. Each
call is timed as a CUDA-graph replay (`timing.time_graph`), like the step.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from polarc.benchmarks.timing import time_graph

from polarc.outputs import write_json

CASES = [  # B, Hkv, k, S_max, D
    (32, 8, 4, 8192, 128), (64, 8, 4, 4096, 128), (16, 32, 16, 4096, 128), (256, 8, 4, 2048, 128),
]


def run_case(b: int, hkv: int, k: int, s: int, d: int) -> dict:
    from polarc.plugins.kv_write import write_kv, write_kv_reference
    from polarc.plugins.topk_groups import topk_groups, topk_groups_reference

    dev = torch.device("cuda")
    scores = torch.randn(b, hkv, device=dev, dtype=torch.bfloat16)
    groups = torch.empty(b, k, dtype=torch.int32, device=dev)
    # bf16 scores tie now and then, and tie order is free: compare the selected values
    ours, ref = topk_groups(scores, k).long(), topk_groups_reference(scores, k).long()
    assert torch.equal(scores.gather(1, ours), scores.gather(1, ref))
    ours_topk = time_graph([lambda: topk_groups(scores, k, out=groups)]) * 1e3
    torch_topk = time_graph([lambda: scores.topk(k, dim=-1).indices.to(torch.int32)]) * 1e3
    kc = torch.zeros(b, hkv, s, d, device=dev, dtype=torch.bfloat16)
    vc = torch.zeros_like(kc)
    new_k = torch.randn(b, hkv, d, device=dev, dtype=torch.bfloat16)
    new_v = torch.randn_like(new_k)
    pos = torch.randint(0, s, (b,), device=dev, dtype=torch.int32)
    ours_kv = time_graph([lambda: write_kv(new_k, new_v, kc, vc, pos)]) * 1e3
    torch_kv = time_graph([lambda: write_kv_reference(new_k, new_v, kc, vc, pos)]) * 1e3
    return {"B": b, "Hkv": hkv, "k": k, "S": s, "D": d, "topk_groups_us": ours_topk,
            "torch_topk_us": torch_topk, "write_kv_us": ours_kv, "torch_index_put_us": torch_kv}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="write the records here")
    args = ap.parse_args()
    records = []
    print(f"{torch.cuda.get_device_name()}")
    print(f"{'B':>4} {'Hkv':>4} {'k':>3} | {'topk us':>8} {'torch us':>9} | {'kv us':>7} {'torch us':>9}")
    for case in CASES:
        r = run_case(*case)
        records.append(r)
        print(f"{r['B']:>4} {r['Hkv']:>4} {r['k']:>3} | {r['topk_groups_us']:>8.2f} "
              f"{r['torch_topk_us']:>9.2f} | {r['write_kv_us']:>7.2f} {r['torch_index_put_us']:>9.2f}",
              flush=True)
        torch.cuda.empty_cache()
    if args.json is not None:
        write_json(args.json, records, force=True)


if __name__ == "__main__":
    main()
