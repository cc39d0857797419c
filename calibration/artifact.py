"""The calibration artifact: DIR/routers.safetensors + DIR/calibration.json (+ report.png).

Written through `polarc.outputs.writing` (a temporary sibling folder renamed into place), so
an interrupted run leaves no half artifact; an existing DIR is replaced only with `force`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, model_validator
from safetensors.torch import load_file, save_file

from polarc import __version__
from polarc.errors import PolarcError, first_line
from polarc.format.manifest import ModelRecord, check_plan, validated
from polarc.format.routers import HeadRouter, MLPRouter, router_tensors

FORMAT = "polarc-calibration"
FORMAT_VERSION = 2
ROUTERS_FILE = "routers.safetensors"
META_FILE = "calibration.json"
REPORT_FILE = "report.png"


class KVAbsmax(BaseModel):
    """The largest |K| and |V| of each KV group seen in calibration (FP8 KV scales)."""

    model_config = ConfigDict(strict=True, extra="forbid")
    k: list[Annotated[float, Field(ge=0, allow_inf_nan=False)]]
    v: list[Annotated[float, Field(ge=0, allow_inf_nan=False)]]


class LayerEntry(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    layer: NonNegativeInt
    k: PositiveInt
    router_recall: float
    mlp_k: PositiveInt | None = None
    mlp_batch: NonNegativeInt | None = None
    mlp_union_recall: float | None = None
    mlp_recall: float | None = None
    kv_absmax: KVAbsmax | None = None


class DatasetRecord(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    name: str
    seq_len: int = Field(ge=2)


class CalibrationPlan(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    mode: Literal["uniform", "budget"]
    k_per_layer: list[PositiveInt]
    n_kv_groups: PositiveInt


class CalibrationMeta(BaseModel):
    """calibration.json, as far as polarc reads it back (the rest is the report)."""

    model_config = ConfigDict(strict=True, extra="allow")
    format: Literal["polarc-calibration"]
    format_version: Literal[2]
    model: ModelRecord
    dataset: DatasetRecord
    plan: CalibrationPlan
    layers: list[LayerEntry]
    routers_sha256: str

    @model_validator(mode="after")
    def _fits(self) -> CalibrationMeta:
        arch = self.model.identity.architecture
        check_plan(self.plan.k_per_layer, self.plan.n_kv_groups, arch.n_layers, arch.n_kv_heads)
        if [e.layer for e in self.layers] != list(range(arch.n_layers)):
            raise ValueError(f"layers must list layers 0 to {arch.n_layers - 1} in order")
        for e, k in zip(self.layers, self.plan.k_per_layer, strict=True):
            if e.k != k:
                raise ValueError(f"layers[{e.layer}].k is {e.k}, the plan says {k}")
            if e.kv_absmax is not None and not len(e.kv_absmax.k) == len(e.kv_absmax.v) \
                    == arch.n_kv_heads:
                raise ValueError(f"layers[{e.layer}].kv_absmax needs {arch.n_kv_heads} groups")
        return self


@dataclass
class Calibration:
    meta: dict[str, Any]
    head_routers: dict[int, HeadRouter]
    mlp_routers: dict[int, MLPRouter]
    # per layer, the mean post-rope K of each group [Hkv, D] (an FP8 cache's key offsets)
    key_means: dict[int, torch.Tensor] | None = None

    @property
    def k_per_layer(self) -> list[int]:
        return list(self.meta["plan"]["k_per_layer"])


def artifact_files(path: Path) -> tuple[Path, Path]:
    """The files of a calibration folder that the commands read (inputs no output replaces)."""
    return path / META_FILE, path / ROUTERS_FILE


def is_calibration_folder(path: Path) -> bool:
    """Whether `path` holds a polarc calibration (so `--force` may replace it)."""
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write(tmp: Path, meta: dict[str, Any], head: dict[int, HeadRouter],
          mlp: dict[int, MLPRouter], key_means: dict[int, torch.Tensor] | None = None) -> None:
    tensors = router_tensors(head, mlp)
    for layer, mean in (key_means or {}).items():
        tensors[f"layers.{layer}.kv.key_mean"] = mean.float().contiguous()
    save_file(tensors, str(tmp / ROUTERS_FILE),
              metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "polarc_version": __version__,
            "routers_sha256": _sha256(tmp / ROUTERS_FILE), **meta}
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2, allow_nan=True) + "\n")


def read_calibration(path: Path) -> Calibration:
    """Load a calibration folder, with one-line errors for anything that is not one: the
    JSON checked against its schema, the routers file against its recorded hash and the
    architecture's shapes."""
    meta_path, routers_path = path / META_FILE, path / ROUTERS_FILE
    if not path.is_dir() or not meta_path.is_file() or not routers_path.is_file():
        raise PolarcError(f"{path} is not a calibration folder",
                          hint=f"expected {META_FILE} and {ROUTERS_FILE} made by polarc calibrate")
    try:
        meta = json.loads(meta_path.read_text())
    except (ValueError, OSError):
        raise PolarcError(f"{meta_path} is not valid JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise PolarcError(f"{meta_path} is not a polarc calibration")
    version = meta.get("format_version")
    if type(version) is int and version != FORMAT_VERSION:
        raise PolarcError(f"{path} has calibration format {version}, this polarc reads "
                          f"{FORMAT_VERSION}", hint="re-run polarc calibrate")
    checked = validated(CalibrationMeta, meta, str(meta_path))
    if _sha256(routers_path) != checked.routers_sha256:
        raise PolarcError(f"{routers_path} is not the routers file of {meta_path}",
                          hint="it was replaced or damaged; re-run polarc calibrate")
    try:
        tensors = load_file(str(routers_path))
    except Exception as exc:
        raise PolarcError(f"{routers_path} is not readable: {first_line(exc)}") from None
    arch = checked.model.identity.architecture
    head: dict[int, HeadRouter] = {}
    mlp: dict[int, MLPRouter] = {}
    key_means: dict[int, torch.Tensor] = {}
    for entry in checked.layers:
        p = f"layers.{entry.layer}."
        if p + "kv.key_mean" in tensors:  # calibrations before key offsets lack them
            key_means[entry.layer] = _take(tensors, p + "kv.key_mean",
                                           (arch.n_kv_heads, arch.head_dim), routers_path)
        if entry.k < arch.n_kv_heads:
            w, b = _take(tensors, p + "head.weight", (arch.n_kv_heads, arch.hidden), routers_path), \
                _take(tensors, p + "head.bias", (arch.n_kv_heads,), routers_path)
            head[entry.layer] = HeadRouter(weight=w, bias=b, k=entry.k, recall=entry.router_recall)
        if entry.mlp_k is not None:
            w1 = _take(tensors, p + "mlp.w1", None, routers_path)
            rank = w1.shape[0]
            if tuple(w1.shape) != (rank, arch.hidden):
                raise PolarcError(f"{routers_path}: {p}mlp.w1 has shape {tuple(w1.shape)}")
            mlp[entry.layer] = MLPRouter(
                w1=w1, w2=_take(tensors, p + "mlp.w2", (arch.intermediate, rank), routers_path),
                b2=_take(tensors, p + "mlp.b2", (arch.intermediate,), routers_path),
                k=entry.mlp_k, batch=entry.mlp_batch or 0,
                union_recall=entry.mlp_union_recall or float("nan"),
                recall=entry.mlp_recall or float("nan"))
    if tensors:
        raise PolarcError(f"{routers_path} holds tensors its calibration.json does not use: "
                          f"{', '.join(sorted(tensors)[:3])}")
    return Calibration(meta=meta, head_routers=head, mlp_routers=mlp,
                       key_means=key_means if len(key_means) == arch.n_layers else None)


def _take(tensors: dict[str, torch.Tensor], name: str, shape: tuple[int, ...] | None,
          where: Path) -> torch.Tensor:
    """Remove and return `name` (of `shape`) from `tensors`, or say what is wrong."""
    if name not in tensors:
        raise PolarcError(f"{where} lacks {name}", hint="re-run polarc calibrate")
    t = tensors.pop(name)
    if shape is not None and tuple(t.shape) != shape:
        raise PolarcError(f"{where}: {name} has shape {tuple(t.shape)}, the model needs {shape}",
                          hint="these routers belong to another model; re-run polarc calibrate")
    return t
