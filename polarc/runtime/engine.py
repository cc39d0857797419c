"""Load a torch-backend engine file (mmap, no pickle) and check that it is one."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from polarc.calibration.routers import HeadRouter, MLPRouter
from polarc.errors import PolarcError
from polarc.models.load import Model
from polarc.models.presets import ModelSpec
from polarc.models.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer

ENGINE_FORMAT = "polarc-engine"
ENGINE_FORMAT_VERSION = 1


@dataclass
class Engine:
    path: Path
    manifest: dict[str, Any]
    model: Model
    k_per_layer: list[int]
    head_routers: dict[int, HeadRouter]
    mlp_routers: dict[int, MLPRouter]
    plans: dict[str, bytes] | None = None  # TensorRT backend: serialized decode/prefill plans

    @property
    def backend(self) -> str:
        return self.manifest.get("backend", "torch")

    @property
    def limits(self) -> dict[str, int]:
        return self.manifest["limits"]


def _looks_like_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 0 < n < path.stat().st_size


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of a polarc engine file, or a one-line error saying what `path` is not."""
    if not path.is_file():
        raise PolarcError(f"engine file {path} does not exist")
    if not _looks_like_safetensors(path):
        with open(path, "rb") as f:
            head = f.read(4)
        if head == b"ftrt":
            raise PolarcError(f"{path} is a bare TensorRT plan, not a polarc engine",
                              hint="polarc run takes the engine polarc build --backend tensorrt writes")
        hint = "build one with polarc build"
        if path.suffix == ".onnx":
            hint = "an ONNX export runs under TensorRT: polarc build --backend tensorrt"
        raise PolarcError(f"{path} is not a polarc engine", hint=hint)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:
        raise PolarcError(f"{path} is truncated or corrupt", hint="rebuild it with polarc build") from None
    if meta.get("format") != ENGINE_FORMAT or "manifest" not in meta:
        raise PolarcError(f"{path} is a safetensors file but not a polarc engine")
    manifest = json.loads(meta["manifest"])
    if manifest.get("format_version") != ENGINE_FORMAT_VERSION:
        raise PolarcError(f"{path} has engine format {manifest.get('format_version')}; this "
                          f"polarc runs format {ENGINE_FORMAT_VERSION}", hint="rebuild it")
    return manifest


def _tokenizer(manifest: dict[str, Any], tensors: dict[str, torch.Tensor], spec: ModelSpec
               ) -> Tokenizer:
    tk = manifest["tokenizer"]
    if "tokenizer.json" not in tensors:
        return ByteTokenizer(spec.vocab)
    import tokenizers
    import transformers

    raw = bytes(tensors.pop("tokenizer.json").cpu().numpy().tobytes()).decode("utf-8")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer.from_str(raw))
    return HFTokenizer(fast, eos_id=tk["eos_id"], bos_id=tk["bos_id"])


def load_engine(path: Path, device: str | torch.device = "cpu") -> Engine:
    """Load an engine file; a TensorRT-backend one comes back with its plans and no weights."""
    manifest = read_manifest(path)
    tensors: dict[str, torch.Tensor] = {}
    trt = manifest.get("backend") == "tensorrt"
    with safe_open(str(path), framework="pt", device="cpu" if trt else str(device)) as f:
        for key in f.keys():
            tensors[key] = f.get_tensor(key)
    spec = ModelSpec(**manifest["spec"])
    if trt:
        model = Model(spec=spec, weights={}, tokenizer=_tokenizer(manifest, tensors, spec),
                      identity=manifest["model"]["identity"],
                      random_weights=manifest["model"]["random_weights"])
        plans = {k.split(".", 1)[1]: tensors[k].numpy().tobytes() for k in tensors
                 if k.startswith("tensorrt.")}
        return Engine(path=path, manifest=manifest, model=model,
                      k_per_layer=list(manifest["plan"]["k_per_layer"]), head_routers={},
                      mlp_routers={}, plans=plans)
    weights = {k[len("weights."):]: v for k, v in tensors.items() if k.startswith("weights.")}
    if "lm_head.weight" not in weights:
        weights["lm_head.weight"] = weights["embed.weight"]
    tok = _tokenizer(manifest, tensors, spec)
    model = Model(spec=spec, weights=weights, tokenizer=tok,
                  identity=manifest["model"]["identity"],
                  random_weights=manifest["model"]["random_weights"],
                  rope_inv_freq=tensors.get("rope.inv_freq"),
                  rope_attention_scaling=float(manifest["rope_attention_scaling"]))
    plan = manifest["plan"]
    head: dict[int, HeadRouter] = {}
    mlp: dict[int, MLPRouter] = {}
    dtype = weights["embed.weight"].dtype
    for layer, k in enumerate(plan["k_per_layer"]):
        key = f"routers.layers.{layer}.head"
        if key + ".weight" in tensors:
            head[layer] = HeadRouter(weight=tensors[key + ".weight"].to(dtype),
                                     bias=tensors[key + ".bias"].to(dtype), k=k,
                                     recall=float("nan"))
        key = f"routers.layers.{layer}.mlp"
        if key + ".w1" in tensors:
            mlp[layer] = MLPRouter(w1=tensors[key + ".w1"].to(dtype),
                                   w2=tensors[key + ".w2"].to(dtype),
                                   b2=tensors[key + ".b2"].to(dtype),
                                   k=int(plan["mlp_k"][str(layer)]), batch=0,
                                   union_recall=float("nan"), recall=float("nan"))
    return Engine(path=path, manifest=manifest, model=model, k_per_layer=list(plan["k_per_layer"]),
                  head_routers=head, mlp_routers=mlp)
