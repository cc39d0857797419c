"""`polarc eval --engine`: held-out text teacher-forced through the engine's decode path."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from polarc.calibration import artifact
from polarc.exporters.engine import BuildConfig, build_engine

from polarc.format.engine_file import load_engine
from polarc.models import load_model
from polarc.models.forward import forward
from polarc.runtime.forced import teacher_forced
from polarc.runtime.torch_runtime import Runtime
from tests.conftest import one_line_error, run


@pytest.fixture(scope="module")
def engines(tiny_dirs: dict, calibrated: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("forced")
    model = load_model(str(tiny_dirs["llama-gqa"]))
    out = {"dense": root / "dense.plan", "sparse": root / "sparse.plan"}
    build_engine(model, None, BuildConfig(out=out["dense"], dtype="fp32", max_batch=8,
                                          max_seq=128))
    build_engine(model, artifact.read_calibration(calibrated["llama-gqa"]),
                 BuildConfig(out=out["sparse"], dtype="fp32", max_batch=8, max_seq=128))
    return out


def test_the_reference_is_the_dense_forward(engines: dict) -> None:
    """Scored positions through prefill + decode steps with every group give the plain
    forward's perplexity on the same positions; a dense engine agrees with itself."""
    eng = load_engine(engines["dense"])
    seqs = torch.randint(3, 300, (5, 40), generator=torch.Generator().manual_seed(0))
    q = teacher_forced(Runtime(eng, batch=3, max_seq=40), Runtime(eng, batch=3, max_seq=40,
                                                                  dense=True), seqs, prefix=9)
    res = q.as_json()
    logp = F.log_softmax(forward(eng.model, seqs).float(), -1)[:, 8:-1]
    nll = -logp.gather(-1, seqs[:, 9:, None]).sum().item()
    assert res["tokens"] == 5 * 31
    assert res["ppl_reference"] == pytest.approx(math.exp(nll / res["tokens"]), rel=1e-4)
    assert res["ppl_engine"] == pytest.approx(res["ppl_reference"], rel=1e-5)
    assert res["top1_agreement"] == 1.0 and res["kl"] < 1e-6


def test_eval_engine_command(engines: dict, tmp_path: Path) -> None:
    out = tmp_path / "e.json"
    code, stdout, stderr = run("eval", "--engine", engines["sparse"], "--tokens", "1024",
                               "--batch-size", "4", "--prefix", "16", "--json", out, "--quiet")
    assert code == 0, stderr
    res = json.loads(out.read_text())
    for key in ("ppl_engine", "ppl_reference", "top1_agreement", "kl", "kv_bytes_ratio"):
        assert math.isfinite(res[key])
    assert res["kv_bytes_ratio"] < 1.0 and 0 < res["top1_agreement"] <= 1
    assert res["ppl_engine"] != res["ppl_reference"]  # the sparse path is what was measured
    assert "teacher-forced tokens of mix" in stdout
    code, _, stderr = run("eval", "--engine", engines["sparse"], "--calibration", tmp_path)
    one_line_error(code, stderr, "give --calibration or --engine")
    code, _, stderr = run("eval", "--engine", engines["sparse"], "--prefix", "500")
    one_line_error(code, stderr, "--prefix 500 leaves no token to score")
