"""BENCHMARKS.md §3: end-to-end decode step time of dense and sparse engines on the GPU.

Random-weight Llama-3-8B and Llama-2-7B architectures in bf16, built in memory; the KV cache
is filled with random values at the case's length (prefill is excluded from the timing);
each step is a captured CUDA graph, timed over many replays (median). The floor of a step is
(weight bytes + KV bytes read) / measured copy bandwidth.
"""

from __future__ import annotations

import gc
import json
import statistics
from pathlib import Path
from typing import Any

import torch

from polarc.exporters.engine import random_routers
from polarc.models.load import _random_model
from polarc.models.presets import get_preset
from polarc.runtime.decode import Runtime
from polarc.runtime.engine import Engine

CASES = [("llama3-8b", 32, 8192), ("llama3-8b", 64, 4096), ("llama2-7b", 16, 4096)]


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a large device-to-device copy (read + write)."""
    src = torch.randn(1 << 29, device=device, dtype=torch.bfloat16)  # 1 GiB
    dst = torch.empty_like(src)
    times = []
    for _ in range(12):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1000)
    del src, dst
    return 2 * (1 << 30) / statistics.median(times[2:])


def time_graph(fn, n: int = 60) -> float:
    """Median ms of `fn` replays."""
    times = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times[5:])


def weight_bytes(model) -> int:
    skip = {"embed.weight"} if not model.spec.tie_embeddings else set()
    seen, total = set(), 0
    for name, t in model.weights.items():
        if name in skip or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def router_ms(rt: Runtime, bw: float) -> float:
    """All layers' router work for the batch: the top-k over the scores, timed as its own CUDA
    graph, plus the router rows' bytes in the fused q/k/v/router GEMM at copy bandwidth."""
    scores = torch.randn(rt.batch, rt.spec.n_kv_heads, device=rt.device, dtype=rt.model.dtype)
    layers = list(rt.engine.head_routers)
    weight_bytes = sum(r.weight.numel() * scores.element_size()
                       for r in rt.engine.head_routers.values())

    def routers() -> None:
        for layer in layers:
            rt.groups_for(layer, scores)

    routers()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        routers()
    return time_graph(g.replay) + weight_bytes / bw * 1000


def run_case(name: str, batch: int, seqlen: int, bw: float, density: float) -> list[dict[str, Any]]:
    device = torch.device("cuda")
    spec = get_preset(name)
    model = _random_model(spec, seed=0, dtype=torch.bfloat16, device=device)
    plan, routers = random_routers(model, density, seed=0)
    routers = {k: type(r)(weight=r.weight.to(device, torch.bfloat16),
                          bias=r.bias.to(device, torch.bfloat16), k=r.k, recall=r.recall)
               for k, r in routers.items()}
    manifest = {"limits": {"max_batch": batch, "max_seq": seqlen + 8}}
    engine = Engine(path=Path("<memory>"), manifest=manifest, model=model, k_per_layer=plan,
                    head_routers=routers, mlp_routers={})
    rt = Runtime(engine, batch=batch, device=device)
    for kc, vc in zip(rt.k_cache, rt.v_cache, strict=True):
        kc.normal_()
        vc.normal_()
    rt.seqlens.fill_(seqlen - 1)
    wbytes = weight_bytes(model)
    tokens = torch.randint(0, spec.vocab, (batch,), device=device)
    records = []
    for mode in ("dense", "sparse"):
        rt.set_dense(mode == "dense")
        rt.capture()

        def step() -> None:
            rt.seqlens.fill_(seqlen - 1)
            rt.step(tokens)

        ms = time_graph(step)
        ks = rt.k_per_layer
        kv = sum(ks) * batch * seqlen * spec.head_dim * 2 * 2
        floor_ms = (wbytes + kv) / bw * 1000
        rec = {"model": name, "batch": batch, "seqlen": seqlen, "mode": mode,
               "density": sum(ks) / (spec.n_kv_heads * spec.n_layers), "step_ms": ms,
               "floor_ms": floor_ms, "ratio_to_floor": ms / floor_ms,
               "tokens_per_s": batch / ms * 1000, "weight_gb": wbytes / 1e9, "kv_gb": kv / 1e9}
        if mode == "sparse":
            rec["router_ms"] = router_ms(rt, bw)
            rec["router_share"] = rec["router_ms"] / ms
        records.append(rec)
        print(json.dumps(rec), flush=True)
    dense, sparse = records
    sparse["speedup"] = dense["step_ms"] / sparse["step_ms"]
    sparse["floor_ratio"] = dense["floor_ms"] / sparse["floor_ms"]
    return records


def hf_generate_tokens_per_s(name: str, batch: int, seqlen: int, new_tokens: int = 32) -> float:
    """transformers `generate` (static cache, SDPA) decode tokens/s on the same architecture."""
    import time

    import transformers

    from polarc.models.presets import hf_config

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


def run_e2e_benchmarks(json_path: Path | None = None, *, density: float = 0.5,
                       with_hf: bool = True, cases: list | None = None) -> list[dict[str, Any]]:
    device = torch.device("cuda")
    bw = copy_bandwidth(device)
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, copy bandwidth "
          f"{bw / 1e12:.2f} TB/s", flush=True)
    records: list[dict[str, Any]] = []
    for name, batch, seqlen in cases or CASES:
        records += run_case(name, batch, seqlen, bw, density)
        gc.collect()
        torch.cuda.empty_cache()
    if with_hf:
        name, batch, seqlen = (cases or CASES)[-1]
        try:
            tps = hf_generate_tokens_per_s(name, batch, seqlen)
            records.append({"model": name, "batch": batch, "seqlen": seqlen, "mode": "hf_generate",
                            "tokens_per_s": tps})
        except Exception as exc:  # a baseline failing must not lose the measured table
            records.append({"model": name, "mode": "hf_generate", "error": str(exc)[:300]})
    lines = ["| model | B | S | mode | density | step ms | floor ms | x floor | tok/s | "
             "speedup (floor ratio) | router share |", "|" + "---|" * 11]
    for r in records:
        if r["mode"] == "hf_generate":
            tps = f"{r['tokens_per_s']:.0f}" if "tokens_per_s" in r else r.get("error", "")
            lines.append(f"| {r['model']} | {r.get('batch', '')} | {r.get('seqlen', '')} | "
                         f"transformers generate | 1.0 | | | | {tps} | | |")
            continue
        sp = f"{r['speedup']:.2f} ({r['floor_ratio']:.2f})" if "speedup" in r else ""
        rs = f"{r['router_share'] * 100:.1f}%" if "router_share" in r else ""
        lines.append(f"| {r['model']} | {r['batch']} | {r['seqlen']} | {r['mode']} | "
                     f"{r['density']:.3f} | {r['step_ms']:.2f} | {r['floor_ms']:.2f} | "
                     f"{r['ratio_to_floor']:.2f} | {r['tokens_per_s']:.0f} | {sp} | {rs} |")
    table = "\n".join(lines)
    print(table)
    if json_path is not None:
        json_path.write_text(json.dumps({"copy_bandwidth_bytes_per_s": bw,
                                         "device": torch.cuda.get_device_name(),
                                         "torch": torch.__version__, "records": records},
                                        indent=2))
    return records
