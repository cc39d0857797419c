"""`polarc calibrate`: collect → train routers → choose a density plan → write the artifact."""

from __future__ import annotations

import datetime
import math
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from polarc.calibration import artifact
from polarc.calibration.collect import LayerSamples, check_gpu_room, collect_layers
from polarc.calibration.data import Sequences, balanced_shares, load_sequences
from polarc.calibration.plan import PlanRun, TuneSet, budget_plan, candidate_ks, run_plans
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
    dataset: str = "mix"
    seq_len: int = 512
    tokens: int = 65536  # calibration tokens for router training
    tune_tokens: int = 8192  # tuning tokens (plan search), disjoint from training tokens
    cost_tokens: int = 2560  # of the tuning tokens: those the per-(layer, k) costs run on
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
    domains: tuple[str, ...] = ()  # only these domains of the dataset (default: all)
    skip_domains: tuple[str, ...] = ()  # none of these


def split_tune(pool: Sequences, n_tune: int) -> tuple[Sequences, Sequences]:
    """(training, tuning) sequences: about `n_tune` tuning rows, an equal share from every
    domain (at most a quarter of its rows, at least one where it has two), each share spread
    evenly over its domain's rows, so the plan is chosen on text like the whole calibration
    set in every domain, not on whatever documents come last."""
    by_domain: dict[str, list[int]] = {}
    for i, d in enumerate(pool.domains):
        by_domain.setdefault(d, []).append(i)
    room = {d: max(1, len(r) // 4) if len(r) > 1 else 0 for d, r in by_domain.items()}
    shares = balanced_shares(room, max(n_tune, 1))
    is_tune = torch.zeros(pool.ids.shape[0], dtype=torch.bool)
    for d, rows in by_domain.items():
        if shares[d]:
            pick = torch.linspace(0, len(rows) - 1, shares[d]).round().long().unique()
            is_tune[torch.tensor(rows)[pick]] = True
    if not is_tune.any():
        is_tune[-1] = True
    return pool.rows(torch.nonzero(~is_tune)[:, 0]), pool.rows(torch.nonzero(is_tune)[:, 0])


def peak_memory(device: torch.device) -> dict[str, float | None]:
    """Peak host RSS of this process and peak GPU memory allocated, in GiB."""
    gpu = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"peak_host_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "peak_gpu_gib": gpu}


class _Clock:
    """Stage timings; each finished stage is also a line above the progress bars (and in a
    log, where the bars do not draw)."""

    def __init__(self, progress: Progress) -> None:
        self.laps: dict[str, float] = {}
        self.last = time.perf_counter()
        self.progress = progress

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self.last, 1)
        self.last = now
        if not self.progress.disable:
            self.progress.console.print(f"{name.replace('_', ' ')}: {self.laps[name]:.1f} s",
                                        highlight=False)


def fit_routers(model: Model, train_ids: torch.Tensor, ks: list[int], *, batch_size: int,
                max_samples: int, epochs: int, seed: int, mlp_batch: int = 32,
                mlp_recall: float = 0.99, domains: list[str] | None = None,
                kv_stats: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
                progress: Progress | None = None
                ) -> tuple[dict[int, dict[int, HeadRouter]], dict[int, MLPRouter], int]:
    """Collect layer by layer and train each layer's routers as its samples arrive:
    `routers[k][layer]`, one per k the plan may use, for every layer but the first; MLP
    routers for ReLU models; and the positions kept per layer. With each row's domain
    (`domains`), the head routers' recall is also measured per domain; `kv_stats`, when
    given, receives each layer's largest |K| and |V| per group [2, Hkv] and mean K per group
    [Hkv, D] (an FP8 cache's scales and key offsets)."""
    names = sorted(set(domains)) if domains else None
    row_domain = (torch.tensor([names.index(d) for d in domains])
                  if domains and names else None)
    routers: dict[int, dict[int, HeadRouter]] = {k: {} for k in ks}
    mlp: dict[int, MLPRouter] = {}

    def train(samples: LayerSamples) -> None:
        layer = samples.layer
        if kv_stats is not None and samples.kv_absmax is not None:
            kv_stats[layer] = (samples.kv_absmax, samples.key_mean)
        if layer > 0 and ks:
            trained = train_head_routers(samples.attn_in, samples.group_norms, ks,
                                         epochs=epochs, seed=seed, domain=samples.domain,
                                         domain_names=names)
            for k in ks:
                routers[k][layer] = trained[k]
        if samples.mlp_in is not None:
            mlp[layer] = train_mlp_router(samples.mlp_in, samples.mlp_active, batch_rows=mlp_batch,
                                          union_recall_target=mlp_recall, seed=seed + layer)

    kept = collect_layers(model, train_ids, train, batch_size=batch_size,
                          max_samples=max_samples, seed=seed, row_domain=row_domain,
                          progress=progress)
    return routers, mlp, kept


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
    check_gpu_room(model, cfg.batch_size, cfg.seq_len)
    spec = model.spec
    torch.manual_seed(cfg.seed)
    pool, _ = load_sequences(cfg.dataset, model.tokenizer, seq_len=cfg.seq_len,
                             calib_tokens=cfg.tokens + cfg.tune_tokens, heldout_tokens=cfg.seq_len,
                             domains=cfg.domains, skip_domains=cfg.skip_domains)
    n_tune = max(1, min(math.ceil(cfg.tune_tokens / cfg.seq_len), pool.ids.shape[0] // 4))
    if pool.ids.shape[0] < 2:
        raise PolarcError(f"dataset {cfg.dataset!r} yields {pool.n_tokens} calibration tokens: "
                          "need at least two sequences (training and tuning)",
                          hint="give more text or a smaller --seq-len")
    train, tune_rows = split_tune(pool, n_tune)
    train_ids, tune_ids = train.ids, tune_rows.ids

    clock = _Clock(progress)
    n_kv = spec.n_kv_heads
    ks = [groups_for_density(cfg.density, n_kv)] if cfg.density is not None else candidate_ks(n_kv)
    ks = [k for k in ks if k < n_kv]
    kv_stats: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    routers_by_k, mlp_routers, n_samples = fit_routers(
        model, train_ids, ks, batch_size=cfg.batch_size, max_samples=cfg.max_samples,
        epochs=cfg.epochs, seed=cfg.seed, mlp_batch=cfg.mlp_batch, mlp_recall=cfg.mlp_recall,
        domains=train.domains, kv_stats=kv_stats, progress=progress)
    clock.lap("collect_and_train")
    search = None
    if cfg.density is not None or not ks:
        plan = uniform_plan(spec.n_layers, n_kv, cfg.density if cfg.density is not None else 1.0)
        mode = "uniform"
    else:
        plan, search = budget_plan(model, tune_ids, routers_by_k, cfg.quality_budget,
                                   domains=tune_rows.domains, batch_size=cfg.batch_size,
                                   cost_tokens=cfg.cost_tokens,
                                   progress=progress)
        mode = "budget"
    head_routers = {layer: routers_by_k[k][layer] for layer, k in enumerate(plan) if k < n_kv}

    # Quality on the tuning split: dense and the chosen plan (the search measured both on the
    # same text) and, for the report, uniform plans, all in one pass over the layers.
    clock.lap("plan")
    uniform = {k: [n_kv] + [k] * (spec.n_layers - 1) for k in ks}
    runs = [PlanRun(uplan, routers_by_k[k]) for k, uplan in uniform.items()]
    if search is None or search.ppl_plan is None:
        runs = [PlanRun([n_kv] * spec.n_layers, {}), PlanRun(plan, head_routers)] + runs
    tune = TuneSet.of(model, tune_ids, tune_rows.domains, cfg.batch_size)
    measured = run_plans(model, tune, runs, progress, "measuring plans")
    if search is None or search.ppl_plan is None:
        ppl_dense, ppl_plan, *ppl_uniform = measured
    else:
        ppl_dense, ppl_plan, ppl_uniform = search.ppl_dense, search.ppl_plan, measured
    curve = [{"k": k, "kv_density": kv_density(uplan, n_kv), "ppl": ppl.overall,
              "increase_pct": ppl.overall_rise(ppl_dense),
              "worst_domain_increase_pct": ppl.rise(ppl_dense)}
             for (k, uplan), ppl in zip(uniform.items(), ppl_uniform, strict=True)]
    by_domain = {d: {"ppl_dense": ppl_dense.by_domain[d], "ppl_plan": p,
                     "increase_pct": (p / ppl_dense.by_domain[d] - 1) * 100,
                     "tokens": tune_rows.domains.count(d) * (cfg.seq_len - 1)}
                 for d, p in ppl_plan.by_domain.items()}

    clock.lap("measure_plans")
    layers = []
    for layer in range(spec.n_layers):
        k = plan[layer]
        entry: dict[str, Any] = {"layer": layer, "k": k, "density": k / n_kv,
                                 "router_recall": head_routers[layer].recall
                                 if layer in head_routers else 1.0}
        if layer in head_routers and head_routers[layer].recall_by_domain:
            entry["router_recall_by_domain"] = head_routers[layer].recall_by_domain
        if layer in kv_stats:
            entry["kv_absmax"] = {"k": kv_stats[layer][0][0].tolist(),
                                  "v": kv_stats[layer][0][1].tolist()}
        if layer in mlp_routers:
            m = mlp_routers[layer]
            entry.update(mlp_k=m.k, mlp_density=m.k / spec.intermediate, mlp_batch=m.batch,
                         mlp_union_recall=m.union_recall, mlp_recall=m.recall)
        layers.append(entry)
    meta: dict[str, Any] = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": model_record(model),
        "dataset": {"name": cfg.dataset, "seq_len": cfg.seq_len,
                    "domains": sorted(set(pool.domains)), "skip_domains": list(cfg.skip_domains),
                    "train_tokens": int(train_ids.numel()), "tune_tokens": int(tune_ids.numel()),
                    "heldout": "every 10th document, never used by calibration"},
        "samples_per_layer": n_samples,
        "plan": {"mode": mode, "density": cfg.density,
                 "quality_budget_pct": cfg.quality_budget if mode == "budget" else None,
                 "k_per_layer": plan, "n_kv_groups": n_kv, "kv_density": kv_density(plan, n_kv)},
        "layers": layers,
        "quality": {
            "tune": {"ppl_dense": ppl_dense.overall, "ppl_plan": ppl_plan.overall,
                     "increase_pct": ppl_plan.overall_rise(ppl_dense),
                     "worst_domain_increase_pct": ppl_plan.rise(ppl_dense),
                     "kv_density": kv_density(plan, n_kv), "by_domain": by_domain},
            "budget_rule": "every domain of the tuning text within the budget (worst domain)",
            "curve": curve,
            "layer_costs_pct": search.layer_costs if search else None,
            "oracle_layer_costs_pct": search.oracle_layer_costs if search else None,
            "move_rule": "routers' cost; moves to the fewest groups add the routers' excess "
                         "over the oracle's (twice the routers' cost where the oracle did "
                         "not run)" if search else None,
            "search_tries": search.tries if search else None,
        },
        "timings_s": clock.laps,
        "memory": peak_memory(model.device),
        "settings": {"epochs": cfg.epochs, "cost_tokens": cfg.cost_tokens,
                     "max_samples": cfg.max_samples, "seed": cfg.seed,
                     "mlp_batch": cfg.mlp_batch, "mlp_recall_target": cfg.mlp_recall,
                     "device": model.device.type,
                     "dtype": str(model.dtype).removeprefix("torch.")},
    }
    with writing(cfg.out, force=cfg.force, folder=True, ours=artifact.is_calibration_folder,
                 inputs=cfg.inputs) as tmp:
        artifact.write(tmp, meta, head_routers, mlp_routers,
                       key_means={layer: mean for layer, (_, mean) in kv_stats.items()})
        plot_report(meta, tmp / artifact.REPORT_FILE)
    return meta

