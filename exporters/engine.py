"""The torch-backend engine file: one safetensors container with the weights (in the chosen
dtype), the routers, the tokenizer and a manifest in its metadata.

Tensor names: `weights.<internal name>` (see polarc.models.load.internal_weights),
`rope.inv_freq`, `routers.layers.{i}.head.weight|bias`, `routers.layers.{i}.mlp.w1|w2|b2`,
`tokenizer.json` (uint8 bytes of a Hugging Face tokenizer.json, absent for byte tokenizers).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from polarc.calibration.artifact import Calibration, router_tensors
from polarc.calibration.plan import uniform_plan
from polarc.calibration.routers import HeadRouter, MLPRouter
from safetensors.torch import save_file

from polarc import __version__
from polarc.errors import PolarcError
from polarc.models.load import Model
from polarc.models.tokenizer import HFTokenizer
from polarc.outputs import check_output, write_failure, writing
from polarc.runtime.engine import ENGINE_FORMAT, ENGINE_FORMAT_VERSION, Engine

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class BuildConfig:
    out: Path
    dtype: str = "bf16"
    max_batch: int = 32
    max_seq: int = 2048
    density: float | None = None  # with random weights and no calibration: random routers
    seed: int = 0
    force: bool = False  # replace an existing output (see polarc.outputs)
    inputs: tuple[Path, ...] = ()  # files the build reads, which the output must never replace


def random_routers(model: Model, density: float, seed: int) -> tuple[list[int], dict[int, HeadRouter]]:
    """Speed-only routers: random weights, a uniform plan of `density` (marked in the manifest)."""
    spec = model.spec
    plan = uniform_plan(spec.n_layers, spec.n_kv_heads, density)
    gen = torch.Generator().manual_seed(seed)
    routers = {
        layer: HeadRouter(weight=torch.randn(spec.n_kv_heads, spec.hidden, generator=gen),
                          bias=torch.zeros(spec.n_kv_heads), k=k, recall=float("nan"))
        for layer, k in enumerate(plan) if k < spec.n_kv_heads}
    return plan, routers


@dataclass
class EngineParts:
    """What every backend packs: the density plan, the routers and the manifest."""

    plan: list[int]
    head_routers: dict[int, HeadRouter]
    mlp_routers: dict[int, MLPRouter]
    manifest: dict[str, Any]


def engine_parts(model: Model, calibration: Calibration | None, cfg: BuildConfig,
                 calibration_path: Path | None = None, backend: str = "torch") -> EngineParts:
    """Check the build options and assemble plan, routers and manifest for `model`."""
    if cfg.dtype not in DTYPES:
        raise PolarcError(f"--dtype must be one of {', '.join(DTYPES)}, got {cfg.dtype!r}")
    if cfg.max_batch <= 0 or cfg.max_seq <= 1:
        raise PolarcError("--max-batch must be positive and --max-seq at least 2")
    spec = model.spec
    if cfg.max_seq > spec.max_positions:
        raise PolarcError(f"--max-seq {cfg.max_seq} exceeds {spec.name}'s "
                          f"{spec.max_positions} positions")
    random_rt = False
    mlp_k: dict[int, int] = {}
    if calibration is not None:
        plan, head, mlp = calibration.k_per_layer, calibration.head_routers, calibration.mlp_routers
        mlp_k = {layer: r.k for layer, r in mlp.items()}
        if cfg.density is not None:
            raise PolarcError("--density goes with a random-weights build, not --calibration")
    elif cfg.density is not None:
        if not model.random_weights:
            raise PolarcError("--density without --calibration builds random routers: only for "
                              "--random-weights speed engines", hint="calibrate the model first")
        plan, head = random_routers(model, cfg.density, cfg.seed)
        mlp = {}
        random_rt = True
    else:
        plan, head, mlp = [spec.n_kv_heads] * spec.n_layers, {}, {}
    tok = model.tokenizer
    manifest: dict[str, Any] = {
        "format": ENGINE_FORMAT, "format_version": ENGINE_FORMAT_VERSION,
        "polarc_version": __version__, "backend": backend,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "spec": dataclasses.asdict(spec), "dtype": cfg.dtype,
        "limits": {"max_batch": cfg.max_batch, "max_seq": cfg.max_seq},
        "plan": {"k_per_layer": list(plan), "n_kv_groups": spec.n_kv_heads,
                 "mlp_k": {str(k): v for k, v in mlp_k.items()}},
        "model": {"name": spec.name, "identity": model.identity,
                  "random_weights": model.random_weights},
        "calibration": None if calibration is None else {
            "path": str(calibration_path), "created": calibration.meta.get("created"),
            "mode": calibration.meta["plan"]["mode"],
            "meta_sha256": hashlib.sha256(json.dumps(calibration.meta, sort_keys=True)
                                          .encode()).hexdigest()},
        "random_routers": random_rt,
        "tokenizer": {"kind": tok.kind, "eos_id": tok.eos_id, "bos_id": tok.bos_id},
        "rope_attention_scaling": model.rope_attention_scaling,
    }
    return EngineParts(list(plan), head, mlp, manifest)


def in_memory_engine(model: Model, parts: EngineParts) -> Engine:
    """The engine as `load_engine` would return it, without writing the torch container
    (the graph backends export from it; weights keep their dtype until export)."""
    return Engine(path=Path("<memory>"), manifest=parts.manifest, model=model,
                  k_per_layer=parts.plan, head_routers=parts.head_routers,
                  mlp_routers=parts.mlp_routers)


def tokenizer_json(model: Model) -> bytes | None:
    """The Hugging Face tokenizer.json of `model` (None for byte tokenizers)."""
    tok = model.tokenizer
    if isinstance(tok, HFTokenizer):
        return tok.tok.backend_tokenizer.to_str().encode("utf-8")
    return None


def build_engine(model: Model, calibration: Calibration | None, cfg: BuildConfig,
                 calibration_path: Path | None = None) -> dict[str, Any]:
    """Write the torch-backend engine to `cfg.out` atomically; return its manifest."""
    check_output(cfg.out, force=cfg.force, inputs=cfg.inputs)
    parts = engine_parts(model, calibration, cfg, calibration_path)
    spec, dtype = model.spec, DTYPES[cfg.dtype]
    tensors: dict[str, torch.Tensor] = {}
    for name, t in model.weights.items():
        if name == "lm_head.weight" and spec.tie_embeddings:
            continue  # tied: the runtime reuses the embedding
        tensors["weights." + name] = t.to(dtype).contiguous()
    if model.rope_inv_freq is not None:
        tensors["rope.inv_freq"] = model.rope_inv_freq.float().contiguous()
    for name, t in router_tensors(parts.head_routers, parts.mlp_routers).items():
        tensors["routers." + name] = t
    tok_json = tokenizer_json(model)
    if tok_json is not None:
        tensors["tokenizer.json"] = torch.frombuffer(bytearray(tok_json), dtype=torch.uint8)
    write_container(tensors, parts.manifest, cfg.out, force=cfg.force, inputs=cfg.inputs)
    return parts.manifest


def write_container(tensors: dict[str, torch.Tensor], manifest: dict[str, Any], out: Path, *,
                    force: bool = False, inputs: tuple[Path, ...] = ()) -> None:
    """Write an engine file (safetensors with the manifest in its metadata) atomically."""
    with writing(out, force=force, inputs=inputs) as tmp:
        save_container(tensors, manifest, tmp, name=out)


def save_container(tensors: dict[str, torch.Tensor], manifest: dict[str, Any], path: Path, *,
                   name: Path) -> None:
    """The container's bytes at `path` (a temporary: `name` is what errors call it)."""
    from safetensors import SafetensorError

    try:
        save_file(tensors, str(path), metadata={"format": ENGINE_FORMAT,
                                                "format_version": str(ENGINE_FORMAT_VERSION),
                                                "manifest": json.dumps(manifest)})
    except SafetensorError as exc:
        raise write_failure(name, exc) from None
