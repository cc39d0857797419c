"""The calibration artifact: DIR/routers.safetensors + DIR/calibration.json (+ report.png).

Written through `polarc.outputs.writing` (a temporary sibling folder renamed into place), so
an interrupted run leaves no half artifact; an existing DIR is replaced only with `force`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from polarc import __version__
from polarc.errors import PolarcError
from polarc.format.routers import HeadRouter, MLPRouter, router_tensors

FORMAT = "polarc-calibration"
FORMAT_VERSION = 1
ROUTERS_FILE = "routers.safetensors"
META_FILE = "calibration.json"
REPORT_FILE = "report.png"


@dataclass
class Calibration:
    meta: dict[str, Any]
    head_routers: dict[int, HeadRouter]
    mlp_routers: dict[int, MLPRouter]

    @property
    def k_per_layer(self) -> list[int]:
        return list(self.meta["plan"]["k_per_layer"])


def is_calibration_folder(path: Path) -> bool:
    """Whether `path` holds a polarc calibration (so `--force` may replace it)."""
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def write(tmp: Path, meta: dict[str, Any], head: dict[int, HeadRouter],
          mlp: dict[int, MLPRouter]) -> None:
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "polarc_version": __version__,
            **meta}
    save_file(router_tensors(head, mlp), str(tmp / ROUTERS_FILE),
              metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2, allow_nan=True) + "\n")


def read_calibration(path: Path) -> Calibration:
    """Load a calibration folder, with one-line errors for anything that is not one."""
    meta_path, routers_path = path / META_FILE, path / ROUTERS_FILE
    if not path.is_dir() or not meta_path.is_file() or not routers_path.is_file():
        raise PolarcError(f"{path} is not a calibration folder",
                          hint=f"expected {META_FILE} and {ROUTERS_FILE} made by polarc calibrate")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise PolarcError(f"{meta_path} is not valid JSON") from None
    if meta.get("format") != FORMAT:
        raise PolarcError(f"{meta_path} is not a polarc calibration")
    if meta.get("format_version") != FORMAT_VERSION:
        raise PolarcError(f"{path} has calibration format {meta.get('format_version')}, "
                          f"this polarc reads {FORMAT_VERSION}", hint="re-run polarc calibrate")
    try:
        tensors = load_file(str(routers_path))
    except Exception as exc:
        raise PolarcError(f"{routers_path} is not readable: {str(exc)[:200]}") from None
    layers = {int(entry["layer"]): entry for entry in meta["layers"]}
    head: dict[int, HeadRouter] = {}
    mlp: dict[int, MLPRouter] = {}
    for layer, entry in layers.items():
        if f"layers.{layer}.head.weight" in tensors:
            head[layer] = HeadRouter(weight=tensors[f"layers.{layer}.head.weight"],
                                     bias=tensors[f"layers.{layer}.head.bias"],
                                     k=int(entry["k"]), recall=float(entry["router_recall"]))
        if f"layers.{layer}.mlp.w1" in tensors:
            mlp[layer] = MLPRouter(w1=tensors[f"layers.{layer}.mlp.w1"],
                                   w2=tensors[f"layers.{layer}.mlp.w2"],
                                   b2=tensors[f"layers.{layer}.mlp.b2"],
                                   k=int(entry["mlp_k"]), batch=int(entry["mlp_batch"]),
                                   union_recall=float(entry["mlp_union_recall"]),
                                   recall=float(entry["mlp_recall"]))
    return Calibration(meta=meta, head_routers=head, mlp_routers=mlp)
