"""benchmarks/README.md §3: end-to-end decode step time of dense and sparse engines on a CUDA GPU.

    python -m polarc.benchmarks.bench_e2e [--json OUT] [--no-hf]    # = polarc bench e2e

Random-weight Llama-3-8B and Llama-2-7B architectures in bf16, built in memory with random
routers; the paged KV cache is filled with random values at the case's length, each row's
pages scattered over the pool (prefill is excluded). A step is the runtime's decode step for
the whole batch, captured in a CUDA graph and timed by `timing.time_graph` (median of
replays). The floor of a step is (weight bytes +
KV bytes read) ÷ the copy bandwidth measured in the same run. `--variants bf16,fp8-kv,fp8-all`
runs each case with the cache in bf16, with the cache in float8 e4m3 (the same engine with
per-group scales: one byte a value read and written by the Triton kernels), and with the
linear layers' weights in float8 too (a scale per output channel, read by the FP8 linear
kernel; embeddings and norms stay bf16). The 16-bit linear layers take the runtime's route;
`--linears kernel,cublas,tiles` times each step on each of `ROUTES` in the same runtime.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch
from polarc.benchmarks.timing import copy_bandwidth, environment, kernel_breakdown, time_graph
from polarc.exporters.engine import BuildConfig, KVStats, assemble, fp8_cache_layout

from polarc.format.engine_file import (
    Engine,
    fp8_weight_names,
    lay_out_wide_linears,
    quantize_rows,
    tile_fp8_weights,
)
from polarc.models.layers import add_part_views, stored_weights
from polarc.models.load import Model, random_identity, random_weights, rope_parameters
from polarc.models.presets import get_preset, hf_config
from polarc.models.tokenizer import ByteTokenizer
from polarc.outputs import write_json
from polarc.runtime.kernels import WIDE_KERNEL_ROWS
from polarc.runtime.torch_runtime import Runtime

CASES = [("llama3-8b", 32, 8192), ("llama3-8b", 64, 4096), ("llama2-7b", 16, 4096)]
STEP_REPS = 60  # replays of one decode step (benchmarks/README.md §3: median over >= 50 steps)


def sparse_engine_in_memory(name: str, *, batch: int, max_seq: int, density: float,
                            device: torch.device) -> Engine:
    """A random-weight bf16 engine made on `device`, with random routers at `density`, as
    `load_engine` gives a written one."""
    spec, dtype = get_preset(name), torch.bfloat16
    rope = rope_parameters(spec)
    if "rope_inv_freq" in rope:  # on the device, as load_engine puts it
        rope["rope_inv_freq"] = rope["rope_inv_freq"].to(device)
    weights = random_weights(spec, seed=0, dtype=dtype, device=device)
    model = Model(spec=spec, weights=weights, tokenizer=ByteTokenizer(spec.vocab),
                  identity={"architecture": spec.architecture(), "weights_sha256": random_identity(0),
                            "source": "random"}, random_weights=True, **rope)
    return assemble(model, None, BuildConfig(out=Path("<memory>"), dtype="bf16", max_batch=batch,
                                             max_seq=max_seq, density=density))


def weight_bytes(model: Model) -> int:
    """Bytes of the stored weight tensors a step reads. The head routers' rows are included
    (the fused q/k/v GEMM reads them in dense mode too); the embedding table only when tied
    (it is then the lm_head; otherwise a step gathers B rows of it)."""
    return sum(t.numel() * t.element_size()
               for name, t in stored_weights(model.weights, model.spec).items()
               if name != "embed.weight" or model.spec.tie_embeddings)


def router_ms(rt: Runtime, bw: float) -> float:
    """All layers' router work for the batch: the router rows' bytes in the fused q/k/v GEMM
    at copy bandwidth (the top-k runs inside the KV append's launch, on data it holds)."""
    routers = rt.engine.head_routers
    rows_bytes = sum(r.weight.numel() * r.weight.element_size() for r in routers.values())
    return rows_bytes / bw * 1e3


VARIANTS = ("bf16", "fp8-kv", "fp8-all")


def as_fp8(engine: Engine, *, weights: bool) -> Engine:
    """The same engine with a float8 KV cache (scales for unit-variance K and V, keys rotated
    and offset as `polarc build` stores them) and, with `weights`, its linear layers' weights
    in float8 as `load_engine` keeps them on a GPU."""
    spec = engine.model.spec
    layout = fp8_cache_layout(KVStats(torch.full((2, spec.n_layers, spec.n_kv_heads), 4.0),
                                      torch.zeros(spec.n_layers, spec.n_kv_heads, spec.head_dim)),
                              spec.head_dim)
    model = engine.model
    if weights:
        w = dict(model.weights)
        for name in fp8_weight_names(stored_weights(w, spec)):
            w[name], w[name + "_scale"] = quantize_rows(w[name])
        tile_fp8_weights(w)  # as load_engine keeps them on CUDA
        add_part_views(w, spec)
        model = dataclasses.replace(model, weights=w)
    return dataclasses.replace(engine, model=model, kv_scales=layout.scales,
                               kv_key_offset=layout.key_offset,
                               manifest={**engine.manifest, "kv_dtype": "fp8_e4m3",
                                         "kv_key_rotation": layout.key_rotation,
                                         "kv_key_offset": True})


def case_runtime(name: str, batch: int, seqlen: int, density: float, variant: str = "bf16",
                 engine: Engine | None = None) -> Runtime:
    """A runtime on the case's engine (`variant`'s dtypes) whose `batch` rows each hold
    `seqlen` positions of random K/V, ready for a decode step at position seqlen - 1."""
    device = torch.device("cuda")
    # max_seq = seqlen: the step writes position seqlen - 1 and attends over seqlen positions
    engine = engine or sparse_engine_in_memory(name, batch=batch, max_seq=seqlen,
                                               density=density, device=device)
    if variant != "bf16":
        engine = as_fp8(engine, weights=variant == "fp8-all")
    rt = Runtime(engine, batch=batch, device=device)
    for kc, vc in zip(rt.cache.k, rt.cache.v, strict=True):
        for c in (kc, vc):  # normal values (float8 has no normal_)
            c.copy_(torch.randn(c.shape, device=device, dtype=torch.bfloat16))
    # each row's pages scattered over the pool, as a server's would be after a while
    random.Random(0).shuffle(rt.cache.free_pages)
    for b in range(batch):
        rt.cache.grow(b, seqlen)
    rt.cache.sync()
    return rt


# --linears routes: (16-bit linear weights as tiles, the kernel on their [N, K] rows)
ROUTES = {"kernel": (False, True), "cublas": (False, False), "tiles": (True, True)}


PREFILL_LENGTHS = (256, 2048)  # `--prefill`: a short chunk (the kernel's rows) and a pack


def run_case(name: str, batch: int, seqlen: int, bw: float, density: float,
             variant: str = "bf16", engine: Engine | None = None,
             profile: bool = False, linears: tuple[str, ...] = (), prefill: bool = False
             ) -> list[dict[str, Any]]:
    """Dense and sparse steps of one case; `linears`: time each mode with the 16-bit linear
    layers through each of `ROUTES`: ``tiles`` (the FP8 linear kernel on tiles), ``kernel``
    (the kernel on their ``[N, K]`` rows, `Kernels.wide_linears`) and ``cublas`` (F.linear
    on the rows), re-laid in place between layouts (`lay_out_wide_linears`), the routes of
    one layout interleaved by mode; default: the runtime's choice. Float8 weights always take
    the kernel, 16-bit rows above `WIDE_KERNEL_ROWS` never. `prefill`: each dense record
    also times prefill chunks of `PREFILL_LENGTHS` tokens (`bench_stream.prefill_speed`, on
    the engine as the route lays it out)."""
    device = torch.device("cuda")
    rt = case_runtime(name, batch, seqlen, density, variant, engine)
    engine = rt.engine
    spec = engine.model.spec
    wbytes = weight_bytes(engine.model)
    tokens = torch.randint(0, spec.vocab, (batch,), device=device)
    if variant == "fp8-all":
        linears = ("kernel",)
    elif not linears:
        linears = ("kernel" if rt.kernels.wide_linears and batch <= WIDE_KERNEL_ROWS
                   else "cublas",)
    elif batch > WIDE_KERNEL_ROWS:  # where the runtime sends 16-bit rows to cuBLAS only
        linears = tuple(dict.fromkeys("cublas" if t == "kernel" else t for t in linears))
    steps = [(m, t) for layout in (False, True) for m in ("dense", "sparse")
             for t in linears if ROUTES[t][0] == layout]
    records = []
    for mode, through in steps:
        lay_out_wide_linears(engine, tiles=ROUTES[through][0])
        rt.set_dense(mode == "dense")
        rt.kernels.wide_linears = ROUTES[through][1]
        ms = time_graph([lambda: (rt.seqlens.fill_(seqlen - 1), rt.decode_step(tokens))],
                        reps=STEP_REPS)
        ks = rt.k_per_layer
        kv = sum(ks) * batch * seqlen * spec.head_dim * 2 * rt.cache.k[0].element_size()
        floor_ms = (wbytes + kv) / bw * 1000
        rec = {"model": name, "batch": batch, "seqlen": seqlen, "mode": mode,
               "variant": variant, "linears": through,
               "density": sum(ks) / (spec.n_kv_heads * spec.n_layers), "step_ms": ms,
               "floor_ms": floor_ms, "ratio_to_floor": ms / floor_ms,
               "tokens_per_s": batch / ms * 1000, "weight_gb": wbytes / 1e9,
               "kv_gb": kv / 1e9}
        if prefill and mode == "dense":
            from polarc.benchmarks.bench_stream import prefill_speed  # (it imports this module)

            def prefill_ms() -> dict[int, float]:
                return {n: n / prefill_speed(engine, device, prompts=5, length=n)[
                    "prefill_tokens_per_s"] * 1e3 for n in PREFILL_LENGTHS}

            rec["prefill_ms"] = prefill_ms()
            print(f"{name} {variant} {through}: prefill " + ", ".join(
                f"{n} tokens {ms:.1f} ms" for n, ms in rec["prefill_ms"].items()), flush=True)
        if mode == "sparse":
            rec["router_ms"] = router_ms(rt, bw)
            rec["router_share"] = rec["router_ms"] / ms
        if profile:
            try:
                rec["kernels"] = kernel_breakdown(lambda: (rt.seqlens.fill_(seqlen - 1),
                                                           rt.decode_step(tokens)))
                print(format_kernels(rec), flush=True)
            except Exception as exc:  # a failed profile must not lose the timed table
                print(f"profile failed: {str(exc)[:200]}", flush=True)
        records.append(rec)
        print(json.dumps(rec), flush=True)
    lay_out_wide_linears(engine, tiles=False)  # the rows back, for the next variant's runtime
    for through in linears:
        dense, sparse = (r for r in records if r["linears"] == through)
        sparse["speedup"] = dense["step_ms"] / sparse["step_ms"]
        sparse["floor_ratio"] = dense["floor_ms"] / sparse["floor_ms"]
    return records


def format_kernels(rec: dict[str, Any], top: int = 12) -> str:
    """A step's kernels, largest first: µs per step, launches, share of the step's time."""
    rows = rec["kernels"]
    total = sum(r["us"] for r in rows)
    lines = [f"{rec['variant']} {rec['mode']}: kernels {total / 1e3:.2f} ms of a "
             f"{rec['step_ms']:.2f} ms step, {sum(r['launches'] for r in rows):.0f} launches"]
    lines += [f"  {r['us']:9.1f} us {r['launches']:5.0f}x {r['us'] / 1e3 / rec['step_ms']:6.1%}  "
              f"{r['kernel']}" for r in rows[:top]]
    return "\n".join(lines)


def hf_generate_tokens_per_s(name: str, batch: int, seqlen: int, new_tokens: int = 32) -> float:
    """transformers `generate` (static cache, SDPA) decode tokens/s on the same architecture."""
    import transformers

    cfg = hf_config(get_preset(name))
    cfg._attn_implementation = "sdpa"
    with torch.device("cuda"):
        hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, cfg.vocab_size, (batch, seqlen), device="cuda")
    out = {}
    for n in (1, new_tokens):
        hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                    cache_implementation="static")
        torch.cuda.synchronize()
        t = time.perf_counter()
        hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                    cache_implementation="static")
        torch.cuda.synchronize()
        out[n] = time.perf_counter() - t
    del hf
    gc.collect()
    torch.cuda.empty_cache()
    return batch * (new_tokens - 1) / (out[new_tokens] - out[1])


def format_table(records: list[dict[str, Any]]) -> str:
    lines = ["| model | B | S | dtypes | mode | density | step ms | floor ms | x floor | tok/s | "
             "speedup (floor ratio) | router share |", "|" + "---|" * 12]
    for r in records:
        if r["mode"] == "hf_generate":
            tps = f"{r['tokens_per_s']:.0f}" if "tokens_per_s" in r else r.get("error", "")
            lines.append(f"| {r['model']} | {r.get('batch', '')} | {r.get('seqlen', '')} | "
                         f"bf16 | transformers generate | 1.0 | | | | {tps} | | |")
            continue
        sp = f"{r['speedup']:.2f} ({r['floor_ratio']:.2f})" if "speedup" in r else ""
        rs = f"{r['router_share'] * 100:.1f}%" if "router_share" in r else ""
        route = {"cublas": ", cuBLAS linears", "tiles": ", tiled linears"}.get(
            r.get("linears"), "")
        lines.append(f"| {r['model']} | {r['batch']} | {r['seqlen']} | "
                     f"{r.get('variant', 'bf16')}{route} | {r['mode']} | "
                     f"{r['density']:.3f} | {r['step_ms']:.2f} | {r['floor_ms']:.2f} | "
                     f"{r['ratio_to_floor']:.2f} | {r['tokens_per_s']:.0f} | {sp} | {rs} |")
    return "\n".join(lines)


def run_e2e_benchmarks(json_path: Path | None = None, *, density: float = 0.5,
                       with_hf: bool = True, cases: list | None = None,
                       variants: tuple[str, ...] = ("bf16",),
                       profile: bool = False, linears: tuple[str, ...] = (),
                       prefill: bool = False) -> list[dict[str, Any]]:
    """Run §3 on the current CUDA device; print the table; write JSON if asked."""
    device = torch.device("cuda", torch.cuda.current_device())
    cases = cases or CASES
    bw = copy_bandwidth(device)
    env = environment(bw, device)
    print(f"{env['device']}, torch {env['torch']}, copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    records: list[dict[str, Any]] = []
    for name, batch, seqlen in cases:
        engine = sparse_engine_in_memory(name, batch=batch, max_seq=seqlen, density=density,
                                         device=device)
        for variant in variants:
            records += run_case(name, batch, seqlen, bw, density, variant, engine, profile,
                                linears, prefill)
            gc.collect()  # the last runtime's cache goes before the next one's is made
            torch.cuda.empty_cache()
            if json_path is not None:  # what is measured survives a run cut short
                write_json(json_path, {"environment": env, "records": records}, force=True)
        del engine
        gc.collect()
        torch.cuda.empty_cache()
    if with_hf:
        name, batch, seqlen = cases[-1]
        try:
            tps = hf_generate_tokens_per_s(name, batch, seqlen)
            records.append({"model": name, "batch": batch, "seqlen": seqlen, "mode": "hf_generate",
                            "tokens_per_s": tps})
        except Exception as exc:  # a baseline failing must not lose the measured table
            records.append({"model": name, "mode": "hf_generate", "error": str(exc)[:300]})
    print(format_table(records))
    if json_path is not None:
        write_json(json_path, {"environment": env, "records": records}, force=True)
    return records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=None, help="write the records to this file")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    ap.add_argument("--variants", default="bf16", help=f"comma-separated: {', '.join(VARIANTS)}")
    ap.add_argument("--cases", default=None,
                    help="comma-separated model:B:S, e.g. llama3-8b:32:8192 (default: §3's)")
    ap.add_argument("--linears", default=None,
                    help=f"comma-separated {','.join(ROUTES)}: time the 16-bit linear layers "
                         "through each (default: the runtime's choice)")
    ap.add_argument("--prefill", action="store_true",
                    help=f"also time dense prefill chunks of {PREFILL_LENGTHS} tokens")
    ap.add_argument("--profile", action="store_true",
                    help="also list each step's kernels (torch profiler over graph replays)")
    args = ap.parse_args()
    variants = tuple(args.variants.split(","))
    if not set(variants) <= set(VARIANTS):
        sys.exit(f"Error: --variants takes {', '.join(VARIANTS)}, got {args.variants!r}")
    linears = tuple(args.linears.split(",")) if args.linears else ()
    if not set(linears) <= set(ROUTES):
        sys.exit(f"Error: --linears takes {', '.join(ROUTES)}, got {args.linears!r}")
    cases = None
    if args.cases:
        cases = [(m, int(b), int(s)) for m, b, s in (c.split(":") for c in args.cases.split(","))]
    if not torch.cuda.is_available():
        sys.exit("Error: end-to-end benchmarks need a CUDA GPU (none is visible here).")
    run_e2e_benchmarks(args.json, with_hf=not args.no_hf, cases=cases, variants=variants,
                       profile=args.profile, linears=linears, prefill=args.prefill)


if __name__ == "__main__":
    main()
