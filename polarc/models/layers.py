"""The one model definition. A decoder layer is written once here and run three ways:

- the reference forward (`forward.py`): whole sequences, causal attention, KV groups masked
  per token (calibration and `polarc eval`);
- prefill (`polarc.runtime`): whole prompts, causal attention, keys and values kept;
- the decode step (`polarc.runtime`): one token per row, attention over a KV cache that reads
  only each row's selected groups.

What differs is an argument, not a copy: `attend` (the attention over past positions), `mlp`
(the dense MLP or the runtime's selective one) and `ops` (the element-wise stages, which the
decode step compiles on CUDA). The layer returns its output as ``(h, delta)`` with ``h +
delta`` the true hidden state, so the next layer adds the residual inside its first norm (one
pass instead of two on the decode path).

Weights (`Model.weights`, internal names), per layer with prefix ``layers.{i}.``:
``attn_norm``, ``mlp_norm`` (``.weight``, and ``.bias`` for LayerNorm models); ``qkv.weight``
``[Hq*D + 2*Hkv*D (+ R), d]`` (+ ``.bias``): the q, k, v projections fused, with an engine's
head router appended as ``R = Hkv`` more rows (its scores come out of the same GEMM);
``o``; SwiGLU: ``gate_up.weight [2F, d]``; ReLU (OPT): ``up [F, d]`` with bias; ``down``.
``q``, ``k``, ``v`` (and ``gate``, ``up`` for SwiGLU) are views into the fused tensors.
Model level: ``embed.weight``, ``pos_embed.weight`` (learned positions), ``norm``,
``lm_head.weight``.

Shapes: hidden ``h [B, T, d]``; ``q [B, T, Hq, D]``; ``k``, ``v [B, T, Hkv, D]``;
``positions [B, T]`` (or ``[T]``, shared by the rows).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from polarc.models.load import Model
    from polarc.models.presets import ModelSpec

# attend(layer, x, q, k, v, extra) -> o [B, T, Hq, D]; x: the attention input after the norm,
# extra: the outputs of rows fused after q, k, v (an engine's router scores) or None.
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                   "torch.Tensor | None"], torch.Tensor]
# mlp(layer, x) -> the MLP's output for the MLP input x (after its norm).
Mlp = Callable[[int, torch.Tensor], torch.Tensor]

OPT_POSITION_OFFSET = 2  # OPT stores its learned positions from index 2


def norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float
         ) -> torch.Tensor:
    """RMSNorm (no bias: the Llama family) or LayerNorm (with a bias: OPT)."""
    if bias is not None:
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def add_norm(h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
             bias: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h + delta, norm(h + delta))``: the residual add and the next norm in one stage."""
    h = h + delta
    return h, norm(h, weight, bias, eps)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def rope_qk(q: torch.Tensor, k: torch.Tensor,
            rope: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary positions on queries and keys (`rope`: cos, sin); None: models without them."""
    if rope is None:
        return q, k
    return apply_rope(q, *rope), apply_rope(k, *rope)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    f = gate_up.shape[-1] // 2
    return F.silu(gate_up[..., :f]) * gate_up[..., f:]


def linear(model: Model, x: torch.Tensor, name: str) -> torch.Tensor:
    return F.linear(x, model.weights[name + ".weight"], model.weights.get(name + ".bias"))


@dataclass(frozen=True)
class Ops:
    """The stages of a layer that a runtime may swap: the element-wise ones (eager here; the
    decode step compiles them; its `rope_qk` also turns an FP8 cache's queries and keys into
    the cache's basis) and the linear layers (the runtime's reads float8 weights)."""

    add_norm: Callable = add_norm
    rope_qk: Callable = rope_qk
    swiglu: Callable = swiglu
    linear: Callable = linear
    # (model, x, name) -> swiglu(linear(model, x, name)) in one kernel, or None where the
    # runtime has no such kernel for that layer (then the two stages run)
    linear_swiglu: Callable | None = None
    # (model, x, name, h) -> delta: linear(model, x, name) added into the residual stream h in
    # place by the GEMM itself, and what this Ops' `add_norm` then takes as `delta` (having
    # nothing left to add); or None where the runtime has no such kernel (then linear runs)
    linear_residual: Callable | None = None


EAGER = Ops()


def embed(model: Model, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    h = F.embedding(ids, model.weights["embed.weight"])
    if model.spec.learned_positions:
        h = h + F.embedding(positions + OPT_POSITION_OFFSET, model.weights["pos_embed.weight"])
    return h


def rope_cos_sin(model: Model, positions: torch.Tensor, dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """cos/sin ``[..., T, 1, D]`` (broadcast over heads) at integer `positions`; None for
    models without rotary positions."""
    if not model.spec.rotary:
        return None
    freqs = positions.float()[..., None] * model.rope_inv_freq.to(positions.device)
    emb = torch.cat([freqs, freqs], dim=-1)[..., None, :]
    s = model.rope_attention_scaling
    return (emb.cos() * s).to(dtype), (emb.sin() * s).to(dtype)


def split_qkv(spec: ModelSpec, qkv: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """q ``[.., Hq, D]``, k, v ``[.., Hkv, D]`` and the extra rows' outputs (or None)."""
    qd, kvd = spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
    lead = qkv.shape[:-1]
    q = qkv[..., :qd].view(*lead, spec.n_heads, spec.head_dim)
    k = qkv[..., qd:qd + kvd].view(*lead, spec.n_kv_heads, spec.head_dim)
    v = qkv[..., qd + kvd:qd + 2 * kvd].view(*lead, spec.n_kv_heads, spec.head_dim)
    extra = qkv[..., spec.qkv_rows:] if qkv.shape[-1] > spec.qkv_rows else None
    return q, k, v, extra


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int = 0
                     ) -> torch.Tensor:
    """Attention of every position over the earlier ones (and itself): ``[B, T, Hq, D]``.
    With `past` > 0 the queries are positions past..past+T-1 and k, v ``[B, past+T, Hkv, D]``
    hold every position from 0 (a prompt's later chunk over the cache and itself)."""
    mask = None
    if past:
        # (imported here: the module pulls in triton, which the CPU runtime does without)
        from torch.nn.attention.bias import causal_lower_right

        mask = causal_lower_right(q.shape[1], k.shape[1])
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=mask, is_causal=past == 0,
                                       enable_gqa=q.shape[2] != k.shape[2])
    return o.transpose(1, 2)


def residual_linear(model: Model, x: torch.Tensor, name: str, h: torch.Tensor | None,
                    ops: Ops = EAGER) -> Any:
    """The delta a linear layer adds to the residual stream h: ``linear(x)``, or what
    `ops.linear_residual` returns having added it into h itself."""
    delta = ops.linear_residual(model, x, name, h) \
        if ops.linear_residual is not None and h is not None else None
    return ops.linear(model, x, name) if delta is None else delta


def dense_mlp(model: Model, layer: int, x: torch.Tensor, ops: Ops = EAGER,
              h: torch.Tensor | None = None) -> Any:
    """The MLP's output (`residual_linear`'s delta to h where h is given)."""
    p = f"layers.{layer}."
    if model.spec.relu_mlp:
        act = F.relu(ops.linear(model, x, p + "up"))
    else:
        act = ops.linear_swiglu(model, x, p + "gate_up") if ops.linear_swiglu else None
        if act is None:
            act = ops.swiglu(ops.linear(model, x, p + "gate_up"))
    return residual_linear(model, act, p + "down", h, ops)


def decoder_layer(
    model: Model,
    layer: int,
    h: torch.Tensor,
    delta: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor] | None,
    attend: Attend,
    *,
    mlp: Mlp | None = None,
    ops: Ops = EAGER,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoder layer: ``(h, delta)`` in (layer input = h + delta), ``(h, delta)`` out."""
    spec, w, p = model.spec, model.weights, f"layers.{layer}."
    h, x = ops.add_norm(h, delta, w[p + "attn_norm.weight"], w.get(p + "attn_norm.bias"),
                        spec.norm_eps)
    q, k, v, extra = split_qkv(spec, ops.linear(model, x, p + "qkv"))
    q, k = ops.rope_qk(q, k, rope)
    o = attend(layer, x, q, k, v, extra)
    attn_out = residual_linear(model, o.flatten(-2), p + "o", h, ops)
    h, x = ops.add_norm(h, attn_out, w[p + "mlp_norm.weight"], w.get(p + "mlp_norm.bias"),
                        spec.norm_eps)
    return h, (mlp(layer, x) if mlp is not None else dense_mlp(model, layer, x, ops, h))


def next_linear(model: Model, name: str) -> str | None:
    """The linear layer `decoder_layer` runs after `name` on the same rows (o, then gate_up or
    up, then down, then the next layer's qkv; after the last down the LM head), for kernels
    that prefetch its weight; None after qkv (the attention runs between) and the LM head."""
    prefix, _, last = name.rpartition(".")
    if last == "o":
        return prefix + (".up" if model.spec.relu_mlp else ".gate_up")
    if last in ("gate_up", "up"):
        return prefix + ".down"
    if last == "down":
        layer = int(prefix.rpartition(".")[2]) + 1
        return f"layers.{layer}.qkv" if layer < model.spec.n_layers else "lm_head"
    return None


def norm_after(model: Model, name: str) -> str:
    """The norm `decoder_layer` applies to the residual stream after linear layer `name` (o
    or down) adds to it: the layer's MLP norm after o, the next layer's attention norm (the
    final norm after the last) after down."""
    if name.endswith(".o"):
        return name[:-len("o")] + "mlp_norm"
    after = next_linear(model, name)  # the next layer's qkv, or the LM head
    return "norm" if after == "lm_head" else after[:-len("qkv")] + "attn_norm"


def final_norm(model: Model, h: torch.Tensor) -> torch.Tensor:
    """The last layer's output (h + delta) normalised: the LM head's input."""
    w = model.weights
    return norm(h, w["norm.weight"], w.get("norm.bias"), model.spec.norm_eps)


def final_logits(model: Model, h: torch.Tensor, ops: Ops = EAGER, delta: Any = None
                 ) -> torch.Tensor:
    """Next-token logits from the last layer's output, h (+ delta: through `ops.add_norm`)."""
    if delta is None:
        return ops.linear(model, final_norm(model, h), "lm_head")
    w = model.weights
    _, x = ops.add_norm(h, delta, w["norm.weight"], w.get("norm.bias"), model.spec.norm_eps)
    return ops.linear(model, x, "lm_head")


# ------------------------------------------------------------------------ weight layout


def _fused_parts(spec: ModelSpec) -> dict[str, list[tuple[str, int]]]:
    """Fused tensor -> its parts (name, rows), for the layer layout above."""
    qd, kvd = spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
    parts = {"qkv": [("q", qd), ("k", kvd), ("v", kvd)]}
    if not spec.relu_mlp:
        parts["gate_up"] = [("gate", spec.intermediate), ("up", spec.intermediate)]
    return parts


def fuse_weights(out: dict[str, torch.Tensor], spec: ModelSpec,
                 layers: range | list[int] | None = None) -> dict[str, torch.Tensor]:
    """Separate q/k/v (and gate/up) weights of `layers` (default all) → the fused layout,
    parts as views; in place on a dict the caller owns, layer by layer, so only one layer's
    parts exist twice at a time."""
    layers = range(spec.n_layers) if layers is None else layers
    for i in layers:
        p = f"layers.{i}."
        for fused, parts in _fused_parts(spec).items():
            for kind in ("weight", "bias"):
                names = [f"{p}{name}.{kind}" for name, _ in parts]
                if all(n in out for n in names):
                    out[f"{p}{fused}.{kind}"] = torch.cat([out.pop(n) for n in names])
    add_part_views(out, spec, layers)
    return out


def add_part_views(weights: dict[str, torch.Tensor], spec: ModelSpec,
                   layers: range | list[int] | None = None) -> None:
    """Add q/k/v (and gate/up) as views into the fused tensors (rows past them, such as an
    engine's router, are left out), and into float8 weights' row scales. Biases get views
    only where the model has them; weights laid out tile by tile (not ``[N, K]``) get none."""
    for i in range(spec.n_layers) if layers is None else layers:
        p = f"layers.{i}."
        for fused, parts in _fused_parts(spec).items():
            kinds = ("weight", "weight_scale", "bias") if fused != "qkv" or spec.qkv_bias \
                else ("weight", "weight_scale")
            for kind in kinds:
                if f"{p}{fused}.{kind}" not in weights or weights[f"{p}{fused}.{kind}"].dim() > 2:
                    continue
                start = 0
                for name, rows in parts:
                    weights[f"{p}{name}.{kind}"] = weights[f"{p}{fused}.{kind}"][start:start + rows]
                    start += rows


def stored_weights(weights: dict[str, torch.Tensor], spec: ModelSpec) -> dict[str, torch.Tensor]:
    """The tensors that hold the weights (the fused ones, no views; lm_head only if untied)."""
    views = {name for parts in _fused_parts(spec).values() for name, _ in parts}
    out = {}
    for name, t in weights.items():
        parts = name.split(".")
        if len(parts) == 4 and parts[0] == "layers" and parts[2] in views:
            continue
        if name == "lm_head.weight" and spec.tie_embeddings:
            continue
        out[name] = t
    return out
