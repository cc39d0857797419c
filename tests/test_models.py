import dataclasses
from pathlib import Path

import pytest
import torch

from polarc.errors import PolarcError
from polarc.models import PRESETS, layers, load_model
from polarc.models.forward import forward, group_output_norms
from polarc.models.load import random_identity
from polarc.models.presets import hf_config, spec_from_hf_config
from polarc.models.weights import hf_names
from tests.conftest import TINY, tiny_hf


@pytest.mark.parametrize("kind", list(TINY))
def test_reference_forward_matches_transformers(kind: str, tiny_dirs: dict[str, Path]) -> None:
    hf = tiny_hf(kind)
    model = load_model(str(tiny_dirs[kind]))
    ids = torch.randint(3, TINY[kind].vocab, (2, 37))
    with torch.no_grad():
        ref = hf(ids).logits
    out = forward(model, ids)
    assert (out - ref).abs().max().item() < 1e-4


def test_group_output_norms_are_what_dropping_a_group_removes() -> None:
    """Each group's label is the norm of the change in the attention block's output when that
    group's query heads are zeroed before W_o (the Gram-matrix form against the product)."""
    gen = torch.Generator().manual_seed(0)
    B, T, hkv, g, d, hidden = 2, 5, 3, 4, 8, 24
    o = torch.randn(B, T, hkv, g, d, generator=gen)
    w_o = torch.randn(hidden, hkv * g * d, generator=gen) * torch.rand(hkv * g * d, generator=gen)
    full = o.flatten(2) @ w_o.T
    for group in range(hkv):
        keep = torch.ones(hkv)
        keep[group] = 0
        without = (o * keep[:, None, None]).flatten(2) @ w_o.T
        removed = (full - without).norm(dim=-1)
        torch.testing.assert_close(group_output_norms(o, w_o)[..., group], removed,
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", list(TINY))
def test_spec_round_trips_through_hf_config(kind: str) -> None:
    spec = TINY[kind]
    assert spec_from_hf_config(hf_config(spec), spec.name).architecture() == spec.architecture()


def test_all_presets_build_configs() -> None:
    for spec in PRESETS.values():
        back = spec_from_hf_config(hf_config(spec), spec.name)
        assert back.architecture() == spec.architecture(), spec.name


@pytest.mark.parametrize("kind", ["qwen2", "opt", "llama-gqa"])
def test_checkpoint_names_cover_every_weight(kind: str) -> None:
    sd = tiny_hf(kind).state_dict()
    names = hf_names(TINY[kind])
    assert set(names.values()) - {"lm_head.weight"} <= set(sd)
    assert {k for k in sd if not k.startswith("lm_head")} <= set(names.values())


def test_random_weights_are_marked() -> None:
    model = load_model("smollm2-135m", random_weights=True, seed=3)
    assert model.random_weights
    assert model.identity["weights_sha256"] == random_identity(3)
    assert model.spec == PRESETS["smollm2-135m"]
    assert model.tokenizer.kind == "bytes"


def test_identity_is_a_hash_of_the_weights(tiny_dirs: dict[str, Path]) -> None:
    a = load_model(str(tiny_dirs["llama-gqa"]))
    b = load_model(str(tiny_dirs["llama-gqa"]))
    c = load_model(str(tiny_dirs["llama-mha"]))
    assert a.identity == b.identity
    assert a.identity["weights_sha256"] != c.identity["weights_sha256"]


def test_unknown_alias() -> None:
    with pytest.raises(PolarcError, match="unknown model alias 'llama9-1t'"):
        load_model("llama9-1t")


def test_alias_without_weights_says_how_to_provide_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PolarcError, match="no weights for llama3-8b") as info:
        load_model("llama3-8b")
    assert "--weights" in (info.value.hint or "")


def test_folder_without_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(PolarcError, match="no weights in"):
        load_model(str(tmp_path))


def test_truncated_safetensors(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    src = tiny_dirs["llama-gqa"]
    for f in src.iterdir():
        data = f.read_bytes()
        if f.suffix == ".safetensors":
            data = data[: len(data) // 2]
        (tmp_path / f.name).write_bytes(data)
    with pytest.raises(PolarcError, match="not a readable safetensors file"):
        load_model(str(tmp_path))


def test_corrupt_gguf(tmp_path: Path) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(200)))
    with pytest.raises(PolarcError, match="not a readable GGUF file"):
        load_model(str(bad))


def test_weights_of_another_architecture(tiny_dirs: dict[str, Path]) -> None:
    with pytest.raises(PolarcError, match="not a smollm2-135m"):
        load_model("smollm2-135m", weights=tiny_dirs["llama-gqa"])


@pytest.mark.parametrize("kind", list(TINY))
def test_next_linear_is_the_order_layers_run_in(kind: str, tiny_dirs: dict[str, Path]) -> None:
    """`next_linear` (what an FP8 GEMM prefetches) names the linear layer that `decoder_layer`
    and `final_logits` actually call next, for every call but qkv's (attention between)."""
    model = load_model(str(tiny_dirs[kind]))
    called = []

    def linear(model, x, name):
        called.append(name)
        return layers.linear(model, x, name)

    ops = dataclasses.replace(layers.EAGER, linear=linear)
    h = torch.randn(1, 2, model.spec.hidden)
    delta = torch.zeros_like(h)
    rope = layers.rope_cos_sin(model, torch.arange(2), h.dtype)
    for i in range(model.spec.n_layers):
        with model.layer_weights(i):
            h, delta = layers.decoder_layer(model, i, h, delta, rope,
                                            lambda layer, x, q, k, v, extra: q, ops=ops)
    layers.final_logits(model, h + delta, ops)
    assert len(called) == 4 * model.spec.n_layers + 1
    for name, after in zip(called, called[1:] + [None], strict=True):
        assert layers.next_linear(model, name) == (None if name.endswith("qkv") else after)


@pytest.mark.parametrize("kind", ["llama-gqa", "qwen2"])
def test_residual_hook_and_deferred_norms_leave_the_logits_unchanged(
        kind: str, tiny_dirs: dict[str, Path]) -> None:
    """`Ops.linear_residual` (the producing GEMM adds its product into the residual stream and
    prepares the norm `norm_after` names, in parts, as `fp8_linear(residual=)` does) with
    `deferred_add_norm` and the kernels' CPU path resolving the parts: the logits the plain
    stages give. The deferred norm refuses parts made for another norm weight."""
    from polarc.plugins.fp8_linear import RmsNormParts

    from polarc.runtime.kernels import AddedDelta, deferred_add_norm, kernels_for

    model = load_model(str(tiny_dirs[kind]))
    kernels = kernels_for(torch.device("cpu"), model.spec.head_dim)
    added = []

    def linear_residual(model, x, name, h):
        added.append(name)
        h += layers.linear(model, x, name)
        weight = model.weights[layers.norm_after(model, name) + ".weight"]
        rows = h.view(-1, h.shape[-1])
        sumsq = rows.float().pow(2).view(rows.shape[0], 4, -1).sum(-1)  # in 4 parts
        return AddedDelta(RmsNormParts(rows * weight, sumsq, model.spec.norm_eps), weight)

    fused = dataclasses.replace(layers.EAGER, add_norm=deferred_add_norm(layers.add_norm),
                                linear=kernels.linear, linear_residual=linear_residual)
    rope = layers.rope_cos_sin(model, torch.arange(2), torch.float32)
    logits = {}
    for name, ops in (("plain", layers.EAGER), ("fused", fused)):
        h = torch.randn(1, 2, model.spec.hidden, generator=torch.Generator().manual_seed(0))
        delta = torch.zeros_like(h)
        for i in range(model.spec.n_layers):
            with model.layer_weights(i):
                h, delta = layers.decoder_layer(model, i, h, delta, rope,
                                                lambda layer, x, q, k, v, extra: q, ops=ops)
        logits[name] = layers.final_logits(model, h, ops, delta)
    torch.testing.assert_close(logits["fused"], logits["plain"], rtol=1e-4, atol=1e-4)
    assert len(added) == 2 * model.spec.n_layers  # every o and down
    h = torch.randn(2, model.spec.hidden)
    made = linear_residual(model, torch.randn(2, model.spec.hidden), "layers.0.o", h)
    with pytest.raises(ValueError, match="the RMS norm its GEMM prepared"):
        fused.add_norm(h, made, model.weights["layers.0.attn_norm.weight"], None,
                       model.spec.norm_eps)
