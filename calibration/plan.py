"""Density plans: how many KV groups each layer keeps per row at decode time.

Layer 0 is always dense; `polarc.format.plan` has the uniform plan (round(X * Hkv) groups,
at least one, on the other layers, as the paper does). `budget_plan` picks per-layer k so
that perplexity on the tuning split rises at most P percent while reading as few KV bytes as
possible: it measures each (layer, k) alone, solves the multiple-choice knapsack on those
costs, measures the whole plan and tightens the internal budget until the measured plan
fits, then lowers single layers greedily while the measured plan still fits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from polarc.calibration.quality import make_selector
from rich.progress import Progress

from polarc.format.plan import groups_for_density, kv_density
from polarc.format.routers import HeadRouter
from polarc.models.forward import forward
from polarc.models.load import Model

DENSITY_GRID = (0.25, 0.375, 0.5, 0.625, 0.75, 0.875)
# A (layer, k) measured as free or helpful alone still costs something in company (costs do
# not add up); pricing every move at least this much keeps the search able to shrink a plan
# all the way back to dense.
MIN_MOVE_COST_PCT = 0.02
# The tuning text is small (4k tokens by default) and the search pushes a plan to the edge of
# whatever it aims at there, so held-out text rises a little more: aim at this share of the
# budget on the tuning text (measured on SmolLM2: a plan at +2.7% on tuning was +3.1% held out).
TUNE_SHARE = 0.85


def candidate_ks(n_kv: int) -> list[int]:
    """The sparse k values a budget search considers (grid densities, deduplicated)."""
    return sorted({groups_for_density(d, n_kv) for d in DENSITY_GRID} - {n_kv})


@dataclass
class PlanSearch:
    """What the budget search measured, for the artifact and the report."""

    ppl_dense: float
    layer_costs: dict[str, dict[str, float]] = field(default_factory=dict)  # layer -> k -> %
    tries: list[dict[str, float]] = field(default_factory=list)


def _nll(model: Model, ids: torch.Tensor, logits: torch.Tensor) -> float:
    logp = F.log_softmax(logits[:, :-1].float(), -1)
    return -logp.gather(-1, ids[:, 1:, None].to(logp.device)).sum().item()


def tune_perplexity(model: Model, batches: list[torch.Tensor], k_per_layer: list[int],
                    routers: dict[int, HeadRouter]) -> float:
    n_kv = model.spec.n_kv_heads
    select = make_selector("sparse", k_per_layer, n_kv, routers=routers)
    nll = sum(_nll(model, ids, forward(model, ids, select=select)) for ids in batches)
    return math.exp(nll / sum(b[:, 1:].numel() for b in batches))


def _solve(costs: dict[int, dict[int, float]], n_layers: int, n_kv: int, budget: float
           ) -> list[int]:
    """Minimise the total groups kept subject to sum of costs <= budget (costs in %)."""
    units = 400
    step = max(budget, 1e-9) / units
    INF = float("inf")
    # best[c] = (groups kept, choices) using c cost units so far
    best: list[tuple[float, list[int]]] = [(0.0, [])] + [(INF, [])] * units
    for layer in range(1, n_layers):
        options = [(n_kv, 0)] + [(k, math.ceil(max(c, MIN_MOVE_COST_PCT) / step - 1e-9))
                                 for k, c in costs.get(layer, {}).items()]
        nxt: list[tuple[float, list[int]]] = [(INF, [])] * (units + 1)
        for used, (kept, choice) in enumerate(best):
            if kept == INF:
                continue
            for k, u in options:
                if used + u <= units and kept + k < nxt[used + u][0]:
                    nxt[used + u] = (kept + k, choice + [k])
        best = nxt
    kept, choice = min(best, key=lambda t: t[0])
    return [n_kv] + choice


@dataclass
class TuneSet:
    """The tuning split in batches, with each layer's dense input cached per batch."""

    batches: list[torch.Tensor]
    layer_inputs: list[list[torch.Tensor]]
    ppl_dense: float

    @property
    def n_tokens(self) -> int:
        return sum(b[:, 1:].numel() for b in self.batches)


@torch.no_grad()
def prepare_tune(model: Model, tune: torch.Tensor, batch_size: int) -> TuneSet:
    batches = list(tune.split(batch_size))
    inputs: list[list[torch.Tensor]] = []
    nll = 0.0
    for ids in batches:
        layer_inputs: list[torch.Tensor] = []
        nll += _nll(model, ids, forward(model, ids, layer_inputs=layer_inputs))
        inputs.append(layer_inputs)
    n_tokens = sum(b[:, 1:].numel() for b in batches)
    return TuneSet(batches=batches, layer_inputs=inputs, ppl_dense=math.exp(nll / n_tokens))


@torch.no_grad()
def measure_layer_costs(
    model: Model,
    tune: TuneSet,
    routers_by_k: dict[int, dict[int, HeadRouter]],
    progress: Progress | None = None,
) -> dict[int, dict[int, float]]:
    """Perplexity rise (%) of each (layer, k) alone. Only layers from the changed one onward
    are re-run, from the cached dense inputs."""
    n_kv, n_layers = model.spec.n_kv_heads, model.spec.n_layers
    ks = sorted(routers_by_k)
    task = progress.add_task("per-layer costs", total=(n_layers - 1) * len(ks)) if progress else None
    costs: dict[int, dict[int, float]] = {}
    for layer in range(1, n_layers):
        for k in ks:
            plan = [n_kv] * n_layers
            plan[layer] = k
            select = make_selector("sparse", plan, n_kv, routers=routers_by_k[k])
            nll = sum(_nll(model, ids, forward(model, ids, select=select, start_layer=layer,
                                               hidden=inp[layer]))
                      for ids, inp in zip(tune.batches, tune.layer_inputs, strict=True))
            costs.setdefault(layer, {})[k] = (math.exp(nll / tune.n_tokens) / tune.ppl_dense - 1) * 100
            if progress is not None:
                progress.advance(task)
    return costs


def _measure(model: Model, tune: TuneSet, routers_by_k: dict[int, dict[int, HeadRouter]],
             plan: list[int], measured: dict[tuple[int, ...], float]) -> float:
    """Perplexity rise (%) of a whole plan on the tuning split (memoised)."""
    key = tuple(plan)
    if key not in measured:
        n_kv = model.spec.n_kv_heads
        routers = {layer: routers_by_k[k][layer] for layer, k in enumerate(plan) if k < n_kv}
        measured[key] = (tune_perplexity(model, tune.batches, plan, routers) / tune.ppl_dense - 1) * 100
    return measured[key]


def search_plan(
    model: Model,
    tune: TuneSet,
    costs: dict[int, dict[int, float]],
    routers_by_k: dict[int, dict[int, HeadRouter]],
    budget_pct: float,
    *,
    max_tries: int = 10,
    refine_tries: int = 8,
) -> tuple[list[int], list[dict[str, float]]]:
    """The cheapest plan (fewest KV groups) whose measured rise on `tune` is within
    TUNE_SHARE of the budget.

    Two stages: the knapsack on per-layer costs with a bisected internal budget (costs do not
    add up, so the budget that fits is found by measuring), then greedy refinement: lower one
    layer at a time, cheapest-alone move first, keeping each move whose whole plan still
    measures within budget (the knapsack leaves groups on the table where its additive
    model is pessimistic)."""
    n_kv, n_layers = model.spec.n_kv_heads, model.spec.n_layers
    target = budget_pct * TUNE_SHARE
    best_plan, best_density = [n_kv] * n_layers, 1.0
    tries: list[dict[str, float]] = []
    measured: dict[tuple[int, ...], float] = {}
    fits, fails = None, None  # internal budgets known to give a fitting / failing plan
    internal = target
    for _ in range(max_tries):
        plan = _solve(costs, n_layers, n_kv, internal)
        rise = _measure(model, tune, routers_by_k, plan, measured)
        density = kv_density(plan, n_kv)
        tries.append({"stage": "knapsack", "internal_budget_pct": internal, "increase_pct": rise,
                      "kv_density": density})
        if rise <= target:
            if density < best_density:
                best_plan, best_density = plan, density
            fits = internal
            if fails is None:
                break
        else:
            fails = internal
        if fits is None:
            # Costs add up super-linearly: shrink the internal budget in proportion.
            internal *= 0.9 * target / max(rise, 1e-9)
        else:
            # Internal budgets that matter span orders of magnitude: bisect geometrically.
            if fails / max(fits, 1e-12) < 1.25:
                break
            internal = math.sqrt(fits * fails)
    moves = sorted((c, layer, k) for layer, kc in costs.items() for k, c in kc.items())
    plan = best_plan
    for _, layer, k in moves:
        if refine_tries <= 0:
            break
        if k >= plan[layer]:
            continue
        candidate = plan[:layer] + [k] + plan[layer + 1:]
        rise = _measure(model, tune, routers_by_k, candidate, measured)
        refine_tries -= 1
        tries.append({"stage": "greedy", "layer": layer, "k": k, "increase_pct": rise,
                      "kv_density": kv_density(candidate, n_kv)})
        if rise <= target:
            plan = candidate
    return plan, tries


def budget_plan(
    model: Model,
    tune_ids: torch.Tensor,
    routers_by_k: dict[int, dict[int, HeadRouter]],
    budget_pct: float,
    *,
    batch_size: int = 8,
    progress: Progress | None = None,
) -> tuple[list[int], PlanSearch]:
    """Per-layer k for a perplexity budget of `budget_pct` percent on `tune_ids` [n, T].

    `routers_by_k[k][layer]` is the router trained to keep k groups at that layer.
    """
    tune = prepare_tune(model, tune_ids, batch_size)
    costs = measure_layer_costs(model, tune, routers_by_k, progress)
    plan, tries = search_plan(model, tune, costs, routers_by_k, budget_pct)
    search = PlanSearch(
        ppl_dense=tune.ppl_dense, tries=tries,
        layer_costs={str(layer): {str(k): c for k, c in v.items()} for layer, v in costs.items()})
    return plan, search
