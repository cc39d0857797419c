"""benchmarks/README.md §4: quality under sparsity on the embedded SmolLM2-135M-Instruct.

Collects and trains routers once, measures per-layer costs once, then evaluates on held-out
text: uniform 2 of 3 and 1 of 3, and the automatic plan for budgets 1%, 3% and 10%.

    python -m polarc.benchmarks.bench_quality --json out/quality.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from polarc.calibration.calibrate import fit_routers, split_tune
from polarc.calibration.data import load_sequences
from polarc.calibration.plan import (
    TUNE_SHARE,
    candidate_ks,
    measure_layer_costs,
    prepare_tune,
    risk_costs,
    risky_moves,
    search_plan,
    tune_perplexity,
)
from polarc.calibration.quality import evaluate

from polarc.format.plan import uniform_plan
from polarc.models import load_model
from polarc.outputs import write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tokens", type=int, default=65536, help="router training tokens")
    ap.add_argument("--tune-tokens", type=int, default=4096)
    ap.add_argument("--eval-tokens", type=int, default=16384, help="held-out tokens")
    ap.add_argument("--budgets", type=float, nargs="*", default=[1.0, 3.0, 10.0])
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    t0 = time.time()
    torch.manual_seed(0)
    model = load_model("smollm2-135m")
    n_kv, n_layers = model.spec.n_kv_heads, model.spec.n_layers
    pool, heldout = load_sequences("builtin", model.tokenizer, seq_len=512,
                                   calib_tokens=args.tokens + args.tune_tokens,
                                   heldout_tokens=args.eval_tokens)
    n_tune = args.tune_tokens // 512
    train, tune_rows = split_tune(pool, n_tune)
    train_ids, tune_ids = train.ids, tune_rows.ids
    ks = candidate_ks(n_kv)
    routers_by_k, _, _ = fit_routers(model, train_ids, ks, batch_size=8, max_samples=args.tokens,
                                     epochs=16, seed=0)
    tune = prepare_tune(model, tune_ids, tune_rows.domains, 8)
    costs = measure_layer_costs(model, tune, routers_by_k)
    print(f"setup {time.time() - t0:.0f}s; tuning ppl dense {tune.ppl_dense.overall:.3f}", flush=True)

    plans = {"uniform 2/3": uniform_plan(n_layers, n_kv, 2 / 3),
             "uniform 1/3": uniform_plan(n_layers, n_kv, 1 / 3)}
    # calibrate's move rule at each budget: the oracle runs for the risky moves of the
    # largest budget (a superset), and each budget prices only its own with them
    targets = {budget: budget * TUNE_SHARE for budget in args.budgets}
    oracle = measure_layer_costs(model, tune, routers_by_k, kind="oracle",
                                 moves=risky_moves(costs, max(targets.values())))
    for budget, target in targets.items():
        risky = set(risky_moves(costs, target))
        mine = {layer: {k: c for k, c in kc.items() if (layer, k) in risky}
                for layer, kc in oracle.items()}
        plan, _, _ = search_plan(model, tune, risk_costs(costs, mine), routers_by_k, budget)
        plans[f"budget {budget:g}%"] = plan
    rows = []
    for name, plan in plans.items():
        routers = {layer: routers_by_k[k][layer] for layer, k in enumerate(plan) if k < n_kv}
        tune_ppl = tune_perplexity(model, tune, plan, routers)
        rep = evaluate(model, heldout.ids, plan, routers=routers).as_json()
        row = {"plan": name, "k_per_layer": plan, **rep,
               "tune_rise_pct": tune_ppl.rise(tune.ppl_dense)}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "k_per_layer"}), flush=True)

    head = ("| plan | KV density | ppl dense | routers | oracle | random | routers rise | oracle rise "
            "| rise ratio | top-1 agree | KL | router recall |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        d = r["ppl_dense"]
        rise_s, rise_o = (r["ppl_sparse"] / d - 1) * 100, (r["ppl_oracle"] / d - 1) * 100
        ratio = rise_s / rise_o if rise_o > 0 else float("nan")
        lines.append(
            f"| {r['plan']} | {r['kv_density']:.3f} | {d:.3f} | {r['ppl_sparse']:.3f} | "
            f"{r['ppl_oracle']:.3f} | {r['ppl_random']:.3f} | {rise_s:+.2f}% | {rise_o:+.2f}% | "
            f"{ratio:.2f} | {r['top1_agreement']:.3f} | {r['kl']:.4f} | {r['router_recall']:.3f} |")
    print("\n".join(lines))
    print(f"total {time.time() - t0:.0f}s; held-out tokens {heldout.n_tokens}")
    if args.json is not None:
        write_json(args.json, rows, force=True)


if __name__ == "__main__":
    main()
