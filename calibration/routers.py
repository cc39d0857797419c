"""Router training: per-layer head routers `Linear(d, Hkv)` and, for ReLU models, low-rank MLP
routers (what they are: `polarc.format.routers`).

A head router is trained for exactly the k it will select: labels are each token's top-k
groups by the norm of their part of the attention output (`group_output_norms`), so what it
was trained for and what it selects are the same thing. Its loss weighs each wrong call by
the group's distance from the top-k boundary, so it spends its capacity where a miss costs
perplexity rather than on near ties.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from polarc.format.routers import HeadRouter, MLPRouter

# The largest weight a (token, group) term of the head routers' loss takes, in median norms
MAX_MARGIN = 10.0


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask [..., H] of the k largest scores in the last dimension."""
    idx = scores.topk(k, dim=-1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, True)


def topk_recall(pred_scores: torch.Tensor, true_scores: torch.Tensor, k: int) -> float:
    """Mean over tokens of |top-k(pred) ∩ top-k(true)| / k."""
    both = topk_mask(pred_scores, k) & topk_mask(true_scores, k)
    return both.sum(-1).float().mean().item() / k


def _split(n: int, val_frac: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=gen)
    n_val = max(1, int(n * val_frac))
    return perm[n_val:], perm[:n_val]


def train_head_routers(
    x: torch.Tensor,
    group_norms: torch.Tensor,
    ks: list[int],
    *,
    epochs: int = 16,
    lr: float = 1e-2,
    batch: int = 512,
    weight_decay: float = 0.3,  # 0.1 let routers overfit the calibration text (LODO, RESULTS.md)
    val_frac: float = 0.1,
    seed: int = 0,
    domain: torch.Tensor | None = None,
    domain_names: list[str] | None = None,
) -> dict[int, HeadRouter]:
    """Fit one `Linear(d, Hkv)` per k in `ks` for one layer (x [n, d], group_norms [n, Hkv]),
    all at once (one batched step trains every k), with BCE on top-k labels, each term
    weighted by the group's margin from the top-k boundary (`margins`; no class weights:
    the margins already decide what counts, and class weights on top of them cost held-out
    perplexity);
    keep each router's best validation recall (the epoch whose router best reproduces the
    true top-k on unseen tokens), and, with each sample's `domain` [n] (indices into
    `domain_names`), that router's validation recall per domain."""
    gen = torch.Generator().manual_seed(seed)
    n, d = x.shape
    hkv, n_k = group_norms.shape[1], len(ks)
    dev = x.device
    train, val = (t.to(dev) for t in _split(n, val_frac, gen))
    # Standardise inputs for the optimiser (once: per step it cost as much as the step's
    # product); folded back into the weights at the end.
    mean = x[train].mean(0)
    std = x[train].std(0) + 1e-6
    xs = (x - mean) / std
    weight = torch.nn.Parameter((torch.randn(n_k, hkv, d, generator=gen) / d**0.5).to(dev))
    bias = torch.nn.Parameter(torch.zeros(n_k, 1, hkv, device=dev))
    opt = torch.optim.AdamW([weight, bias], lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(train) / batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)

    def logits(idx: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # [n_k, len(idx), Hkv] by one [len, d] x [d, n_k * Hkv] product (a batched einsum
        # took 1.6-1.8x as long per call on the CPU)
        return (F.linear(xs.index_select(0, idx), w.view(n_k * hkv, d))
                .view(len(idx), n_k, hkv).transpose(0, 1) + b)

    # Every sample's top-k labels and loss weights [n, 2, n_k, Hkv] (sample-major: a step
    # gathers its rows in one read), made once: a group's weight is its distance from its
    # token's top-k boundary (midway between the k-th and the (k+1)-th norm) in median
    # norms, at most MAX_MARGIN. A wrong call far from the boundary costs what dropping that
    # group removes; near it, almost nothing. The cap keeps a few very loud tokens from
    # taking the fit.
    norms = group_norms.float()
    targets = torch.stack([topk_mask(norms, k) for k in ks], 1).float()
    ranked = norms.sort(-1, descending=True).values
    unit = norms[train].median().clamp(min=1e-12)
    margins = torch.stack([((norms - (ranked[:, k - 1:k] + ranked[:, k:k + 1]) / 2).abs() / unit)
                           .clamp(max=MAX_MARGIN) if k < hkv else torch.ones_like(norms)
                           for k in ks], 1)
    labels = torch.stack([targets, margins], 1)
    val_labels = targets[val].transpose(0, 1).bool()
    best_recall = torch.full((n_k,), -1.0, device=dev)
    best_w, best_b = weight.detach().clone(), bias.detach().clone()
    for _ in range(epochs):
        order = train[torch.randperm(len(train), generator=gen).to(dev)]
        for s in range(0, len(order), batch):
            # In memory order: the same batch, gathered with far fewer cache misses.
            b = order[s:s + batch].sort().values
            target, margin = labels.index_select(0, b).permute(1, 2, 0, 3)
            loss = (F.binary_cross_entropy_with_logits(logits(b, weight, bias), target,
                                                       reduction="none") * margin).mean()
            opt.zero_grad()
            (loss * n_k).backward()  # the routers are independent: sum their losses
            opt.step()
            sched.step()
        with torch.no_grad():
            pred = logits(val, weight, bias)
            recall = torch.stack([(topk_mask(pred[j], k) & val_labels[j]).sum(-1).float().mean() / k
                                  for j, k in enumerate(ks)])
            better = recall > best_recall
            best_recall = torch.where(better, recall, best_recall)
            best_w[better] = weight.detach()[better]
            best_b[better] = bias.detach()[better]
    w_eff = best_w / std  # [n_k, H, d]
    b_eff = best_b[:, 0] - (best_w * (mean / std)).sum(-1)
    by_domain: list[dict[str, float]] = [{} for _ in ks]
    if domain is not None and domain_names is not None:
        with torch.no_grad():
            pred = logits(val, best_w, best_b)
            val_domain = domain.to(dev)[val]
            for j, k in enumerate(ks):
                hit = (topk_mask(pred[j], k) & val_labels[j]).sum(-1).float() / k
                for i, name in enumerate(domain_names):
                    mine = val_domain == i
                    if mine.any():
                        by_domain[j][name] = float(hit[mine].mean())
    return {k: HeadRouter(weight=w_eff[j].contiguous(), bias=b_eff[j].contiguous(), k=k,
                          recall=float(best_recall[j]), recall_by_domain=by_domain[j])
            for j, k in enumerate(ks)}


def train_mlp_router(
    x: torch.Tensor,
    active: torch.Tensor,
    *,
    rank: int = 1024,
    batch_rows: int = 32,
    union_recall_target: float = 0.99,
    epochs: int = 8,
    lr: float = 3e-3,
    batch: int = 512,
    val_frac: float = 0.1,
    seed: int = 0,
) -> MLPRouter:
    """Fit a low-rank `d → r → N` neuron router with weighted BCE on `active` (activation > 0),
    then choose the batch-union k: the smallest multiple of 128 whose union top-k over
    groups of `batch_rows` validation tokens covers `union_recall_target` of the neurons that
    fire in any of them."""
    gen = torch.Generator().manual_seed(seed)
    n, d = x.shape
    n_neurons = active.shape[1]
    rank = min(rank, d, n_neurons)
    labels = active.float()
    train, val = _split(n, val_frac, gen)
    mean, std = x[train].mean(0), x[train].std(0) + 1e-6
    xs = (x - mean) / std
    net = torch.nn.Sequential(torch.nn.Linear(d, rank, bias=False),
                              torch.nn.Linear(rank, n_neurons)).to(x.device)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01)
    frac = labels[train].mean().clamp(1e-4, 1 - 1e-4)
    pos_weight = ((1 - frac) / frac).clamp(max=20.0).expand(n_neurons)
    for _ in range(epochs):
        order = train[torch.randperm(len(train), generator=gen)]
        for s in range(0, len(order), batch):
            b = order[s:s + batch]
            loss = F.binary_cross_entropy_with_logits(net(xs[b]), labels[b], pos_weight=pos_weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        w1 = net[0].weight / std
        bias_fold = net[1].weight @ (net[0].weight @ (mean / std))
        b2 = net[1].bias - bias_fold
        router = MLPRouter(w1=w1, w2=net[1].weight.detach().clone(), b2=b2.detach(), k=n_neurons,
                           batch=batch_rows, union_recall=1.0, recall=1.0)
        scores = router.scores(x[val])
        act = active[val]
        per_token_k = max(1, int(act.float().sum(1).mean().round().item()))
        router.recall = _per_token_recall(scores, act, per_token_k)
        router.k, router.union_recall = union_k(scores, act, batch_rows, union_recall_target)
    return router


def _per_token_recall(scores: torch.Tensor, active: torch.Tensor, k: int) -> float:
    hit = (topk_mask(scores, k) & active).sum(1).float()
    return (hit / active.sum(1).clamp(min=1)).mean().item()


def union_k(scores: torch.Tensor, active: torch.Tensor, batch_rows: int, target: float
            ) -> tuple[int, float]:
    """Smallest k (multiple of 128, at most all neurons) whose batch-union top-k reaches
    `target` recall of the union of active neurons, averaged over batches of `batch_rows`."""
    n_neurons = scores.shape[1]
    n_batches = max(1, scores.shape[0] // batch_rows)
    rows = n_batches * batch_rows
    if scores.shape[0] < batch_rows:
        rows, n_batches = scores.shape[0], 1
    probs = torch.sigmoid(scores[:rows]).view(n_batches, -1, n_neurons).sum(1)
    union = active[:rows].view(n_batches, -1, n_neurons).any(1)
    order = probs.argsort(dim=1, descending=True)
    hits = torch.gather(union, 1, order).float().cumsum(1)  # [n_batches, N]
    total = union.sum(1).clamp(min=1).float()
    for k in range(128, n_neurons + 128, 128):
        k = min(k, n_neurons)
        recall = (hits[:, k - 1] / total).mean().item()
        if recall >= target or k == n_neurons:
            return k, recall
    return n_neurons, 1.0
