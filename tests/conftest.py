"""Shared fixtures: tiny random models of each family (saved as Hugging Face folders) and
small calibrations of them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Kernels run through Triton's interpreter on the CPU; it must be set before triton loads.
    os.environ.setdefault("TRITON_INTERPRET", "1")
import transformers
from typer.testing import CliRunner

from polarc.cli import app
from polarc.models.presets import ModelSpec, hf_config


def run(*args: object) -> tuple[int, str, str]:
    """A polarc command in this process: (exit code, stdout, stderr)."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def one_line_error(code: int, stderr: str, match: str) -> None:
    """The command failed with exit 1 and exactly one `Error:` line containing `match`."""
    assert code == 1, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), stderr
    assert match in lines[0], lines[0]
    assert "Traceback" not in stderr


def fill(args: list[str], subs: dict[str, str]) -> list[str]:
    """Command arguments with {placeholders} replaced (table-driven tests)."""
    out = []
    for a in args:
        for key, value in subs.items():
            a = a.replace(key, value)
        out.append(a)
    return out


# Small calibration settings for tiny models.
SMALL = ["--seq-len", "64", "--tokens", "2048", "--tune-tokens", "256", "--epochs", "2",
         "--batch-size", "4", "--quiet"]

TINY = {
    "llama-gqa": ModelSpec(name="tiny-llama-gqa", family="llama", hf_model_type="llama",
                           n_layers=3, hidden=64, n_heads=4, n_kv_heads=2, head_dim=16,
                           intermediate=96, vocab=320, max_positions=512),
    "llama-mha": ModelSpec(name="tiny-llama-mha", family="llama", hf_model_type="llama",
                           n_layers=3, hidden=64, n_heads=4, n_kv_heads=4, head_dim=16,
                           intermediate=96, vocab=320, max_positions=512),
    "qwen2": ModelSpec(name="tiny-qwen2", family="llama", hf_model_type="qwen2", n_layers=2,
                       hidden=64, n_heads=4, n_kv_heads=2, head_dim=16, intermediate=96,
                       vocab=320, max_positions=512, qkv_bias=True),
    "opt": ModelSpec(name="tiny-opt", family="opt", hf_model_type="opt", n_layers=3, hidden=64,
                     n_heads=4, n_kv_heads=4, head_dim=16, intermediate=256, vocab=320,
                     max_positions=512, qkv_bias=True, tie_embeddings=True),
}


def tiny_hf(kind: str, seed: int = 0) -> transformers.PreTrainedModel:
    """A random transformers model whose every parameter (biases and norms too) is non-trivial."""
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(hf_config(TINY[kind])).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
    return hf


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte (what byte-level BPE vocabularies use)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b if b in keep else next(extra)) for b in range(256)}


def byte_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A real Hugging Face tokenizer with one token per byte: id = byte + 3, after <unk>, <s>
    and </s> (the layout of polarc's ByteTokenizer), for the tiny models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2,
             **{ch: b + 3 for b, ch in _bytes_to_unicode().items()}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                                bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each tiny model saved as a Hugging Face folder (safetensors and a byte tokenizer)."""
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for kind in TINY:
        path = root / kind
        tiny_hf(kind).save_pretrained(path, safe_serialization=True)
        byte_tokenizer().save_pretrained(path)
        out[kind] = path
    return out


@pytest.fixture(scope="session")
def calibrated(tiny_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = {}
    root = tmp_path_factory.mktemp("cal")
    for kind, extra in [("llama-gqa", ["--quality-budget", "50"]), ("opt", ["--density", "0.5"]),
                        ("llama-mha", ["--density", "0.5"])]:
        args = ["calibrate", "-m", tiny_dirs[kind], "--out", root / kind, *SMALL, *extra]
        result = CliRunner().invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.stderr
        out[kind] = root / kind
    return out
