import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from polarc.calibration import plan as plan_mod
from polarc.calibration.plan import TUNE_SHARE, _solve, candidate_ks, search_plan
from polarc.calibration.routers import (
    topk_mask,
    topk_recall,
    train_head_routers,
    train_mlp_router,
    union_k,
)

from polarc.format.plan import groups_for_density, uniform_plan


def test_head_router_learns_a_linear_ranking() -> None:
    torch.manual_seed(0)
    x = torch.randn(4000, 32)
    w = torch.randn(4, 32)
    norms = (x @ w.T + 0.1 * torch.randn(4000, 4)).exp()  # ranking is linear in x
    router = train_head_routers(x, norms, [2], epochs=40, lr=1e-2)[2]
    assert router.recall > 0.9
    fresh = torch.randn(1000, 32)
    assert topk_recall(router.scores(fresh), fresh @ w.T, 2) > 0.9
    # random scores keep about k/H of the true top-k
    assert abs(topk_recall(torch.rand(1000, 4), fresh @ w.T, 2) - 0.5) < 0.06


def test_topk_mask() -> None:
    s = torch.tensor([[0.1, 0.9, 0.5], [3.0, 2.0, 1.0]])
    assert topk_mask(s, 2).tolist() == [[False, True, True], [True, True, False]]


def test_mlp_router_union_k_is_a_multiple_of_128_and_meets_target() -> None:
    torch.manual_seed(0)
    x = torch.randn(6000, 16)
    w = torch.randn(1024, 16)
    active = (x @ w.T) > 9.0  # about 1.4% of neurons fire per token, predictably
    router = train_mlp_router(x, active, rank=16, batch_rows=8, epochs=20, lr=1e-2)
    assert router.k % 128 == 0
    assert router.union_recall >= 0.99
    assert router.k < 1024
    assert router.recall > 0.6  # random top-k would keep about 1.4%


def test_union_k_with_perfect_scores() -> None:
    active = torch.zeros(64, 1024, dtype=torch.bool)
    active[:, :100] = True
    k, recall = union_k(active.float() * 10 - 5, active, 16, 0.99)
    assert k == 128 and recall == 1.0


def test_uniform_plan_rounds_to_groups() -> None:
    assert groups_for_density(0.67, 3) == 2
    assert groups_for_density(0.34, 3) == 1
    assert groups_for_density(0.05, 8) == 1  # at least one group
    assert groups_for_density(0.5, 3) == 2  # halves round up
    assert uniform_plan(4, 8, 0.5) == [8, 4, 4, 4]


def test_density_out_of_range() -> None:
    import pytest

    from polarc.errors import PolarcError

    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(PolarcError, match="must be in"):
            groups_for_density(bad, 8)


def test_candidate_ks() -> None:
    assert candidate_ks(3) == [1, 2]
    assert candidate_ks(8) == [2, 3, 4, 5, 6, 7]


def test_solve_spends_budget_on_cheapest_savings() -> None:
    costs = {1: {1: 5.0, 2: 0.2}, 2: {1: 0.5, 2: 0.1}, 3: {1: 9.0, 2: 3.0}}
    assert _solve(costs, 4, 3, 1.0) == [3, 2, 1, 3]
    assert _solve(costs, 4, 3, 0.0) == [3, 3, 3, 3]
    assert _solve(costs, 4, 3, 100.0) == [3, 1, 1, 1]


def test_solve_never_treats_a_move_as_free() -> None:
    costs = {1: {1: -2.0, 2: -1.0}, 2: {1: 0.0, 2: -0.5}}
    assert _solve(costs, 3, 3, 0.01) == [3, 3, 3]  # a tiny budget gives back the dense plan
    assert _solve(costs, 3, 3, 1.0) == [3, 1, 1]


def _search_with_true_rise(monkeypatch: pytest.MonkeyPatch, costs: dict, n_layers: int,
                           n_kv: int, scale: float, budget: float) -> tuple[list[int], list]:
    """search_plan where a whole plan truly rises `scale` x the sum of its moves' costs."""
    def true_rise(plan: list[int]) -> float:
        return scale * sum(costs[layer][k] for layer, k in enumerate(plan) if k < n_kv)

    monkeypatch.setattr(plan_mod._Measurer, "rise", lambda self, plan: true_rise(plan))
    monkeypatch.setattr(plan_mod._Measurer, "accept", lambda self, plan: None)
    model = SimpleNamespace(spec=SimpleNamespace(n_kv_heads=n_kv, n_layers=n_layers))
    plan, tries, _ = search_plan(model, None, costs, {}, budget)
    assert true_rise(plan) <= budget * TUNE_SHARE
    return plan, tries


def test_search_grows_the_budget_when_costs_overstate(monkeypatch: pytest.MonkeyPatch) -> None:
    costs = {layer: {1: 1.0 + layer / 10, 2: 0.3 + layer / 50} for layer in range(1, 12)}
    first = _solve(costs, 12, 3, 3 * TUNE_SHARE)
    plan, tries = _search_with_true_rise(monkeypatch, costs, 12, 3, 0.25, 3.0)
    # alone-costs four times the truth: the first knapsack fits easily, and the search goes on
    assert tries[0]["increase_pct"] < 0.5 * 3 * TUNE_SHARE
    assert sum(plan) < sum(first)
    assert any(t["increase_pct"] > 3 * TUNE_SHARE for t in tries)  # it found the edge


def test_search_shrinks_the_budget_when_costs_understate(monkeypatch: pytest.MonkeyPatch) -> None:
    costs = {layer: {1: 1.0 + layer / 10, 2: 0.3 + layer / 50} for layer in range(1, 12)}
    plan, tries = _search_with_true_rise(monkeypatch, costs, 12, 3, 3.0, 3.0)
    assert tries[0]["increase_pct"] > 3 * TUNE_SHARE
    assert sum(plan) < 3 * 12


HEAP_CHURN = """
import sys, torch
from polarc.models.memory import freed_memory_returned
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * 4096
ctx = freed_memory_returned() if sys.argv[1] == 'call' else None
if ctx: ctx.__enter__()
big = torch.ones(30 << 18)  # 30 MiB: its free lifts glibc's default threshold to 30 MiB
del big
before = rss()
parts = [torch.ones(1 << 19) for _ in range(24)]  # 2 MiB each
del parts[:-1]  # the last one pins the top of the heap: the others cannot be trimmed
print((rss() - before) >> 20)
if ctx: ctx.__exit__(None, None, None)
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
def test_freed_host_memory_goes_back_to_the_system() -> None:
    """The plan search's peak RSS depends on it; control run without it."""
    kept = {mode: int(subprocess.run([sys.executable, "-c", HEAP_CHURN, mode], check=True,
                                     capture_output=True, text=True).stdout.split()[-1])
            for mode in ("call", "control")}
    if kept["control"] < 16:
        pytest.skip(f"this allocator returns freed memory anyway (kept {kept['control']} MiB)")
    assert kept["call"] <= 4, kept
