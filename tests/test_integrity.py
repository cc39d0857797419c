"""Engines and calibrations that were damaged or tampered with are one clear PolarcError, never
a traceback or a silently different model: table-driven cases, then fuzzing (hypothesis) of
truncations, byte flips and JSON mutations of every manifest field."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from polarc.calibration.artifact import read_calibration
from polarc.exporters.engine import BuildConfig, build_engine
from safetensors import safe_open
from safetensors.torch import save_file

from polarc.errors import PolarcError
from polarc.format.engine_file import load_engine
from polarc.models import load_model

FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def engine_file(tiny_dirs: dict, calibrated: dict, tmp_path_factory: pytest.TempPathFactory
                ) -> Path:
    """A small sparse engine (routers in its q/k/v rows)."""
    from polarc.calibration.artifact import read_calibration as read

    out = tmp_path_factory.mktemp("engine") / "e.plan"
    build_engine(load_model(str(tiny_dirs["llama-gqa"])), read(calibrated["llama-gqa"]),
                 BuildConfig(out=out, dtype="fp32", max_batch=2, max_seq=64))
    return out


def _container(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


def _rewrite(src: Path, dst: Path, *, manifest: Any = None, raw_manifest: str | None = None,
             tensor_edit: Any = None) -> Path:
    """A copy of the engine with its manifest replaced and/or a tensor changed, checksums
    left as they were (what a tampered file looks like)."""
    tensors, meta = _container(src)
    if tensor_edit is not None:
        tensor_edit(tensors)
    if manifest is not None:
        meta["manifest"] = json.dumps(manifest)
    if raw_manifest is not None:
        meta["manifest"] = raw_manifest
    save_file(tensors, str(dst), metadata=meta)
    return dst


def _manifest(path: Path) -> dict[str, Any]:
    return json.loads(_container(path)[1]["manifest"])


def test_intact_engine_loads(engine_file: Path) -> None:
    engine = load_engine(engine_file)
    assert engine.head_routers and engine.k_per_layer[0] == 2


def test_flipped_bytes_in_weights(engine_file: Path, tmp_path: Path) -> None:
    data = bytearray(engine_file.read_bytes())
    for i in range(64):  # 64 bytes near the end: tensor data, not the header
        data[-1000 - i] ^= 0x5A
    bad = tmp_path / "flipped.plan"
    bad.write_bytes(bytes(data))
    with pytest.raises(PolarcError, match="does not match its checksum"):
        load_engine(bad)


def test_nan_norm_weights(engine_file: Path, tmp_path: Path) -> None:
    def poison(tensors: dict[str, torch.Tensor]) -> None:
        tensors["weights.layers.1.attn_norm.weight"] = torch.full_like(
            tensors["weights.layers.1.attn_norm.weight"], float("nan"))

    bad = _rewrite(engine_file, tmp_path / "nan.plan", tensor_edit=poison)
    with pytest.raises(PolarcError, match="attn_norm.weight does not match its checksum"):
        load_engine(bad)


def _set(d: dict[str, Any], path: str | tuple, value: Any) -> dict[str, Any]:
    """A copy of `d` with the field at `path` ("a.b.0" or a tuple of keys) set or deleted."""
    d = json.loads(json.dumps(d))
    keys = path.split(".") if isinstance(path, str) else list(path)
    node = d
    for key in keys[:-1]:
        node = node[int(key)] if isinstance(node, list) else node[key]
    last = int(keys[-1]) if isinstance(node, list) else keys[-1]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return d


_DELETE = object()

MANIFEST_CASES = [
    ("not JSON", None, "{not json", "not valid JSON"),
    ("a list", [], None, "is invalid"),
    ("missing key", ("limits", _DELETE), None, "limits: Field required"),
    ("string for a number", ("limits.max_batch", "4"), None,
     "limits.max_batch: Input should be a valid integer"),
    ("wrong layer count", ("plan.k_per_layer", [2, 1]), None, "2 entries for 3 layers"),
    ("k = 0", ("plan.k_per_layer.1", 0), None, "plan.k_per_layer.1: Input should be greater"),
    ("k > Hkv", ("plan.k_per_layer.1", 9), None, "plan.k_per_layer[1] is 9"),
    ("format_version as a string", ("format_version", "2"), None, "format_version: Input should be 2"),
    ("older format", ("format_version", 1), None, "has engine format 1; this polarc runs format 2"),
    ("spec of another model", ("spec.hidden", 128), None, "has shape"),
    ("NaN scaling", ("rope_attention_scaling", float("nan")), None, "rope_attention_scaling"),
]


@pytest.mark.parametrize("name, edit, raw, match", MANIFEST_CASES, ids=[c[0] for c in MANIFEST_CASES])
def test_tampered_manifest(name: str, edit: Any, raw: str | None, match: str, engine_file: Path,
                           tmp_path: Path) -> None:
    manifest = _manifest(engine_file)
    new = edit if isinstance(edit, list) else (_set(manifest, *edit) if edit else None)
    bad = _rewrite(engine_file, tmp_path / "bad.plan", manifest=new, raw_manifest=raw)
    with pytest.raises(PolarcError, match=re.escape(match)) as info:
        load_engine(bad)
    assert "\n" not in str(info.value)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8),
                                                                        children, max_size=4),
    max_leaves=8)


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every field of a JSON value, as a tuple of keys."""
    out = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, value in items:
        out.append((*prefix, key))
        out += _paths(value, (*prefix, key))
    return out


def _loads_or_polarc_error(path: Path) -> None:
    try:
        load_engine(path)
    except PolarcError as exc:
        assert "\n" not in str(exc)


@FUZZ
@given(data=st.data())
def test_fuzz_manifest_fields(data: st.DataObject, engine_file: Path, tmp_path: Path) -> None:
    manifest = _manifest(engine_file)
    path = data.draw(st.sampled_from(_paths(manifest)), label="field")
    value = data.draw(st.just(_DELETE) | json_values, label="value")
    bad = _rewrite(engine_file, tmp_path / "fuzz.plan", manifest=_set(manifest, path, value))
    _loads_or_polarc_error(bad)


@FUZZ
@given(cut=st.floats(0.0, 0.999))
def test_fuzz_truncation(cut: float, engine_file: Path, tmp_path: Path) -> None:
    data = engine_file.read_bytes()
    bad = tmp_path / "cut.plan"
    bad.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(PolarcError):
        load_engine(bad)


@FUZZ
@given(flips=st.lists(st.tuples(st.floats(0.0, 0.9999), st.integers(1, 255)), min_size=1,
                      max_size=8))
def test_fuzz_byte_flips(flips: list[tuple[float, int]], engine_file: Path, tmp_path: Path) -> None:
    data = bytearray(engine_file.read_bytes())
    for where, mask in flips:
        data[int(where * len(data))] ^= mask
    bad = tmp_path / "flipped.plan"
    bad.write_bytes(bytes(data))
    _loads_or_polarc_error(bad)


# --------------------------------------------------------------------------- calibrations


def _copy_calibration(src: Path, dst: Path, meta: Any = None, raw: str | None = None) -> Path:
    shutil.copytree(src, dst)
    if meta is not None:
        (dst / "calibration.json").write_text(json.dumps(meta))
    if raw is not None:
        (dst / "calibration.json").write_text(raw)
    return dst


CALIBRATION_CASES = [
    ("not JSON", None, "{", "is not valid JSON"),
    ("a list", [], None, "is not a polarc calibration"),
    ("missing key", ("plan", _DELETE), None, "plan: Field required"),
    ("string for a number", ("dataset.seq_len", "64"), None, "dataset.seq_len"),
    ("wrong layer count", ("plan.k_per_layer", [4, 2]), None, "2 entries for 3 layers"),
    ("k = 0", ("plan.k_per_layer.1", 0), None, "plan.k_per_layer.1"),
    ("k > Hkv", ("plan.k_per_layer.1", 7), None, "plan.k_per_layer[1] is 7"),
    ("format_version as a string", ("format_version", "2"), None, "format_version: Input should be 2"),
    ("older format", ("format_version", 1), None, "has calibration format 1, this polarc reads 2"),
]


@pytest.mark.parametrize("name, edit, raw, match", CALIBRATION_CASES,
                         ids=[c[0] for c in CALIBRATION_CASES])
def test_tampered_calibration(name: str, edit: Any, raw: str | None, match: str, calibrated: dict,
                              tmp_path: Path) -> None:
    src = calibrated["llama-mha"]
    meta = json.loads((src / "calibration.json").read_text())
    new = edit if isinstance(edit, list) else (_set(meta, *edit) if edit else None)
    bad = _copy_calibration(src, tmp_path / "cal", meta=new, raw=raw)
    with pytest.raises(PolarcError, match=re.escape(match)):
        read_calibration(bad)


def test_routers_of_another_calibration(calibrated: dict, tmp_path: Path) -> None:
    bad = _copy_calibration(calibrated["llama-mha"], tmp_path / "cal")
    shutil.copy(calibrated["llama-gqa"] / "routers.safetensors", bad / "routers.safetensors")
    with pytest.raises(PolarcError, match="is not the routers file of"):
        read_calibration(bad)


@FUZZ
@given(data=st.data())
def test_fuzz_calibration_fields(data: st.DataObject, calibrated: dict, tmp_path: Path) -> None:
    src = calibrated["llama-mha"]
    meta = json.loads((src / "calibration.json").read_text())
    path = data.draw(st.sampled_from(_paths(meta)), label="field")
    value = data.draw(st.just(_DELETE) | json_values, label="value")
    dst = tmp_path / "fuzzcal"
    shutil.rmtree(dst, ignore_errors=True)
    _copy_calibration(src, dst, meta=_set(meta, path, value))
    try:
        read_calibration(dst)
    except PolarcError as exc:
        assert "\n" not in str(exc)
