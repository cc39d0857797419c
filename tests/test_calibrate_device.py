"""Calibration and evaluation on a chosen device and dtype: bf16 on the GPU gives the same
plan and router recall as fp32 on the CPU; a device that is not there is one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import SMALL, one_line_error, run

CUDA = torch.cuda.is_available()


@pytest.mark.skipif(CUDA, reason="checks the answer on a machine without a GPU")
@pytest.mark.parametrize("command", ["calibrate", "eval"])
def test_cuda_without_a_gpu(command: str, tmp_path: Path, tiny_dirs: dict, calibrated: dict) -> None:
    args = (["calibrate", "-m", tiny_dirs["llama-gqa"], "--out", tmp_path / "c", *SMALL]
            if command == "calibrate" else
            ["eval", "--calibration", calibrated["llama-gqa"], "-m", tiny_dirs["llama-gqa"]])
    code, _, stderr = run(*args, "--device", "cuda")
    one_line_error(code, stderr, "--device cuda but no CUDA GPU is available")


def test_calibration_records_device_dtype_and_memory(calibrated: dict) -> None:
    meta = json.loads((calibrated["llama-gqa"] / "calibration.json").read_text())
    assert meta["settings"]["device"] == ("cuda" if CUDA else "cpu")
    assert meta["settings"]["dtype"] == ("bfloat16" if CUDA else "float32")
    assert meta["memory"]["peak_host_rss_gib"] > 0
    assert "collect_and_train" in meta["timings_s"]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_bf16_calibration_matches_cpu(tiny_dirs: dict, tmp_path: Path) -> None:
    metas = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        code, _, stderr = run("calibrate", "-m", tiny_dirs["llama-mha"], "--out", out, *SMALL,
                              "--density", "0.5", "--device", device)
        assert code == 0, stderr
        metas[device] = json.loads((out / "calibration.json").read_text())
    assert metas["cuda"]["settings"]["dtype"] == "bfloat16"
    assert metas["cuda"]["plan"]["k_per_layer"] == metas["cpu"]["plan"]["k_per_layer"]
    recall = {d: [e["router_recall"] for e in m["layers"][1:]] for d, m in metas.items()}
    for gpu, cpu in zip(recall["cuda"], recall["cpu"], strict=True):
        assert abs(gpu - cpu) <= 0.02
    code, _, stderr = run("eval", "--calibration", tmp_path / "cuda", "-m", tiny_dirs["llama-mha"],
                          "--tokens", "256", "--quiet", "--device", "cuda",
                          "--json", tmp_path / "e.json")
    assert code == 0, stderr
    assert json.loads((tmp_path / "e.json").read_text())["device"] == "cuda"


@pytest.mark.skipif(CUDA, reason="checks the answer on a machine without a GPU")
def test_gpu_memory_without_a_gpu(tmp_path: Path, tiny_dirs: dict) -> None:
    code, _, stderr = run("calibrate", "-m", tiny_dirs["llama-gqa"], "--out", tmp_path / "c",
                          *SMALL, "--gpu-memory", "8")
    one_line_error(code, stderr, "--gpu-memory is for a GPU run")
    assert not (tmp_path / "c").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_memory_cap_bounds_the_run(tiny_dirs: dict, tmp_path: Path) -> None:
    import subprocess
    import sys

    # A process of its own: the cap is PyTorch's, for the rest of the process.
    code = subprocess.run([sys.executable, "-c", "from polarc.cli import main; main()",
                           "calibrate", "-m", str(tiny_dirs["llama-gqa"]), "--out",
                           str(tmp_path / "c"), *SMALL, "--density", "0.5", "--gpu-memory", "0.5"],
                          capture_output=True, text=True)
    assert code.returncode == 0, code.stderr
    meta = json.loads((tmp_path / "c" / "calibration.json").read_text())
    assert meta["memory"]["peak_gpu_gib"] * 2**30 <= 0.5e9
    code, _, stderr = run("calibrate", "-m", tiny_dirs["llama-gqa"], "--out", tmp_path / "d",
                          *SMALL, "--gpu-memory", "1e9")
    one_line_error(code, stderr, "--gpu-memory must be in (0,")
