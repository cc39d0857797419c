"""Schemas of the JSON that polarc's files carry, checked whenever one is read: a tampered or
foreign record is one clear error naming the field, never a KeyError deep inside.

Types are strict (a string where a number belongs is an error, not a conversion); numbers
are finite; the plan must fit the architecture it is for.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    FiniteFloat,
    NonNegativeInt,
    PositiveInt,
    ValidationError,
    model_validator,
)

from polarc.errors import PolarcError


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class Architecture(Strict):
    """`polarc.models.presets.ModelSpec.architecture()`: the numbers that identify a model."""

    family: Literal["llama", "opt"]
    hf_model_type: Literal["llama", "mistral", "qwen2", "opt"]
    n_layers: PositiveInt
    hidden: PositiveInt
    n_heads: PositiveInt
    n_kv_heads: PositiveInt
    head_dim: PositiveInt
    intermediate: PositiveInt
    vocab: PositiveInt
    max_positions: PositiveInt
    norm_eps: FiniteFloat = Field(gt=0)
    rope_theta: FiniteFloat = Field(gt=0)
    rope_scaling: dict[str, Any] | None = None
    qkv_bias: bool = False
    tie_embeddings: bool = False

    @model_validator(mode="after")
    def _heads(self) -> Architecture:
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"{self.n_heads} query heads are not a multiple of "
                             f"{self.n_kv_heads} KV groups")
        return self


class SpecRecord(Architecture):
    """`polarc.models.presets.ModelSpec`, as recorded."""

    name: str
    hub_id: str | None = None


class Identity(Strict):
    architecture: Architecture
    weights_sha256: str
    source: str


class ModelRecord(Strict):
    """`polarc.models.load.model_record`: which model an artifact was made for."""

    name: str
    identity: Identity
    random_weights: bool


class Limits(Strict):
    max_batch: PositiveInt
    max_seq: int = Field(ge=2)


class PlanRecord(Strict):
    k_per_layer: list[PositiveInt]
    n_kv_groups: PositiveInt
    mlp_k: dict[str, PositiveInt] = {}


class TokenizerRecord(Strict):
    kind: Literal["hf", "bytes"]
    eos_id: NonNegativeInt | None
    bos_id: NonNegativeInt | None
    chat_template: str | None = None  # Jinja, as the model's tokenizer has it (chat requests)


class CalibrationRef(Strict):
    path: str
    created: str | None
    mode: Literal["uniform", "budget"]
    meta_sha256: str


class Checksums(Strict):
    algorithm: Literal["xxh3_64"]
    tensors: dict[str, str]


class Manifest(Strict):
    """The engine file's manifest (`engine_file.py`)."""

    format: Literal["polarc-engine"]
    format_version: Literal[2]
    polarc_version: str
    backend: Literal["torch", "tensorrt"]
    created: str
    spec: SpecRecord
    dtype: Literal["bf16", "fp16", "fp32"]
    limits: Limits
    plan: PlanRecord
    model: ModelRecord
    calibration: CalibrationRef | None
    random_routers: bool
    tokenizer: TokenizerRecord
    rope_attention_scaling: FiniteFloat
    checksums: Checksums
    dense: bool = False
    tensorrt_version: str | None = None
    kv_dtype: Literal["fp8_e4m3"] | None = None  # None: the KV cache is in `dtype`
    kv_scales_source: str | None = None  # what the FP8 KV scales were measured on
    # "hadamard": an FP8 cache holds keys times the orthonormal Hadamard matrix (queries are
    # rotated alike, so q.k is unchanged); None: keys as they are
    kv_key_rotation: Literal["hadamard"] | None = None
    # True: it stores keys less their group's mean key (`kv.key_offset`, in the key basis;
    # softmax ignores a shift common to every key)
    kv_key_offset: bool = False
    weight_dtype: Literal["fp8_e4m3"] | None = None  # None: the linear weights in `dtype`

    @model_validator(mode="after")
    def _fits(self) -> Manifest:
        check_plan(self.plan.k_per_layer, self.plan.n_kv_groups, self.spec.n_layers,
                   self.spec.n_kv_heads)
        for layer, k in self.plan.mlp_k.items():
            if not layer.isdigit() or int(layer) >= self.spec.n_layers:
                raise ValueError(f"plan.mlp_k names layer {layer!r} of {self.spec.n_layers}")
            if k > self.spec.intermediate:
                raise ValueError(f"plan.mlp_k keeps {k} of {self.spec.intermediate} neurons")
        if self.limits.max_seq > self.spec.max_positions:
            raise ValueError(f"limits.max_seq {self.limits.max_seq} exceeds the model's "
                             f"{self.spec.max_positions} positions")
        return self


def check_plan(k_per_layer: list[int], n_kv_groups: int, n_layers: int, n_kv_heads: int) -> None:
    """A plan keeps between 1 and Hkv groups on each of the model's layers."""
    if n_kv_groups != n_kv_heads:
        raise ValueError(f"plan.n_kv_groups is {n_kv_groups}, the model has {n_kv_heads}")
    if len(k_per_layer) != n_layers:
        raise ValueError(f"plan.k_per_layer has {len(k_per_layer)} entries for {n_layers} layers")
    for layer, k in enumerate(k_per_layer):
        if not 1 <= k <= n_kv_heads:
            raise ValueError(f"plan.k_per_layer[{layer}] is {k}; a layer keeps 1 to "
                             f"{n_kv_heads} KV groups")


Record = TypeVar("Record", bound=BaseModel)


def validated(schema: type[Record], data: Any, what: str) -> Record:
    """`data` checked against `schema`, or a PolarcError naming the first field that is wrong."""
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        msg = first["msg"].removeprefix("Value error, ")
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise PolarcError(f"{what} is invalid: {where + ': ' if where else ''}{msg}{more}",
                          hint="it was changed or damaged after polarc wrote it; make it again"
                          ) from None
