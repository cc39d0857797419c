"""Architecture presets and the one internal model description (`ModelSpec`).

A spec holds only architecture numbers; weights come from a loader (see `load.py`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from polarc.errors import PolarcError


@dataclass(frozen=True)
class ModelSpec:
    """Architecture of a decoder-only model, for the Llama family and OPT.

    family "llama": RMSNorm, rotary positions, SwiGLU MLP (Llama-2/3, Mistral, Qwen2, SmolLM2).
    family "opt": LayerNorm, learned positions, ReLU MLP with biases.
    """

    name: str
    family: str  # "llama" | "opt"
    hf_model_type: str  # "llama" | "mistral" | "qwen2" | "opt"
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    max_positions: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = field(default=None, hash=False, compare=False)
    qkv_bias: bool = False
    tie_embeddings: bool = False
    hub_id: str | None = None

    @property
    def group_size(self) -> int:
        """Query heads per KV group (1 for MHA)."""
        return self.n_heads // self.n_kv_heads

    @property
    def qkv_rows(self) -> int:
        """Rows of the fused q/k/v projection (models/layers.py)."""
        return (self.n_heads + 2 * self.n_kv_heads) * self.head_dim

    @property
    def relu_mlp(self) -> bool:
        """ReLU MLP with biases (OPT); else SwiGLU (the Llama family)."""
        return self.family == "opt"

    @property
    def rotary(self) -> bool:
        """Rotary positions (the Llama family); else learned position embeddings (OPT)."""
        return self.family == "llama"

    @property
    def learned_positions(self) -> bool:
        return not self.rotary

    @property
    def n_params(self) -> int:
        d, f = self.hidden, self.intermediate
        q = d * self.n_heads * self.head_dim
        kv = 2 * d * self.n_kv_heads * self.head_dim
        attn = 2 * q + kv
        mlp = (2 if self.relu_mlp else 3) * d * f
        emb = self.vocab * d * (1 if self.tie_embeddings else 2)
        if self.learned_positions:
            emb += (self.max_positions + 2) * d
        return self.n_layers * (attn + mlp) + emb

    def architecture(self) -> dict[str, Any]:
        """The identity-relevant numbers (everything but the preset name and hub id)."""
        d = dataclasses.asdict(self)
        d.pop("name")
        d.pop("hub_id")
        return d


def _llama(name: str, **kw: Any) -> ModelSpec:
    kw.setdefault("family", "llama")
    kw.setdefault("hf_model_type", "llama")
    return ModelSpec(name=name, **kw)


PRESETS: dict[str, ModelSpec] = {
    "smollm2-135m": _llama(
        "smollm2-135m", n_layers=30, hidden=576, n_heads=9, n_kv_heads=3, head_dim=64,
        intermediate=1536, vocab=49152, max_positions=8192, rope_theta=100000.0,
        tie_embeddings=True, hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
    "llama3-8b": _llama(
        "llama3-8b", n_layers=32, hidden=4096, n_heads=32, n_kv_heads=8, head_dim=128,
        intermediate=14336, vocab=128256, max_positions=8192, rope_theta=500000.0,
        hub_id="meta-llama/Meta-Llama-3-8B",
    ),
    "llama3.1-8b": _llama(
        "llama3.1-8b", n_layers=32, hidden=4096, n_heads=32, n_kv_heads=8, head_dim=128,
        intermediate=14336, vocab=128256, max_positions=131072, rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
        },
        hub_id="meta-llama/Llama-3.1-8B",
    ),
    "llama3-70b": _llama(
        "llama3-70b", n_layers=80, hidden=8192, n_heads=64, n_kv_heads=8, head_dim=128,
        intermediate=28672, vocab=128256, max_positions=8192, rope_theta=500000.0,
        hub_id="meta-llama/Meta-Llama-3-70B",
    ),
    "llama2-70b": _llama(
        "llama2-70b", n_layers=80, hidden=8192, n_heads=64, n_kv_heads=8, head_dim=128,
        intermediate=28672, vocab=32000, max_positions=4096, rope_theta=10000.0,
        hub_id="meta-llama/Llama-2-70b-hf",
    ),
    "llama2-7b": _llama(
        "llama2-7b", n_layers=32, hidden=4096, n_heads=32, n_kv_heads=32, head_dim=128,
        intermediate=11008, vocab=32000, max_positions=4096, rope_theta=10000.0,
        hub_id="meta-llama/Llama-2-7b-hf",
    ),
    "mistral-7b": _llama(
        "mistral-7b", hf_model_type="mistral", n_layers=32, hidden=4096, n_heads=32,
        n_kv_heads=8, head_dim=128, intermediate=14336, vocab=32768, max_positions=32768,
        rope_theta=1000000.0, hub_id="mistralai/Mistral-7B-v0.3",
    ),
    "qwen2.5-7b": _llama(
        "qwen2.5-7b", hf_model_type="qwen2", n_layers=28, hidden=3584, n_heads=28,
        n_kv_heads=4, head_dim=128, intermediate=18944, vocab=152064, max_positions=32768,
        rope_theta=1000000.0, norm_eps=1e-6, qkv_bias=True, hub_id="Qwen/Qwen2.5-7B",
    ),
    "opt-6.7b": ModelSpec(
        name="opt-6.7b", family="opt", hf_model_type="opt", n_layers=32, hidden=4096,
        n_heads=32, n_kv_heads=32, head_dim=128, intermediate=16384, vocab=50272,
        max_positions=2048, qkv_bias=True, tie_embeddings=True, hub_id="facebook/opt-6.7b",
    ),
    "opt-125m": ModelSpec(
        name="opt-125m", family="opt", hf_model_type="opt", n_layers=12, hidden=768,
        n_heads=12, n_kv_heads=12, head_dim=64, intermediate=3072, vocab=50272,
        max_positions=2048, qkv_bias=True, tie_embeddings=True, hub_id="facebook/opt-125m",
    ),
}

DEFAULT_MODEL = "smollm2-135m"


def get_preset(name: str) -> ModelSpec:
    try:
        return PRESETS[name]
    except KeyError:
        raise PolarcError(
            f"unknown model alias {name!r}",
            hint=f"valid aliases: {', '.join(PRESETS)}; or give a Hugging Face folder or a .gguf",
        ) from None


def hf_config(spec: ModelSpec) -> Any:
    """The transformers config that builds `spec` (used for random weights)."""
    import transformers

    if spec.family == "opt":
        return transformers.OPTConfig(
            vocab_size=spec.vocab, hidden_size=spec.hidden, num_hidden_layers=spec.n_layers,
            ffn_dim=spec.intermediate, num_attention_heads=spec.n_heads,
            max_position_embeddings=spec.max_positions, word_embed_proj_dim=spec.hidden,
            do_layer_norm_before=True, activation_function="relu", enable_bias=True,
            tie_word_embeddings=spec.tie_embeddings,
        )
    common = dict(
        vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.n_layers, num_attention_heads=spec.n_heads,
        num_key_value_heads=spec.n_kv_heads, max_position_embeddings=spec.max_positions,
        rms_norm_eps=spec.norm_eps, tie_word_embeddings=spec.tie_embeddings,
        hidden_act="silu",
    )
    rope = {"rope_type": "default", "rope_theta": spec.rope_theta}
    if spec.rope_scaling:
        rope = {**spec.rope_scaling, "rope_theta": spec.rope_theta}
    if spec.hf_model_type == "qwen2":
        cfg = transformers.Qwen2Config(**common, rope_parameters=rope)
    elif spec.hf_model_type == "mistral":
        cfg = transformers.MistralConfig(
            **common, head_dim=spec.head_dim, rope_parameters=rope, sliding_window=None
        )
    else:
        cfg = transformers.LlamaConfig(
            **common, head_dim=spec.head_dim, rope_parameters=rope,
            attention_bias=spec.qkv_bias,
        )
    return cfg


def spec_from_hf_config(cfg: Any, name: str) -> ModelSpec:
    """Read a transformers config of a supported family into a `ModelSpec`."""
    mt = getattr(cfg, "model_type", None)
    if mt == "opt":
        if not getattr(cfg, "do_layer_norm_before", True) or cfg.word_embed_proj_dim != cfg.hidden_size:
            raise PolarcError(f"{name}: OPT variants with post-norm or projected embeddings "
                              "(opt-350m) are not supported")
        return ModelSpec(
            name=name, family="opt", hf_model_type="opt", n_layers=cfg.num_hidden_layers,
            hidden=cfg.hidden_size, n_heads=cfg.num_attention_heads,
            n_kv_heads=cfg.num_attention_heads,
            head_dim=cfg.hidden_size // cfg.num_attention_heads, intermediate=cfg.ffn_dim,
            vocab=cfg.vocab_size, max_positions=cfg.max_position_embeddings, qkv_bias=True,
            tie_embeddings=bool(getattr(cfg, "tie_word_embeddings", True)),
        )
    if mt not in ("llama", "mistral", "qwen2"):
        raise PolarcError(f"{name}: model type {mt!r} is not supported",
                          hint="supported: Llama family (llama, mistral, qwen2) and OPT")
    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    theta = float(rope.pop("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
    scaling = rope if rope.get("rope_type", "default") != "default" else None
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return ModelSpec(
        name=name, family="llama", hf_model_type=mt, n_layers=cfg.num_hidden_layers,
        hidden=cfg.hidden_size, n_heads=cfg.num_attention_heads,
        n_kv_heads=cfg.num_key_value_heads or cfg.num_attention_heads, head_dim=head_dim,
        intermediate=cfg.intermediate_size, vocab=cfg.vocab_size,
        max_positions=cfg.max_position_embeddings,
        norm_eps=float(f"{cfg.rms_norm_eps:.6g}"),  # GGUF stores eps as float32
        rope_theta=theta, rope_scaling=scaling,
        qkv_bias=mt == "qwen2" or bool(getattr(cfg, "attention_bias", False)),
        tie_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
    )
