"""Quality of a density plan under four selections, in the plain-torch masked forward.

dense: every group. sparse: the routers' top-k. oracle: the true top-k groups by the norm
of their part of the attention output (after W_o), per token. random: k random groups per
token. The same per-layer k throughout.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from polarc.calibration.artifact import read_calibration
from polarc.calibration.collect import check_gpu_room
from polarc.calibration.data import HELDOUT_EVERY, load_sequences
from polarc.calibration.routers import topk_mask
from rich.progress import Progress

from polarc.format.plan import kv_density
from polarc.format.routers import HeadRouter
from polarc.models.forward import Selector, forward
from polarc.models.load import Model, check_same_model, load_model, model_source

KINDS = ("dense", "sparse", "oracle", "random")


@dataclass
class RecallCounter:
    """Counts how many oracle-kept groups the router also keeps."""

    hits: float = 0.0
    total: float = 0.0

    @property
    def recall(self) -> float:
        return self.hits / self.total if self.total else float("nan")

    # the domain of each row of the batch being run; hits and totals per domain
    row_domains: list[str] = field(default_factory=list)
    by_domain: dict[str, list[float]] = field(default_factory=dict)

    def add(self, row_hits: torch.Tensor, per_row: int) -> None:
        """Count one layer's hits of a batch (`row_hits` [B]) out of `per_row` each."""
        self.hits += row_hits.sum().item()
        self.total += per_row * row_hits.numel()
        if self.row_domains:
            for d, h in zip(self.row_domains, row_hits.tolist(), strict=True):
                count = self.by_domain.setdefault(d, [0.0, 0.0])
                count[0] += h
                count[1] += per_row

    def domain_recall(self, domain: str) -> float:
        hits, total = self.by_domain.get(domain, (0.0, 0.0))
        return hits / total if total else float("nan")


def make_selector(
    kind: str,
    k_per_layer: list[int],
    n_kv: int,
    *,
    routers: dict[int, HeadRouter] | None = None,
    seed: int = 0,
    recall: RecallCounter | None = None,
) -> Selector | None:
    """A selector keeping `k_per_layer[l]` groups per token; layers with k == n_kv stay dense."""
    if kind == "dense":
        return None
    gen = torch.Generator().manual_seed(seed)

    def select(layer: int, x: torch.Tensor, norms: Callable[[], torch.Tensor]
               ) -> torch.Tensor | None:
        k = k_per_layer[layer]
        if k >= n_kv:
            return None
        if kind == "oracle":
            return topk_mask(norms(), k)
        if kind == "random":
            return topk_mask(torch.rand((*x.shape[:-1], n_kv), generator=gen).to(x.device), k)
        if routers is None or layer not in routers:
            raise ValueError(f"no router for layer {layer}")
        keep = topk_mask(routers[layer].scores(x), k)
        if recall is not None:
            recall.add((keep & topk_mask(norms(), k)).flatten(1).sum(1), x.shape[1] * k)
        return keep

    return select


@dataclass
class SelectionStats:
    nll: float = 0.0
    tokens: int = 0
    top1_agree: float = 0.0
    kl: float = 0.0

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else float("nan")


@dataclass
class QualityReport:
    stats: dict[str, SelectionStats] = field(default_factory=dict)
    router_recall: float = float("nan")
    kv_density: float = 1.0
    tokens: int = 0
    by_domain: dict[str, dict[str, SelectionStats]] = field(default_factory=dict)
    recall_by_domain: dict[str, float] = field(default_factory=dict)

    def as_json(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for kind, s in self.stats.items():
            out[f"ppl_{kind}"] = s.ppl
            if kind != "dense":
                out[f"top1_agreement_{kind}"] = s.top1_agree / max(s.tokens, 1)
                out[f"kl_{kind}"] = s.kl / max(s.tokens, 1)
        if "sparse" in self.stats:
            out["top1_agreement"] = out["top1_agreement_sparse"]
            out["kl"] = out["kl_sparse"]
        out["router_recall"] = self.router_recall
        out["kv_density"] = self.kv_density
        out["tokens"] = self.tokens
        if len(self.by_domain) > 1 or any(self.by_domain):
            out["by_domain"] = {
                d: {**{f"ppl_{kind}": s.ppl for kind, s in stats.items()},
                    **{f"increase_pct_{kind}": (s.ppl / stats["dense"].ppl - 1) * 100
                       for kind, s in stats.items() if kind != "dense" and "dense" in stats},
                    "router_recall": self.recall_by_domain.get(d, float("nan")),
                    "tokens": next(iter(stats.values())).tokens}
                for d, stats in sorted(self.by_domain.items())}
        return out


@torch.no_grad()
def evaluate(
    model: Model,
    seqs: torch.Tensor,
    k_per_layer: list[int],
    *,
    routers: dict[int, HeadRouter] | None,
    kinds: tuple[str, ...] = KINDS,
    batch_size: int = 8,
    seed: int = 0,
    domains: list[str] | None = None,
    progress: Progress | None = None,
) -> QualityReport:
    """Perplexity per selection on `seqs` [n, T], overall and per domain of the rows
    (`domains`, default one); agreement and KL against dense per batch."""
    n_kv = model.spec.n_kv_heads
    report = QualityReport(stats={k: SelectionStats() for k in kinds},
                           kv_density=kv_density(k_per_layer, n_kv))
    recall = RecallCounter()
    selectors = {kind: make_selector(kind, k_per_layer, n_kv, routers=routers, seed=seed,
                                     recall=recall) for kind in kinds}
    task = progress.add_task("evaluating", total=seqs.shape[0]) if progress else None
    row_domains = domains or [""] * seqs.shape[0]
    for start in range(0, seqs.shape[0], batch_size):
        ids = seqs[start:start + batch_size].to(model.device)
        target = ids[:, 1:].reshape(-1)
        dense_logp = None
        batch_domains = row_domains[start:start + ids.shape[0]]
        recall.row_domains = batch_domains
        for kind in ("dense", *[k for k in kinds if k != "dense"]):
            logits = forward(model, ids, select=selectors.get(kind))
            logp = F.log_softmax(logits[:, :-1].float(), -1).reshape(target.numel(), -1)
            s = report.stats.setdefault(kind, SelectionStats()) if kind in kinds else None
            if kind == "dense":
                dense_logp = logp
            if s is None:
                continue
            row_nll = -logp.gather(1, target[:, None]).view(ids.shape[0], -1).sum(1)
            s.nll += row_nll.sum().item()
            s.tokens += target.numel()
            for d, v in zip(batch_domains, row_nll.tolist(), strict=True):
                ds = report.by_domain.setdefault(d, {}).setdefault(kind, SelectionStats())
                ds.nll += v
                ds.tokens += ids.shape[1] - 1
            if kind != "dense":
                s.top1_agree += (logp.argmax(-1) == dense_logp.argmax(-1)).sum().item()
                s.kl += (dense_logp.exp() * (dense_logp - logp)).sum().item()
        if progress is not None:
            progress.advance(task, ids.shape[0])
    report.router_recall = recall.recall
    report.recall_by_domain = {d: recall.domain_recall(d) for d in report.by_domain}
    report.tokens = report.stats[kinds[0]].tokens
    return report


def evaluate_calibration(calibration: Path, *, model: str | None, weights: Path | None,
                         random_weights: bool, dataset: str | None, tokens: int,
                         batch_size: int, seed: int, device: torch.device | None = None,
                         dtype: torch.dtype = torch.float32, domains: tuple[str, ...] = (),
                         skip_domains: tuple[str, ...] = (), progress: Progress | None = None
                         ) -> dict[str, Any]:
    """`polarc eval`: the calibration's plan and routers on held-out text, four selections,
    overall and per domain.

    The calibration's own dataset is read for its held-out documents only (every tenth, never
    seen by calibration); any other dataset is held-out text as a whole. Where the text is
    not the calibration's own (another dataset, or a domain it was not calibrated on), the
    result says whether the plan's rise stayed within the budget it was made for."""
    cal = read_calibration(calibration)
    record = cal.meta["model"]
    if model is None:
        model = model_source(record)
        random_weights = random_weights or record["random_weights"]
    m = load_model(model, weights=weights, random_weights=random_weights, dtype=dtype,
                   device=device or torch.device("cpu"), stream=True)
    check_same_model(record, m, what=str(calibration))
    routers = {layer: dataclasses.replace(r, weight=r.weight.to(m.device), bias=r.bias.to(m.device))
               for layer, r in cal.head_routers.items()}
    own = cal.meta["dataset"]["name"]
    ds = dataset or own
    seq_len = int(cal.meta["dataset"]["seq_len"])
    whole = dataset is not None and dataset != own
    calibrated_on = set(cal.meta["dataset"].get("domains", [""]))
    if not whole and not domains and not skip_domains:
        # its own held-out text: the domains it was calibrated on
        domains = tuple(sorted(d for d in calibrated_on if d))
    _, heldout = load_sequences(ds, m.tokenizer, seq_len=seq_len, calib_tokens=0,
                                heldout_tokens=max(tokens, seq_len), split=not whole,
                                domains=domains, skip_domains=skip_domains)
    check_gpu_room(m, batch_size, seq_len)
    report = evaluate(m, heldout.ids, cal.k_per_layer, routers=routers,
                      batch_size=batch_size, seed=seed, domains=heldout.domains,
                      progress=progress)
    res: dict[str, Any] = report.as_json()
    unseen = sorted(set(heldout.domains) - calibrated_on) if not whole else sorted(
        set(heldout.domains))
    budget = cal.meta["plan"].get("quality_budget_pct")
    if unseen and budget is not None:
        rises = {d: v["increase_pct_sparse"] for d, v in res.get("by_domain", {}).items()
                 if d in unseen}
        if not rises:  # one domain, the whole text
            rises = {"": (res["ppl_sparse"] / res["ppl_dense"] - 1) * 100}
        res["budget_check"] = {"budget_pct": budget, "unseen_domains": unseen,
                               "worst_rise_pct": max(rises.values()),
                               "within_budget": max(rises.values()) <= budget}
    res.update(model=m.spec.name, calibration=str(calibration), dataset=ds,
               device=m.device.type, dtype=str(dtype).removeprefix("torch."),
               heldout="the whole dataset" if whole else f"every {HELDOUT_EVERY}th document",
               random_weights=m.random_weights)
    return res
