"""Next tokens from logits: greedy, temperature, nucleus (top-p)."""

from __future__ import annotations

import torch


def sample(logits: torch.Tensor, *, temperature: float, top_p: float,
           generator: torch.Generator | None) -> torch.Tensor:
    """Next tokens [B] from logits [B, vocab]: greedy at temperature 0, else nucleus sampling.

    The largest logit is subtracted before dividing by the temperature, so a tiny temperature
    tends to greedy instead of overflowing."""
    if temperature <= 0:
        return logits.argmax(-1)
    scaled = (logits.double() - logits.double().amax(-1, keepdim=True)) / temperature
    probs = torch.softmax(scaled, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        cut = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest set reaching top_p
        sorted_p = sorted_p.masked_fill(cut, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs.float().cpu(), 1, generator=generator).squeeze(1).to(logits.device)
