"""`layers.py` as ONNX graph pieces: each function here builds, node by node, what the function
of the same name in `layers.py` computes, so the two read side by side. The exporter
(`polarc.exporters.onnx_export`) wires them into the decode and prefill graphs.

Why a second description at all: `torch.onnx.export` of `layers.decoder_layer` was prototyped
(2026-11-25, torch 2.13 + onnxscript 0.7) and gives the same logits, but only with
onnxscript's private constant-folding pass (its public optimizer renames, transposes, merges
and drops weights, which breaks the engine's weight names and the shared weight file),
opset 18 only, and 15-30x slower exports (a 32-layer model: 47 s against 1.6 s), plus a new
dependency. The tests (`tests/test_onnx_export.py`) run both graphs under ONNX's reference
evaluator against the torch engine at 1e-4, which keeps the two descriptions equal.

Values are tensor names. Leading dims: ``[B]`` in the decode graph, ``[B, T]`` in prefill
(`rows` names the shape of those leading dims where a 2-D Gemm needs them flattened).
Unlike `layers.py` the residual is added directly (no ``(h, delta)`` pair): the same sums.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from polarc.models.load import Model

OPSET = 17
ONNX_DTYPES = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16,
               torch.bfloat16: TensorProto.BFLOAT16}

# attend(layer, x, q, k, v, extra) -> o [..., Hq, D]: layers.Attend, for graphs
Attend = Callable[[int, str, str, str, str, "str | None"], str]


class Graph:
    """A tiny ONNX graph builder over one model: every op gets fresh output names; weights
    are initializers named as in `Model.weights`, their bytes placed by `store`."""

    def __init__(self, model: Model, dtype: torch.dtype,
                 store: Callable[[str, torch.Tensor], TensorProto]) -> None:
        self.model, self.spec = model, model.spec
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, TensorProto] = {}
        self.dtype, self.onnx_dtype, self.store = dtype, ONNX_DTYPES[dtype], store
        self.count = 0

    def op(self, op_type: str, *inputs: str, n_out: int = 1, domain: str = "",
           name: str | None = None, **attrs: Any) -> Any:
        outs = [f"{op_type.lower()}_{self.count}_{i}" for i in range(n_out)]
        if name is not None:
            outs[0] = name
        self.count += 1
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, domain=domain or None,
                                           **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, value: Any, dtype: Any = np.int64) -> str:
        name = f"const_{self.count}"
        self.count += 1
        self.inits[name] = numpy_helper.from_array(np.asarray(value, dtype=dtype), name)
        return name

    def w(self, name: str, tensor: torch.Tensor | None = None) -> str:
        """A model weight (in the export dtype) by its name, or `tensor` under that name."""
        t = tensor if tensor is not None else self.model.weights[name]
        if t.is_floating_point():
            t = t.to(self.dtype)
        self.inits[name] = self.store(name, t)
        return name

    def model_proto(self, name: str, inputs: list, outputs: list, domains: dict[str, int],
                    manifest: dict[str, Any]) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, inputs, outputs,
                                  initializer=list(self.inits.values()))
        opsets = [helper.make_opsetid("", OPSET)] + [helper.make_opsetid(d, v)
                                                     for d, v in domains.items()]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="polarc")
        model.ir_version = 8
        helper.set_model_props(model, {"polarc.manifest": json.dumps(manifest),
                                       "polarc.graph": name})
        return model


def linear(g: Graph, x: str, name: str, rows: str | None = None) -> str:
    """x @ W.T + b (Gemm, transB=1); `rows`: the shape of x's leading dims when there are two."""
    wt = g.model.weights[name + ".weight"]
    args = [g.w(name + ".weight")]
    if name + ".bias" in g.model.weights:
        args.append(g.w(name + ".bias"))
    if rows is None:
        return g.op("Gemm", x, *args, transB=1)
    flat = g.op("Reshape", x, g.const([-1, wt.shape[1]]))
    y = g.op("Gemm", flat, *args, transB=1)
    return g.op("Reshape", y, g.op("Concat", rows, g.const([wt.shape[0]]), axis=0))


def norm(g: Graph, x: str, prefix: str) -> str:
    if prefix + ".bias" in g.model.weights:
        return g.op("LayerNormalization", x, g.w(prefix + ".weight"), g.w(prefix + ".bias"),
                    axis=-1, epsilon=g.spec.norm_eps)
    xf = g.op("Cast", x, to=TensorProto.FLOAT)
    ms = g.op("ReduceMean", g.op("Mul", xf, xf), axes=[-1], keepdims=1)
    inv = g.op("Reciprocal", g.op("Sqrt", g.op("Add", ms, g.const(g.spec.norm_eps, np.float32))))
    y = g.op("Cast", g.op("Mul", xf, inv), to=g.onnx_dtype)
    return g.op("Mul", y, g.w(prefix + ".weight"))


def embed(g: Graph, ids: str, positions: str) -> str:
    h = g.op("Gather", g.w("embed.weight"), ids, axis=0)
    if g.spec.learned_positions:
        h = g.op("Add", h, g.op("Gather", g.w("pos_embed.weight"),
                                g.op("Add", positions, g.const(2)), axis=0))
    return h


def rope_cos_sin(g: Graph, positions: str) -> tuple[str, str] | None:
    """cos/sin ``[..., 1, D]`` in the export dtype for int64 `positions` ``[...]``."""
    if not g.spec.rotary:
        return None
    inv = g.model.rope_inv_freq.float().numpy()
    freqs = g.op("Mul", g.op("Unsqueeze", g.op("Cast", positions, to=TensorProto.FLOAT),
                             g.const([-1])), g.const(inv, np.float32))
    emb = g.op("Unsqueeze", g.op("Concat", freqs, freqs, axis=-1), g.const([-2]))
    s = g.const(g.model.rope_attention_scaling, np.float32)
    cos, sin = (g.op("Cast", g.op("Mul", g.op(fn, emb), s), to=g.onnx_dtype)
                for fn in ("Cos", "Sin"))
    return cos, sin


def apply_rope(g: Graph, x: str, cos: str, sin: str) -> str:
    d = g.spec.head_dim
    lo = g.op("Slice", x, g.const([0]), g.const([d // 2]), g.const([-1]))
    hi = g.op("Slice", x, g.const([d // 2]), g.const([d]), g.const([-1]))
    rotated = g.op("Concat", g.op("Neg", hi), lo, axis=-1)
    return g.op("Add", g.op("Mul", x, cos), g.op("Mul", rotated, sin))


def split_qkv(g: Graph, qkv: str, lead: int, layer: int) -> tuple[str, str, str, str | None]:
    """q ``[.., Hq, D]``, k, v ``[.., Hkv, D]`` and the extra rows (router scores) or None."""
    spec = g.spec
    qd, kvd = spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
    keep = [0] * lead

    def part(lo: int, hi: int, heads: int) -> str:
        piece = g.op("Slice", qkv, g.const([lo]), g.const([hi]), g.const([-1]))
        return g.op("Reshape", piece, g.const([*keep, heads, spec.head_dim]))

    q = part(0, qd, spec.n_heads)
    k = part(qd, qd + kvd, spec.n_kv_heads)
    v = part(qd + kvd, qd + 2 * kvd, spec.n_kv_heads)
    rows = g.model.weights[f"layers.{layer}.qkv.weight"].shape[0]
    extra = None
    if rows > spec.qkv_rows:
        extra = g.op("Slice", qkv, g.const([spec.qkv_rows]), g.const([rows]), g.const([-1]))
    return q, k, v, extra


def causal_attention(g: Graph, q: str, k: str, v: str, mask: str, scale: str) -> str:
    """Every position over the earlier ones: q ``[B, T, Hq, D]`` → ``[B, T, Hq, D]``;
    `mask` ``[G*T, T]`` (0 or -inf), `scale` a scalar, both in the export dtype."""
    spec = g.spec
    hkv, hq, d = spec.n_kv_heads, spec.n_heads, spec.head_dim
    qt, kt, vt = (g.op("Transpose", t, perm=[0, 2, 1, 3]) for t in (q, k, v))  # [B, H, T, D]
    qg = g.op("Reshape", qt, g.const([0, hkv, -1, d]))  # [B, Hkv, G*T, D]
    scores = g.op("Add", g.op("Mul", g.op("MatMul", qg, g.op("Transpose", kt, perm=[0, 1, 3, 2])),
                              scale), mask)
    o = g.op("MatMul", g.op("Softmax", scores, axis=-1), vt)  # [B, Hkv, G*T, D]
    return g.op("Transpose", g.op("Reshape", o, g.const([0, hq, -1, d])), perm=[0, 2, 1, 3])


def dense_mlp(g: Graph, layer: int, x: str, rows: str | None) -> str:
    p = f"layers.{layer}."
    if g.spec.relu_mlp:
        return linear(g, g.op("Relu", linear(g, x, p + "up", rows)), p + "down", rows)
    f = g.spec.intermediate
    gate_up = linear(g, x, p + "gate_up", rows)
    gate = g.op("Slice", gate_up, g.const([0]), g.const([f]), g.const([-1]))
    up = g.op("Slice", gate_up, g.const([f]), g.const([2 * f]), g.const([-1]))
    act = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), up)
    return linear(g, act, p + "down", rows)


def decoder_layer(g: Graph, layer: int, h: str, rope: tuple[str, str] | None, attend: Attend,
                  *, lead: int, rows: str | None = None,
                  mlp: Callable[[int, str], str] | None = None) -> str:
    """One decoder layer: h in, h out (leading dims `lead`: 1 in decode, 2 in prefill)."""
    p = f"layers.{layer}."
    x = norm(g, h, p + "attn_norm")
    q, k, v, extra = split_qkv(g, linear(g, x, p + "qkv", rows), lead, layer)
    if rope is not None:
        q, k = apply_rope(g, q, *rope), apply_rope(g, k, *rope)
    o = attend(layer, x, q, k, v, extra)
    flat = g.op("Reshape", o, g.const([0] * lead + [g.spec.n_heads * g.spec.head_dim]))
    h = g.op("Add", h, linear(g, flat, p + "o", rows))
    x = norm(g, h, p + "mlp_norm")
    return g.op("Add", h, mlp(layer, x) if mlp is not None else dense_mlp(g, layer, x, rows))


def final_logits(g: Graph, h: str) -> str:
    lm = "embed.weight" if g.spec.tie_embeddings else "lm_head.weight"
    return g.op("Gemm", norm(g, h, "norm"), g.w(lm), transB=1, name="logits")
