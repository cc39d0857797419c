"""Layer-streamed models: sharded checkpoints read layer by layer, random weights made layer
by layer, and a calibration that holds one layer's weights at a time and gives exactly what
the in-memory one gives."""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import pytest
import torch
from polarc.calibration.calibrate import CalibrateConfig, calibrate
from rich.progress import Progress

from polarc.errors import PolarcError
from polarc.models import load_model
from polarc.models.forward import forward
from polarc.models.load import Model
from polarc.models.presets import get_preset
from polarc.models.weights import RandomSource, hashed_uniform
from tests.conftest import TINY, byte_tokenizer, one_line_error, run, tiny_hf

KINDS = ["llama-gqa", "llama-mha", "opt"]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each tiny model as a Hugging Face folder of several safetensors shards."""
    out = {}
    for kind in KINDS:
        path = tmp_path_factory.mktemp("sharded") / kind
        tiny_hf(kind).save_pretrained(path, safe_serialization=True, max_shard_size="40KB")
        byte_tokenizer().save_pretrained(path)
        assert len(list(path.glob("*.safetensors"))) >= 3
        out[kind] = path
    return out


class CountingSource:
    """Wraps a model's weight source; records how many layers' weights are alive at once."""

    def __init__(self, model: Model) -> None:
        self.inner, self.alive, self.most, self.loads = model.source, [], 0, 0
        model.source = self

    def top(self, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return self.inner.top(device, dtype)

    def layer(self, i: int, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        w = self.inner.layer(i, device, dtype)
        self.alive = [r for r in self.alive if r() is not None] + [weakref.ref(w[f"layers.{i}.qkv.weight"])]
        self.most = max(self.most, len(self.alive))
        self.loads += 1
        return w


def _calibrate(model: Model, out: Path, **kw: object) -> tuple[dict, dict]:
    cfg = CalibrateConfig(out=out, seq_len=64, tokens=2048, tune_tokens=256, epochs=2,
                          batch_size=4, **kw)
    with Progress(disable=True) as bar:
        meta = calibrate(model, cfg, bar)
    from safetensors.torch import load_file

    return meta, load_file(out / "routers.safetensors")


@pytest.mark.parametrize("kind", KINDS)
def test_sharded_streamed_forward_equals_whole(kind: str, sharded: dict, tiny_dirs: dict) -> None:
    whole = load_model(str(tiny_dirs[kind]))
    streamed = load_model(str(sharded[kind]), stream=True, resident_layers=0)
    assert not any(name.startswith("layers.") for name in streamed.weights)
    ids = torch.randint(3, TINY[kind].vocab, (2, 33))
    assert torch.equal(forward(whole, ids), forward(streamed, ids))
    assert not any(name.startswith("layers.") for name in streamed.weights)


@pytest.mark.parametrize(("kind", "plan"), [("llama-gqa", {"quality_budget": 50.0}),
                                            ("llama-mha", {"quality_budget": 30.0}),
                                            ("opt", {"density": 0.5})])
def test_streamed_calibration_equals_in_memory(kind: str, plan: dict, sharded: dict,
                                               tmp_path: Path) -> None:
    whole = load_model(str(sharded[kind]))
    streamed = load_model(str(sharded[kind]), stream=True, resident_layers=0)
    counter = CountingSource(streamed)
    meta_a, routers_a = _calibrate(whole, tmp_path / "whole", **plan)
    meta_b, routers_b = _calibrate(streamed, tmp_path / "streamed", **plan)
    assert counter.most == 1  # never two layers' weights at once
    assert counter.loads >= TINY[kind].n_layers
    assert meta_a["plan"]["k_per_layer"] == meta_b["plan"]["k_per_layer"]
    assert meta_a["quality"] == meta_b["quality"]
    assert routers_a.keys() == routers_b.keys() and routers_a
    for name in routers_a:
        assert torch.equal(routers_a[name], routers_b[name]), name


def test_random_weights_are_made_per_layer_and_device_independent() -> None:
    spec = TINY["llama-gqa"]
    src = RandomSource(spec, seed=5)
    whole = load_model("smollm2-135m", random_weights=True, seed=5)  # the loader's path
    assert whole.identity["weights_sha256"].endswith("seed-5")
    a = src.layer(1, torch.device("cpu"), torch.float32)
    b = RandomSource(spec, seed=5).layer(1, torch.device("cpu"), torch.float32)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(a["layers.1.qkv.weight"],
                           RandomSource(spec, seed=6).layer(1, torch.device("cpu"),
                                                            torch.float32)["layers.1.qkv.weight"])
    x = hashed_uniform((1000, 100), 7, 0.02, device=torch.device("cpu"), dtype=torch.float32)
    assert abs(x.std().item() - 0.02) < 0.001 and abs(x.mean().item()) < 0.001
    if torch.cuda.is_available():
        y = hashed_uniform((1000, 100), 7, 0.02, device=torch.device("cuda"), dtype=torch.bfloat16)
        assert torch.equal(y.cpu(), x.to(torch.bfloat16))


def test_random_70b_layer_is_made_alone() -> None:
    spec = get_preset("llama3-70b")
    model = load_model("llama3-70b", random_weights=True, stream=True, resident_layers=0,
                       dtype=torch.bfloat16, device="meta")
    assert model.spec == spec and not any(n.startswith("layers.") for n in model.weights)


def test_missing_and_truncated_shards_are_named(sharded: dict, tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(sharded["llama-gqa"], folder)
    shards = sorted(folder.glob("*.safetensors"))
    shards[1].write_bytes(shards[1].read_bytes()[:-100])
    code, _, stderr = run("calibrate", "-m", folder, "--out", tmp_path / "c", "--quiet")
    one_line_error(code, stderr, shards[1].name)
    shards[1].unlink()
    code, _, stderr = run("calibrate", "-m", folder, "--out", tmp_path / "c", "--quiet")
    one_line_error(code, stderr, shards[1].name)
    assert not (tmp_path / "c").exists()


def test_checkpoint_of_another_architecture_is_one_line(sharded: dict, tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(sharded["llama-gqa"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 128  # the tensors hold 96
    (folder / "config.json").write_text(json.dumps(cfg))
    code, _, stderr = run("calibrate", "-m", folder, "--out", tmp_path / "c", "--quiet")
    one_line_error(code, stderr, "has shape [96, 64], but m needs [128, 64]")
    assert not (tmp_path / "c").exists()
    with pytest.raises(PolarcError, match="has shape"):
        load_model(str(folder))


@pytest.mark.parametrize("alias", ["llama3-70b", "llama2-70b"])
def test_build_of_a_70b_refuses_before_making_weights(alias: str, tmp_path: Path) -> None:
    code, _, stderr = run("build", "--model", alias, "--random-weights", "-o", tmp_path / "e.plan")
    one_line_error(code, stderr, f"{alias} does not fit one GPU")
    assert not list(tmp_path.iterdir())


def test_a_batch_without_gpu_room_names_one_that_fits() -> None:
    from polarc.calibration.collect import check_gpu_room, layer_work_bytes

    model = load_model("llama3-8b", random_weights=True, stream=True, resident_layers=0,
                       dtype=torch.bfloat16, device="meta")
    need = layer_work_bytes(model, 8, 512)
    check_gpu_room(model, 8, 512, free=need)  # exactly enough
    with pytest.raises(PolarcError, match=r"at --batch-size 64 x --seq-len 512") as exc:
        check_gpu_room(model, 64, 512, free=need)
    assert exc.value.hint == "--batch-size 8 would fit"
    with pytest.raises(PolarcError) as exc:
        check_gpu_room(model, 1, 512, free=layer_work_bytes(model, 0, 512))
    assert "even one sequence of 512 tokens does not fit" in exc.value.hint


def test_out_of_gpu_memory_is_one_line(capsys: pytest.CaptureFixture) -> None:
    import typer

    from polarc.console import user_errors

    with pytest.raises(typer.Exit) as exc, user_errors():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    assert exc.value.exit_code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: out of GPU memory")
    with pytest.raises(RuntimeError, match="other"), user_errors():
        raise RuntimeError("other")  # a bug stays a traceback


def test_build_that_cannot_fit_host_memory_refuses_before_making_weights(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import collections

    import psutil

    mem = collections.namedtuple("mem", "available")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: mem(8 * 10**9))
    code, _, stderr = run("build", "--model", "llama3-8b", "--random-weights", "-o",
                          tmp_path / "e.plan")
    one_line_error(code, stderr, "building llama3-8b needs about 20 GB of host memory")
    assert not list(tmp_path.iterdir())


def _write_gguf(path: Path, tensors: dict[str, tuple[int, ...]]) -> None:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch="llama")
    for name, shape in tensors.items():
        writer.add_tensor(name, np.zeros(shape, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_whose_tensors_do_not_match_the_architecture(tmp_path: Path) -> None:
    from polarc.models.weights import CheckpointSource, gguf_names, unfused_shapes

    spec = TINY["llama-gqa"]
    shapes = {**unfused_shapes(spec, None)}
    for i in range(spec.n_layers):
        shapes.update(unfused_shapes(spec, i))
    tensors = {gguf_names(spec)[ours]: shape for ours, shape in shapes.items()}
    good = tmp_path / "good.gguf"
    _write_gguf(good, tensors)
    src = CheckpointSource.open(spec, [good])
    assert src.layer(1, torch.device("cpu"), torch.float32)["layers.1.qkv.weight"].shape[1] == spec.hidden
    wrong = dict(tensors, **{"blk.1.ffn_up.weight": (spec.intermediate + 8, spec.hidden)})
    _write_gguf(tmp_path / "wrong.gguf", wrong)
    want = rf"blk.1.ffn_up.weight has shape \[{spec.intermediate + 8}, {spec.hidden}\]"
    with pytest.raises(PolarcError, match=want):
        CheckpointSource.open(spec, [tmp_path / "wrong.gguf"])
    missing = {n: s for n, s in tensors.items() if n != "blk.0.attn_k.weight"}
    _write_gguf(tmp_path / "missing.gguf", missing)
    with pytest.raises(PolarcError, match="has no tensor blk.0.attn_k.weight"):
        CheckpointSource.open(spec, [tmp_path / "missing.gguf"])
