"""Density plans: how many KV groups each layer keeps per row at decode time.

Layer 0 is always dense; `polarc.format.plan` has the uniform plan (round(X * Hkv) groups,
at least one, on the other layers, as the paper does). `budget_plan` picks per-layer k so
that perplexity on the tuning split rises at most P percent while reading as few KV bytes as
possible: it measures each (layer, k) alone, solves the multiple-choice knapsack on those
costs, measures the whole plan and tightens the internal budget until the measured plan
fits, then lowers single layers greedily while the measured plan still fits.

Moves to the fewest groups are priced for their risk on other text (`risk_costs`): there a
router's misses cost the most, and on text unlike the calibration's its error grows while the
oracle's does not. Leaving each domain of the builtin mix out (RESULTS.md, 2026-12-04), this
took the left-out code domain's rise from +5.87% to +3.54% (the other domains' plans and the
in-domain one unchanged) for 6-11 extra cost runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from polarc.calibration.collect import layer_work_bytes
from polarc.calibration.quality import make_selector
from rich.progress import Progress

from polarc.format.plan import groups_for_density, kv_density
from polarc.format.routers import HeadRouter
from polarc.models.forward import run_layer
from polarc.models.layers import embed, final_norm, rope_cos_sin
from polarc.models.load import Model
from polarc.models.memory import free_memory, freed_memory_returned

DENSITY_GRID = (0.25, 0.375, 0.5, 0.625, 0.75, 0.875)
# A (layer, k) measured as free or helpful alone still costs something in company (costs do
# not add up); pricing every move at least this much keeps the search able to shrink a plan
# all the way back to dense.
MIN_MOVE_COST_PCT = 0.02
# The tuning text is small (4k tokens by default) and the search pushes a plan to the edge of
# whatever it aims at there, so held-out text rises a little more: aim at this share of the
# budget on the tuning text (measured on SmolLM2: a plan at +2.7% on tuning was +3.1% held out).
TUNE_SHARE = 0.85
NLL_CHUNK = 256  # positions whose logits one product makes (see _row_nll)


def candidate_ks(n_kv: int) -> list[int]:
    """The sparse k values a budget search considers (grid densities, deduplicated)."""
    return sorted({groups_for_density(d, n_kv) for d in DENSITY_GRID} - {n_kv})


@dataclass
class Perplexity:
    """A plan's perplexity on the tuning text: overall and per domain of the text."""

    overall: float
    by_domain: dict[str, float]

    def rise(self, dense: Perplexity) -> float:
        """What the budget bounds, in percent: the worst domain's rise over dense (the
        overall rise when the text has one domain). Keeping the budget on the average would
        let one kind of text pay for the others."""
        return max((ppl / dense.by_domain[d] - 1) * 100 for d, ppl in self.by_domain.items())

    def overall_rise(self, dense: Perplexity) -> float:
        return (self.overall / dense.overall - 1) * 100


@dataclass
class PlanSearch:
    """What the budget search measured, for the artifact and the report."""

    ppl_dense: Perplexity
    layer_costs: dict[str, dict[str, float]] = field(default_factory=dict)  # layer -> k -> %
    oracle_layer_costs: dict[str, dict[str, float]] = field(default_factory=dict)  # the same
    ppl_plan: Perplexity | None = None  # the chosen plan's, on the whole tuning text
    tries: list[dict[str, float]] = field(default_factory=list)


def _row_nll(model: Model, ids: torch.Tensor, h: torch.Tensor) -> list[float]:
    """Each sequence's summed next-token NLL, `ids` [B, T], from the last layer's output `h`
    [B, T, d]. The logits of NLL_CHUNK positions at a time go through one buffer and the
    softmax runs in place on it: a sequence's whole logits (T x vocab in fp32: 100 MB for
    SmolLM2 at 512 tokens, 2 GB for Llama-3 at 4k) and their temporaries, made fresh for
    every sequence, would set the run's peak and, on the CPU, cost more in page faults than
    the product itself."""
    head, bias = model.weights["lm_head.weight"], model.weights.get("lm_head.bias")
    x = final_norm(model, h[:, :-1])
    targets = ids[:, 1:].to(x.device)
    buf = torch.empty(min(NLL_CHUNK, x.shape[1]), head.shape[0], dtype=x.dtype, device=x.device)
    out = []
    for row in range(ids.shape[0]):
        nll = torch.zeros((), dtype=torch.float64, device=x.device)
        for s in range(0, x.shape[1], NLL_CHUNK):
            chunk = x[row, s:s + NLL_CHUNK]
            logits = torch.mm(chunk, head.t(), out=buf[:len(chunk)])
            if bias is not None:
                logits += bias
            logits = logits.float()  # itself when already fp32
            picked = logits.gather(-1, targets[row, s:s + len(chunk), None])[:, 0]
            top = logits.amax(-1, keepdim=True)
            lse = logits.sub_(top).exp_().sum(-1).log_() + top[:, 0]
            nll += (lse - picked).sum()
        out.append(nll.item())
    return out


def tune_perplexity(model: Model, tune: TuneSet, k_per_layer: list[int],
                    routers: dict[int, HeadRouter]) -> Perplexity:
    """Perplexity of one plan on the tuning batches, streamed layer by layer."""
    return run_plans(model, tune, [PlanRun(list(k_per_layer), routers)])[0]


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
    """The tuning split in batches (on the model's device), each row's domain (in batch
    order), and each layer's dense input per batch (`layer_inputs[layer][batch]`; empty when
    not prepared)."""

    batches: list[torch.Tensor]
    domains: list[str]
    layer_inputs: list[list[torch.Tensor]] = field(default_factory=list)
    ppl_dense: Perplexity | None = None

    @staticmethod
    def of(model: Model, ids: torch.Tensor, domains: list[str], batch_size: int) -> TuneSet:
        return TuneSet([b.to(model.device) for b in ids.split(batch_size)], list(domains))

    def perplexity(self, row_nll: list[float]) -> Perplexity:
        per_row = self.batches[0].shape[1] - 1
        nll: dict[str, float] = {}
        rows: dict[str, int] = {}
        for d, v in zip(self.domains, row_nll, strict=True):
            nll[d] = nll.get(d, 0.0) + v
            rows[d] = rows.get(d, 0) + 1
        return Perplexity(math.exp(sum(row_nll) / (len(row_nll) * per_row)),
                          {d: math.exp(nll[d] / (rows[d] * per_row)) for d in sorted(nll)})


@dataclass
class PlanRun:
    """One plan to measure: `k_per_layer` with its routers, run from layer `start` on the
    inputs `given[batch]` (default: the dense inputs of that layer). With `record`, the run
    keeps each layer's input from `start` on (`recorded[layer][batch]`)."""

    plan: list[int]
    routers: dict[int, HeadRouter]
    start: int = 0
    kind: str = "sparse"  # or "oracle": each token's true top-k groups, not the routers' pick
    given: list[torch.Tensor] | None = None
    record: bool = False
    recorded: dict[int, list[torch.Tensor]] = field(default_factory=dict)


def _hidden_bytes(model: Model, tune: TuneSet) -> int:
    elem = torch.empty((), dtype=model.dtype).element_size()
    return sum(b.numel() for b in tune.batches) * model.spec.hidden * elem


def _runs_per_pass(model: Model, tune: TuneSet, runs: list[PlanRun]) -> int:
    """How many runs' hidden states one pass holds: half the free GPU memory (or a quarter
    of the available host memory) over one run's hidden states (and its records)."""
    free = free_memory(model.device) // (2 if model.device.type == "cuda" else 4)
    per_run = _hidden_bytes(model, tune) * (1 + (model.spec.n_layers if any(
        r.record for r in runs) else 0))
    return max(1, free // max(per_run, 1))


@torch.no_grad()
def run_plans(model: Model, tune: TuneSet, runs: list[PlanRun],
              progress: Progress | None = None, label: str = "") -> list[Perplexity]:
    """Perplexity of each run on the tuning batches. Layer-major: each pass loads a layer's
    weights once and runs it for every run of the pass and every batch, so a streamed model
    reads its weights once per pass, however many plans it measures. Runs are grouped into
    passes that fit memory (`_runs_per_pass`)."""
    n_layers, n_kv = model.spec.n_layers, model.spec.n_kv_heads
    positions = torch.arange(tune.batches[0].shape[1], device=model.device)
    rope = rope_cos_sin(model, positions, model.dtype)
    per_pass = _runs_per_pass(model, tune, runs)
    order = sorted(range(len(runs)), key=lambda r: runs[r].start)
    results: list[Perplexity | None] = [None] * len(runs)
    task = progress.add_task(label, total=len(runs)) if progress and label else None
    for first in range(0, len(order), per_pass):
        group = [runs[r] for r in order[first:first + per_pass]]
        hidden: list[list[torch.Tensor] | None] = [None] * len(group)
        selects = [make_selector(r.kind, r.plan, n_kv, routers=r.routers) for r in group]
        for layer in range(min(r.start for r in group), n_layers):
            with model.layer_weights(layer):
                for g, run in enumerate(group):
                    if run.start > layer:
                        continue
                    if run.start == layer:
                        hidden[g] = list(run.given) if run.given is not None else (
                            [embed(model, ids, positions) for ids in tune.batches]
                            if layer == 0 else list(tune.layer_inputs[layer]))
                    if run.record:
                        run.recorded[layer] = list(hidden[g])
                    hidden[g] = [run_layer(model, layer, h, rope, select=selects[g])
                                 for h in hidden[g]]
        for g in range(len(group)):
            results[order[first + g]] = tune.perplexity(
                [v for ids, h in zip(tune.batches, hidden[g], strict=True)
                 for v in _row_nll(model, ids, h)])
            hidden[g] = None
            if task is not None:
                progress.advance(task)
    return results  # type: ignore[return-value]


@torch.no_grad()
def prepare_tune(model: Model, tune: torch.Tensor, domains: list[str], batch_size: int
                 ) -> TuneSet:
    """The tuning batches with every layer's dense input and the dense perplexity."""
    ts = TuneSet.of(model, tune, domains, batch_size)
    dense = PlanRun([model.spec.n_kv_heads] * model.spec.n_layers, {}, record=True)
    ts.ppl_dense = run_plans(model, ts, [dense])[0]
    ts.layer_inputs = [dense.recorded[layer] for layer in range(model.spec.n_layers)]
    return ts


def spread_rows(model: Model, tune: TuneSet, n_rows: int) -> TuneSet:
    """`n_rows` of the tuning sequences, spread evenly over them (so over every part of the
    text), with their dense layer inputs and their own dense perplexity."""
    total = sum(b.shape[0] for b in tune.batches)
    if n_rows >= total:
        return tune
    pick = torch.linspace(0, total - 1, n_rows).round().long().unique()
    batches: list[torch.Tensor] = []
    local: list[tuple[int, torch.Tensor]] = []
    offset = 0
    for i, b in enumerate(tune.batches):
        rows = pick[(pick >= offset) & (pick < offset + b.shape[0])] - offset
        if len(rows):
            batches.append(b[rows.to(b.device)])
            local.append((i, rows))
        offset += b.shape[0]
    inputs = [[per_batch[i][rows.to(per_batch[i].device)] for i, rows in local]
              for per_batch in tune.layer_inputs]
    sub = TuneSet(batches, [tune.domains[int(i)] for i in pick], inputs)
    n_layers = len(inputs)
    sub.ppl_dense = run_plans(model, sub, [PlanRun([model.spec.n_kv_heads] * n_layers, {},
                                                   start=n_layers - 1)])[0]
    return sub


def measure_layer_costs(
    model: Model,
    tune: TuneSet,
    routers_by_k: dict[int, dict[int, HeadRouter]],
    progress: Progress | None = None,
    *,
    kind: str = "sparse",
    moves: list[tuple[int, int]] | None = None,
) -> dict[int, dict[int, float]]:
    """Perplexity rise (%) of each (layer, k) alone on `tune` (`moves`, default: every layer
    but the first with every k of `routers_by_k`), with the routers' selection or, with
    `kind="oracle"`, each token's true top-k. Each run starts at its layer from the cached
    dense input, and all of them share the passes over the weights."""
    n_kv, n_layers = model.spec.n_kv_heads, model.spec.n_layers
    keys = moves if moves is not None else [(layer, k) for layer in range(1, n_layers)
                                            for k in sorted(routers_by_k)]
    runs = []
    for layer, k in keys:
        plan = [n_kv] * n_layers
        plan[layer] = k
        runs.append(PlanRun(plan, routers_by_k[k], start=layer, kind=kind))
    label = "per-layer costs" if kind == "sparse" else f"per-layer costs ({kind})"
    ppls = run_plans(model, tune, runs, progress, label)
    costs: dict[int, dict[int, float]] = {}
    for (layer, k), ppl in zip(keys, ppls, strict=True):
        # Overall, not worst-domain: these only rank moves, on a few rows per domain, where
        # a maximum would mostly rank noise; whole plans are held to the worst domain.
        costs.setdefault(layer, {})[k] = ppl.overall_rise(tune.ppl_dense)
    return costs


def _fewest_groups(costs: dict[int, dict[int, float]]) -> int | None:
    return min((k for kc in costs.values() for k in kc), default=None)


def risky_moves(costs: dict[int, dict[int, float]], target_pct: float) -> list[tuple[int, int]]:
    """The moves whose router error `risk_costs` prices, so the ones the oracle runs for: to
    the fewest groups any router keeps, and cheap enough by the routers' cost (at most half
    the target) that the search may take them."""
    k_min = _fewest_groups(costs)
    return [(layer, k) for layer, kc in sorted(costs.items()) for k, c in kc.items()
            if k == k_min and c <= target_pct / 2]


def risk_costs(costs: dict[int, dict[int, float]], oracle: dict[int, dict[int, float]]
               ) -> dict[int, dict[int, float]]:
    """What the search ranks moves by: the routers' cost, and for moves to the fewest groups
    that cost plus the routers' excess over the oracle's (`oracle`, measured for
    `risky_moves`); where the oracle did not run, as if it lost nothing (twice the routers'
    cost). Keeping the fewest groups, a router's miss drops most of what the layer needed,
    and its misses multiply on text unlike the calibration's: a move that is cheap only
    because the routers happen to do well on the tuning text is a risk elsewhere. (Pricing
    the excess on every move, an oracle run each, moved the other left-out domains' rises
    both ways, all within the budget as with this rule: RESULTS.md, 2026-12-04.)"""
    k_min = _fewest_groups(costs)
    out: dict[int, dict[int, float]] = {}
    for layer, kc in costs.items():
        for k, c in kc.items():
            if k == k_min:
                o = oracle.get(layer, {}).get(k)
                c = c + max(0.0, c - o) if o is not None else c + max(c, 0.0)
            out.setdefault(layer, {})[k] = c
    return out


def _resume(plan: list[int], start: int, dense: list[list[torch.Tensor]],
            priors: tuple[PlanRun | None, ...]
            ) -> tuple[int, dict[int, list[torch.Tensor]] | list[list[torch.Tensor]]]:
    """Where `plan` must start running and the inputs of every layer up to there: the dense
    ones up to its first sparse layer `start`, or an earlier run's, which are this plan's up
    to the first layer where the two plans differ (the base in the greedy stage; the last
    plan tried in the knapsack stage, where budgets close together give plans that share
    their first layers). Only those layers' inputs are kept, so the earlier run's later
    records can go before this one runs."""
    earlier: dict[int, list[torch.Tensor]] | list[list[torch.Tensor]] = dense
    for prior in priors:
        if prior is None:
            continue
        differs = next((i for i, (a, b) in enumerate(zip(plan, prior.plan, strict=True))
                        if a != b), len(plan) - 1)
        if differs > start:
            start, earlier = differs, {i: prior.recorded[i] for i in range(differs + 1)}
    return start, earlier


@dataclass
class _Measurer:
    """Whole-plan rises on the tuning split, memoised. A plan runs from its first sparse layer
    on the dense inputs, or, once a base plan is accepted, from the first layer where it
    differs from the base on the base's recorded inputs: only the layers a change can affect
    are re-run (the greedy stage changes one layer at a time)."""

    model: Model
    tune: TuneSet
    routers_by_k: dict[int, dict[int, HeadRouter]]
    measured: dict[tuple[int, ...], float] = field(default_factory=dict)
    ppls: dict[tuple[int, ...], Perplexity] = field(default_factory=dict)
    base: PlanRun | None = None
    last: PlanRun | None = None

    def rise(self, plan: list[int]) -> float:
        key = tuple(plan)
        if key not in self.measured:
            self.measured[key] = self._run(plan)
        return self.measured[key]

    def accept(self, plan: list[int]) -> None:
        """Make `plan` the base that later plans start from."""
        if self.last is None or self.last.plan != plan:
            self._run(plan)
        self.base = self.last

    def _run(self, plan: list[int]) -> float:
        n_kv = self.model.spec.n_kv_heads
        routers = {layer: self.routers_by_k[k][layer] for layer, k in enumerate(plan) if k < n_kv}
        start = next((i for i, k in enumerate(plan) if k < n_kv), len(plan) - 1)
        start, earlier = _resume(plan, start, self.tune.layer_inputs, (self.base, self.last))
        run = PlanRun(list(plan), routers, start=start, given=earlier[start], record=True)
        if self.last is not self.base:
            self.last = None  # its later records would otherwise live beside the new run's
        ppl = run_plans(self.model, self.tune, [run])[0]
        run.recorded.update({i: earlier[i] for i in range(start)})
        self.last = run
        self.ppls[tuple(plan)] = ppl
        return ppl.rise(self.tune.ppl_dense)


def search_plan(
    model: Model,
    tune: TuneSet,
    costs: dict[int, dict[int, float]],
    routers_by_k: dict[int, dict[int, HeadRouter]],
    budget_pct: float,
    *,
    max_tries: int = 10,
    refine_tries: int = 8,
    progress: Progress | None = None,
) -> tuple[list[int], list[dict[str, float]], Perplexity | None]:
    """The cheapest plan (fewest KV groups) whose measured rise on `tune` is within
    TUNE_SHARE of the budget, the search's tries, and that plan's perplexity on `tune`.

    Two stages: the knapsack on per-layer costs with a bisected internal budget (costs do not
    add up, so the budget that fits is found by measuring), then greedy refinement: lower one
    layer at a time, cheapest-alone move first, keeping each move whose whole plan still
    measures within budget (the knapsack leaves groups on the table where its additive
    model is pessimistic)."""
    n_kv, n_layers = model.spec.n_kv_heads, model.spec.n_layers
    target = budget_pct * TUNE_SHARE
    best_plan, best_density = [n_kv] * n_layers, 1.0
    tries: list[dict[str, float]] = []
    measure = _Measurer(model, tune, routers_by_k)
    task = progress.add_task("plan search", total=max_tries + refine_tries) if progress else None
    fits, fails = None, None  # internal budgets known to give a fitting / failing plan
    internal = target
    for _ in range(max_tries):
        plan = _solve(costs, n_layers, n_kv, internal)
        rise = measure.rise(plan)
        if task is not None:
            progress.advance(task)
        density = kv_density(plan, n_kv)
        tries.append({"stage": "knapsack", "internal_budget_pct": internal, "increase_pct": rise,
                      "kv_density": density})
        if rise <= target:
            if density < best_density:
                best_plan, best_density = plan, density
            fits = internal
        else:
            fails = internal
        if fits is None:
            # Costs add up super-linearly: shrink the internal budget in proportion.
            internal *= 0.9 * target / max(rise, 1e-9)
        elif fails is None:
            # Every plan so far fits: the costs measured alone overstate the whole plan's
            # (they are noisy on few tuning rows, and moves can offset): grow it, at most 4x.
            if plan == _solve(costs, n_layers, n_kv, internal * 4) or rise >= 0.97 * target:
                break  # nothing cheaper to find, or already at the edge
            internal *= min(4.0, 1.1 * target / max(rise, target / 40))
        else:
            # Internal budgets that matter span orders of magnitude: bisect geometrically.
            if fails / max(fits, 1e-12) < 1.25:
                break
            internal = math.sqrt(fits * fails)
    moves = sorted((c, layer, k) for layer, kc in costs.items() for k, c in kc.items())
    plan = best_plan
    measure.accept(plan)
    if task is not None:
        progress.update(task, total=len(tries) + refine_tries, completed=len(tries))
    for _, layer, k in moves:
        if refine_tries <= 0:
            break
        if k >= plan[layer]:
            continue
        candidate = plan[:layer] + [k] + plan[layer + 1:]
        rise = measure.rise(candidate)
        refine_tries -= 1
        if task is not None:
            progress.advance(task)
        tries.append({"stage": "greedy", "layer": layer, "k": k, "increase_pct": rise,
                      "kv_density": kv_density(candidate, n_kv)})
        if rise <= target:
            plan = candidate
            measure.accept(plan)
    return plan, tries, measure.ppls.get(tuple(plan))


def _str_keys(costs: dict[int, dict[int, float]]) -> dict[str, dict[str, float]]:
    return {str(layer): {str(k): c for k, c in v.items()} for layer, v in costs.items()}


def budget_plan(
    model: Model,
    tune_ids: torch.Tensor,
    routers_by_k: dict[int, dict[int, HeadRouter]],
    budget_pct: float,
    *,
    domains: list[str] | None = None,
    batch_size: int = 8,
    cost_tokens: int | None = None,
    progress: Progress | None = None,
) -> tuple[list[int], PlanSearch]:
    """Per-layer k for a perplexity budget of `budget_pct` percent on `tune_ids` [n, T] (rows
    of `domains`, default one domain): the budget holds on every domain.

    `routers_by_k[k][layer]` is the router trained to keep k groups at that layer. The
    (layer, k) costs, one run each, are measured on about `cost_tokens` of the tuning tokens
    (default: all): they only rank the moves; every whole plan is measured on all of them,
    and only those measurements decide what fits the budget.
    """
    with freed_memory_returned():
        tune = prepare_tune(model, tune_ids, domains or [""] * tune_ids.shape[0], batch_size)
        # The search keeps two plans' recorded inputs (the accepted base and the plan being
        # measured) beside the dense ones, one layer's work and one sequence's logits.
        elem = torch.empty((), dtype=model.dtype).element_size()
        model.make_room(2 * _hidden_bytes(model, tune) * model.spec.n_layers
                        + layer_work_bytes(model, batch_size, tune_ids.shape[1])
                        + 2 * tune_ids.shape[1] * model.spec.vocab * max(elem, 4))
        n_rows = (tune_ids.shape[0] if cost_tokens is None
                  else math.ceil(cost_tokens / tune_ids.shape[1]))
        cost_tune = spread_rows(model, tune, n_rows)
        costs = measure_layer_costs(model, cost_tune, routers_by_k, progress)
        risky = risky_moves(costs, budget_pct * TUNE_SHARE)
        oracle = measure_layer_costs(model, cost_tune, routers_by_k, progress, kind="oracle",
                                     moves=risky) if risky else {}
        plan, tries, ppl_plan = search_plan(model, tune, risk_costs(costs, oracle),
                                            routers_by_k, budget_pct, progress=progress)
        search = PlanSearch(ppl_dense=tune.ppl_dense, tries=tries, ppl_plan=ppl_plan,
                            layer_costs=_str_keys(costs), oracle_layer_costs=_str_keys(oracle))
    return plan, search
