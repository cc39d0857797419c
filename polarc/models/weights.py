"""Where a model's weights come from, one decoder layer at a time.

A `WeightSource` makes the model-level tensors (embeddings, final norm, LM head) and any one
decoder layer's tensors on a given device and dtype, in polarc's fused layout
(`models/layers.py`). Loading a whole model is asking for every layer; calibration asks for
one layer at a time, so neither host nor GPU memory ever has to hold a model that is too big
for it (`Model.layer_weights`).

- `CheckpointSource`: safetensors files (memory-mapped, each tensor read by name from the
  shard that holds it) or a GGUF file (tensors by name, de-quantized one at a time).
- `RandomSource`: random weights, each tensor made from (seed, tensor name) by a counter-based
  hash, so a layer can be made alone, on any device, and is bit-identical on CPU and GPU: a
  calibration made on the GPU and an engine built on the CPU have the same weights.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from polarc.errors import PolarcError, first_line
from polarc.models.layers import fuse_weights
from polarc.models.presets import ModelSpec

RANDOM_STD = 0.02


class WeightSource(Protocol):
    def top(self, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """embed, norm (+ bias), pos_embed (OPT) and, unless tied, lm_head."""

    def layer(self, i: int, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Layer i's tensors, fused layout, names ``layers.{i}.*``."""


def unfused_shapes(spec: ModelSpec, layer: int | None) -> dict[str, tuple[int, ...]]:
    """Every tensor of one layer (or, for None, the model-level ones) as checkpoints store
    them, with the shape the architecture needs."""
    d, f = spec.hidden, spec.intermediate
    qd, kvd = spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
    opt = spec.relu_mlp
    if layer is None:
        out: dict[str, tuple[int, ...]] = {"embed.weight": (spec.vocab, d), "norm.weight": (d,)}
        if opt:
            out["norm.bias"] = (d,)
            out["pos_embed.weight"] = (spec.max_positions + 2, d)
        if not spec.tie_embeddings:
            out["lm_head.weight"] = (spec.vocab, d)
        return out
    p = f"layers.{layer}."
    out = {p + "attn_norm.weight": (d,), p + "mlp_norm.weight": (d,)}
    if opt:
        out.update({p + "attn_norm.bias": (d,), p + "mlp_norm.bias": (d,)})
    linears = {"q": (qd, d), "k": (kvd, d), "v": (kvd, d), "o": (d, qd), "up": (f, d),
               "down": (d, f)}
    if not opt:
        linears["gate"] = (f, d)
    for name, shape in linears.items():
        out[p + name + ".weight"] = shape
        if opt or (spec.qkv_bias and name in ("q", "k", "v")):
            out[p + name + ".bias"] = (shape[0],)
    return out


def layer_bytes(spec: ModelSpec, dtype: torch.dtype) -> int:
    """Bytes of one decoder layer's weights in `dtype`."""
    size = torch.empty((), dtype=dtype).element_size()
    return sum(math.prod(s) for s in unfused_shapes(spec, 0).values()) * size


# ----------------------------------------------------------------------------- random

_M32 = 0xFFFFFFFF
# Elements per step: cache-sized on the CPU (5x faster than large steps), large on a GPU
# (few launches).
_CHUNK = {"cpu": 1 << 16, "cuda": 1 << 24}


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix (lowbias32) on int64 tensors holding uint32 values. Products wrap
    the same way on every device, and only their low 32 bits are kept."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def hashed_uniform(shape: tuple[int, ...], key: int, std: float, *, device: torch.device,
                   dtype: torch.dtype) -> torch.Tensor:
    """Uniform values of standard deviation `std`, element j a function of (key, j) only.
    One rounding (int → float is exact, then one multiply), so CPU and GPU agree bit for bit."""
    n = math.prod(shape)
    out = torch.empty(n, dtype=dtype, device=device)
    scale = std * math.sqrt(3.0) / 2**23  # (x >> 8) - 2**23 spans [-2**23, 2**23)
    chunk = _CHUNK.get(device.type, 1 << 20)
    for start in range(0, n, chunk):
        j = torch.arange(start, min(n, start + chunk), device=device, dtype=torch.int64)
        x = hash32(hash32((j & _M32) ^ key) ^ (j >> 32))
        out[start:start + len(j)] = (((x >> 8) - 2**23).float() * scale).to(dtype)
    return out.view(shape)


@dataclass
class RandomSource:
    """Random weights: uniform, std 0.02 (norm weights one, OPT biases random too)."""

    spec: ModelSpec
    seed: int = 0

    def _make(self, shapes: dict[str, tuple[int, ...]], device: torch.device,
              dtype: torch.dtype) -> dict[str, torch.Tensor]:
        out = {}
        for name, shape in shapes.items():
            if name.endswith("norm.weight"):
                out[name] = torch.ones(shape, dtype=dtype, device=device)
                continue
            key = int.from_bytes(hashlib.sha256(f"{self.seed}:{name}".encode()).digest()[:4],
                                 "little")
            out[name] = hashed_uniform(shape, key, RANDOM_STD, device=device, dtype=dtype)
        return out

    def top(self, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return self._make(unfused_shapes(self.spec, None), device, dtype)

    def layer(self, i: int, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return fuse_weights(self._make(unfused_shapes(self.spec, i), device, dtype), self.spec,
                            [i])


# ------------------------------------------------------------------------- checkpoints

_HF_LLAMA = {"input_layernorm": "attn_norm", "self_attn.q_proj": "q", "self_attn.k_proj": "k",
             "self_attn.v_proj": "v", "self_attn.o_proj": "o",
             "post_attention_layernorm": "mlp_norm", "mlp.gate_proj": "gate",
             "mlp.up_proj": "up", "mlp.down_proj": "down"}
_HF_OPT = {"self_attn_layer_norm": "attn_norm", "self_attn.q_proj": "q", "self_attn.k_proj": "k",
           "self_attn.v_proj": "v", "self_attn.out_proj": "o", "final_layer_norm": "mlp_norm",
           "fc1": "up", "fc2": "down"}
_GGUF_LLAMA = {"attn_norm": "attn_norm", "attn_q": "q", "attn_k": "k", "attn_v": "v",
               "attn_output": "o", "ffn_norm": "mlp_norm", "ffn_gate": "gate", "ffn_up": "up",
               "ffn_down": "down"}


def hf_names(spec: ModelSpec) -> dict[str, str]:
    """polarc name → Hugging Face checkpoint name, for every tensor the architecture has."""
    out = {}
    if spec.relu_mlp:
        top = {"embed.weight": "model.decoder.embed_tokens.weight",
               "pos_embed.weight": "model.decoder.embed_positions.weight",
               "norm.weight": "model.decoder.final_layer_norm.weight",
               "norm.bias": "model.decoder.final_layer_norm.bias"}
        names, prefix = _HF_OPT, "model.decoder.layers."
    else:
        top = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
        names, prefix = _HF_LLAMA, "model.layers."
    top["lm_head.weight"] = "lm_head.weight"
    for layer in [None, *range(spec.n_layers)]:
        for ours in unfused_shapes(spec, layer):
            if layer is None:
                out[ours] = top[ours]
                continue
            _, i, part, kind = ours.split(".")
            hf = next(h for h, o in names.items() if o == part)
            out[ours] = f"{prefix}{i}.{hf}.{kind}"
    return out


def gguf_names(spec: ModelSpec) -> dict[str, str]:
    out = {"embed.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    for i in range(spec.n_layers):
        for ours in unfused_shapes(spec, i):
            _, _, part, kind = ours.split(".")
            g = next(g for g, o in _GGUF_LLAMA.items() if o == part)
            out[ours] = f"blk.{i}.{g}.{kind}"
    return out


def _unpermute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp stores q/k rows interleaved per head for its rotary layout; undo it."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass
class CheckpointSource:
    """Tensors read by name from safetensors files or one GGUF file."""

    spec: ModelSpec
    files: list[Path]
    where: dict[str, tuple[Path, str]] = field(default_factory=dict)  # ours -> (file, key)

    @classmethod
    def open(cls, spec: ModelSpec, files: list[Path]) -> CheckpointSource:
        src = cls(spec, files)
        available: dict[str, tuple[Path, str]] = {}  # checkpoint name -> (file, stored key)
        shapes: dict[str, tuple[int, ...]] = {}  # checkpoint name -> shape in the file
        if files[0].suffix == ".gguf":
            if spec.hf_model_type not in ("llama", "mistral"):
                raise PolarcError(f"{files[0]}: GGUF of {spec.hf_model_type} models is not "
                                  "supported", hint="give its Hugging Face safetensors folder")
            wanted = gguf_names(spec)
            for name, t in src._gguf().items():
                available[name] = (files[0], name)
                shapes[name] = tuple(int(n) for n in reversed(t.shape))
        else:
            wanted = hf_names(spec)
            for f in files:
                for key, shape in _safetensors_shapes(f).items():
                    # Some checkpoints (OPT) store names without the leading "model.".
                    name = key if key.startswith(("model.", "lm_head.")) else "model." + key
                    available.setdefault(name, (f, key))
                    shapes.setdefault(name, shape)
        need = {**unfused_shapes(spec, None), "lm_head.weight": (spec.vocab, spec.hidden)}
        for i in range(spec.n_layers):
            need.update(unfused_shapes(spec, i))
        for ours, name in wanted.items():
            if name in available:
                src.where[ours] = available[name]
                _check_shape(available[name], shapes[name], need[ours], spec)
            elif ours != "lm_head.weight":
                where = files[0] if len(files) == 1 else files[0].parent
                raise PolarcError(f"{where} has no tensor {name}, which {spec.name} "
                                  f"({spec.n_layers} layers, hidden {spec.hidden}) needs",
                                  hint="the file does not hold this architecture")
        if "lm_head.weight" not in src.where:  # tied to the embeddings
            src.where["lm_head.weight"] = src.where["embed.weight"]
        return src

    def _gguf(self) -> dict:
        """The GGUF file's tensors by name (gguf's reader memory-maps the file)."""
        if not hasattr(self, "_tensors"):
            from gguf import GGUFReader

            self._tensors = {t.name: t for t in GGUFReader(str(self.files[0])).tensors}
        return self._tensors

    def _read(self, names: list[str], shapes: dict[str, tuple[int, ...]], device: torch.device,
              dtype: torch.dtype) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        by_file: dict[Path, list[str]] = {}
        for ours in names:
            if ours in self.where:
                by_file.setdefault(self.where[ours][0], []).append(ours)
        for path, ours_names in by_file.items():
            if path.suffix == ".gguf":
                for ours in ours_names:
                    out[ours] = self._gguf_tensor(ours)
            else:
                from safetensors import safe_open

                with safe_open(str(path), framework="pt") as st:
                    for ours in ours_names:
                        out[ours] = st.get_tensor(self.where[ours][1])
        for ours, t in out.items():
            _check_shape(self.where[ours], tuple(t.shape), shapes[ours], self.spec)
            out[ours] = t.to(device, dtype)
        return out

    def _gguf_tensor(self, ours: str) -> torch.Tensor:
        from gguf import GGMLQuantizationType, quants

        t = self._gguf()[self.where[ours][1]]
        shape = tuple(int(s) for s in reversed(t.shape))
        try:
            if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
                data = t.data
            else:
                data = quants.dequantize(t.data, t.tensor_type)
            w = torch.from_numpy(data.astype("float32").reshape(shape))
        except Exception as exc:
            raise PolarcError(f"{self.files[0]}: cannot read tensor {t.name}: "
                              f"{first_line(exc)}") from None
        part = ours.split(".")[2] if ours.startswith("layers.") else ""
        if part == "q":
            w = _unpermute_rope(w, self.spec.n_heads)
        elif part == "k":
            w = _unpermute_rope(w, self.spec.n_kv_heads)
        return w

    def top(self, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        shapes = unfused_shapes(self.spec, None)
        return self._read(list(shapes), shapes, device, dtype)

    def layer(self, i: int, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        shapes = unfused_shapes(self.spec, i)
        return fuse_weights(self._read(list(shapes), shapes, device, dtype), self.spec, [i])


def _check_shape(where: tuple[Path, str], shape: tuple[int, ...], want: tuple[int, ...],
                 spec: ModelSpec) -> None:
    if shape != want:
        raise PolarcError(f"{where[0]}: tensor {where[1]} has shape {list(shape)}, but "
                          f"{spec.name} needs {list(want)}",
                          hint="the file does not hold this architecture")


def _safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from a safetensors header (8-byte length, then JSON)."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise PolarcError(f"{path} is not a readable safetensors file: {first_line(exc)}") from None
