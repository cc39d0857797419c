"""Runs an exported decode/prefill pair with onnx.reference (numpy), polarc's custom op
implemented by its triton-free reference: the same prefill-then-step loop as the torch
runtime, for checking the graphs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from polarc.exporters.onnx_export import DOMAIN, prefill_path
from polarc.plugins.reference import selective_attention_reference


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
                 "past_seqlens": self.seqlens.copy()}
        for i in range(self.n_layers):
            feeds[f"past_key_{i}"] = self.caches[2 * i]
            feeds[f"past_value_{i}"] = self.caches[2 * i + 1]
        res = self.decode.run(None, feeds)
        self.caches = list(res[1:])
        self.seqlens += 1
        return res[0]
