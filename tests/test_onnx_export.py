"""ONNX export: graph structure, onnx.checker, and the reference evaluator (numpy, with our
SelectiveHeadAttention) against the torch engine, dense and sparse, over several decode steps."""

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from polarc.calibration import artifact
from polarc.exporters.engine import BuildConfig, build_engine
from polarc.exporters.onnx_export import (
    ATTENTION_OP,
    DOMAIN,
    PLUGIN_NAMESPACE,
    data_path,
    export_onnx,
    prefill_path,
)
from typer.testing import CliRunner

from polarc.cli import app
from polarc.format.engine_file import Engine, load_engine
from polarc.models import load_model
from polarc.runtime.torch_runtime import Runtime
from tests.onnx_reference import OnnxReference

PROMPTS = [[5, 9, 17, 33, 64, 101, 7], [200, 3, 12], [44, 45, 46, 47, 48, 49, 50, 51, 52]]
STEPS = 6


def _engine_file(tmp_path: Path, model_dir: Path, calibration=None) -> Path:
    out = tmp_path / "e.plan"
    build_engine(load_model(str(model_dir)), calibration,
                 BuildConfig(out=out, dtype="fp32", max_batch=4, max_seq=64))
    return out


def _load(engine_file: Path, mlp_k: int | None = None) -> Engine:
    engine = load_engine(engine_file)
    for r in engine.mlp_routers.values():
        r.k = mlp_k or r.k  # force real neuron sparsity on a tiny random model
    return engine


def _compare(engine_file: Path, onnx_file: Path, dense: bool, mlp_k: int | None = None) -> float:
    """Greedy prefill + STEPS decode steps on both; returns the largest logit difference."""
    rt = Runtime(_load(engine_file, mlp_k), batch=len(PROMPTS), dense=dense)
    ref = OnnxReference(onnx_file, batch=len(PROMPTS), max_seq=64)
    ours, theirs = rt.prefill(PROMPTS), torch.from_numpy(ref.prefill(PROMPTS))
    worst = (ours - theirs).abs().max().item()
    for _ in range(STEPS):
        nxt = ours.argmax(-1)
        ours, theirs = rt.decode_step(nxt), torch.from_numpy(ref.step(nxt.numpy()))
        worst = max(worst, (ours - theirs).abs().max().item())
    return worst


@pytest.mark.parametrize("kind", ["llama-gqa", "llama-mha", "opt", "qwen2"])
def test_dense_graph_matches_torch_engine(kind: str, tiny_dirs: dict, tmp_path: Path) -> None:
    engine_file = _engine_file(tmp_path, tiny_dirs[kind])
    paths = export_onnx(load_engine(engine_file), tmp_path / "m.onnx")
    assert paths == [tmp_path / "m.onnx", prefill_path(tmp_path / "m.onnx"),
                     data_path(tmp_path / "m.onnx")]
    assert _compare(engine_file, paths[0], dense=True) < 1e-4


@pytest.mark.parametrize("kind", ["llama-gqa", "llama-mha", "opt"])
def test_sparse_graph_matches_torch_engine(kind: str, tiny_dirs: dict, calibrated: dict,
                                           tmp_path: Path) -> None:
    cal = artifact.read_calibration(calibrated[kind])
    engine_file = _engine_file(tmp_path, tiny_dirs[kind], calibration=cal)
    mlp_k = 128 if kind == "opt" else None  # N = 256: half the neurons
    engine = _load(engine_file, mlp_k)
    n_kv = engine.model.spec.n_kv_heads
    assert any(k < n_kv for k in engine.k_per_layer)
    path = export_onnx(engine, tmp_path / "m.onnx")[0]
    graph = onnx.load(str(path), load_external_data=False).graph
    topk_inputs = [n.input[0] for n in graph.node if n.op_type == "TopK"]
    assert len(topk_inputs) >= sum(k < n_kv for k in engine.k_per_layer)
    if kind == "opt":  # the batch-union selective MLP is in the graph too
        assert any(n.op_type == "Gather" and n.input[0].endswith("up.weight") for n in graph.node)
    sparse_err = _compare(engine_file, path, dense=False, mlp_k=mlp_k)
    assert sparse_err < 1e-4
    dense_path = export_onnx(engine, tmp_path / "d.onnx", dense=True)[0]
    assert _compare(engine_file, dense_path, dense=True) < 1e-4
    # and the two graphs really differ (the sparse one selects)
    ref_s, ref_d = (OnnxReference(p, batch=1, max_seq=64) for p in (path, dense_path))
    ls, ld = ref_s.prefill(PROMPTS[:1]), ref_d.prefill(PROMPTS[:1])
    for tok in (3, 7, 11):
        ls, ld = ref_s.step(np.array([tok])), ref_d.step(np.array([tok]))
    assert np.abs(ls - ld).max() > 1e-4


def test_graph_declares_custom_op_for_tensorrt(tiny_dirs: dict, calibrated: dict,
                                               tmp_path: Path) -> None:
    cal = artifact.read_calibration(calibrated["llama-gqa"])
    engine = load_engine(_engine_file(tmp_path, tiny_dirs["llama-gqa"], calibration=cal))
    path = export_onnx(engine, tmp_path / "m.onnx")[0]
    model = onnx.load(str(path), load_external_data=False)
    assert {o.domain: o.version for o in model.opset_import}[DOMAIN] == 1
    nodes = [n for n in model.graph.node if n.op_type == ATTENTION_OP]
    assert len(nodes) == engine.model.spec.n_layers
    for layer, node in enumerate(nodes):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert node.domain == DOMAIN
        assert attrs["plugin_namespace"] == PLUGIN_NAMESPACE.encode()
        assert attrs["plugin_version"] == b"1"
        assert attrs["num_kv_groups"] == 2 and attrs["num_heads"] == 4 and attrs["head_dim"] == 16
        assert attrs["num_selected"] == engine.k_per_layer[layer]
        assert attrs["scale"] == pytest.approx(0.25)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in model.graph.input}
    assert dims["input_ids"] == ["batch", 1]
    assert dims["past_key_0"] == ["batch", 2, "cache_len", 16]
    inits = {i.name: i for i in model.graph.initializer}
    assert inits["embed.weight"].data_location == onnx.TensorProto.EXTERNAL
    onnx.checker.check_model(str(path))
    onnx.checker.check_model(str(prefill_path(path)))


def test_build_backend_onnx_cli(tiny_dirs: dict, calibrated: dict, tmp_path: Path) -> None:
    out = tmp_path / "model.onnx"
    args = ["build", "-m", str(tiny_dirs["opt"]), "--calibration", str(calibrated["opt"]),
            "--backend", "onnx", "-o", str(out), "--dtype", "fp32"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.stderr
    assert out.is_file() and prefill_path(out).is_file() and data_path(out).is_file()
    assert "onnx.checker passed" in result.stdout
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 1 and "already exists" in again.stderr
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []
