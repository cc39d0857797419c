"""Plain-torch reference forward over whole sequences, with per-layer KV-group selection.

This defines what a sparse model computes: at each layer a selector may keep a subset of
KV groups per token; the attention outputs of the other groups' query heads are set to zero
before the output projection. Calibration observes the same forward to collect router inputs
and labels, and `polarc eval` runs it with dense, router, oracle and random selectors.

Shapes: ids [B, T]; hidden h [B, T, d]; attention output per head [B, T, Hq, D];
group norms and keep masks [B, T, Hkv].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from polarc.models.load import Model

# select(layer, attn_in [B,T,d], group_norms [B,T,Hkv]) -> keep mask [B,T,Hkv] or None (dense)
Selector = Callable[[int, torch.Tensor, torch.Tensor], "torch.Tensor | None"]


@dataclass
class LayerObservation:
    layer: int
    attn_in: torch.Tensor  # [B, T, d]: the router input (attention input after the norm)
    group_norms: torch.Tensor  # [B, T, Hkv]: L2 norm of each group's heads' attention output
    mlp_active: torch.Tensor | None  # [B, T, N] bool: which ReLU neurons fire (OPT only)
    mlp_in: torch.Tensor | None  # [B, T, d]: MLP input after its norm (OPT only: router input)


Observer = Callable[[LayerObservation], None]


def embed(model: Model, ids: torch.Tensor) -> torch.Tensor:
    w = model.weights
    h = F.embedding(ids, w["embed.weight"])
    if model.spec.family == "opt":
        # OPT's learned positions are stored with an offset of 2.
        pos = torch.arange(ids.shape[1], device=ids.device) + 2
        h = h + F.embedding(pos, w["pos_embed.weight"])[None]
    return h


def norm(model: Model, x: torch.Tensor, prefix: str) -> torch.Tensor:
    w = model.weights
    if model.spec.family == "opt":
        return F.layer_norm(x, (x.shape[-1],), w[prefix + ".weight"], w[prefix + ".bias"], 1e-5)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + model.spec.norm_eps)
    return w[prefix + ".weight"] * xf.to(x.dtype)


def rope_cos_sin(model: Model, positions: torch.Tensor, dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [..., D] for rotary embedding at integer `positions`."""
    inv = model.rope_inv_freq.to(positions.device)
    freqs = positions.float()[..., None] * inv
    emb = torch.cat([freqs, freqs], dim=-1)
    s = model.rope_attention_scaling
    return (emb.cos() * s).to(dtype), (emb.sin() * s).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def linear(model: Model, x: torch.Tensor, name: str) -> torch.Tensor:
    return F.linear(x, model.weights[name + ".weight"], model.weights.get(name + ".bias"))


def run_layer(
    model: Model,
    i: int,
    h: torch.Tensor,
    *,
    select: Selector | None = None,
    observe: Observer | None = None,
    kv_out: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    mlp_select: Callable[[int, torch.Tensor], torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """One decoder layer over whole sequences (causal), with optional group selection.
    `kv_out`, when given, receives this layer's keys and values [B, Hkv, T, D] (rotated).
    `mlp_select(layer, mlp_in)` may return a keep mask [B, T, N] of ReLU neurons (OPT)."""
    spec = model.spec
    B, T, _ = h.shape
    p = f"layers.{i}"
    attn_in = norm(model, h, p + ".attn_norm")
    q = linear(model, attn_in, p + ".q").view(B, T, spec.n_heads, spec.head_dim).transpose(1, 2)
    k = linear(model, attn_in, p + ".k").view(B, T, spec.n_kv_heads, spec.head_dim)
    v = linear(model, attn_in, p + ".v").view(B, T, spec.n_kv_heads, spec.head_dim)
    k, v = k.transpose(1, 2), v.transpose(1, 2)
    if spec.family == "llama":
        cos, sin = rope_cos_sin(model, torch.arange(T, device=h.device), q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if kv_out is not None:
        kv_out.append((k, v))
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                       enable_gqa=spec.n_kv_heads != spec.n_heads)
    o = o.transpose(1, 2).reshape(B, T, spec.n_kv_heads, spec.group_size, spec.head_dim)
    group_norms = o.float().pow(2).sum(dim=(-1, -2)).sqrt()
    keep = select(i, attn_in, group_norms) if select is not None else None
    if keep is not None:
        o = o * keep.to(o.dtype)[..., None, None]
    h = h + linear(model, o.reshape(B, T, -1), p + ".o")
    x = norm(model, h, p + ".mlp_norm")
    active = None
    if spec.family == "opt":
        up = linear(model, x, p + ".up")
        active = up > 0
        hidden = F.relu(up)
        keep_neurons = mlp_select(i, x) if mlp_select is not None else None
        if keep_neurons is not None:
            hidden = hidden * keep_neurons.to(hidden.dtype)
        mlp = linear(model, hidden, p + ".down")
    else:
        gated = F.silu(linear(model, x, p + ".gate")) * linear(model, x, p + ".up")
        mlp = linear(model, gated, p + ".down")
    if observe is not None:
        observe(LayerObservation(i, attn_in, group_norms, active, x if active is not None else None))
    return h + mlp


def final_logits(model: Model, h: torch.Tensor) -> torch.Tensor:
    return F.linear(norm(model, h, "norm"), model.weights["lm_head.weight"])


@torch.no_grad()
def forward(
    model: Model,
    ids: torch.Tensor,
    *,
    select: Selector | None = None,
    observe: Observer | None = None,
    start_layer: int = 0,
    hidden: torch.Tensor | None = None,
    layer_inputs: list[torch.Tensor] | None = None,
    mlp_select: Callable[[int, torch.Tensor], torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Logits [B, T, vocab]. With `start_layer` > 0, `hidden` is that layer's input
    (from an earlier dense run), so a change at one layer re-runs only the layers after it.
    `layer_inputs`, when given, receives each layer's input hidden state."""
    h = embed(model, ids) if start_layer == 0 else hidden
    for i in range(start_layer, model.spec.n_layers):
        if layer_inputs is not None:
            layer_inputs.append(h)
        h = run_layer(model, i, h, select=select, observe=observe, mlp_select=mlp_select)
    return final_logits(model, h)
