"""The engine and runtime against transformers and against the masked reference forward."""

from pathlib import Path

import pytest
import torch
from polarc.calibration import artifact
from polarc.calibration.quality import make_selector
from polarc.exporters.engine import BuildConfig, build_engine
from polarc.plugins.reference import selective_attention_reference as attention_torch

from polarc.errors import PolarcError
from polarc.format.engine_file import lay_out_wide_linears, load_engine
from polarc.models import load_model
from polarc.models.forward import forward
from polarc.runtime.generate import generate
from polarc.runtime.torch_runtime import Runtime
from tests.conftest import tiny_hf

PROMPTS = [[5, 9, 17, 33, 64, 101, 7], [200, 3, 12], [44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54]]


def _engine(tmp_path: Path, path: Path, *, calibration=None, dtype: str = "fp32",
            max_batch: int = 4, max_seq: int = 64) -> Path:
    model = load_model(str(path))
    out = tmp_path / "e.plan"
    build_engine(model, calibration, BuildConfig(out=out, dtype=dtype, max_batch=max_batch,
                                                 max_seq=max_seq))
    return out


@pytest.mark.parametrize("kind", ["llama-gqa", "llama-mha", "opt", "qwen2"])
def test_dense_engine_matches_transformers(kind: str, tiny_dirs: dict, tmp_path: Path) -> None:
    hf = tiny_hf(kind)
    rt = Runtime(load_engine(_engine(tmp_path, tiny_dirs[kind])), batch=len(PROMPTS))
    logits = rt.prefill(PROMPTS)
    seqs = [list(p) for p in PROMPTS]
    for step in range(17):
        for b, seq in enumerate(seqs):
            with torch.no_grad():
                ref = hf(torch.tensor([seq])).logits[0, -1]
            err = (logits[b] - ref).abs().max().item()
            assert err < 1e-4, (kind, step, b, err)
        if step == 16:
            break
        nxt = logits.argmax(-1)
        for b, seq in enumerate(seqs):
            seq.append(int(nxt[b]))
        logits = rt.decode_step(nxt)


def test_sparse_engine_matches_masked_reference(tiny_dirs: dict, tmp_path: Path,
                                                calibrated: dict) -> None:
    cal = artifact.read_calibration(calibrated["llama-mha"])
    engine = load_engine(_engine(tmp_path, tiny_dirs["llama-mha"], calibration=cal))
    assert engine.k_per_layer == [4, 2, 2]
    model = load_model(str(tiny_dirs["llama-mha"]))
    prompt = PROMPTS[0]
    rt = Runtime(engine, batch=1)
    logits = rt.prefill([prompt])
    seq = list(prompt)
    n_kv = model.spec.n_kv_heads
    for _ in range(8):
        nxt = int(logits[0].argmax())
        seq.append(nxt)
        logits = rt.decode_step(torch.tensor([nxt]))
        # Reference: prompt positions dense (prefill), later positions router top-k.
        sparse = make_selector("sparse", cal.k_per_layer, n_kv, routers=cal.head_routers)

        def select(layer, x, norms, sparse=sparse):
            keep = sparse(layer, x, norms)
            if keep is None:
                return None
            keep[:, : len(prompt)] = True
            return keep

        ref = forward(model, torch.tensor([seq]), select=select)[0, -1]
        assert (logits[0] - ref).abs().max().item() < 1e-4
    dense_rt = Runtime(engine, batch=1, dense=True)
    dense_logits = dense_rt.prefill([prompt])
    for tok in seq[len(prompt):]:
        dense_logits = dense_rt.decode_step(torch.tensor([tok]))
    assert (dense_logits - logits).abs().max().item() > 1e-4  # sparse really is sparse


def test_attention_torch_matches_kernel_reference() -> None:
    from polarc.plugins.reference import selective_attention_reference

    torch.manual_seed(0)
    q = torch.randn(3, 8, 16)
    kc, vc = torch.randn(3, 4, 20, 16), torch.randn(3, 4, 20, 16)
    lens = torch.tensor([20, 1, 7], dtype=torch.int32)
    groups = torch.tensor([[2, 0], [3, 1], [1, 2]], dtype=torch.int32)
    ref = selective_attention_reference(q, kc, vc, lens, groups, 0.25)
    assert torch.allclose(attention_torch(q, kc, vc, lens, groups, 0.25), ref, atol=1e-5)


def test_generate_stops_rows_at_eos(tiny_dirs: dict, tmp_path: Path) -> None:
    engine = load_engine(_engine(tmp_path, tiny_dirs["llama-gqa"]))
    rt = Runtime(engine, batch=3)
    outs, stats = generate(rt, PROMPTS, max_new_tokens=12)
    assert all(len(o) == 12 for o in outs) or any(o[-1] == 2 for o in outs)
    rt2 = Runtime(engine, batch=3)
    again, _ = generate(rt2, PROMPTS, max_new_tokens=12)
    assert again == outs  # greedy is deterministic
    s = stats.summary()
    assert s["decode_tokens_per_s"] > 0 and s["decode_steps"] == 11
    sampled, _ = generate(Runtime(engine, batch=3), PROMPTS, max_new_tokens=12,
                          temperature=1.0, top_p=0.9, seed=1)
    sampled2, _ = generate(Runtime(engine, batch=3), PROMPTS, max_new_tokens=12,
                           temperature=1.0, top_p=0.9, seed=1)
    assert sampled == sampled2


def test_finished_rows_are_compacted_into_smaller_buckets(tiny_dirs: dict, tmp_path: Path) -> None:
    """Rows that stop at different steps: the live ones move to the front and run in smaller
    batch buckets; each row's output is what it generates without EOS, cut at its EOS."""
    engine = load_engine(_engine(tmp_path, tiny_dirs["llama-gqa"], max_batch=8))
    prompts = PROMPTS + [[7, 8, 9], [100, 101], [31, 41, 59, 26, 53]]
    full, _ = generate(Runtime(engine, batch=len(prompts)), prompts, max_new_tokens=12,
                       stop_at_eos=False)
    # as EOS, the token that the most rows produce within their first 8 steps
    early = [set(out[:8]) for out in full]
    eos = max({t for e in early for t in e}, key=lambda t: sum(t in e for e in early))
    engine.model.tokenizer.eos_id = eos
    rt = Runtime(engine, batch=len(prompts))
    assert rt.buckets == [1, 2, 4, 6]
    seen = []
    compact = rt.compact
    rt.compact = lambda live, bucket: (seen.append(bucket), compact(live, bucket))
    outs, stats = generate(rt, prompts, max_new_tokens=12)
    expected = [o[: o.index(eos) + 1] if eos in o else o for o in full]
    assert outs == expected
    assert seen, "no row finished early enough to shrink the batch"
    assert stats.decode_tokens == sum(len(o) for o in outs) - len(outs)  # first: from prefill


def test_engine_file_errors(tmp_path: Path, tiny_dirs: dict) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(PolarcError, match="not a polarc engine"):
        load_engine(text)
    good = _engine(tmp_path, tiny_dirs["llama-gqa"])
    data = good.read_bytes()
    cut = tmp_path / "cut.plan"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(PolarcError, match="truncated or corrupt"):
        load_engine(cut)
    with pytest.raises(PolarcError, match="does not exist"):
        load_engine(tmp_path / "missing.plan")


def test_batch_over_engine_limit(tmp_path: Path, tiny_dirs: dict) -> None:
    engine = load_engine(_engine(tmp_path, tiny_dirs["llama-gqa"], max_batch=2))
    with pytest.raises(PolarcError, match="exceeds the engine's --max-batch 2"):
        Runtime(engine, batch=3)


def test_sparse_mlp_matches_masked_reference(tiny_dirs: dict, tmp_path: Path,
                                             calibrated: dict) -> None:
    cal = artifact.read_calibration(calibrated["opt"])
    engine = load_engine(_engine(tmp_path, tiny_dirs["opt"], calibration=cal))
    n = engine.model.spec.intermediate
    assert engine.mlp_routers and all(r.k % 128 == 0 for r in engine.mlp_routers.values())
    for r in engine.mlp_routers.values():
        r.k = 128  # force real neuron sparsity on this tiny random model (N = 256)
    rt = Runtime(engine, batch=1)
    assert set(rt.mlp_k) == set(engine.mlp_routers)
    model = load_model(str(tiny_dirs["opt"]))
    prompt = PROMPTS[2]
    logits = rt.prefill([prompt])
    seq = list(prompt)
    heads = make_selector("sparse", cal.k_per_layer, model.spec.n_kv_heads, routers=cal.head_routers)

    def select(layer, x, norms):
        keep = heads(layer, x, norms)
        if keep is not None:
            keep[:, : len(prompt)] = True
        return keep

    def mlp_select(layer, x):
        r = engine.mlp_routers[layer]
        scores = torch.sigmoid((x @ r.w1.T) @ r.w2.T + r.b2)
        idx = scores.topk(128, dim=-1).indices  # batch of one row: union = the row's top-k
        keep = torch.zeros(*x.shape[:2], n, dtype=torch.bool).scatter_(-1, idx, True)
        keep[:, : len(prompt)] = True
        return keep

    for _ in range(6):
        nxt = int(logits[0].argmax())
        seq.append(nxt)
        logits = rt.decode_step(torch.tensor([nxt]))
        ref = forward(model, torch.tensor([seq]), select=select, mlp_select=mlp_select)[0, -1]
        assert (logits[0] - ref).abs().max().item() < 1e-4


def test_16_bit_linears_as_tiles_give_the_rows_results(tiny_dirs: dict, tmp_path: Path,
                                                       calibrated: dict) -> None:
    """`Runtime(tile_linears=True)` lays a 16-bit engine's linear weights out as tiles
    (`lay_out_wide_linears`: the head routers get rows of their own, the q/k/v and gate/up
    views come back); prefill and sparse decode steps then give the rows' logits up to
    rounding, and the rows come back bit for bit."""
    cal = artifact.read_calibration(calibrated["llama-mha"])
    engine = load_engine(_engine(tmp_path, tiny_dirs["llama-mha"], calibration=cal,
                                 dtype="bf16"))
    rows = {n: t.clone() for n, t in engine.model.weights.items()}
    routers = {layer: r.weight.clone() for layer, r in engine.head_routers.items()}
    assert routers
    logits = {}
    for tiles in (False, True):
        rt = Runtime(engine, batch=2, tile_linears=tiles)
        w = engine.model.weights
        assert (w["layers.0.qkv.weight"].dim() == 4) == tiles
        out = [rt.prefill(PROMPTS[:2])]
        for step in range(3):  # (the same tokens both times: no near ties to follow)
            out.append(rt.decode_step(torch.tensor([11 + step, 40 + step])))
        logits[tiles] = torch.stack(out).float()
    qkv = engine.model.weights["layers.0.qkv.weight"]
    for layer, r in engine.head_routers.items():  # not views of the old rows
        assert torch.equal(r.weight, routers[layer])
        assert r.weight.untyped_storage().data_ptr() != qkv.untyped_storage().data_ptr()
    err = (logits[True] - logits[False]).norm() / logits[False].norm()
    assert err < 1e-2
    lay_out_wide_linears(engine, tiles=False)
    w = engine.model.weights
    assert set(w) == set(rows)
    assert all(torch.equal(w[n], t) for n, t in rows.items())
    q = w["layers.0.q.weight"]
    assert q.untyped_storage().data_ptr() == w["layers.0.qkv.weight"].untyped_storage().data_ptr()
