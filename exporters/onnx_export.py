"""ONNX export of a built model: the decode step and a prefill graph, with polarc's custom
selective attention op (the tests run both under ONNX's reference evaluator).

Files (`-o model.onnx`):

- ``model.onnx``          the decode step. Inputs ``input_ids [B, 1]`` int64, ``past_seqlens
  [B]`` int32 (valid positions before this token), ``past_key_{i}`` / ``past_value_{i}``
  ``[B, Hkv, S, D]`` per layer. Outputs ``logits [B, vocab]`` and ``present_key_{i}`` /
  ``present_value_{i}`` (the caches with this token written at position ``past_seqlens[b]``).
  Per layer (`polarc.models.layers_onnx.decoder_layer`, the graph form of the model's one
  layer definition): norm → q/k/v and router scores (one Gemm) → rotary → TopK over the
  router scores → ScatterElements (KV write) → ``SelectiveHeadAttention`` → output projection
  → MLP (for ReLU layers with a cheap enough batch union: router → ReduceSum over the batch →
  TopK → Gather of the kept neurons).
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

import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from polarc.plugins import PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION

from polarc.errors import PolarcError
from polarc.format.engine_file import DTYPES, Engine
from polarc.format.plan import sparse_mlp_layers
from polarc.models.layers_onnx import (
    ONNX_DTYPES,
    Graph,
    causal_attention,
    decoder_layer,
    dense_mlp,
    embed,
    final_logits,
    rope_cos_sin,
)
from polarc.outputs import check_output, writing

DOMAIN = "ai.polarc"
ATTENTION_OP = PLUGIN_NAME  # TensorRT's ONNX parser looks the plugin up by the op's name


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


def _sparse_mlp(g: Graph, layer: int, x: str, k: int, router: Any) -> str:
    """The runtime's selective MLP (`polarc.runtime.torch_runtime.Runtime.sparse_mlp`): the
    batch-union neuron index is the top-k of the router's summed probabilities over the rows;
    only those neurons' weights are gathered."""
    p, rp = f"layers.{layer}.", f"routers.layers.{layer}.mlp."
    scores = g.op("Gemm", g.op("Gemm", x, g.w(rp + "w1", router.w1), transB=1),
                  g.w(rp + "w2", router.w2), g.w(rp + "b2", router.b2), transB=1)
    total = g.op("ReduceSum", g.op("Sigmoid", g.op("Cast", scores, to=TensorProto.FLOAT)),
                 g.const([0]), keepdims=0)
    _, idx = g.op("TopK", total, g.const([k]), n_out=2, axis=-1)
    up_w = g.op("Gather", g.w(p + "up.weight"), idx, axis=0)
    up_b = g.op("Gather", g.w(p + "up.bias"), idx, axis=0)
    hidden = g.op("Relu", g.op("Gemm", x, up_w, up_b, transB=1))
    down_w = g.op("Gather", g.w(p + "down.weight"), idx, axis=1)
    return g.op("Gemm", hidden, down_w, g.w(p + "down.bias"), transB=1)


def _kv_value_infos(g: Graph, prefix: str, seq: str) -> list:
    shape = ["batch", g.spec.n_kv_heads, seq, g.spec.head_dim]
    return [helper.make_tensor_value_info(f"{prefix}_{kind}_{i}", g.onnx_dtype, shape)
            for i in range(g.spec.n_layers) for kind in ("key", "value")]


def _decode_graph(g: Graph, engine: Engine, manifest: dict[str, Any], dense: bool
                  ) -> onnx.ModelProto:
    """The decode step (`polarc.runtime.torch_runtime.Runtime.decode_step`) as a graph: the
    KV append is a ScatterElements into the past caches, the attention the custom op."""
    spec = g.spec
    hkv, hq, d = spec.n_kv_heads, spec.n_heads, spec.head_dim
    ks = [hkv] * spec.n_layers if dense else engine.k_per_layer
    mlp_k = {} if dense else sparse_mlp_layers(
        {layer: r.k for layer, r in engine.mlp_routers.items()}, spec.intermediate)
    ids = g.op("Reshape", "input_ids", g.const([-1]))
    pos = g.op("Cast", "past_seqlens", to=TensorProto.INT64)
    cache_seqlens = g.op("Add", "past_seqlens", g.const(1, np.int32))  # this token included
    batch = g.op("Shape", "input_ids", start=0, end=1)
    all_groups = g.op("Expand", g.const([list(range(hkv))], np.int32),
                      g.op("Concat", batch, g.const([hkv]), axis=0))

    def attend(layer: int, x: str, q: str, k: str, v: str, extra: str | None) -> str:
        if ks[layer] < hkv:
            _, top = g.op("TopK", extra, g.const([ks[layer]]), n_out=2, axis=-1)
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
        return g.op(ATTENTION_OP, q, caches[0], caches[1], cache_seqlens, groups, domain=DOMAIN,
                    num_heads=hq, num_kv_groups=hkv, head_dim=d, num_selected=ks[layer],
                    scale=1.0 / math.sqrt(d),
                    plugin_namespace=PLUGIN_NAMESPACE, plugin_version=PLUGIN_VERSION)

    def mlp(layer: int, x: str) -> str:
        if layer in mlp_k:
            return _sparse_mlp(g, layer, x, mlp_k[layer], engine.mlp_routers[layer])
        return dense_mlp(g, layer, x, None)

    h = embed(g, ids, pos)
    rope = rope_cos_sin(g, pos)  # [B, 1, D]
    for layer in range(spec.n_layers):
        h = decoder_layer(g, layer, h, rope, attend, lead=1, mlp=mlp)
    final_logits(g, h)
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", 1]),
              helper.make_tensor_value_info("past_seqlens", TensorProto.INT32, ["batch"]),
              *_kv_value_infos(g, "past", "cache_len")]
    outputs = [helper.make_tensor_value_info("logits", g.onnx_dtype, ["batch", spec.vocab]),
               *_kv_value_infos(g, "present", "cache_len")]
    return g.model_proto("decode", inputs, outputs, {DOMAIN: 1}, manifest)


def _prefill_graph(g: Graph, manifest: dict[str, Any]) -> onnx.ModelProto:
    """Dense prefill (`polarc.runtime.torch_runtime.Runtime.prefill`) of equal-length rows."""
    spec = g.spec
    rows = g.op("Shape", "input_ids")  # [B, T]
    t_len = g.op("Squeeze", g.op("Shape", "input_ids", start=1, end=2), g.const([0]))
    pos = g.op("Range", g.const(0), t_len, g.const(1))
    # Causal mask for the grouped queries [G*T, T]: query row r sits at position r % T.
    square = g.op("Concat", g.op("Unsqueeze", t_len, g.const([0])),
                  g.op("Unsqueeze", t_len, g.const([0])), axis=0)
    lower = g.op("Trilu", g.op("ConstantOfShape", square,
                               value=numpy_helper.from_array(np.ones(1, np.int64))), upper=0)
    causal = g.op("Tile", g.op("Cast", lower, to=TensorProto.BOOL), g.const([spec.group_size, 1]))
    mask = g.op("Cast", g.op("Where", causal, g.const(0.0, np.float32),
                             g.const(-np.inf, np.float32)), to=g.onnx_dtype)
    scale = g.op("Cast", g.const(1.0 / math.sqrt(spec.head_dim), np.float32), to=g.onnx_dtype)

    def attend(layer: int, x: str, q: str, k: str, v: str, extra: str | None) -> str:
        g.op("Transpose", k, perm=[0, 2, 1, 3], name=f"present_key_{layer}")  # [B, Hkv, T, D]
        g.op("Transpose", v, perm=[0, 2, 1, 3], name=f"present_value_{layer}")
        return causal_attention(g, q, k, v, mask, scale)

    h = embed(g, "input_ids", pos)
    rope = rope_cos_sin(g, pos)  # [T, 1, D]
    for layer in range(spec.n_layers):
        h = decoder_layer(g, layer, h, rope, attend, lead=2, rows=rows)
    final_logits(g, g.op("Gather", h, g.op("Sub", t_len, g.const(1)), axis=1))  # last position
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "prompt_len"])]
    outputs = [helper.make_tensor_value_info("logits", g.onnx_dtype, ["batch", spec.vocab]),
               *_kv_value_infos(g, "present", "prompt_len")]
    return g.model_proto("prefill", inputs, outputs, {DOMAIN: 1}, manifest)


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
            decode = _decode_graph(Graph(engine.model, dtype, weights.proto), engine, manifest, dense)
            prefill = _prefill_graph(Graph(engine.model, dtype, weights.proto), manifest)
        finally:
            weights.close()
        onnx.save(decode, str(decode_tmp))
        onnx.save(prefill, str(prefill_tmp))
    for path in paths[:2]:
        onnx.checker.check_model(str(path))
    return paths
