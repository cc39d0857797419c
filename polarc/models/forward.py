"""The reference forward: whole sequences through the one layer definition (`layers.py`),
with per-layer KV-group selection.

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

from polarc.models.layers import (
    causal_attention,
    decoder_layer,
    embed,
    final_logits,
    linear,
    rope_cos_sin,
)
from polarc.models.load import Model

# select(layer, attn_in [B,T,d], group_norms) -> keep mask [B,T,Hkv] or None (dense), where
# group_norms() gives [B,T,Hkv], made on the first call only: a router's selection never
# asks, and they cost a few percent of a layer on the CPU
Selector = Callable[[int, torch.Tensor, Callable[[], torch.Tensor]], "torch.Tensor | None"]
# mlp_select(layer, mlp_in [B,T,d]) -> keep mask [B,T,N] of ReLU neurons or None (dense)
NeuronSelector = Callable[[int, torch.Tensor], "torch.Tensor | None"]


@dataclass
class LayerObservation:
    layer: int
    attn_in: torch.Tensor  # [B, T, d]: the router input (attention input after the norm)
    group_norms: torch.Tensor  # [B, T, Hkv]: L2 norm of each group's part of the attention output
    mlp_active: torch.Tensor | None  # [B, T, N] bool: which ReLU neurons fire (OPT only)
    mlp_in: torch.Tensor | None  # [B, T, d]: MLP input after its norm (OPT only: router input)
    kv_absmax: torch.Tensor | None = None  # [2, Hkv]: largest |K| and |V| per group (post-rope)
    key_sum: torch.Tensor | None = None  # [Hkv, D] float64: K summed over the positions (post-rope)


Observer = Callable[[LayerObservation], None]


def group_output_norms(o: torch.Tensor, w_o: torch.Tensor) -> torch.Tensor:
    """[B, T, Hkv]: the L2 norm of each KV group's part of the attention block's output, its
    query heads' outputs o [B, T, Hkv, G, D] through their columns of W_o [d, Hq * D].

    What dropping a group removes from the residual stream is that part, not the heads' own
    output: W_o weighs heads very unequally. Measured on SmolLM2 (uniform 2 of 3 groups,
    16k held-out tokens of the mix) the top-2 by this norm cost +15.0% perplexity, by the
    heads' output norm +20.7%. ||o_g W_g^T||^2 = o_g (W_g^T W_g) o_g^T, so each group's Gram
    matrix [G*D, G*D] stands in for a product with all of W_o."""
    B, T, hkv, g, d = o.shape
    og = o.reshape(B, T, hkv, g * d).float()
    wg = w_o.float().view(w_o.shape[0], hkv, g * d)
    gram = torch.einsum("dhc,dhe->hce", wg, wg)
    return (torch.einsum("bthc,hce->bthe", og, gram) * og).sum(-1).clamp_min(0).sqrt()


@torch.no_grad()
def run_layer(
    model: Model,
    layer: int,
    h: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor] | None,
    *,
    select: Selector | None = None,
    observe: Observer | None = None,
    mlp_select: NeuronSelector | None = None,
) -> torch.Tensor:
    """One layer of the reference forward: input hidden state [B, T, d] → output."""
    spec = model.spec
    B, T, _ = h.shape
    seen: dict[str, torch.Tensor] = {}

    def attend(layer: int, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               extra: torch.Tensor | None) -> torch.Tensor:
        o = causal_attention(q, k, v).reshape(B, T, spec.n_kv_heads, spec.group_size,
                                                spec.head_dim)
        seen["attn_in"] = x

        def norms(o: torch.Tensor = o) -> torch.Tensor:
            if "norms" not in seen:
                seen["norms"] = group_output_norms(o, model.weights[f"layers.{layer}.o.weight"])
            return seen["norms"]

        if observe is not None:
            norms()
            seen["kv_absmax"] = torch.stack([k.abs().amax(dim=(0, 1, 3)),
                                             v.abs().amax(dim=(0, 1, 3))]).float()
            seen["key_sum"] = k.sum(dim=(0, 1), dtype=torch.float64)
        keep = select(layer, x, norms) if select is not None else None
        if keep is not None:
            o = o * keep.to(o.dtype)[..., None, None]
        return o.reshape(B, T, spec.n_heads, spec.head_dim)

    def relu_mlp(layer: int, x: torch.Tensor) -> torch.Tensor:
        p = f"layers.{layer}."
        up = linear(model, x, p + "up")
        seen["active"], seen["mlp_in"] = up > 0, x
        hidden_act = F.relu(up)
        keep = mlp_select(layer, x) if mlp_select is not None else None
        if keep is not None:
            hidden_act = hidden_act * keep.to(hidden_act.dtype)
        return linear(model, hidden_act, p + "down")

    h, delta = decoder_layer(model, layer, h, torch.zeros_like(h), rope, attend,
                             mlp=relu_mlp if spec.relu_mlp else None)
    if observe is not None:
        observe(LayerObservation(layer, seen["attn_in"], seen["norms"], seen.get("active"),
                                 seen.get("mlp_in"), seen.get("kv_absmax"), seen.get("key_sum")))
    return h + delta


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
    mlp_select: NeuronSelector | None = None,
) -> torch.Tensor:
    """Logits [B, T, vocab]. With `start_layer` > 0, `hidden` is that layer's input
    (from an earlier dense run), so a change at one layer re-runs only the layers after it.
    `layer_inputs`, when given, receives each layer's input hidden state."""
    ids = ids.to(model.device)
    positions = torch.arange(ids.shape[1], device=ids.device)
    h = embed(model, ids, positions) if start_layer == 0 else hidden
    rope = rope_cos_sin(model, positions, h.dtype)
    for i in range(start_layer, model.spec.n_layers):
        if layer_inputs is not None:
            layer_inputs.append(h)
        with model.layer_weights(i):
            h = run_layer(model, i, h, rope, select=select, observe=observe,
                          mlp_select=mlp_select)
    return final_logits(model, h)
