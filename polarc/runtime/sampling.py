"""Next tokens from logits, one row at a time in effect: greedy, temperature, nucleus (top-p).

Each row samples with its own seed and its own counter (the token's index in its output):
the random number for (seed, counter, token id) is a counter hash, the same on every device
and whatever else is in the batch, so a request's sampled output depends only on its own
seed, never on which requests share its steps. Sampling is Gumbel-max: the argmax of the
scaled logits plus -log(-log(u)) draws exactly from their softmax.
"""

from __future__ import annotations

import torch

from polarc.models.weights import hash32


def row_uniforms(seeds: torch.Tensor, counters: torch.Tensor, vocab: int) -> torch.Tensor:
    """Uniforms in (0, 1) [B, vocab]: element (b, j) a function of (seeds[b], counters[b], j)."""
    dev = seeds.device
    key = hash32(hash32(seeds.long() & 0xFFFFFFFF) ^ (counters.long() & 0xFFFFFFFF))  # [B]
    j = torch.arange(vocab, device=dev, dtype=torch.int64)
    x = hash32(hash32(j[None, :] ^ key[:, None]) ^ (seeds.long()[:, None] >> 32))
    return ((x >> 8).float() + 0.5) / 2**24


def sample(logits: torch.Tensor, *, temperature: torch.Tensor, top_p: torch.Tensor,
           seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """Next tokens [B] from logits [B, vocab] with each row's own `temperature` (0: greedy),
    `top_p` (the smallest set of tokens whose probability reaches it), seed and counter.

    The largest logit is subtracted before dividing by the temperature, so a tiny temperature
    tends to greedy instead of overflowing."""
    greedy = logits.argmax(-1)
    sampled = temperature > 0
    if not bool(sampled.any()):
        return greedy
    rows = torch.nonzero(sampled)[:, 0]
    x = logits[rows].float()
    x = (x - x.amax(-1, keepdim=True)) / temperature[rows, None].float()
    p = top_p[rows].float()
    if bool((p < 1).any()):
        probs = torch.softmax(x, -1)
        sorted_p, order = probs.sort(dim=-1, descending=True)
        cut = sorted_p.cumsum(-1) - sorted_p > p[:, None]  # keep the smallest set reaching p
        x = x.masked_fill(torch.zeros_like(cut).scatter_(-1, order, cut), float("-inf"))
    u = row_uniforms(seeds[rows], counters[rows], x.shape[-1])
    out = greedy.clone()
    out[rows] = (x - torch.log(-torch.log(u))).argmax(-1)
    return out
