"""benchmarks/README.md §5: a stream of requests through the scheduler (continuous batching over
the paged KV cache) against the chunked batch loop, dense and sparse, on a CUDA GPU.

    python -m polarc.benchmarks.bench_stream [--requests 2000] [--baseline-requests 500] [--json OUT]

The workload (`workload`, fixed seed, no download): prompt lengths log-uniform in [64, 4096]
tokens, output lengths log-uniform in [16, 1024] (forced: EOS is ignored; random weights never
mean to stop), random token ids, greedy. Llama-3-8B architecture, random weights, bf16, one
engine with random routers at density 0.5 (layer 0 dense), run sparse and dense (every group:
the same engine, one code path), max sequence 8192, as many slots as the GPU's memory holds
at that length. The baseline is the loop `polarc run` had before the scheduler: the requests
in chunks of the slot count, each chunk prefilled then decoded to its longest row (finished
rows compacted into smaller batch buckets), timed on the first `--baseline-requests`
requests, which the scheduler also runs alone, for a like-for-like ratio.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from polarc.benchmarks.bench_e2e import sparse_engine_in_memory, weight_bytes
from polarc.benchmarks.timing import copy_bandwidth, environment, time_graph

from polarc.format.engine_file import lay_out_wide_linears
from polarc.models.layers import stored_weights
from polarc.outputs import write_json
from polarc.runtime.generate import generate
from polarc.runtime.kv_cache import pages_for, pages_that_fit
from polarc.runtime.scheduler import Request, Scheduler, SchedulerStats, drive
from polarc.runtime.torch_runtime import Runtime

MAX_SEQ = 8192
PAGE_SIZE = 64
PREFILL_CHUNK = 2048


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release(device: torch.device) -> None:
    """Give the last runtime's memory back before the next one sizes itself."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def workload(n: int = 2000, seed: int = 0, vocab: int = 128256,
             prompt: tuple[int, int] = (64, 4096), output: tuple[int, int] = (16, 1024)
             ) -> list[tuple[list[int], int]]:
    """(prompt token ids, output length) of `n` requests (§5; the server benchmark too)."""
    g = torch.Generator().manual_seed(seed)

    def log_uniform(lo: int, hi: int) -> torch.Tensor:
        u = torch.rand(n, generator=g, dtype=torch.float64)
        return torch.exp(math.log(lo) + u * (math.log(hi) - math.log(lo))).round().long()

    lens, outs = log_uniform(*prompt), log_uniform(*output)
    return [(torch.randint(3, vocab, (int(m),), generator=g).tolist(), int(o))
            for m, o in zip(lens, outs, strict=True)]


def matmul_peak(device: torch.device) -> float:
    """bf16 matmul FLOP/s of a large square product, measured in this run."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    ms = time_graph([lambda: a @ b])
    return 2 * 8192**3 / (ms * 1e-3)


def prefill_speed(engine: Any, device: torch.device, *, prompts: int = 16, length: int = 2048,
                  torch_choice: bool = False) -> dict[str, float]:
    """Prompt tokens/s of the runtime's prefill, one chunk of `length` tokens per prompt
    (`torch_choice`: any SDPA backend for its attention, as `first_pass_cost`)."""
    rt = Runtime(engine, batch=1, device=device, page_size=PAGE_SIZE, max_seq=max(length, 64) * 2)
    if torch_choice:
        rt.prefill_sdpa = None
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(3, engine.model.spec.vocab, (length,), generator=g).tolist()
           for _ in range(prompts + 2)]
    rt.cache.grow(0, length)
    for p in ids[:2]:  # warm-up
        rt.prefill_chunk(0, p, 0)
    _sync(device)
    t0 = time.perf_counter()
    for p in ids[2:]:
        rt.prefill_chunk(0, p, 0)
    _sync(device)
    tps = prompts * length / (time.perf_counter() - t0)
    del rt
    _release(device)
    return {"prompt_length": length, "prefill_tokens_per_s": tps}


def profile_prefill(engine: Any, device: torch.device) -> None:
    """The CUDA kernels that take a 1024- and a 4096-token prefill's time, and the host's."""
    from torch.profiler import ProfilerActivity, profile

    rt = Runtime(engine, batch=1, device=device, page_size=PAGE_SIZE, max_seq=8192)
    rt.cache.grow(0, 4096)
    g = torch.Generator().manual_seed(3)
    for n in (1024, 4096):
        ids = torch.randint(3, engine.model.spec.vocab, (n,), generator=g).tolist()
        rt.prefill_chunk(0, ids, 0)
        _sync(device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            rt.prefill_chunk(0, ids, 0)
            _sync(device)
            wall = time.perf_counter() - t0
        print(f"prefill of {n} tokens: {wall * 1e3:.1f} ms wall", flush=True)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12,
                                        max_name_column_width=60), flush=True)
    del rt
    _release(device)


def first_pass_cost(engine: Any, device: torch.device, *, seed: int, n_packs: int = 24,
                    torch_choice: bool = False) -> dict[str, float]:
    """Seconds for `n_packs` prefill packs of chunk lengths this process has not seen (drawn
    with `seed`), then for the same packs again: a first pass much slower than the second
    means per-shape set-up work (an attention graph per new length, say) in prefill. With
    `torch_choice` prefill attention may use any SDPA backend (cuDNN's too), else the
    runtime's (`PREFILL_SDPA`)."""
    rt = Runtime(engine, batch=8, device=device, page_size=PAGE_SIZE, max_seq=PREFILL_CHUNK)
    if torch_choice:
        rt.prefill_sdpa = None
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, engine.model.spec.vocab, (PREFILL_CHUNK,), generator=g).tolist()
    packs = []
    for _ in range(n_packs):
        lens, room = [], PREFILL_CHUNK
        while room > 0 and len(lens) < rt.batch:
            lens.append(int(torch.randint(1, room + 1, (1,), generator=g)))
            room -= lens[-1]
        packs.append(lens)

    def run(rt: Runtime) -> float:
        _sync(device)
        t0 = time.perf_counter()
        for lens in packs:
            for slot, n in enumerate(lens):
                rt.cache.grow(slot, n)
            rt.prefill_pack([(slot, ids[:n], 0) for slot, n in enumerate(lens)],
                            width=PREFILL_CHUNK)
            for slot in range(len(lens)):
                rt.cache.free(slot)
        _sync(device)
        return time.perf_counter() - t0

    first, second = run(rt), run(rt)
    del rt
    _release(device)
    return {"first_s": first, "second_s": second, "ratio": first / second}


def run_scheduler(engine: Any, requests: list[tuple[list[int], int]], *, slots: int, pages: int,
                  dense: bool, device: torch.device, detokenize: bool = False,
                  tiles: bool = False) -> dict[str, Any]:
    """`tiles`: the engine's linear weights laid out as tiles for the run
    (`Runtime(tile_linears=True)`), and back to rows after it."""
    rt = Runtime(engine, batch=slots, dense=dense, device=device, page_size=PAGE_SIZE,
                 pages=pages, tile_linears=tiles)
    sched = Scheduler(rt, prefill_chunk=PREFILL_CHUNK, detokenize=detokenize)
    # warm-up, not timed: the step's CUDA graph, compiled kernels, the prefill's GEMM choices
    for _ in drive(sched, iter([Request(p[:64], 4, id=-1 - i, ignore_eos=True)
                                for i, (p, _) in enumerate(requests[:slots])]),
                   max_waiting=2 * slots):
        pass
    sched.stats = SchedulerStats()
    reqs = [Request(p, m, id=i, ignore_eos=True) for i, (p, m) in enumerate(requests)]
    _sync(device)
    t0 = time.perf_counter()
    done = failed = 0
    for ev in drive(sched, iter(reqs), max_waiting=2 * slots):
        if ev.finish_reason is not None:
            done += ev.error is None
            failed += ev.error is not None
    _sync(device)
    wall = time.perf_counter() - t0
    stats = sched.stats.summary(slots)
    out = {"requests": len(reqs), "done": done, "failed": failed, "seconds": wall,
           "requests_per_s": done / wall, "output_tokens_per_s": stats["output_tokens"] / wall,
           "prompt_tokens_per_s_wall": stats["prompt_tokens"] / wall,
           "prefill_tokens_per_s": stats["prompt_tokens"] / stats["prefill_s"],
           "decode_tokens_per_s": stats["output_tokens"] / stats["decode_s"], **stats}
    del sched, rt
    lay_out_wide_linears(engine, tiles=False)
    _release(device)
    return out


def run_chunked(engine: Any, requests: list[tuple[list[int], int]], *, slots: int, dense: bool,
                device: torch.device) -> dict[str, Any]:
    """The loop before the scheduler: chunks of `slots` requests, each run to its end."""
    rt = Runtime(engine, batch=slots, dense=dense, device=device, page_size=PAGE_SIZE)
    _sync(device)
    t0 = time.perf_counter()
    tokens = 0
    for start in range(0, len(requests), slots):
        chunk = requests[start:start + slots]
        if len(chunk) < slots:  # the last, smaller chunk: its own runtime, once this one is gone
            del rt
            _release(device)
            rt = Runtime(engine, batch=len(chunk), dense=dense, device=device,
                         page_size=PAGE_SIZE)
        outs, _ = generate(rt, [p for p, _ in chunk], max_new_tokens=[m for _, m in chunk],
                           stop_at_eos=False)
        tokens += sum(len(o) for o in outs)
    _sync(device)
    wall = time.perf_counter() - t0
    del rt
    _release(device)
    return {"requests": len(requests), "seconds": wall, "output_tokens": tokens,
            "output_tokens_per_s": tokens / wall, "requests_per_s": len(requests) / wall}


def step_floor_ratio(engine: Any, live: float, context: float, bw: float) -> dict[str, float]:
    """Byte floors of a decode step of `live` rows at mean `context`, dense and sparse."""
    spec = engine.model.spec
    wbytes = weight_bytes(engine.model)
    per_group = 2 * spec.head_dim * 2 * live * context  # K and V, bf16
    dense = wbytes + per_group * spec.n_kv_heads * spec.n_layers
    sparse = wbytes + per_group * sum(engine.k_per_layer)
    return {"dense_floor_ms": dense / bw * 1e3, "sparse_floor_ms": sparse / bw * 1e3,
            "floor_ratio": dense / sparse}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--baseline-requests", type=int, default=500)
    ap.add_argument("--modes", default="sparse,dense")
    ap.add_argument("--baseline-modes", default="sparse")
    ap.add_argument("--max-slots", type=int, default=256)
    ap.add_argument("--layouts", default="rows",
                    help="rows, tiles or both (rows,tiles): each mode's scheduler run with the "
                         "16-bit linear weights in each layout (`Runtime(tile_linears=True)`; "
                         "keys scheduler_MODE and scheduler_MODE_tiles)")
    ap.add_argument("--detokenize", action="store_true",
                    help="make each token's text as `polarc run` and the server do (the "
                         "like-for-like baseline for bench_serve)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--profile", action="store_true", help="the top CUDA kernels of prefill")
    ap.add_argument("--first-pass", action="store_true",
                    help="time packs of new chunk lengths twice, with torch's choice of "
                         "attention backend and with the runtime's (no cuDNN)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("Error: the stream benchmark needs a CUDA GPU (none is visible here).")
    device = torch.device("cuda", torch.cuda.current_device())
    bw = copy_bandwidth(device)
    peak = matmul_peak(device)
    env = environment(bw, device)
    env["matmul_tflops"] = peak / 1e12
    print(f"{env['device']}: copy {bw / 1e12:.2f} TB/s, bf16 matmul {peak / 1e12:.0f} TFLOP/s",
          flush=True)
    engine = sparse_engine_in_memory("llama3-8b", batch=4096, max_seq=MAX_SEQ, density=0.5,
                                     device=device)
    spec = engine.model.spec
    per_row = pages_for(MAX_SEQ, PAGE_SIZE)
    fits = pages_that_fit(spec, PAGE_SIZE, engine.model.dtype, device, memory_share=0.85)
    slots = min(args.max_slots, fits // per_row)
    pages = slots * per_row
    print(f"{slots} slots (what fits at max sequence {MAX_SEQ}), {pages} pages of {PAGE_SIZE}",
          flush=True)
    reqs = workload(args.requests, vocab=spec.vocab)
    params = sum(t.numel() for n, t in stored_weights(engine.model.weights, spec).items()
                 if n != "embed.weight")
    prefill = prefill_speed(engine, device)
    prefill["matmul_share"] = 2 * params * prefill["prefill_tokens_per_s"] / peak
    prefill["by_length"] = {n: prefill_speed(engine, device, prompts=max(4, 16384 // n),
                                             length=n)["prefill_tokens_per_s"]
                            for n in (64, 256, 1024, 4096)}
    print("prefill", json.dumps(prefill), flush=True)
    if args.profile:
        profile_prefill(engine, device)
    first: dict[str, Any] = {}
    if args.first_pass:
        first = {"torch_choice": first_pass_cost(engine, device, seed=11, torch_choice=True),
                 "runtime_default": first_pass_cost(engine, device, seed=12),
                 "prefill_2048_torch_choice": prefill_speed(engine, device, torch_choice=True)}
        print("first pass", json.dumps(first), flush=True)
    records: dict[str, Any] = {"environment": env, "slots": slots, "pages": pages,
                               "prefill": prefill, "first_pass": first,
                               "workload": {"requests": len(reqs),
                                            "prompt_tokens": sum(len(p) for p, _ in reqs),
                                            "output_tokens": sum(m for _, m in reqs)}}
    layouts = [layout for layout in args.layouts.split(",") if layout]
    if not set(layouts) <= {"rows", "tiles"}:
        sys.exit(f"Error: --layouts must name rows and/or tiles, got {args.layouts!r}")
    for mode in filter(None, args.modes.split(",")):
        dense = mode == "dense"
        for layout in layouts:
            full = run_scheduler(engine, reqs, slots=slots, pages=pages, dense=dense,
                                 device=device, detokenize=args.detokenize,
                                 tiles=layout == "tiles")
            full["prefill_matmul_share"] = 2 * params * full["prefill_tokens_per_s"] / peak
            full.update(step_floor_ratio(engine, full["mean_live_batch"], full["mean_context"],
                                         bw))
            key = f"scheduler_{mode}" + ("_tiles" if layout == "tiles" else "")
            records[key] = full
            print(key, json.dumps({k: round(v, 3) if isinstance(v, float) else v
                                   for k, v in full.items()}), flush=True)
            if args.json is not None:  # what is measured survives a run cut short
                write_json(args.json, records, force=True)
        if mode in args.baseline_modes.split(",") and args.baseline_requests:
            sub = reqs[:args.baseline_requests]
            sched = run_scheduler(engine, sub, slots=slots, pages=pages, dense=dense,
                                  device=device)
            base = run_chunked(engine, sub, slots=slots, dense=dense, device=device)
            records[f"subset_{mode}"] = {"scheduler": sched, "chunked": base,
                                         "speedup": sched["output_tokens_per_s"]
                                         / base["output_tokens_per_s"]}
            print(mode, "subset", json.dumps(records[f"subset_{mode}"]["speedup"]), flush=True)
            if args.json is not None:
                write_json(args.json, records, force=True)
    if "scheduler_dense" in records and "scheduler_sparse" in records:
        d, s = records["scheduler_dense"], records["scheduler_sparse"]
        records["sparse_over_dense"] = {
            "output_tokens_per_s": s["output_tokens_per_s"] / d["output_tokens_per_s"],
            "decode_tokens_per_s": s["decode_tokens_per_s"] / d["decode_tokens_per_s"],
            "floor_ratio": s["floor_ratio"]}
    print(format_table(records))
    if args.json is not None:
        write_json(args.json, records, force=True)


def format_table(records: dict[str, Any]) -> str:
    pf = records["prefill"]
    lines = [f"slots {records['slots']}, pages {records['pages']}; workload "
             f"{records['workload']}; prefill of {pf['prompt_length']}-token prompts "
             f"{pf['prefill_tokens_per_s']:.0f} tok/s = {pf['matmul_share'] * 100:.0f}% of the "
             "bf16 matmul peak",
             "| run | requests | s | req/s | output tok/s | prefill tok/s | decode tok/s | "
             "occupancy | mean live batch | mean context | peak pages |", "|" + "---|" * 11]
    for key, r in records.items():
        if key.startswith("scheduler_"):
            lines.append(
                f"| {key} | {r['done']}/{r['requests']} | {r['seconds']:.1f} | "
                f"{r['requests_per_s']:.2f} | {r['output_tokens_per_s']:.0f} | "
                f"{r['prefill_tokens_per_s']:.0f} | {r['decode_tokens_per_s']:.0f} | "
                f"{r['slot_occupancy_while_queued']:.3f} | {r['mean_live_batch']:.1f} | "
                f"{r['mean_context']:.0f} | {r['peak_kv_pages']} |")
        elif key.startswith("subset_"):
            s, c = r["scheduler"], r["chunked"]
            lines.append(f"| {key}: scheduler | {s['requests']} | {s['seconds']:.1f} | "
                         f"{s['requests_per_s']:.2f} | {s['output_tokens_per_s']:.0f} | | | | | | |")
            lines.append(f"| {key}: chunked | {c['requests']} | {c['seconds']:.1f} | "
                         f"{c['requests_per_s']:.2f} | {c['output_tokens_per_s']:.0f} | | | | | | |")
    if "sparse_over_dense" in records:
        lines.append(f"sparse / dense: {records['sparse_over_dense']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
