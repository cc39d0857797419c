"""Text of several domains: the plan's budget holds on the worst domain, routers' recall is
reported per domain, a domain can be left out of calibration, and `polarc eval` says whether
a plan held its budget on text the calibration never saw."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from polarc.calibration.plan import (
    TUNE_SHARE,
    Perplexity,
    TuneSet,
    _Measurer,
    budget_plan,
    candidate_ks,
    measure_layer_costs,
    prepare_tune,
    risk_costs,
    risky_moves,
    spread_rows,
    tune_perplexity,
)
from polarc.calibration.quality import make_selector
from polarc.calibration.routers import train_head_routers

from polarc.format.routers import HeadRouter
from polarc.models import load_model
from polarc.models.forward import forward
from tests.conftest import SMALL, one_line_error, run


def _tagged(path: Path, per_domain: int = 40) -> Path:
    words = {"a": "the cat sat on a mat ", "b": "def f(x): return x + 1 ", "c": "Q: why? A: so. "}
    path.write_text("".join(json.dumps({"text": f"{d} {i}: " + w * 10, "domain": d}) + "\n"
                            for d, w in words.items() for i in range(per_domain)))
    return path


def test_rise_is_the_worst_domains() -> None:
    dense = Perplexity(10.0, {"a": 8.0, "b": 12.0})
    plan = Perplexity(10.4, {"a": 8.08, "b": 12.6})
    assert plan.overall_rise(dense) == pytest.approx(4.0)
    assert plan.rise(dense) == pytest.approx(5.0)  # b: 12.6 / 12 - 1


def _random_routers(model, seed: int = 0) -> dict[int, dict[int, HeadRouter]]:
    g = torch.Generator().manual_seed(seed)
    n_kv, d = model.spec.n_kv_heads, model.spec.hidden
    return {k: {layer: HeadRouter(torch.randn(n_kv, d, generator=g), torch.zeros(n_kv), k, 1.0)
                for layer in range(1, model.spec.n_layers)} for k in candidate_ks(n_kv)}


def test_budget_plan_holds_the_budget_on_every_domain(tiny_dirs: dict) -> None:
    model = load_model(str(tiny_dirs["llama-mha"]))
    g = torch.Generator().manual_seed(0)
    # two kinds of text: uniform random bytes, and a short repeated pattern
    ids = torch.cat([torch.randint(0, 320, (4, 32), generator=g),
                     torch.arange(32).remainder(5).repeat(4, 1) + 40])
    domains = ["noise"] * 4 + ["pattern"] * 4
    routers_by_k = _random_routers(model)
    budget = 20.0
    plan, search = budget_plan(model, ids, routers_by_k, budget, domains=domains, batch_size=3)
    routers = {layer: routers_by_k[k][layer] for layer, k in enumerate(plan) if k < 4}
    # measured again, each domain alone
    rises = {}
    for d in ("noise", "pattern"):
        rows = torch.tensor([i for i, x in enumerate(domains) if x == d])
        alone = TuneSet.of(model, ids[rows], [d] * 4, 4)
        dense = tune_perplexity(model, alone, [4] * model.spec.n_layers, {})
        rises[d] = tune_perplexity(model, alone, plan, routers).rise(dense)
    assert max(rises.values()) <= budget * TUNE_SHARE + 1e-6
    # what calibrate reports without measuring again: the search's own measurement of the
    # chosen plan, equal to a fresh run over the whole tuning text
    whole = TuneSet.of(model, ids, domains, 3)
    fresh = tune_perplexity(model, whole, plan, routers)
    assert search.ppl_plan is not None
    assert search.ppl_plan.overall == pytest.approx(fresh.overall, rel=1e-5)
    assert search.ppl_plan.by_domain == pytest.approx(fresh.by_domain, rel=1e-5)
    # the oracle ran only for moves to the fewest groups
    assert search.oracle_layer_costs
    assert {k for kc in search.oracle_layer_costs.values() for k in kc} == {"1"}
    # the search measured the worst domain, not the average, for the plan it chose
    if plan != [4] * model.spec.n_layers:
        seen = [t["increase_pct"] for t in search.tries if t["kv_density"] ==
                pytest.approx(sum(plan) / (4 * len(plan)))]
        assert any(s == pytest.approx(max(rises.values()), rel=1e-4) for s in seen)


def test_plans_measured_from_an_earlier_plans_inputs_equal_fresh_runs(tiny_dirs: dict) -> None:
    """The search re-runs only the layers from the first one where a plan differs from the
    last plan tried (knapsack stage) or the accepted base (greedy stage)."""
    model = load_model(str(tiny_dirs["llama-mha"]))
    ids = torch.randint(0, 320, (6, 32), generator=torch.Generator().manual_seed(2))
    tune = prepare_tune(model, ids, list("aabbcc"), 4)
    routers_by_k = _random_routers(model)
    measure = _Measurer(model, tune, routers_by_k)
    for plan, accept, start in (([4, 2, 4], False, 1), ([4, 2, 1], True, 2),
                                ([4, 2, 3], False, 2), ([4, 1, 1], False, 1)):
        routers = {layer: routers_by_k[k][layer] for layer, k in enumerate(plan) if k < 4}
        fresh = tune_perplexity(model, tune, plan, routers).rise(tune.ppl_dense)
        assert measure.rise(plan) == pytest.approx(fresh, rel=1e-5, abs=1e-6)
        assert measure.last.start == start
        if accept:
            measure.accept(plan)


def test_risk_costs_add_the_routers_excess_on_moves_to_the_fewest_groups() -> None:
    costs = {1: {1: 0.5, 2: 0.1}, 2: {1: 3.0, 2: 0.2}, 3: {1: -0.1, 2: 0.0}, 4: {1: 0.4, 2: 0.3}}
    target = 2.0
    # k = 1 is the fewest; (2, 1) costs more than half the target: no oracle run for it
    assert risky_moves(costs, target) == [(1, 1), (3, 1), (4, 1)]
    oracle = {1: {1: 0.2}, 3: {1: -0.3}, 4: {1: 0.9}}
    ranked = risk_costs(costs, oracle)
    assert ranked[1][1] == pytest.approx(0.5 + 0.3)  # the routers lose 0.3 more than the oracle
    assert ranked[3][1] == pytest.approx(-0.1 + 0.2)
    assert ranked[4][1] == pytest.approx(0.4)  # the routers did better: no excess
    assert ranked[2][1] == pytest.approx(6.0)  # not measured: as if the oracle lost nothing
    assert {layer: kc[2] for layer, kc in ranked.items()} == {1: 0.1, 2: 0.2, 3: 0.0, 4: 0.3}


def test_oracle_costs_equal_the_reference_forward_with_the_oracle(tiny_dirs: dict) -> None:
    model = load_model(str(tiny_dirs["llama-gqa"]))
    n_kv, n_layers = model.spec.n_kv_heads, model.spec.n_layers
    ids = torch.randint(0, 320, (5, 24), generator=torch.Generator().manual_seed(3))
    tune = prepare_tune(model, ids, ["x"] * 5, 2)
    moves = [(1, 1), (2, 1)]
    got = measure_layer_costs(model, tune, _random_routers(model), kind="oracle", moves=moves)
    assert sorted((layer, k) for layer, kc in got.items() for k in kc) == moves

    def ppl(select) -> float:
        logits = forward(model, ids, select=select).float()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        return float(nll.exp())

    dense = ppl(None)
    for layer, k in moves:
        plan = [n_kv] * n_layers
        plan[layer] = k
        want = (ppl(make_selector("oracle", plan, n_kv)) / dense - 1) * 100
        assert got[layer][k] == pytest.approx(want, rel=1e-3, abs=2e-4)  # fp32 sums


def test_costs_run_on_rows_spread_over_the_tuning_text(tiny_dirs: dict) -> None:
    model = load_model(str(tiny_dirs["llama-gqa"]))
    ids = torch.randint(0, 320, (8, 32), generator=torch.Generator().manual_seed(1))
    domains = list("aabbccdd")
    tune = prepare_tune(model, ids, domains, 3)
    sub = spread_rows(model, tune, 3)
    rows = torch.linspace(0, 7, 3).round().long()
    assert torch.equal(torch.cat(sub.batches), ids[rows])
    assert sub.domains == [domains[i] for i in rows]
    for layer in range(model.spec.n_layers):
        assert torch.equal(torch.cat(sub.layer_inputs[layer]),
                           torch.cat(tune.layer_inputs[layer])[rows])
    direct = prepare_tune(model, ids[rows], sub.domains, 3).ppl_dense
    assert sub.ppl_dense.overall == pytest.approx(direct.overall, rel=1e-5)
    assert sub.ppl_dense.by_domain == pytest.approx(direct.by_domain, rel=1e-5)


def test_resident_layers_make_room_for_the_search(monkeypatch: pytest.MonkeyPatch,
                                                  tiny_dirs: dict) -> None:
    model = load_model(str(tiny_dirs["llama-gqa"]), stream=True, resident_layers=3)
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(2))
    ref = forward(model, ids)
    assert all(f"layers.{i}.qkv.weight" in model.weights for i in range(3))
    # pretend each resident layer takes 100 bytes of a device with 0 free beside them
    monkeypatch.setattr("polarc.models.load.free_memory",
                        lambda device: 100 * (3 - model.resident_layers))
    model.make_room(200)
    assert model.resident_layers == 1
    assert "layers.0.qkv.weight" in model.weights
    assert not any(n.startswith(("layers.1.", "layers.2.")) for n in model.weights)
    assert torch.equal(forward(model, ids), ref)  # the dropped layers are read again
    assert "layers.2.qkv.weight" not in model.weights  # and not kept


def test_router_recall_per_domain() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6000, 16, generator=g)
    w = torch.randn(4, 16, generator=g)
    domain = (torch.arange(6000) % 2)
    norms = (x @ w.T).exp()
    # domain 1's true ranking is noise: no linear router can follow it there
    norms[domain == 1] = torch.rand(3000, 4, generator=g)
    router = train_head_routers(x, norms, [2], epochs=8, domain=domain,
                                domain_names=["clean", "noisy"])[2]
    by = router.recall_by_domain
    assert set(by) == {"clean", "noisy"}
    assert by["clean"] > 0.8 and abs(by["noisy"] - 0.5) < 0.1
    assert min(by.values()) <= router.recall <= max(by.values())


def test_leave_one_domain_out_then_eval_on_it(tiny_dirs: dict, tmp_path: Path) -> None:
    data = _tagged(tmp_path / "tagged.jsonl")
    out = tmp_path / "no-c"
    code, _, stderr = run("calibrate", "-m", tiny_dirs["llama-mha"], "--dataset", data,
                          "--skip-domain", "c", "--out", out, *SMALL, "--quality-budget", "50")
    assert code == 0, stderr
    meta = json.loads((out / "calibration.json").read_text())
    assert meta["dataset"]["domains"] == ["a", "b"]
    tune = meta["quality"]["tune"]
    assert set(tune["by_domain"]) == {"a", "b"}
    assert tune["worst_domain_increase_pct"] == pytest.approx(
        max(v["increase_pct"] for v in tune["by_domain"].values()))
    for entry in meta["layers"]:
        if entry["k"] < 4:
            assert set(entry["router_recall_by_domain"]) == {"a", "b"}

    code, stdout, stderr = run("eval", "--calibration", out, "--domain", "c", "--tokens", "256",
                               "--json", tmp_path / "c.json")
    assert code == 0, stderr
    res = json.loads((tmp_path / "c.json").read_text())
    check = res["budget_check"]
    assert check["unseen_domains"] == ["c"] and check["budget_pct"] == 50
    assert check["within_budget"] == (check["worst_rise_pct"] <= 50)
    assert "on text the calibration never saw (c): worst rise" in stdout
    # its own held-out text, every calibrated domain: reported per domain, no verdict
    code, stdout, stderr = run("eval", "--calibration", out, "--tokens", "256",
                               "--json", tmp_path / "own.json")
    assert code == 0, stderr
    res = json.loads((tmp_path / "own.json").read_text())
    assert set(res["by_domain"]) == {"a", "b"} and "budget_check" not in res
    assert "per domain" in stdout


def test_unknown_domain_is_one_line(tiny_dirs: dict, tmp_path: Path) -> None:
    data = _tagged(tmp_path / "tagged.jsonl")
    code, _, stderr = run("calibrate", "-m", tiny_dirs["llama-gqa"], "--dataset", data,
                          "--domain", "z", "--out", tmp_path / "x", *SMALL)
    one_line_error(code, stderr, "has no domain z; its domains: a, b, c")
    assert not (tmp_path / "x").exists()
