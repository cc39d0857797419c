"""Leave one domain out: how a plan and its routers behave on text the calibration never saw.

For each domain of the builtin mix: calibrate (routers for every candidate k, the budget
plan) on the mix without that domain, with `polarc calibrate`'s defaults, then evaluate on
the left-out domain's held-out documents: the budget plan (routers and oracle) and uniform
2 of 3 (routers against oracle). A last row calibrates on every domain and evaluates on the
mix's own held-out text (the in-domain targets).

    python -m polarc.benchmarks.bench_lodo --json out/lodo.json
    python -m polarc.benchmarks.bench_lodo --model /path/SmolLM2.gguf --device cuda --dtype fp32
    python -m polarc.benchmarks.bench_lodo --domains code narrative none --json out/part1.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from polarc.calibration.calibrate import CalibrateConfig, fit_routers, split_tune
from polarc.calibration.data import MIX, iter_tagged, load_sequences
from polarc.calibration.plan import budget_plan, candidate_ks
from polarc.calibration.quality import evaluate

from polarc.format.plan import kv_density, uniform_plan
from polarc.models import load_model
from polarc.outputs import write_json


def one_fold(model, left_out: str | None, cfg: CalibrateConfig, eval_tokens: int) -> dict:
    n_kv, n_layers = model.spec.n_kv_heads, model.spec.n_layers
    skip = (left_out,) if left_out else ()
    pool, _ = load_sequences(MIX, model.tokenizer, seq_len=cfg.seq_len,
                             calib_tokens=cfg.tokens + cfg.tune_tokens,
                             heldout_tokens=cfg.seq_len, skip_domains=skip)
    train, tune = split_tune(pool, max(1, cfg.tune_tokens // cfg.seq_len))
    ks = candidate_ks(n_kv)
    routers_by_k, _, _ = fit_routers(model, train.ids, ks, batch_size=cfg.batch_size,
                                     max_samples=cfg.max_samples, epochs=cfg.epochs,
                                     seed=cfg.seed, domains=train.domains)
    plan, _ = budget_plan(model, tune.ids, routers_by_k, cfg.quality_budget,
                               domains=tune.domains, batch_size=cfg.batch_size,
                               cost_tokens=cfg.cost_tokens)
    _, heldout = load_sequences(MIX, model.tokenizer, seq_len=cfg.seq_len, calib_tokens=0,
                                heldout_tokens=eval_tokens,
                                domains=(left_out,) if left_out else ())
    row: dict = {"left_out": left_out or "(none: all domains)", "k_per_layer": plan,
                 "kv_density": kv_density(plan, n_kv), "heldout_tokens": heldout.n_tokens}
    for name, p in (("plan", plan), ("uniform_2of3", uniform_plan(n_layers, n_kv, 2 / 3))):
        routers = {layer: routers_by_k[k][layer] for layer, k in enumerate(p) if k < n_kv}
        rep = evaluate(model, heldout.ids, p, routers=routers, kinds=("dense", "sparse", "oracle"),
                       domains=heldout.domains).as_json()
        d = rep["ppl_dense"]
        row[name] = {"routers_rise_pct": (rep["ppl_sparse"] / d - 1) * 100,
                     "oracle_rise_pct": (rep["ppl_oracle"] / d - 1) * 100,
                     "router_recall": rep["router_recall"], "ppl_dense": d,
                     "kv_density": rep["kv_density"], "by_domain": rep.get("by_domain")}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--eval-tokens", type=int, default=16384, help="held-out tokens per fold")
    ap.add_argument("--domains", nargs="*", default=None,
                    help="folds to run, 'none' for the in-domain row (default: every domain, "
                         "then none); split a long run over several calls this way")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = load_model(args.model, dtype=dtype, device=args.device, stream=True)
    cfg = CalibrateConfig(out=Path("unused"))
    folds = ([None if d == "none" else d for d in args.domains] if args.domains is not None
             else [*sorted({d for d, _ in iter_tagged(MIX)}), None])
    rows = []
    for left_out in folds:
        t0 = time.time()
        row = one_fold(model, left_out, cfg, args.eval_tokens)
        row["seconds"] = round(time.time() - t0, 1)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "k_per_layer"}), flush=True)
        if args.json is not None:  # each fold as it ends: a run cut short keeps what it did
            write_json(args.json, rows, force=True)
    lines = ["| left out | plan KV density | plan: routers rise | plan: oracle rise | "
             "uniform 2/3: routers / oracle rise | ratio | recall (2/3) |", "|" + "---|" * 7]
    for r in rows:
        p, u = r["plan"], r["uniform_2of3"]
        ratio = u["routers_rise_pct"] / u["oracle_rise_pct"] if u["oracle_rise_pct"] > 0 else float("nan")
        lines.append(f"| {r['left_out']} | {r['kv_density']:.3f} | {p['routers_rise_pct']:+.2f}% | "
                     f"{p['oracle_rise_pct']:+.2f}% | {u['routers_rise_pct']:+.2f}% / "
                     f"{u['oracle_rise_pct']:+.2f}% | {ratio:.2f} | {u['router_recall']:.3f} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
