"""The launch-floor benchmark's model of a step: its reads add up to the byte floor's bytes,
and its plain reader reads every element once (the interpreter on the CPU)."""

from __future__ import annotations

import pytest
import torch
from polarc.benchmarks.bench_launch_floor import check_readers, step_reads

from polarc.models.layers import stored_weights
from polarc.models.load import random_weights
from tests.conftest import TINY


@pytest.mark.parametrize("kind", ["llama-gqa", "opt"])
def test_step_reads_are_the_weights_and_kv_a_step_reads(kind: str) -> None:
    spec = TINY[kind]
    weights = stored_weights(random_weights(spec, seed=0, dtype=torch.bfloat16), spec)
    linear = sum(t.numel() * 2 for name, t in weights.items()
                 if t.dim() == 2 and name not in ("embed.weight", "pos_embed.weight"))
    if spec.tie_embeddings:
        linear += weights["embed.weight"].numel() * 2
    reads = step_reads(spec, batch=3, seqlen=40, density=1.0, weight_bytes=2, kv_bytes=1)
    assert len(reads) == 5 * spec.n_layers + 1 and reads[-1][0] == "lm_head"
    assert sum(n for name, n in reads if not name.endswith("attention")) == linear
    kv = spec.n_layers * 3 * 40 * spec.n_kv_heads * spec.head_dim * 2
    assert sum(n for name, n in reads if name.endswith("attention")) == kv
    half = step_reads(spec, batch=3, seqlen=40, density=0.5, weight_bytes=2, kv_bytes=1)
    assert sum(n for name, n in half if name.endswith("attention")) == kv // 2


def test_plain_reader_reads_every_element_once() -> None:
    from polarc.benchmarks.bench_launch_floor import _read_kernel

    if not torch.cuda.is_available() and type(_read_kernel()).__name__ != "InterpretedFunction":
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set and there is no CUDA")
    check_readers(torch.device("cuda" if torch.cuda.is_available() else "cpu"), sms=2)


def test_the_run_prints_and_writes_every_part(monkeypatch: pytest.MonkeyPatch, tmp_path,
                                              capsys: pytest.CaptureFixture) -> None:
    """The whole run on the CPU with a tiny model and a stand-in clock (the readers still run
    through the interpreter): the curve and every case x variant x mode in the tables and the
    JSON."""
    import json

    from polarc.benchmarks import bench_launch_floor as lf

    if type(lf._read_kernel()).__name__ != "InterpretedFunction":
        pytest.skip("needs Triton's interpreter (TRITON_INTERPRET=1 before triton loads)")
    calls = []

    def clock(fns, reps=15, target_ms=3.0):
        for fn in fns:
            fn()
        calls.append(len(fns))
        return 0.5

    monkeypatch.setattr(lf, "time_graph", clock)
    monkeypatch.setattr(lf, "copy_bandwidth", lambda device: 1e9)
    monkeypatch.setattr(lf, "environment", lambda bw, device: {"device": "cpu", "torch": "-"})
    monkeypatch.setattr(lf, "get_preset", lambda name: TINY["llama-gqa"])
    monkeypatch.setattr(lf, "CURVE_MB", (1,))
    monkeypatch.setattr(lf, "sets_to_rotate", lambda size: 2)
    out = tmp_path / "lf.json"
    lf.run([("tiny", 2, 16)], ["bf16", "fp8-all"], json_path=out,
           steps={("tiny", 2, 16, "bf16", "dense"): 1.0}, device=torch.device("cpu"), sms=2)
    saved = json.loads(out.read_text())
    assert [(r["variant"], r["mode"]) for r in saved["records"]] == [
        ("bf16", "dense"), ("bf16", "sparse"), ("fp8-all", "dense"), ("fp8-all", "sparse")]
    assert {r["reader"] for r in saved["curve"]} == {"triton x1/SM", "triton x2/SM",
                                                     "triton x4/SM"}
    assert all(r["launch_ms"] == 0.5 and r["launches"] == 5 * TINY["llama-gqa"].n_layers + 1
               for r in saved["records"])
    assert saved["records"][0]["step_over_launch"] == 2.0
    assert "step_ms" not in saved["records"][1]
    assert "| tiny | 2 | 16 | fp8-all | sparse |" in capsys.readouterr().out


def test_e2e_steps_reads_a_bench_e2e_file() -> None:
    from pathlib import Path

    from polarc.benchmarks.bench_launch_floor import e2e_steps

    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    steps = e2e_steps(results / "e2e-fp8-llama3-8b-32-8192-h100-2026-12-07-s46.json")
    assert len(steps) == 6
    assert steps[("llama3-8b", 32, 8192, "fp8-all", "sparse")] == pytest.approx(6.78, abs=0.005)
