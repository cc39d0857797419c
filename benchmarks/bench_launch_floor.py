"""What a decode step's launch sizes alone cost: plain reads of the same bytes, in the same
launches, in the same order.

    python -m polarc.benchmarks.bench_launch_floor [--cases llama3-8b:32:8192,...] [--json OUT]
        [--e2e E2E.json]    # a bench_e2e run's steps set beside

A step of polarc's runtime reads its bytes in one launch per linear layer and one per
attention (plus small launches: the KV append, the norms where they are not inside the FP8
GEMMs). On the H100 a plain read of 17 MB runs at ~41% of the copy bandwidth and one of
134 MB at ~88% (KERNEL_NOTES.md, "Read probe"): each launch pays a ramp and a tail that a
byte floor does not count. This benchmark times, as one CUDA graph, a sequence of plain reads
with exactly the big reads of a step: per layer the q/k/v weight, the KV bytes the attention
reads (dense, or times the density), o, gate_up and down; then the LM head. Each read has its
own region of one pool (no read is served from L2 by the one before), and the small launches
are left out, so the time is a lower bound for any step built of these launches with kernels
no better at reading than a plain read. Readers: a Triton loop over 64 KB blocks (1, 2 or 4
programs per SM) and `torch.sum`, each timed for the whole sequence; the best is reported, and
the same readers on single reads of a range of sizes (the efficiency curve).

Compare the `launch ms` column with the step of the same case in benchmarks/README.md §3
(`bench_e2e`): step / launch-floor near 1 means the kernels read as well as a plain read at
their sizes, and the rest of the gap to the byte floor belongs to the launch structure.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from polarc.benchmarks.timing import copy_bandwidth, environment, sets_to_rotate, time_graph

from polarc.models.presets import ModelSpec, get_preset
from polarc.outputs import write_json

CASES = [("llama3-8b", 32, 8192), ("llama3-8b", 64, 4096)]
DENSITY = 0.515625  # bench_e2e's sparse engines' mean density (random routers)
VARIANTS = {"bf16": (2, 2), "fp8-kv": (2, 1), "fp8-all": (1, 1)}  # weight, KV bytes a value
CURVE_MB = (4, 8, 17, 25, 34, 59, 67, 117, 134, 268, 525, 1073)
BLOCK = 16384  # int32 a program reads per loop step: 64 KB
ONE_READ = "one read of it all"


def step_reads(spec: ModelSpec, batch: int, seqlen: int, density: float, weight_bytes: int,
               kv_bytes: int) -> list[tuple[str, int]]:
    """The big reads of one decode step in launch order, (what, bytes): per layer the fused
    q/k/v weight, the attention's K and V (`density` of the groups), o, gate_up (SwiGLU) or
    up (ReLU), down; then the LM head (tied or not, a step reads it once)."""
    d, f, kv_heads = spec.hidden, spec.intermediate, spec.n_kv_heads
    kv = round(batch * seqlen * kv_heads * density) * spec.head_dim * 2 * kv_bytes
    up = (1 if spec.relu_mlp else 2) * f * d
    layer = [("qkv", spec.qkv_rows * d), ("attention", None),
             ("o", d * spec.n_heads * spec.head_dim), ("gate_up", up), ("down", f * d)]
    reads = []
    for i in range(spec.n_layers):
        reads += [(f"{i}.{name}", kv if n is None else n * weight_bytes) for name, n in layer]
    return reads + [("lm_head", spec.vocab * d * weight_bytes)]


@functools.cache
def _read_kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def read_kernel(Src, Out, n, BLOCK: tl.constexpr):
        """Program p sums blocks p, p + P, ... of Src (so no load is dead) into Out[p]."""
        pid, progs = tl.program_id(0), tl.num_programs(0)
        acc = tl.zeros([BLOCK], tl.int32)
        for start in range(pid.to(tl.int64) * BLOCK, n, progs * BLOCK):  # (n may pass 2^31)
            offs = start + tl.arange(0, BLOCK)
            acc += tl.load(Src + offs, mask=offs < n, other=0)
        tl.store(Out + pid, tl.sum(acc, 0))

    return read_kernel


Readers = dict[str, Callable[[torch.Tensor, torch.Tensor], None]]


def readers(device: torch.device, sms: int) -> Readers:
    """Ways to read an int32 tensor whole: name -> fn(src, scratch); `scratch` holds an int32
    per program."""
    kernel = _read_kernel()

    def triton_read(per_sm: int) -> Callable[[torch.Tensor, torch.Tensor], None]:
        def read(src: torch.Tensor, out: torch.Tensor) -> None:
            progs = max(1, min(math.ceil(src.numel() / BLOCK), per_sm * sms))
            kernel[(progs,)](src, out, src.numel(), BLOCK=BLOCK, num_warps=8)
        return read

    out = {f"triton x{p}/SM": triton_read(p) for p in (1, 2, 4)}
    if device.type == "cuda":  # (what KERNEL_NOTES.md's read probe timed)
        total = torch.empty((), dtype=torch.bfloat16, device=device)
        out["torch.sum"] = lambda src, scratch: torch.sum(src.view(torch.bfloat16), 0, out=total)
    return out


def _regions(pool: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """Consecutive int32 views of `pool`, one of each size in bytes (rounded down to 4)."""
    views, at = [], 0
    for size in sizes:
        views.append(pool[at:at + size // 4])
        at += size // 4
    return views


def check_readers(device: torch.device, sms: int) -> None:
    """Each Triton reader sums a buffer of ones to its length (every element read once)."""
    src = torch.ones(3 * BLOCK * sms + 123, dtype=torch.int32, device=device)
    scratch = torch.zeros(8 * sms, dtype=torch.int32, device=device)
    for name, read in readers(device, sms).items():
        if name.startswith("triton"):
            scratch.zero_()
            read(src, scratch)
            if int(scratch.sum()) != src.numel():
                raise RuntimeError(f"bench_launch_floor: {name} read {int(scratch.sum())} of "
                                   f"{src.numel()} elements")


def efficiency_curve(fns: Readers, device: torch.device, sms: int, bw: float
                     ) -> list[dict[str, Any]]:
    """Each reader on single reads of CURVE_MB sizes (input sets rotated past L2)."""
    rows = []
    scratch = torch.zeros(8 * sms, dtype=torch.int32, device=device)
    for mb in CURVE_MB:
        size = mb << 20
        sets = _regions(torch.ones(sets_to_rotate(size) * size // 4, dtype=torch.int32,
                                   device=device), [size] * sets_to_rotate(size))
        for name, read in fns.items():
            ms = time_graph([functools.partial(read, s, scratch) for s in sets])
            rows.append(dict(mb=mb, reader=name, us=ms * 1e3, of_copy=size / bw / (ms * 1e-3)))
        del sets
        torch.cuda.empty_cache()
    return rows


def time_sequence(reads: list[tuple[str, int]], fns: Readers, device: torch.device, sms: int
                  ) -> dict[str, float]:
    """ms of the whole sequence as one graph, per reader; and of all its bytes in one read."""
    sizes = [n for _, n in reads]
    pool = torch.ones(sum(s // 4 for s in sizes), dtype=torch.int32, device=device)
    views = _regions(pool, sizes)
    scratch = torch.zeros(8 * sms, dtype=torch.int32, device=device)
    out = {}
    for name, read in fns.items():
        def step(read: Callable = read, views: list = views) -> None:
            for v in views:
                read(v, scratch)
        out[name] = time_graph([step], reps=10)
    try:  # (a pool past 2^31 elements: a failure here must not lose the sequences' times)
        out[ONE_READ] = min(
            time_graph([functools.partial(read, pool, scratch)], reps=10)
            for name, read in fns.items() if name.startswith("triton"))
    except Exception as exc:
        print(f"one read of {pool.numel() * 4 / 1e9:.1f} GB failed: {str(exc)[:200]}", flush=True)
        out[ONE_READ] = float("nan")
    del pool, views
    torch.cuda.empty_cache()
    return out


def e2e_steps(path: Path) -> dict[tuple, float]:
    """A `bench_e2e --json` file's step times by (model, batch, seqlen, variant, mode)."""
    records = json.loads(path.read_text())["records"]
    return {(r["model"], r["batch"], r["seqlen"], r.get("variant", "bf16"), r["mode"]):
            r["step_ms"] for r in records if "step_ms" in r}


def run(cases: list[tuple[str, int, int]], variants: list[str], *, json_path: Path | None = None,
        steps: dict[tuple, float] | None = None, device: torch.device | None = None,
        sms: int | None = None) -> dict[str, Any]:
    """The efficiency curve, then each case x variant x mode; printed as tables and, after each
    part, written to `json_path`. `steps` (`e2e_steps`): the measured steps, set beside."""
    device = device or torch.device("cuda")
    sms = sms or torch.cuda.get_device_properties(device).multi_processor_count
    check_readers(device, sms)
    bw = copy_bandwidth(device)
    result: dict[str, Any] = dict(environment=environment(bw, device), curve=[], records=[])
    env = result["environment"]

    def save() -> None:
        if json_path is not None:
            write_json(json_path, result, force=True)

    print(f"{env['device']}, torch {env['torch']}, copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    fns = readers(device, sms)
    result["curve"] = efficiency_curve(fns, device, sms, bw)
    save()
    print("| MB | " + " | ".join(fns) + " |  (us, % of copy bandwidth)")
    for mb in CURVE_MB:
        cells = [f"{r['us']:.1f} {100 * r['of_copy']:.0f}%" for r in result["curve"]
                 if r["mb"] == mb]
        print(f"| {mb} | " + " | ".join(cells) + " |")
    print("| model | B | S | dtypes | mode | launches | floor ms | launch ms (reader) | x floor "
          "| one read ms | step ms | step / launch |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for name, batch, seqlen in cases:
        spec = get_preset(name)
        for variant in variants:
            w_bytes, kv_bytes = VARIANTS[variant]
            for mode, density in (("dense", 1.0), ("sparse", DENSITY)):
                reads = step_reads(spec, batch, seqlen, density, w_bytes, kv_bytes)
                floor_ms = sum(n for _, n in reads) / bw * 1e3
                times = time_sequence(reads, fns, device, sms)
                best = min((k for k in times if k != ONE_READ), key=times.get)
                rec = dict(model=name, batch=batch, seqlen=seqlen, variant=variant, mode=mode,
                           density=density, launches=len(reads), floor_ms=floor_ms,
                           launch_ms=times[best], reader=best, one_read_ms=times[ONE_READ],
                           readers_ms=times)
                step = (steps or {}).get((name, batch, seqlen, variant, mode))
                if step is not None:
                    rec.update(step_ms=step, step_over_launch=step / times[best])
                result["records"].append(rec)
                save()
                measured = f"{step:.2f} | {step / times[best]:.3f}" if step else " | "
                print(f"| {name} | {batch} | {seqlen} | {variant} | {mode} | {len(reads)} | "
                      f"{floor_ms:.2f} | {times[best]:.2f} ({best}) | "
                      f"{times[best] / floor_ms:.2f} | {rec['one_read_ms']:.2f} | {measured} |",
                      flush=True)
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=None, help="model:batch:seqlen,... (default: "
                    + ",".join(f"{m}:{b}:{s}" for m, b, s in CASES) + ")")
    ap.add_argument("--variants", default="bf16,fp8-kv,fp8-all",
                    help="comma-separated of " + ", ".join(VARIANTS))
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--e2e", type=Path, default=None,
                    help="a `bench_e2e --json` file of the same cases: its steps set beside")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_launch_floor: needs a CUDA GPU")
    cases = CASES if args.cases is None else [
        (m, int(b), int(s)) for m, b, s in (c.split(":") for c in args.cases.split(","))]
    variants = args.variants.split(",")
    if bad := [v for v in variants if v not in VARIANTS]:
        raise SystemExit(f"bench_launch_floor: unknown variant {bad[0]!r} (one of "
                         f"{', '.join(VARIANTS)})")
    try:
        steps = e2e_steps(args.e2e) if args.e2e else None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"bench_launch_floor: cannot read --e2e {args.e2e}: {exc}") from None
    run(cases, variants, json_path=args.json, steps=steps)


if __name__ == "__main__":
    main()
