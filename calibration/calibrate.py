"""`polarc calibrate`: collect → train routers → choose a density plan → write the artifact."""

from __future__ import annotations

import datetime
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from polarc.calibration import artifact
from polarc.calibration.collect import Samples, collect
from polarc.calibration.data import load_sequences
from polarc.calibration.plan import budget_plan, candidate_ks, tune_perplexity
from polarc.calibration.report import plot_report
from polarc.calibration.routers import train_head_routers, train_mlp_router
from rich.progress import Progress

from polarc.errors import PolarcError
from polarc.format.plan import groups_for_density, kv_density, uniform_plan
from polarc.format.routers import HeadRouter, MLPRouter
from polarc.models.load import Model, model_record
from polarc.outputs import check_output, writing


@dataclass
class CalibrateConfig:
    out: Path
    dataset: str = "builtin"
    seq_len: int = 512
    tokens: int = 65536  # calibration tokens for router training
    tune_tokens: int = 4096  # tuning tokens (plan search), disjoint from training tokens
    density: float | None = None  # uniform plan; None = quality budget
    quality_budget: float = 3.0  # percent perplexity rise allowed
    batch_size: int = 8
    max_samples: int = 65536  # router samples kept per layer (memory bound)
    mlp_batch: int = 32
    mlp_recall: float = 0.99
    epochs: int = 16
    seed: int = 0
    force: bool = False
    inputs: tuple[Path, ...] = ()  # files the run reads, which --out must never replace


def split_tune(ids: torch.Tensor, n_tune: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(training, tuning) sequences; the tuning ones spread evenly over the pool, so the plan
    is chosen on text like the whole calibration set, not on whatever documents come last."""
    rows = torch.linspace(0, ids.shape[0] - 1, n_tune).round().long().unique()
    is_tune = torch.zeros(ids.shape[0], dtype=torch.bool)
    is_tune[rows] = True
    return ids[~is_tune], ids[is_tune]


class _Clock:
    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self.last, 1)
        self.last = now


def train_all_head_routers(samples: Samples, ks: list[int], *, epochs: int, seed: int,
                           progress: Progress | None = None) -> dict[int, dict[int, HeadRouter]]:
    """`routers[k][layer]`: for every layer but the first, one router per k it may keep."""
    routers: dict[int, dict[int, HeadRouter]] = {}
    task = progress.add_task("training routers", total=len(ks)) if progress else None
    for k in ks:
        fitted = train_head_routers(samples.attn_in[1:], samples.group_norms[1:], k,
                                    epochs=epochs, seed=seed)
        routers[k] = {layer: r for layer, r in enumerate(fitted, start=1)}
        if progress is not None:
            progress.advance(task)
    return routers


def calibrate(model: Model, cfg: CalibrateConfig, progress: Progress) -> dict[str, Any]:
    """Run the whole calibration; the artifact appears at `cfg.out` only if every step works."""
    if cfg.density is not None:
        groups_for_density(cfg.density, model.spec.n_kv_heads)  # validates the range
    if cfg.quality_budget < 0:
        raise PolarcError(f"--quality-budget must be >= 0, got {cfg.quality_budget}")
    if cfg.seq_len > model.spec.max_positions:
        raise PolarcError(f"--seq-len {cfg.seq_len} exceeds {model.spec.name}'s "
                          f"{model.spec.max_positions} positions")
    if cfg.tokens < cfg.seq_len:
        raise PolarcError(f"--tokens {cfg.tokens} is less than one sequence (--seq-len "
                          f"{cfg.seq_len})")
    check_output(cfg.out, force=cfg.force, folder=True, ours=artifact.is_calibration_folder,
                 inputs=cfg.inputs)
    spec = model.spec
    torch.manual_seed(cfg.seed)
    pool, _ = load_sequences(cfg.dataset, model.tokenizer, seq_len=cfg.seq_len,
                             calib_tokens=cfg.tokens + cfg.tune_tokens, heldout_tokens=cfg.seq_len)
    n_tune = max(1, min(math.ceil(cfg.tune_tokens / cfg.seq_len), pool.ids.shape[0] // 4))
    if pool.ids.shape[0] < 2:
        raise PolarcError(f"dataset {cfg.dataset!r} yields {pool.n_tokens} calibration tokens: "
                          "need at least two sequences (training and tuning)",
                          hint="give more text or a smaller --seq-len")
    train_ids, tune_ids = split_tune(pool.ids, n_tune)

    clock = _Clock()
    samples = collect(model, train_ids, batch_size=cfg.batch_size, max_samples=cfg.max_samples,
                      seed=cfg.seed, progress=progress)

    n_kv = spec.n_kv_heads
    ks = [groups_for_density(cfg.density, n_kv)] if cfg.density is not None else candidate_ks(n_kv)
    ks = [k for k in ks if k < n_kv]
    clock.lap("collect")
    routers_by_k = train_all_head_routers(samples, ks, epochs=cfg.epochs, seed=cfg.seed,
                                      progress=progress)

    mlp_routers: dict[int, MLPRouter] = {}
    clock.lap("train_head_routers")
    if spec.relu_mlp:
        task = progress.add_task("training MLP routers", total=spec.n_layers)
        for layer in range(spec.n_layers):
            mlp_routers[layer] = train_mlp_router(
                samples.mlp_in[layer], samples.mlp_active[layer], batch_rows=cfg.mlp_batch,
                union_recall_target=cfg.mlp_recall, seed=cfg.seed + layer)
            progress.advance(task)

    n_samples = int(samples.attn_in.shape[1])
    del samples  # the largest allocation of the run; plan search needs the memory

    clock.lap("train_mlp_routers")
    search = None
    if cfg.density is not None or not ks:
        plan = uniform_plan(spec.n_layers, n_kv, cfg.density if cfg.density is not None else 1.0)
        mode = "uniform"
    else:
        plan, search = budget_plan(model, tune_ids, routers_by_k, cfg.quality_budget,
                                   batch_size=cfg.batch_size, progress=progress)
        mode = "budget"
    head_routers = {layer: routers_by_k[k][layer] for layer, k in enumerate(plan) if k < n_kv}

    # Quality on the tuning split: the chosen plan and, for the report, uniform plans.
    tune_batches = list(tune_ids.split(cfg.batch_size))
    clock.lap("plan")
    task = progress.add_task("measuring plans", total=1 + len(ks) + 1)
    ppl_dense = search.ppl_dense if search else tune_perplexity(model, tune_batches,
                                                                 [n_kv] * spec.n_layers, {})
    progress.advance(task)
    ppl_plan = tune_perplexity(model, tune_batches, plan, head_routers)
    progress.advance(task)
    curve = []
    for k in ks:
        uplan = [n_kv] + [k] * (spec.n_layers - 1)
        ppl = tune_perplexity(model, tune_batches, uplan, routers_by_k[k])
        curve.append({"k": k, "kv_density": kv_density(uplan, n_kv),
                      "ppl": ppl, "increase_pct": (ppl / ppl_dense - 1) * 100})
        progress.advance(task)

    clock.lap("measure_plans")
    layers = []
    for layer in range(spec.n_layers):
        k = plan[layer]
        entry: dict[str, Any] = {"layer": layer, "k": k, "density": k / n_kv,
                                 "router_recall": head_routers[layer].recall
                                 if layer in head_routers else 1.0}
        if layer in mlp_routers:
            m = mlp_routers[layer]
            entry.update(mlp_k=m.k, mlp_density=m.k / spec.intermediate, mlp_batch=m.batch,
                         mlp_union_recall=m.union_recall, mlp_recall=m.recall)
        layers.append(entry)
    meta: dict[str, Any] = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": model_record(model),
        "dataset": {"name": cfg.dataset, "seq_len": cfg.seq_len,
                    "train_tokens": int(train_ids.numel()), "tune_tokens": int(tune_ids.numel()),
                    "heldout": "every 10th document, never used by calibration"},
        "samples_per_layer": n_samples,
        "plan": {"mode": mode, "density": cfg.density,
                 "quality_budget_pct": cfg.quality_budget if mode == "budget" else None,
                 "k_per_layer": plan, "n_kv_groups": n_kv, "kv_density": kv_density(plan, n_kv)},
        "layers": layers,
        "quality": {
            "tune": {"ppl_dense": ppl_dense, "ppl_plan": ppl_plan,
                     "increase_pct": (ppl_plan / ppl_dense - 1) * 100,
                     "kv_density": kv_density(plan, n_kv)},
            "curve": curve,
            "layer_costs_pct": search.layer_costs if search else None,
            "search_tries": search.tries if search else None,
        },
        "timings_s": clock.laps,
        "settings": {"epochs": cfg.epochs, "max_samples": cfg.max_samples, "seed": cfg.seed,
                     "mlp_batch": cfg.mlp_batch, "mlp_recall_target": cfg.mlp_recall},
    }
    with writing(cfg.out, force=cfg.force, folder=True, ours=artifact.is_calibration_folder,
                 inputs=cfg.inputs) as tmp:
        artifact.write(tmp, meta, head_routers, mlp_routers)
        plot_report(meta, tmp / artifact.REPORT_FILE)
    return meta

