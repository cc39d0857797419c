"""The commands end to end on tiny random models, and every bad input a user can give."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SMALL, fill, one_line_error, run


def test_models_lists_presets(tmp_path: Path) -> None:
    code, stdout, _ = run("models", "--json", tmp_path / "m.json")
    assert code == 0
    assert "smollm2-135m" in stdout and "llama3-8b" in stdout and "opt-6.7b" in stdout
    rows = json.loads((tmp_path / "m.json").read_text())
    llama3 = next(r for r in rows if r["alias"] == "llama3-8b")
    assert (llama3["layers"], llama3["q_heads"], llama3["kv_groups"]) == (32, 32, 8)


def test_calibration_artifact(calibrated: dict) -> None:
    for path in calibrated.values():
        assert sorted(p.name for p in path.iterdir()) == [
            "calibration.json", "report.png", "routers.safetensors"]
        meta = json.loads((path / "calibration.json").read_text())
        assert meta["format_version"] == 2  # 2: the routers file's hash is recorded
        assert meta["model"]["identity"]["weights_sha256"]
        ks = meta["plan"]["k_per_layer"]
        n_kv = meta["plan"]["n_kv_groups"]
        assert ks[0] == n_kv  # layer 0 dense
        assert all(1 <= k <= n_kv for k in ks)
        assert len(meta["layers"]) == len(ks)
        assert not list(path.parent.glob(".*tmp*"))
    opt = json.loads((calibrated["opt"] / "calibration.json").read_text())
    assert all(e["mlp_k"] % 128 == 0 or e["mlp_k"] == 256 for e in opt["layers"])
    mha = json.loads((calibrated["llama-mha"] / "calibration.json").read_text())
    assert mha["plan"]["k_per_layer"][1:] == [2, 2]
    budget = json.loads((calibrated["llama-gqa"] / "calibration.json").read_text())
    assert budget["plan"]["mode"] == "budget"
    assert budget["quality"]["tune"]["increase_pct"] <= 50


def test_eval_json(calibrated: dict, tiny_dirs: dict, tmp_path: Path) -> None:
    code, stdout, stderr = run("eval", "--calibration", calibrated["llama-mha"], "--model",
                               tiny_dirs["llama-mha"], "--tokens", "512", "--quiet",
                               "--json", tmp_path / "e.json")
    assert code == 0, stderr
    res = json.loads((tmp_path / "e.json").read_text())
    for key in ("ppl_dense", "ppl_sparse", "ppl_oracle", "ppl_random", "top1_agreement", "kl",
                "router_recall", "kv_density"):
        assert key in res
    assert res["kv_density"] == pytest.approx((4 + 2 + 2) / 12)
    assert 0.0 <= res["router_recall"] <= 1.0
    assert "routers" in stdout and "oracle" in stdout


def test_existing_out_needs_force(calibrated: dict, tiny_dirs: dict) -> None:
    path = calibrated["llama-mha"]
    before = (path / "calibration.json").read_text()
    code, _, stderr = run("calibrate", "-m", tiny_dirs["llama-mha"], "--out", path, *SMALL)
    one_line_error(code, stderr, "already exists")
    assert (path / "calibration.json").read_text() == before


def test_force_replaces(tiny_dirs: dict, tmp_path: Path) -> None:
    out = tmp_path / "c"
    assert run("calibrate", "-m", tiny_dirs["llama-gqa"], "--out", out, *SMALL,
               "--density", "1.0")[0] == 0
    code, _, stderr = run("calibrate", "-m", tiny_dirs["llama-gqa"], "--out", out, *SMALL,
                          "--density", "0.5", "--force")
    assert code == 0, stderr
    assert json.loads((out / "calibration.json").read_text())["plan"]["density"] == 0.5


def test_interrupted_run_leaves_nothing(tiny_dirs: dict, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import polarc.calibration.calibrate as cal

    def interrupt(*_a: object, **_k: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cal, "plot_report", interrupt)
    out = tmp_path / "c"
    code, _, stderr = run("calibrate", "-m", tiny_dirs["llama-gqa"], "--out", out, *SMALL,
                          "--density", "0.5")
    assert code == 130 and "nothing was written" in stderr
    assert list(tmp_path.iterdir()) == []


def test_eval_with_another_model(calibrated: dict, tiny_dirs: dict) -> None:
    code, _, stderr = run("eval", "--calibration", calibrated["llama-gqa"], "--model",
                          tiny_dirs["qwen2"], "--quiet")
    one_line_error(code, stderr, "made for another model")


@pytest.mark.parametrize("args, match", [
    (["calibrate", "-m", "gpt-17", "--out", "{tmp}/x"], "unknown model alias 'gpt-17'"),
    (["calibrate", "-m", "{empty}", "--out", "{tmp}/x"], "no weights in"),
    (["calibrate", "--density", "1.5", "--out", "{tmp}/x"], "--density must be in (0, 1]"),
    (["calibrate", "--density", "0", "--out", "{tmp}/x"], "--density must be in (0, 1]"),
    (["calibrate", "--out", "{short}/x"], "is not a folder"),
    (["calibrate", "-m", "{tiny}", "--dataset", "{short}", "--out", "{tmp}/x"],
     "fewer than one sequence"),
    (["eval", "--calibration", "{tmp}"], "is not a calibration folder"),
])
def test_bad_input(args: list[str], match: str, tmp_path: Path, tiny_dirs: dict) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    short = tmp_path / "short.txt"
    short.write_text("only a few words")
    subs = {"{tmp}": str(tmp_path), "{empty}": str(empty), "{short}": str(short),
            "{tiny}": str(tiny_dirs["llama-gqa"])}
    code, _, stderr = run(*fill(args, subs))
    one_line_error(code, stderr, match)
    assert not (tmp_path / "x").exists()


def test_unwritable_output(tmp_path: Path, tiny_dirs: dict) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        import os

        if os.access(locked, os.W_OK):
            pytest.skip("running as a user that can write anywhere (root)")
        code, _, stderr = run("calibrate", "-m", tiny_dirs["llama-gqa"], "--out", locked / "x",
                              *SMALL)
        one_line_error(code, stderr, "not writable")
    finally:
        locked.chmod(0o700)


def test_out_is_a_file(tmp_path: Path, tiny_dirs: dict) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    code, _, stderr = run("calibrate", "-m", tiny_dirs["llama-gqa"], "--out", f / "sub", *SMALL)
    one_line_error(code, stderr, "cannot write")


def test_real_process_prints_no_traceback() -> None:
    proc = subprocess.run([sys.executable, "-m", "polarc.cli", "calibrate", "-m", "nope",
                           "--out", "x"], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("Error: unknown model alias")
    assert "Traceback" not in proc.stderr


def test_usage_error_exits_2() -> None:
    code, _, _ = run("calibrate", "--no-such-flag")
    assert code == 2


def test_build_and_run(calibrated: dict, tiny_dirs: dict, tmp_path: Path) -> None:
    engine = tmp_path / "e.plan"
    code, stdout, stderr = run("build", "--calibration", calibrated["llama-gqa"], "-m",
                               tiny_dirs["llama-gqa"], "-o", engine, "--max-batch", "4",
                               "--max-seq", "128")
    assert code == 0, stderr
    assert "sparse engine" in stdout or "dense engine" in stdout
    code, stdout, stderr = run("run", engine, "--prompt", "hello", "--prompt", "world wide",
                               "--max-new-tokens", "5", "--json", tmp_path / "r.json", "--quiet")
    assert code == 0, stderr
    res = json.loads((tmp_path / "r.json").read_text())
    for key in ("decode_tokens_per_s", "step_ms_median", "prefill_tokens_per_s", "outputs"):
        assert key in res
    assert len(res["outputs"]) == 2 and all(o["tokens"] == 5 for o in res["outputs"])
    code, _, stderr = run("build", "--calibration", calibrated["llama-gqa"], "-m",
                          tiny_dirs["llama-gqa"], "-o", engine)
    one_line_error(code, stderr, "already exists")
    code, _, stderr = run("run", engine, "--batch", "9", "--quiet")
    one_line_error(code, stderr, "exceeds the engine's max batch 4")


def test_build_random_speed_engine(tmp_path: Path) -> None:
    engine = tmp_path / "speed.plan"
    code, stdout, stderr = run("build", "-m", "smollm2-135m", "--random-weights", "--density",
                               "0.34", "-o", engine, "--max-batch", "2", "--max-seq", "64")
    assert code == 0, stderr
    assert "(random weights, random routers: speed only)" in stdout
    code, _, stderr = run("run", engine, "--max-new-tokens", "3", "--quiet")
    assert code == 0, stderr


def test_run_rejects_non_engines(tmp_path: Path, calibrated: dict) -> None:
    code, _, stderr = run("run", calibrated["llama-gqa"] / "routers.safetensors")
    one_line_error(code, stderr, "not a polarc engine")
    junk = tmp_path / "junk.plan"
    junk.write_bytes(b"\x00" * 100)
    code, _, stderr = run("run", junk)
    one_line_error(code, stderr, "not a polarc engine")


def test_build_density_needs_random_weights(tiny_dirs: dict, tmp_path: Path) -> None:
    code, _, stderr = run("build", "-m", tiny_dirs["llama-gqa"], "--density", "0.5",
                          "-o", tmp_path / "x.plan")
    one_line_error(code, stderr, "only for --random-weights")


def test_build_loads_large_models_in_their_engine_dtype(monkeypatch, tmp_path: Path) -> None:
    """An 8B build must not materialise an fp32 copy (host memory ~1.5x the model at most)."""
    import collections

    import polarc.exporters.engine as ec
    import psutil
    import torch

    from polarc.errors import PolarcError

    seen = {}

    def fake_load(source, **kwargs):
        seen[source] = kwargs["dtype"]
        raise PolarcError("stop here")

    monkeypatch.setattr(ec, "load_model", fake_load)
    # as if the host had room for an 8B build, whatever else runs on this one (the refusal
    # is test_streaming's)
    monkeypatch.setattr(psutil, "virtual_memory",
                        lambda: collections.namedtuple("mem", "available")(10**12))
    for alias in ("llama3-8b", "opt-125m"):
        code, _, stderr = run("build", "-m", alias, "--random-weights", "-o", tmp_path / "e.plan")
        one_line_error(code, stderr, "stop here")
    assert seen == {"llama3-8b": torch.bfloat16, "opt-125m": torch.float32}

