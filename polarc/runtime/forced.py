"""Quality through the engine itself: held-out text teacher-forced through the runtime's own
path, a dense prefill of a prefix and then every following token one decode step at a time
(the router, top-k, the selective attention over the paged cache, every kernel and every
cast the engine runs), against the same engine with every KV group selected.

Both run in lockstep, one step each per position, so no logits are stored: each step adds its
tokens' negative log-likelihood, top-1 agreement and KL(reference ‖ engine).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from polarc.runtime.torch_runtime import Runtime


@dataclass
class ForcedQuality:
    nll_engine: float = 0.0
    nll_reference: float = 0.0
    top1_agree: int = 0
    kl: float = 0.0
    tokens: int = 0

    def add(self, engine: torch.Tensor, reference: torch.Tensor, target: torch.Tensor) -> None:
        """One position of every row: logits [B, V] of both, next tokens [B]."""
        lp_e = F.log_softmax(engine.float(), -1)
        lp_r = F.log_softmax(reference.float(), -1)
        t = target.to(lp_e.device)[:, None]
        self.nll_engine -= lp_e.gather(-1, t).sum().item()
        self.nll_reference -= lp_r.gather(-1, t).sum().item()
        self.top1_agree += (lp_e.argmax(-1) == lp_r.argmax(-1)).sum().item()
        self.kl += (lp_r.exp() * (lp_r - lp_e)).sum().item()
        self.tokens += target.numel()

    def as_json(self) -> dict[str, float]:
        n = max(self.tokens, 1)
        return {"ppl_engine": math.exp(self.nll_engine / n),
                "ppl_reference": math.exp(self.nll_reference / n),
                "top1_agreement": self.top1_agree / n, "kl": self.kl / n, "tokens": self.tokens}


@torch.no_grad()
def teacher_forced(engine_rt: Runtime, reference_rt: Runtime, seqs: torch.Tensor, *,
                   prefix: int, on_batch: Callable[[int], None] | None = None) -> ForcedQuality:
    """`seqs` [n, T] through both runtimes, as many rows at a time as they have slots: each
    row's first `prefix` tokens prefilled, then positions prefix..T-1 fed one decode step at
    a time; every prediction of positions prefix..T-1 is scored."""
    n, length = seqs.shape
    if not 1 <= prefix < length:
        raise ValueError(f"prefix must be in [1, {length}), got {prefix}")
    quality = ForcedQuality()
    rows = engine_rt.batch
    for first in range(0, n, rows):
        batch = seqs[first:first + rows]
        logits = [_prefill(rt, batch, prefix, length) for rt in (engine_rt, reference_rt)]
        for t in range(prefix, length):
            quality.add(logits[0], logits[1], batch[:, t])
            if t == length - 1:
                break
            tokens = torch.zeros(rows, dtype=torch.long)
            tokens[:len(batch)] = batch[:, t]
            logits = [rt.step(tokens.to(rt.device))[:len(batch)] for rt in (engine_rt,
                                                                            reference_rt)]
        for rt in (engine_rt, reference_rt):
            for slot in range(rows):
                rt.cache.free(slot)
        if on_batch is not None:
            on_batch(len(batch))
    return quality


def _prefill(rt: Runtime, batch: torch.Tensor, prefix: int, length: int) -> torch.Tensor:
    """The rows' prefixes in slots 0..; logits [B, V] predicting position `prefix`."""
    chunks = []
    for b in range(batch.shape[0]):
        rt.cache.free(b)
        rt.cache.grow(b, length)
        chunks.append((b, batch[b, :prefix].tolist(), 0))
    logits = torch.stack([rt.prefill_chunk(*c) for c in chunks])
    for b in range(batch.shape[0]):
        rt.cache.set_length(b, prefix)
    rt.cache.sync()
    return logits
