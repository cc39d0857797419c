"""ONNX export of a built model: the decode step and a prefill graph, with polarc's custom
selective attention op, plus a reference runner that executes them with numpy.

Files (`-o model.onnx`):

- ``model.onnx``          the decode step. Inputs ``input_ids [B, 1]`` int64, ``cache_seqlens
  [B]`` int32 (valid positions before this token), ``past_key_{i}`` / ``past_value_{i}``
  ``[B, Hkv, S, D]`` per layer. Outputs ``logits [B, vocab]`` and ``present_key_{i}`` /
  ``present_value_{i}`` (the caches with this token written at position ``cache_seqlens[b]``).
  Per layer: norm → router (Gemm) → TopK → q/k/v → rotary → ScatterElements (KV write) →
  ``SelectiveHeadAttention`` → output projection → MLP (for ReLU layers with a cheap enough
  batch union: router → ReduceSum over the batch → TopK → Gather of the kept neurons).
- ``model.prefill.onnx``  dense prefill of ``input_ids [B, T]`` (rows of equal length):
  outputs the last position's ``logits [B, vocab]`` and ``present_key_{i}`` /
  ``present_value_{i}`` ``[B, Hkv, T, D]``.
- ``model.onnx.data``     the weights, written once and shared by both graphs (external data,
  so models past protobuf's 2 GB limit export too).

``SelectiveHeadAttention`` (domain ``ai.polarc``) has the kernel contract of
``polarc.plugins.selective_attention``: inputs ``q [B, Hq, D]``, ``k_cache`` / ``v_cache``
``[B, Hkv, S, D]``, ``cache_seqlens [B]`` int32 (valid positions, this token included),
``groups [B, k]`` int32; output ``[B, Hq, D]`` with exact zeros for unselected groups. Its
attributes name the TensorRT plugin that implements it (``plugin_namespace``,
``plugin_version``), which is how TensorRT's ONNX parser finds it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from polarc.plugins.reference import selective_attention_reference

from polarc.errors import PolarcError
from polarc.format.engine_file import DTYPES, Engine
from polarc.format.plan import sparse_mlp_layers
from polarc.outputs import check_output, writing

DOMAIN = "ai.polarc"
ATTENTION_OP = "SelectiveHeadAttention"  # = the TensorRT plugin's name (ONNX parser looks it up)
PLUGIN_NAMESPACE = "polarc"
PLUGIN_VERSION = "1"
OPSET = 17
ONNX_DTYPES = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16,
               torch.bfloat16: TensorProto.BFLOAT16}


def prefill_path(decode: Path) -> Path:
    return decode.with_name(decode.stem + ".prefill.onnx")


def data_path(decode: Path) -> Path:
    return decode.with_name(decode.name + ".data")


class _WeightFile:
    """Appends each weight once to the shared external-data file; hands out TensorProtos
    that point into it (both graphs reference the same bytes)."""

    def __init__(self, path: Path, location: str) -> None:
        self.f = open(path, "wb")  # noqa: SIM115 - closed by close()
        self.location = location
        self.protos: dict[str, TensorProto] = {}

    def proto(self, name: str, t: torch.Tensor) -> TensorProto:
        if name not in self.protos:
            t = t.detach().contiguous().cpu()
            offset = self.f.tell()
            pad = -offset % 64
            self.f.write(b"\0" * pad)
            raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
            self.f.write(raw)
            p = TensorProto(name=name, data_type=ONNX_DTYPES[t.dtype], dims=list(t.shape))
            p.data_location = TensorProto.EXTERNAL
            for key, value in (("location", self.location), ("offset", str(offset + pad)),
                               ("length", str(len(raw)))):
                entry = p.external_data.add()
                entry.key, entry.value = key, value
            self.protos[name] = p
        return self.protos[name]

    def close(self) -> None:
        self.f.close()


class _Graph:
    """A tiny ONNX graph builder: every op gets fresh output names."""

    def __init__(self, weights: _WeightFile, engine: Engine, dtype: torch.dtype) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, TensorProto] = {}
        self.weights, self.engine, self.dtype = weights, engine, dtype
        self.onnx_dtype = ONNX_DTYPES[dtype]
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
        """A model weight (in the export dtype) or a router tensor, by its engine name."""
        t = tensor if tensor is not None else self.engine.model.weights[name]
        if t.is_floating_point():
            t = t.to(self.dtype)
        self.inits[name] = self.weights.proto(name, t)
        return name

    def has(self, name: str) -> bool:
        return name in self.engine.model.weights

    def linear(self, x: str, name: str, rows_shape: str | None = None) -> str:
        """x @ W.T + b for the engine weight `name` ([out, in] layout, Gemm transB=1).
        `rows_shape` (the leading dims, e.g. [B, T]) marks a 3-D input, flattened around it."""
        wt = self.engine.model.weights[name + ".weight"]
        args = [self.w(name + ".weight")]
        if self.has(name + ".bias"):
            args.append(self.w(name + ".bias"))
        if rows_shape is None:
            return self.op("Gemm", x, *args, transB=1)
        flat = self.op("Reshape", x, self.const([-1, wt.shape[1]]))
        y = self.op("Gemm", flat, *args, transB=1)
        return self.op("Reshape", y, self.op("Concat", rows_shape, self.const([wt.shape[0]]),
                                               axis=0))

    def norm(self, x: str, prefix: str) -> str:
        spec = self.engine.model.spec
        if spec.family == "opt":
            return self.op("LayerNormalization", x, self.w(prefix + ".weight"),
                           self.w(prefix + ".bias"), axis=-1, epsilon=1e-5)
        xf = self.op("Cast", x, to=TensorProto.FLOAT)
        ms = self.op("ReduceMean", self.op("Mul", xf, xf), axes=[-1], keepdims=1)
        inv = self.op("Reciprocal", self.op("Sqrt", self.op("Add", ms, self.const(
            spec.norm_eps, np.float32))))
        y = self.op("Cast", self.op("Mul", xf, inv), to=self.onnx_dtype)
        return self.op("Mul", y, self.w(prefix + ".weight"))

    def rope_cos_sin(self, positions: str) -> tuple[str, str]:
        """cos/sin [..., D] in the export dtype for int64 `positions` [...]."""
        model = self.engine.model
        inv = model.rope_inv_freq.float().numpy()
        freqs = self.op("Mul", self.op("Unsqueeze", self.op("Cast", positions, to=TensorProto.FLOAT),
                                       self.const([-1])), self.const(inv, np.float32))
        emb = self.op("Concat", freqs, freqs, axis=-1)
        s = self.const(model.rope_attention_scaling, np.float32)
        return tuple(self.op("Cast", self.op("Mul", self.op(fn, emb), s), to=self.onnx_dtype)
                     for fn in ("Cos", "Sin"))

    def rope(self, x: str, cos: str, sin: str) -> str:
        d = self.engine.model.spec.head_dim
        lo = self.op("Slice", x, self.const([0]), self.const([d // 2]), self.const([-1]))
        hi = self.op("Slice", x, self.const([d // 2]), self.const([d]), self.const([-1]))
        rotated = self.op("Concat", self.op("Neg", hi), lo, axis=-1)
        return self.op("Add", self.op("Mul", x, cos), self.op("Mul", rotated, sin))

    def model_proto(self, name: str, inputs: list, outputs: list, manifest: dict[str, Any]
                    ) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, inputs, outputs,
                                  initializer=list(self.inits.values()))
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                        helper.make_opsetid(DOMAIN, 1)],
                                  producer_name="polarc")
        model.ir_version = 8
        helper.set_model_props(model, {"polarc.manifest": json.dumps(manifest),
                                       "polarc.graph": name})
        return model


def _mlp(g: _Graph, layer: int, x: str, rows_shape: str | None, sparse_k: int | None) -> str:
    spec = g.engine.model.spec
    p = f"layers.{layer}"
    if spec.family == "llama":
        gate = g.linear(x, p + ".gate", rows_shape)
        act = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), g.linear(x, p + ".up", rows_shape))
        return g.linear(act, p + ".down", rows_shape)
    if sparse_k is None:
        return g.linear(g.op("Relu", g.linear(x, p + ".up", rows_shape)), p + ".down", rows_shape)
    # The batch-union neuron index, as the torch runtime picks it: top-k of the router's
    # summed probabilities over the rows; then only those neurons' weights are gathered.
    r = g.engine.mlp_routers[layer]
    rp = f"routers.layers.{layer}.mlp"
    scores = g.op("Gemm", g.op("Gemm", x, g.w(rp + ".w1", r.w1), transB=1), g.w(rp + ".w2", r.w2),
                  g.w(rp + ".b2", r.b2), transB=1)
    total = g.op("ReduceSum", g.op("Sigmoid", g.op("Cast", scores, to=TensorProto.FLOAT)),
                 g.const([0]), keepdims=0)
    _, idx = g.op("TopK", total, g.const([sparse_k]), n_out=2, axis=-1)
    up_w = g.op("Gather", g.w(p + ".up.weight"), idx, axis=0)
    up_b = g.op("Gather", g.w(p + ".up.bias"), idx, axis=0)
    hidden = g.op("Relu", g.op("Gemm", x, up_w, up_b, transB=1))
    down_w = g.op("Gather", g.w(p + ".down.weight"), idx, axis=1)
    return g.op("Gemm", hidden, down_w, g.w(p + ".down.bias"), transB=1)


def _final(g: _Graph, h: str) -> str:
    lm = "lm_head.weight" if not g.engine.model.spec.tie_embeddings else "embed.weight"
    return g.op("Gemm", g.norm(h, "norm"), g.w(lm), transB=1, name="logits")


def _kv_value_infos(g: _Graph, prefix: str, seq: str) -> list:
    spec = g.engine.model.spec
    shape = ["batch", spec.n_kv_heads, seq, spec.head_dim]
    return [helper.make_tensor_value_info(f"{prefix}_{kind}_{i}", g.onnx_dtype, shape)
            for i in range(spec.n_layers) for kind in ("key", "value")]


def _decode_graph(g: _Graph, manifest: dict[str, Any], dense: bool) -> onnx.ModelProto:
    engine = g.engine
    spec = engine.model.spec
    hkv, hq, d = spec.n_kv_heads, spec.n_heads, spec.head_dim
    ks = [hkv] * spec.n_layers if dense else engine.k_per_layer
    mlp_k = {} if dense else sparse_mlp_layers(
        {layer: r.k for layer, r in engine.mlp_routers.items()}, spec.intermediate)
    ids = g.op("Reshape", "input_ids", g.const([-1]))
    pos = g.op("Cast", "cache_seqlens", to=TensorProto.INT64)
    lens = g.op("Add", "cache_seqlens", g.const(1, np.int32))
    batch = g.op("Shape", "input_ids", start=0, end=1)
    h = g.op("Gather", g.w("embed.weight"), ids, axis=0)
    if spec.family == "opt":
        h = g.op("Add", h, g.op("Gather", g.w("pos_embed.weight"),
                                g.op("Add", pos, g.const(2)), axis=0))
    else:
        cos, sin = (g.op("Unsqueeze", t, g.const([1])) for t in g.rope_cos_sin(pos))
    all_groups = g.op("Expand", g.const([list(range(hkv))], np.int32),
                      g.op("Concat", batch, g.const([hkv]), axis=0))
    for layer in range(spec.n_layers):
        p = f"layers.{layer}"
        x = g.norm(h, p + ".attn_norm")
        q = g.op("Reshape", g.linear(x, p + ".q"), g.const([0, hq, d]))
        k = g.op("Reshape", g.linear(x, p + ".k"), g.const([0, hkv, d]))
        v = g.op("Reshape", g.linear(x, p + ".v"), g.const([0, hkv, d]))
        if spec.family == "llama":
            q, k = g.rope(q, cos, sin), g.rope(k, cos, sin)
        if ks[layer] < hkv:
            router = engine.head_routers[layer]
            rp = f"routers.layers.{layer}.head"
            scores = g.op("Gemm", x, g.w(rp + ".weight", router.weight),
                          g.w(rp + ".bias", router.bias), transB=1)
            _, top = g.op("TopK", scores, g.const([ks[layer]]), n_out=2, axis=-1)
            groups = g.op("Cast", top, to=TensorProto.INT32)
        else:
            groups = all_groups
        caches = []
        for kind, new in (("key", k), ("value", v)):
            update = g.op("Unsqueeze", new, g.const([2]))  # [B, Hkv, 1, D]
            where = g.op("Expand", g.op("Reshape", pos, g.const([-1, 1, 1, 1])),
                         g.op("Shape", update))
            caches.append(g.op("ScatterElements", f"past_{kind}_{layer}", where, update, axis=2,
                               name=f"present_{kind}_{layer}"))
        o = g.op(ATTENTION_OP, q, caches[0], caches[1], lens, groups, domain=DOMAIN,
                 num_heads=hq, num_kv_groups=hkv, head_dim=d, num_selected=ks[layer],
                 scale=1.0 / math.sqrt(d),
                 plugin_namespace=PLUGIN_NAMESPACE, plugin_version=PLUGIN_VERSION)
        h = g.op("Add", h, g.linear(g.op("Reshape", o, g.const([0, hq * d])), p + ".o"))
        x = g.norm(h, p + ".mlp_norm")
        h = g.op("Add", h, _mlp(g, layer, x, None, mlp_k.get(layer)))
    _final(g, h)
    dt = g.onnx_dtype
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", 1]),
              helper.make_tensor_value_info("cache_seqlens", TensorProto.INT32, ["batch"]),
              *_kv_value_infos(g, "past", "cache_len")]
    outputs = [helper.make_tensor_value_info("logits", dt, ["batch", spec.vocab]),
               *_kv_value_infos(g, "present", "cache_len")]
    return g.model_proto("decode", inputs, outputs, manifest)


def _prefill_graph(g: _Graph, manifest: dict[str, Any]) -> onnx.ModelProto:
    spec = g.engine.model.spec
    hkv, hq, d, group = spec.n_kv_heads, spec.n_heads, spec.head_dim, spec.group_size
    rows = g.op("Shape", "input_ids")  # [B, T]
    t_len = g.op("Squeeze", g.op("Shape", "input_ids", start=1, end=2), g.const([0]))
    pos = g.op("Range", g.const(0), t_len, g.const(1))
    h = g.op("Gather", g.w("embed.weight"), "input_ids", axis=0)
    if spec.family == "opt":
        h = g.op("Add", h, g.op("Gather", g.w("pos_embed.weight"), g.op("Add", pos, g.const(2)),
                                axis=0))
    else:
        cos, sin = g.rope_cos_sin(pos)  # [T, D]
    # Causal mask for the grouped queries [B, Hkv, G*T, T]: query row r sits at position r % T.
    square = g.op("Concat", g.op("Unsqueeze", t_len, g.const([0])),
                  g.op("Unsqueeze", t_len, g.const([0])), axis=0)
    lower = g.op("Trilu", g.op("ConstantOfShape", square,
                               value=numpy_helper.from_array(np.ones(1, np.int64))), upper=0)
    causal = g.op("Tile", g.op("Cast", lower, to=TensorProto.BOOL), g.const([group, 1]))
    mask = g.op("Where", causal, g.const(0.0, np.float32), g.const(-np.inf, np.float32))
    mask = g.op("Cast", mask, to=g.onnx_dtype)
    scale = g.op("Cast", g.const(1.0 / math.sqrt(d), np.float32), to=g.onnx_dtype)
    for layer in range(spec.n_layers):
        p = f"layers.{layer}"
        x = g.norm(h, p + ".attn_norm")
        heads = {}
        for n, count in (("q", hq), ("k", hkv), ("v", hkv)):
            y = g.op("Reshape", g.linear(x, p + "." + n, rows), g.const([0, 0, count, d]))
            heads[n] = g.op("Transpose", y, perm=[0, 2, 1, 3])  # [B, H, T, D]
        q, k, v = heads["q"], heads["k"], heads["v"]
        if spec.family == "llama":
            q, k = g.rope(q, cos, sin), g.rope(k, cos, sin)
        g.op("Identity", k, name=f"present_key_{layer}")
        g.op("Identity", v, name=f"present_value_{layer}")
        qg = g.op("Reshape", q, g.const([0, hkv, -1, d]))  # [B, Hkv, G*T, D]
        scores = g.op("Add", g.op("Mul", g.op("MatMul", qg, g.op("Transpose", k, perm=[0, 1, 3, 2])),
                                  scale), mask)
        o = g.op("MatMul", g.op("Softmax", scores, axis=-1), v)  # [B, Hkv, G*T, D]
        o = g.op("Transpose", g.op("Reshape", o, g.const([0, hq, -1, d])), perm=[0, 2, 1, 3])
        o = g.op("Reshape", o, g.const([0, 0, hq * d]))
        h = g.op("Add", h, g.linear(o, p + ".o", rows))
        x = g.norm(h, p + ".mlp_norm")
        h = g.op("Add", h, _mlp(g, layer, x, rows, None))
    last = g.op("Gather", h, g.op("Sub", t_len, g.const(1)), axis=1)  # [B, d]
    _final(g, last)
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "prompt_len"])]
    outputs = [helper.make_tensor_value_info("logits", g.onnx_dtype, ["batch", spec.vocab]),
               *_kv_value_infos(g, "present", "prompt_len")]
    return g.model_proto("prefill", inputs, outputs, manifest)


def export_onnx(engine: Engine, out: Path, *, dense: bool = False, dtype: str | None = None,
                force: bool = False, inputs: tuple[Path, ...] = ()) -> list[Path]:
    """Write decode graph, prefill graph and shared weights for `engine` (atomically) and
    check both graphs with onnx.checker. `dtype` (bf16/fp16/fp32) defaults to the engine's
    weights' dtype. Returns the paths written."""
    dtype = DTYPES[dtype] if dtype is not None else engine.model.weights["embed.weight"].dtype
    if dtype not in ONNX_DTYPES:
        raise PolarcError(f"cannot export {dtype} weights to ONNX")
    paths = [out, prefill_path(out), data_path(out)]
    for path in paths:  # all three before any work: a side file is an output too
        check_output(path, force=force, inputs=inputs)
    manifest = {**engine.manifest, "dense": dense}
    # Renamed into place in reverse order of entry: the weights first, the decode graph last.
    with writing(paths[0], force=force, inputs=inputs) as decode_tmp, \
            writing(paths[1], force=force, inputs=inputs) as prefill_tmp, \
            writing(paths[2], force=force, inputs=inputs) as data_tmp:
        weights = _WeightFile(data_tmp, location=paths[2].name)
        try:
            decode = _decode_graph(_Graph(weights, engine, dtype), manifest, dense)
            prefill = _prefill_graph(_Graph(weights, engine, dtype), manifest)
        finally:
            weights.close()
        onnx.save(decode, str(decode_tmp))
        onnx.save(prefill, str(prefill_tmp))
    for path in paths[:2]:
        onnx.checker.check_model(str(path))
    return paths


# --------------------------------------------------------------------------- reference runner


def _attention_numpy(q, k_cache, v_cache, cache_seqlens, groups, scale):
    out = selective_attention_reference(*(torch.from_numpy(np.ascontiguousarray(a)) for a in
                                          (q, k_cache, v_cache, cache_seqlens, groups)),
                                        float(scale))
    return out.numpy()


def _reference_op() -> type:
    from onnx.reference.op_run import OpRun

    class SelectiveHeadAttention(OpRun):
        op_domain = DOMAIN

        def _run(self, q, k_cache, v_cache, cache_seqlens, groups, num_heads=None,  # noqa: ARG002
                 num_kv_groups=None, head_dim=None, num_selected=None, scale=None,
                 plugin_namespace=None, plugin_version=None):
            return (_attention_numpy(q, k_cache, v_cache, cache_seqlens, groups, scale),)

    return SelectiveHeadAttention


@dataclass
class OnnxReference:
    """Runs an exported decode/prefill pair with onnx.reference (numpy), custom op included:
    the same prefill-then-step loop as the torch runtime, for checking the graphs."""

    decode_path: Path
    batch: int
    max_seq: int

    def __post_init__(self) -> None:
        from onnx.reference import ReferenceEvaluator

        op = _reference_op()
        self.decode = ReferenceEvaluator(str(self.decode_path), new_ops=[op])
        self.prefill_sess = ReferenceEvaluator(str(prefill_path(self.decode_path)), new_ops=[op])
        kv = self.decode.proto_.graph.input[2].type.tensor_type.shape.dim
        self.n_layers = (len(self.decode.proto_.graph.input) - 2) // 2
        self.n_kv, self.head_dim = kv[1].dim_value, kv[3].dim_value
        dt = onnx.helper.tensor_dtype_to_np_dtype(self.decode.proto_.graph.input[2].type.tensor_type
                                                  .elem_type)
        shape = (self.batch, self.n_kv, self.max_seq, self.head_dim)
        self.caches = [np.zeros(shape, dt) for _ in range(2 * self.n_layers)]
        self.seqlens = np.zeros(self.batch, np.int32)

    def prefill(self, prompts: list[list[int]]) -> np.ndarray:
        logits = []
        for b, prompt in enumerate(prompts):
            res = self.prefill_sess.run(None, {"input_ids": np.array([prompt], np.int64)})
            logits.append(res[0][0])
            for i, cache in enumerate(res[1:]):
                self.caches[i][b, :, : len(prompt)] = cache[0]
            self.seqlens[b] = len(prompt)
        return np.stack(logits)

    def step(self, tokens: np.ndarray) -> np.ndarray:
        feeds = {"input_ids": np.asarray(tokens, np.int64).reshape(-1, 1),
                 "cache_seqlens": self.seqlens.copy()}
        for i in range(self.n_layers):
            feeds[f"past_key_{i}"] = self.caches[2 * i]
            feeds[f"past_value_{i}"] = self.caches[2 * i + 1]
        res = self.decode.run(None, feeds)
        self.caches = list(res[1:])
        self.seqlens += 1
        return res[0]
