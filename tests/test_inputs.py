"""Every mistake a user can make on the command line is one `Error:` line and exit 1; user and
model text is printed as it is (never read as markup); inputs that are not what they seem are
refused with a reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from polarc.calibration.data import CHUNK_CHARS, iter_documents

from tests.conftest import SMALL, fill, one_line_error, run, tiny_hf


@pytest.fixture(scope="module")
def engine(tiny_dirs: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("engine") / "e.plan"
    code, _, stderr = run("build", "-m", tiny_dirs["llama-gqa"], "-o", path, "--max-batch",
                          "10000000", "--max-seq", "64")
    assert code == 0, stderr
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("files")
    latin1 = root / "latin1.txt"
    latin1.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    empty = root / "empty.txt"
    empty.write_text("\n   \n")
    return {"latin1": latin1, "empty": empty}


BAD = [
    (["calibrate", "-m", "{tiny}", "--out", "{tmp}/c", "--quality-budget", "nan"],
     "--quality-budget must be a finite number"),
    (["calibrate", "-m", "{tiny}", "--out", "{tmp}/c", "--tune-tokens", "-100000"],
     "--tune-tokens must be positive"),
    (["calibrate", "-m", "{tiny}", "--out", "{tmp}/c", "--seq-len", "100000"],
     "--seq-len 100000 exceeds llama-gqa's 512 positions"),
    (["calibrate", "-m", "{tiny}", "--out", "{tmp}/c", "--density", "nan"],
     "--density must be in (0, 1]"),
    (["run", "{engine}", "--batch", "-1"], "--batch must be positive"),
    (["run", "{engine}", "--batch", "0"], "--batch must be positive"),
    (["run", "{engine}", "--temperature", "nan"], "--temperature must be a finite number"),
    (["run", "{engine}", "--top-p", "nan"], "--top-p must be a finite number"),
    (["run", "{engine}", "--device", "foo"], "--device must be auto, cpu or cuda"),
    (["run", "{engine}", "--device", "meta"], "--device must be auto, cpu or cuda"),
    (["run", "{engine}", "--device", "mps"], "--device must be auto, cpu or cuda"),
    (["run", "{engine}", "--prompts", "{latin1}"], "is not UTF-8 text"),
    (["run", "{engine}", "--prompts", "{empty}"], "has no prompts"),
    (["run", "{engine}", "--batch", "10000000", "--device", "cpu"],
     "a KV cache for batch 10000000"),
    (["build", "-m", "{tiny}", "-o", "{tmp}/e.plan", "--max-seq", "0"],
     "--max-seq must be positive"),
    (["build", "-m", "{tiny}", "-o", "{tmp}/e.plan", "--max-batch", "0"],
     "--max-batch must be positive"),
    (["build", "-m", "{tiny}", "-o", "{tmp}/e.plan", "--max-seq", "100000"],
     "--max-seq 100000 exceeds llama-gqa's 512 positions"),
    (["build", "-m", "{tiny}", "-o", "{tmp}/e.plan", "--dtype", "fp8"], "--dtype must be"),
    (["eval", "--calibration", "{cal}", "-m", "{tiny}", "--tokens", "0"], "--tokens must be positive"),
]


@pytest.mark.parametrize("args, match", BAD, ids=[f"{a[0]} {' '.join(a[-2:])}" for a, _ in BAD])
def test_bad_input(args: list[str], match: str, tmp_path: Path, tiny_dirs: dict, engine: Path,
                   files: dict, calibrated: dict) -> None:
    subs = {"{tmp}": str(tmp_path), "{tiny}": str(tiny_dirs["llama-gqa"]), "{engine}": str(engine),
            "{latin1}": str(files["latin1"]), "{empty}": str(files["empty"]),
            "{cal}": str(calibrated["llama-gqa"])}
    code, _, stderr = run(*fill(args, subs))
    one_line_error(code, stderr, match)
    assert [p.name for p in tmp_path.iterdir()] == []  # nothing written


@pytest.mark.parametrize("prompt", ["x [/] y", "a[i] = b[j]", "[bold]not bold[/bold]"])
def test_text_is_printed_as_it_is(prompt: str, engine: Path) -> None:
    code, stdout, stderr = run("run", engine, "--prompt", prompt, "--max-new-tokens", "3",
                               "--quiet", "--batch", "1")
    assert code == 0, stderr
    assert prompt in stdout


def test_tiny_temperature_is_near_greedy(engine: Path, tmp_path: Path) -> None:
    results = {}
    for t in ("0", "1e-40"):
        out = tmp_path / f"{t}.json"
        code, _, stderr = run("run", engine, "--prompt", "hello", "--temperature", t,
                              "--max-new-tokens", "6", "--batch", "1", "--quiet", "--json", out)
        assert code == 0, stderr
        results[t] = json.loads(out.read_text())["outputs"][0]["completion"]
    assert results["0"] == results["1e-40"]


def test_random_weights_label_survives(tiny_dirs: dict, tmp_path: Path) -> None:
    code, stdout, stderr = run("calibrate", "-m", tiny_dirs["llama-gqa"], "--random-weights",
                               "--out", tmp_path / "c", *SMALL, "--density", "0.5")
    assert code == 0, stderr
    assert "[random weights]" in stdout


def test_folder_without_tokenizer(tmp_path: Path) -> None:
    tiny_hf("opt").save_pretrained(tmp_path / "opt", safe_serialization=True)
    code, _, stderr = run("calibrate", "-m", tmp_path / "opt", "--out", tmp_path / "c", *SMALL)
    one_line_error(code, stderr, "has no tokenizer")


def test_pickle_weights_are_refused_and_identity_is_the_loaded_files(tmp_path: Path,
                                                                      tiny_dirs: dict) -> None:
    import torch

    from polarc.models import load_model
    from tests.conftest import byte_tokenizer

    pickled = tmp_path / "pickled"
    hf = tiny_hf("llama-gqa")
    hf.save_pretrained(pickled)
    byte_tokenizer().save_pretrained(pickled)
    (pickled / "model.safetensors").unlink()  # weights only as a pickle, plus a stray file
    torch.save(hf.state_dict(), pickled / "pytorch_model.bin")
    (pickled / "extra.safetensors").write_bytes((tiny_dirs["llama-gqa"] / "model.safetensors")
                                                .read_bytes())
    code, _, stderr = run("calibrate", "-m", pickled, "--out", tmp_path / "c", *SMALL)
    one_line_error(code, stderr, "has PyTorch pickle weights")
    # an unrelated safetensors file beside the model does not change its identity
    before = load_model(str(tiny_dirs["llama-gqa"])).identity["weights_sha256"]
    (tiny_dirs["llama-gqa"] / "notes.safetensors").write_bytes(b"\0" * 64)
    try:
        assert load_model(str(tiny_dirs["llama-gqa"])).identity["weights_sha256"] == before
    finally:
        (tiny_dirs["llama-gqa"] / "notes.safetensors").unlink()


def test_eval_reads_a_foreign_dataset_whole(calibrated: dict, tiny_dirs: dict,
                                            tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("\n\n".join(f"Paragraph {i}: " + "some words of text " * 20 for i in range(40)))
    out = tmp_path / "e.json"
    code, stdout, stderr = run("eval", "--calibration", calibrated["llama-gqa"], "-m",
                               tiny_dirs["llama-gqa"], "--dataset", text, "--tokens", "100000",
                               "--quiet", "--json", out)
    assert code == 0, stderr
    res = json.loads(out.read_text())
    size = len(text.read_bytes())  # one token per byte (+ separators): nearly all of it
    assert res["tokens"] > 0.8 * size and res["heldout"] == "the whole dataset"
    assert f"{res['tokens']} held-out tokens" in stdout


def test_a_single_long_line_is_cut_into_bounded_documents(tmp_path: Path) -> None:
    path = tmp_path / "one-line.txt"
    path.write_text("word " * 2_000_000)  # 10 MB, no line or paragraph break
    docs = iter_documents(str(path))
    first = [next(docs) for _ in range(1000)]
    assert all(0 < len(d) <= CHUNK_CHARS for d in first)
