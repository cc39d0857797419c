"""The decode step's small kernels against the torch ops they replace, and the host cost of
an eager (uncaptured) selective attention call against SDPA's (GPU).

    python -m polarc.benchmarks.bench_step_kernels [--json OUT]

The step's KV append (`rope_write_kv`, with rotary positions) alone and with the top-k group
selection it also runs (router scores → top-k groups, int32), beside `torch.topk` + cast as a
launch of its own; `write_kv` (append one token's K and V) against indexed assignment; at
decode shapes. Each call is timed as a CUDA-graph replay (`timing.time_graph`), like the step.

Eager host cost: at a tiny shape (the GPU work takes a few microseconds) the wall time of
many back-to-back calls ÷ their number is what the host spends per call; the least of 25
rounds, the variants' rounds interleaved.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch
from polarc.benchmarks.timing import time_graph

from polarc.outputs import write_json

CASES = [  # B, Hkv, k, S_max, D
    (32, 8, 4, 8192, 128), (64, 8, 4, 4096, 128), (16, 32, 16, 4096, 128), (256, 8, 4, 2048, 128),
]


def run_case(b: int, hkv: int, k: int, s: int, d: int) -> dict:
    from polarc.plugins.kv_write import rope_write_kv, write_kv, write_kv_reference
    from polarc.plugins.reference import topk_groups_reference

    dev = torch.device("cuda")
    scores = torch.randn(b, hkv, device=dev, dtype=torch.bfloat16)
    groups = torch.empty(b, k, dtype=torch.int32, device=dev)
    kc = torch.zeros(b, hkv, s, d, device=dev, dtype=torch.bfloat16)
    vc = torch.zeros_like(kc)
    q = torch.randn(b, 4 * hkv, d, device=dev, dtype=torch.bfloat16)
    new_k = torch.randn(b, hkv, d, device=dev, dtype=torch.bfloat16)
    new_v = torch.randn_like(new_k)
    pos = torch.randint(0, s, (b,), device=dev, dtype=torch.int32)
    cos, sin = torch.randn(2, b, d, device=dev, dtype=torch.bfloat16)
    rope_write_kv(q, new_k, new_v, kc, vc, pos, cos=cos, sin=sin, scores=scores, groups=groups)
    # bf16 scores tie now and then, and tie order is free: compare the selected values
    ref = topk_groups_reference(scores, k).long()
    assert torch.equal(scores.gather(1, groups.long()), scores.gather(1, ref))
    append = time_graph([lambda: rope_write_kv(q, new_k, new_v, kc, vc, pos, cos=cos,
                                               sin=sin)]) * 1e3
    with_topk = time_graph([lambda: rope_write_kv(q, new_k, new_v, kc, vc, pos, cos=cos, sin=sin,
                                                  scores=scores, groups=groups)]) * 1e3
    torch_topk = time_graph([lambda: scores.topk(k, dim=-1).indices.to(torch.int32)]) * 1e3
    ours_kv = time_graph([lambda: write_kv(new_k, new_v, kc, vc, pos)]) * 1e3
    torch_kv = time_graph([lambda: write_kv_reference(new_k, new_v, kc, vc, pos)]) * 1e3
    return {"B": b, "Hkv": hkv, "k": k, "S": s, "D": d, "rope_write_kv_us": append,
            "rope_write_kv_topk_us": with_topk, "torch_topk_us": torch_topk,
            "write_kv_us": ours_kv, "torch_index_put_us": torch_kv}


def host_us(fns: dict[str, Callable[[], object]], calls: int = 200, rounds: int = 25
            ) -> dict[str, float]:
    """Host microseconds per eager call of each fn (module docstring), the rounds of the fns
    interleaved so that drift of the host (a shared machine) hits them alike; the least round
    of each, the cost without interference."""
    for fn in fns.values():
        for _ in range(20):
            fn()
    torch.cuda.synchronize()
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            best[name] = min(best[name], (time.perf_counter() - start) / calls * 1e6)
            torch.cuda.synchronize()
    return best


def eager_host_cost(b: int = 1, hq: int = 32, hkv: int = 8, s: int = 256, d: int = 128) -> dict:
    """One eager selective attention call, three ways, beside SDPA on the same shape."""
    import torch.nn.functional as F
    from polarc.plugins._triton_util import num_sms
    from polarc.plugins.selective_attention import (
        plan_selective_attention,
        selective_attention,
        selective_attention_workspace,
    )

    dev = torch.device("cuda")
    q = torch.randn(b, hq, d, device=dev, dtype=torch.bfloat16)
    kc = torch.randn(b, hkv, s, d, device=dev, dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    lens = torch.full((b,), s, dtype=torch.int32, device=dev)
    groups = torch.arange(hkv // 2, dtype=torch.int32, device=dev).expand(b, -1).contiguous()
    plan = plan_selective_attention(b, hkv // 2, hq // hkv, s, d, sms=num_sms(dev))
    ws = selective_attention_workspace(q, kc)
    out = torch.empty_like(q)
    rec: dict = {"B": b, "Hq": hq, "Hkv": hkv, "S": s, "D": d, "k": hkv // 2}
    rec.update({f"{name}_us": us for name, us in host_us({
        "sdpa": lambda: F.scaled_dot_product_attention(q[:, :, None], kc, vc, enable_gqa=True),
        "default": lambda: selective_attention(q, kc, vc, lens, groups),
        "unchecked": lambda: selective_attention(q, kc, vc, lens, groups, check_indices=False),
        "planned": lambda: selective_attention(q, kc, vc, lens, groups, plan=plan, workspace=ws,
                                               out=out, check_indices=False),
    }).items()})
    rec["planned_over_sdpa"] = rec["planned_us"] / rec["sdpa_us"]
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="write the records here")
    args = ap.parse_args()
    # first, before the graphs of the step-kernel table: what a fresh eager caller sees
    eager = eager_host_cost()
    records = []
    print(f"{torch.cuda.get_device_name()}")
    print(f"{'B':>4} {'Hkv':>4} {'k':>3} | {'append us':>9} {'+ topk us':>9} {'torch topk':>10} "
          f"| {'kv us':>7} {'torch us':>9}")
    for case in CASES:
        r = run_case(*case)
        records.append(r)
        print(f"{r['B']:>4} {r['Hkv']:>4} {r['k']:>3} | {r['rope_write_kv_us']:>9.2f} "
              f"{r['rope_write_kv_topk_us']:>9.2f} {r['torch_topk_us']:>10.2f} | "
              f"{r['write_kv_us']:>7.2f} {r['torch_index_put_us']:>9.2f}", flush=True)
        torch.cuda.empty_cache()
    print(f"eager host cost per call (B=1, 32/8 heads, S=256, k=4): SDPA {eager['sdpa_us']:.1f} us; "
          f"selective default {eager['default_us']:.1f}, without index checks "
          f"{eager['unchecked_us']:.1f}, with a plan and workspace made once "
          f"{eager['planned_us']:.1f} ({eager['planned_over_sdpa']:.2f}x SDPA)", flush=True)
    if args.json is not None:
        write_json(args.json, {"step_kernels": records, "eager_host_cost": eager}, force=True)


if __name__ == "__main__":
    main()
