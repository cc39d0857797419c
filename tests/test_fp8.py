"""FP8 KV cache (float8 e4m3, one scale per layer and KV group): the quantize / dequantize
references, the paged write and attention over an FP8 cache against unquantized ones, scales
from calibration statistics or a short pass, and what is refused."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from polarc.calibration import artifact
from polarc.exporters.engine import BuildConfig, KVStats, build_engine, fp8_cache_layout
from polarc.plugins.reference import (
    FP8,
    FP8_MAX,
    dequantize_kv,
    hadamard,
    quantize_kv,
    selective_attention_reference,
    write_kv_reference,
)

from polarc.format.engine_file import load_engine
from polarc.models import load_model
from polarc.runtime.torch_runtime import Runtime
from tests.conftest import one_line_error, run


def test_quantize_round_trip() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 16, generator=g) * torch.tensor([0.1, 1.0, 30.0])[:, None]
    scale = x.abs().amax(dim=(0, 2)) / FP8_MAX
    q = quantize_kv(x, scale)
    assert q.dtype == FP8
    back = dequantize_kv(q.transpose(0, 1)[None], scale)[0].transpose(0, 1)
    rel = ((back - x).norm(dim=(0, 2)) / x.norm(dim=(0, 2)))
    assert (rel < 0.04).all()  # e4m3: 3 mantissa bits, about 2-3% of the norm
    # values beyond the scale's range saturate instead of turning into NaN
    assert torch.isfinite(quantize_kv(x * 10, scale).float()).all()


def test_paged_fp8_write_and_attention_match_unquantized() -> None:
    g = torch.Generator().manual_seed(1)
    b, hq, hkv, d, page, pages = 3, 8, 2, 16, 16, 9
    table = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8]], dtype=torch.int32)
    exact = [torch.zeros(pages, hkv, page, d) for _ in range(2)]
    fp8 = [torch.zeros(pages, hkv, page, d, dtype=FP8) for _ in range(2)]
    k_scale, v_scale = torch.tensor([5.0, 6.0]) / FP8_MAX, torch.tensor([4.5, 5.0]) / FP8_MAX
    lens = torch.tensor([40, 7, 33], dtype=torch.int32)
    for pos in range(40):
        k = torch.randn(b, hkv, d, generator=g).clamp(-4.5, 4.5)
        v = torch.randn(b, hkv, d, generator=g).clamp(-4.5, 4.5)
        at = torch.where(lens > pos, torch.tensor(pos, dtype=torch.int32), -1)
        write_kv_reference(k, v, exact[0], exact[1], at, table)
        write_kv_reference(k, v, fp8[0], fp8[1], at, table, k_scale, v_scale)
    q = torch.randn(b, hq, d, generator=g)
    groups = torch.tensor([[1], [0], [1]], dtype=torch.int32)
    ref = selective_attention_reference(q, exact[0], exact[1], lens, groups, block_table=table)
    got = selective_attention_reference(q, fp8[0], fp8[1], lens, groups, block_table=table,
                                        k_scale=k_scale, v_scale=v_scale)
    assert ((got - ref).norm() / ref.norm()).item() < 0.05


@pytest.fixture(scope="module")
def fp8_engines(tiny_dirs: dict, calibrated: dict, tmp_path_factory: pytest.TempPathFactory
                ) -> dict:
    root = tmp_path_factory.mktemp("fp8")
    out = {}
    cal = artifact.read_calibration(calibrated["llama-gqa"])
    for name, c in (("calibrated", cal), ("short_pass", None)):
        out[name] = root / f"{name}.plan"
        build_engine(load_model(str(tiny_dirs["llama-gqa"])), c,
                     BuildConfig(out=out[name], dtype="fp32", max_batch=8, max_seq=128,
                                 kv_dtype="fp8"))
    return out


def test_scales_come_from_the_calibration_or_a_short_pass(fp8_engines: dict,
                                                          calibrated: dict) -> None:
    meta = json.loads((calibrated["llama-gqa"] / "calibration.json").read_text())
    absmax = torch.tensor([[e["kv_absmax"]["k"] for e in meta["layers"]],
                           [e["kv_absmax"]["v"] for e in meta["layers"]]])
    eng = load_engine(fp8_engines["calibrated"])
    assert eng.kv_dtype == "fp8_e4m3" and eng.manifest["kv_scales_source"] == "calibration"
    # keys are stored rotated (`hadamard`) and less their group's mean key, in that basis:
    # K's scale is 2 sqrt(D) wider, so that it never saturates
    assert eng.key_rotation == "hadamard"
    d = eng.model.spec.head_dim
    widen = torch.tensor([2 * d ** 0.5, 1.0])[:, None, None]
    torch.testing.assert_close(eng.kv_scales, absmax / FP8_MAX * widen)
    means = artifact.read_calibration(calibrated["llama-gqa"]).key_means
    assert means is not None and len(means) == eng.model.spec.n_layers
    torch.testing.assert_close(eng.kv_key_offset,
                               torch.stack([means[i] for i in range(len(means))]) @ hadamard(d))
    short = load_engine(fp8_engines["short_pass"])
    assert short.manifest["kv_scales_source"].startswith("short pass over 4096 tokens")
    assert (short.kv_scales > 0).all() and short.kv_key_offset.abs().sum() > 0


def test_fp8_engine_runs_and_stays_close(fp8_engines: dict, tmp_path: Path) -> None:
    out = tmp_path / "e.json"
    code, _, stderr = run("eval", "--engine", fp8_engines["calibrated"], "--tokens", "1024",
                          "--batch-size", "4", "--prefix", "16", "--json", out, "--quiet")
    assert code == 0, stderr
    res = json.loads(out.read_text())
    assert res["kv_dtype"] == "fp8_e4m3"
    assert abs(res["ppl_engine"] / res["ppl_reference"] - 1) < 0.05
    assert res["kv_bytes_ratio"] < 0.25 + 1e-9  # a quarter of fp32's bytes, at most
    code, stdout, stderr = run("run", fp8_engines["calibrated"], "--prompt", "hello",
                               "--max-new-tokens", "4", "--device", "cpu", "--quiet")
    assert code == 0, stderr


def test_hadamard_is_orthonormal() -> None:
    for n in (1, 2, 16, 128):
        h = hadamard(n, torch.float64)
        torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64))
        torch.testing.assert_close(h.abs(), torch.full((n, n), n ** -0.5, dtype=torch.float64))
    with pytest.raises(ValueError, match="power of two"):
        hadamard(48)


def test_an_fp8_cache_holds_rotated_keys_less_their_offset(fp8_engines: dict) -> None:
    """The cache of an engine built now holds K times the Hadamard matrix less the group's
    key offset (queries rotated alike); an engine without rotation and offset (built before)
    keeps plain keys; one whose offset is far from the keys' mean (a large vector) still
    gives what the exact engine gives, since softmax ignores a shift common to all keys; all
    stay close to the unquantized engine."""
    eng = load_engine(fp8_engines["calibrated"])
    d = eng.model.spec.head_dim
    plain = dataclasses.replace(
        eng, manifest={k: v for k, v in eng.manifest.items() if k != "kv_key_rotation"},
        kv_scales=eng.kv_scales / torch.tensor([2 * d ** 0.5, 1.0])[:, None, None],
        kv_key_offset=None)
    shift = 0.5 * torch.randn(eng.kv_key_offset.shape, generator=torch.Generator().manual_seed(0))
    shifted = dataclasses.replace(eng, kv_key_offset=eng.kv_key_offset + shift,
                                  kv_scales=eng.kv_scales * torch.tensor([4.0, 1.0])[:, None, None])
    ids = list(range(5, 45))
    keys, logits = {}, {}
    for name, e, quantized in (("rotated", eng, True), ("plain", plain, True),
                               ("shifted", shifted, True), ("exact", eng, False)):
        rt = Runtime(e, batch=1, device="cpu", quantized=quantized)
        assert (rt.key_rotation is not None) == (name in ("rotated", "shifted"))
        assert (rt.key_offset is not None) == (name in ("rotated", "shifted"))
        rt.cache.grow(0, len(ids))
        logits[name] = rt.prefill_pack([(0, ids[:30], 0)])[0]
        logits[name] = rt.prefill_pack([(0, ids[30:], 30)])[0]  # attends to the cache
        pages, offsets = rt.cache.positions(0, 0, len(ids))
        scale = rt.layer_kv_scales(1)[0]
        stored = rt.cache.k[1][pages, :, offsets].float()
        keys[name] = stored * scale[:, None] if scale is not None else stored
    rotated_back = (keys["rotated"] + eng.kv_key_offset[1]) @ hadamard(d).T
    assert (rotated_back - keys["plain"]).norm() < 0.1 * keys["plain"].norm()
    assert (keys["rotated"] - keys["plain"]).norm() > 0.5 * keys["plain"].norm()
    assert (keys["shifted"] - keys["rotated"] + shift[1]).norm() < 0.1 * keys["plain"].norm()
    for name in ("rotated", "plain", "shifted"):
        assert (logits[name] - logits["exact"]).norm() < 0.1 * logits["exact"].norm(), name


def test_an_fp8_cache_keeps_position_zero_unquantized(fp8_engines: dict) -> None:
    """Prefill stores each sequence's position 0 unquantized in the sinks of its first page
    (keys in the cache's basis: rotated, less the offset); later chunks and decode steps read
    it from there (a changed sink changes their logits, not the first chunk's, which attends
    to its own unquantized K and V)."""
    eng = load_engine(fp8_engines["calibrated"])
    ids = list(range(5, 45))
    exact = Runtime(eng, batch=1, device="cpu", quantized=False)
    assert exact.cache.k_sink is None
    exact.cache.grow(0, len(ids))
    exact.prefill_pack([(0, ids, 0)])
    rt = Runtime(eng, batch=1, device="cpu")
    rt.cache.grow(0, len(ids) + 1)
    rt.prefill_pack([(0, ids[:30], 0)])
    first = rt.cache.host_row(0)[0]
    for layer in range(eng.model.spec.n_layers):
        k0 = exact.cache.k[layer][exact.cache.host_row(0)[0], :, 0]
        v0 = exact.cache.v[layer][exact.cache.host_row(0)[0], :, 0]
        want = rt.cache_basis(layer, k0[None], k0[None])[1][0]
        torch.testing.assert_close(rt.cache.k_sink[layer][first], want)
        torch.testing.assert_close(rt.cache.v_sink[layer][first], v0)
    later = rt.prefill_pack([(0, ids[30:], 30)])[0]
    rt.cache.set_length(0, len(ids))
    step = rt.step(torch.tensor([7]))[0]
    for layer in range(eng.model.spec.n_layers):
        rt.cache.k_sink[layer][first] *= 3.0
    rt.cache.set_length(0, len(ids))
    assert not torch.allclose(rt.prefill_pack([(0, ids[30:], 30)])[0], later)
    rt.cache.set_length(0, len(ids))
    assert not torch.allclose(rt.step(torch.tensor([7]))[0], step)


def test_an_fp8_page_pool_keeps_v_position_major(fp8_engines: dict) -> None:
    """V pages of an FP8 cache are [D, P] streams behind the usual [N, Hkv, P, D] view (what
    the attention kernel reads best); K pages, and an unquantized cache's, stay [P, D]; every
    pool starts zeroed (the paged float8 kernel reads whole blocks)."""
    eng = load_engine(fp8_engines["calibrated"])
    fp8 = Runtime(eng, batch=2, device="cpu")
    plain = Runtime(eng, batch=2, device="cpu", quantized=False)
    for k, v in zip(fp8.cache.k, fp8.cache.v, strict=True):
        assert k.shape == v.shape and k.stride(-1) == 1 and v.stride(2) == 1
        assert not k.float().any() and not v.float().any()
    assert all(v.stride(-1) == 1 for v in plain.cache.v)


def test_a_decode_step_stores_keys_in_the_cache_basis(fp8_engines: dict) -> None:
    """The step rotates queries and keys in its rotary stage and write_kv takes the offset;
    prefill does both in torch: the first layer's key at a position (it depends on that
    token alone) lands in the cache alike either way, up to a float8 step where the rounding
    of the two products differs."""
    eng = load_engine(fp8_engines["calibrated"])
    ids = list(range(5, 25))
    by_step = Runtime(eng, batch=1, device="cpu")
    assert by_step.key_rotation is not None and by_step.key_offset is not None
    by_step.cache.grow(0, len(ids))
    by_step.prefill_pack([(0, ids[:-1], 0)])
    by_step.cache.set_length(0, len(ids) - 1)
    by_step.step(torch.tensor([ids[-1]]))
    by_prefill = Runtime(eng, batch=1, device="cpu")
    by_prefill.cache.grow(0, len(ids))
    by_prefill.prefill_pack([(0, ids, 0)])
    pos = len(ids) - 1
    got, want = (rt.cache.k[0][rt.cache.host_row(0)[pos // rt.cache.page_size], :,
                                pos % rt.cache.page_size].float()
                 for rt in (by_step, by_prefill))
    assert (got == want).float().mean() > 0.95
    assert torch.allclose(got, want, rtol=2 ** -3, atol=2 ** -9)  # one e4m3 step at most


def test_write_kv_takes_the_key_offset() -> None:
    """Keys stored less their group's offset, in fp32 before the quantization and the sink."""
    g = torch.Generator().manual_seed(4)
    k, v = torch.randn(3, 2, 8, generator=g), torch.randn(3, 2, 8, generator=g)
    offset = torch.randn(2, 8, generator=g)
    scales = torch.tensor([0.01, 0.02])
    pools = [torch.zeros(3, 2, 16, 8).to(FP8) for _ in range(2)]
    sinks = [torch.zeros(3, 2, 8) for _ in range(2)]
    pos = torch.tensor([0, 5, 9], dtype=torch.int32)
    write_kv_reference(k, v, *pools, pos, None, scales, scales, *sinks, k_offset=offset)
    assert torch.equal(pools[0][[0, 1, 2], :, [0, 5, 9]].view(torch.uint8),
                       quantize_kv(k - offset, scales).view(torch.uint8))
    assert torch.equal(sinks[0][0], k[0] - offset)


def test_key_offset_takes_the_shared_part_out_of_the_rounding() -> None:
    """Keys with a large part common to every position (as real models' keys have): stored
    less their mean (`fp8_cache_layout`), attention over the float8 cache is several times
    closer to exact attention than with keys stored as they are."""
    g = torch.Generator().manual_seed(0)
    S, H, D = 512, 2, 64
    k = torch.randn(S, H, D, generator=g) + 6 * torch.randn(H, D, generator=g)
    v = torch.randn(S, H, D, generator=g)
    q = torch.randn(1, H, D, generator=g) / D ** 0.5
    exact = torch.softmax(torch.einsum("qhd,shd->hs", q, k), -1)
    err = {}
    for name, mean in (("offset", k.mean(0)), ("none", None)):
        stats = KVStats(torch.stack([k.abs().amax((0, 2)), v.abs().amax((0, 2))])[:, None],
                        None if mean is None else mean[None])
        layout = fp8_cache_layout(stats, D)
        rot = hadamard(D)
        stored = k @ rot - (layout.key_offset[0] if mean is not None else 0)
        scale = layout.scales[0, 0]
        assert (stored.abs() / scale[:, None]).amax() <= FP8_MAX  # never saturates
        back = dequantize_kv(quantize_kv(stored, scale).permute(1, 0, 2)[None], scale)[0]
        p = torch.softmax(torch.einsum("qhd,hsd->hs", q @ rot, back), -1)
        err[name] = ((p - exact).norm() / exact.norm()).item()
    assert err["offset"] < err["none"] / 3, err


def test_fp8_bad_input(tiny_dirs: dict, tmp_path: Path, fp8_engines: dict) -> None:
    code, _, stderr = run("build", "-m", tiny_dirs["llama-gqa"], "-o", tmp_path / "x.plan",
                          "--kv-dtype", "int4")
    one_line_error(code, stderr, "--kv-dtype must be one of auto, fp8")
    code, _, stderr = run("build", "-m", tiny_dirs["llama-gqa"], "-o", tmp_path / "x.onnx",
                          "--kv-dtype", "fp8", "--backend", "onnx")
    one_line_error(code, stderr, "--kv-dtype / --weight-dtype fp8 build torch engines only")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("what", ["scales", "key offsets"])
def test_non_finite_scales_or_offsets_are_refused(what: str, tiny_dirs: dict, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from polarc.exporters import engine as engine_mod

    def broken(stats: KVStats, head_dim: int):  # noqa: ANN202
        layout = fp8_cache_layout(stats, head_dim)
        if what == "scales":
            return dataclasses.replace(layout, scales=layout.scales * float("nan"))
        return dataclasses.replace(layout, key_offset=layout.key_offset * float("inf"))

    monkeypatch.setattr(engine_mod, "fp8_cache_layout", broken)
    path = tmp_path / "nan.plan"
    build_engine(load_model(str(tiny_dirs["llama-gqa"])), None,
                 BuildConfig(out=path, dtype="fp32", max_batch=2, max_seq=64, kv_dtype="fp8"))
    code, _, stderr = run("run", path, "--prompt", "x", "--device", "cpu")
    expected = "FP8 KV scales are not all finite and positive" if what == "scales" \
        else "FP8 key offsets are not all finite"
    one_line_error(code, stderr, expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp8_kv_on_cuda_matches_cpu(fp8_engines: dict) -> None:
    """The Triton write (quantizing) and attention (reading float8) in the CUDA-graph step
    against the CPU path's references, teacher-forced on the CPU's tokens."""
    runtimes = {device: Runtime(load_engine(fp8_engines["calibrated"], device=device), batch=3,
                                device=device) for device in ("cpu", "cuda")}
    assert all(rt.cache.k[0].dtype == torch.float8_e4m3fn for rt in runtimes.values())
    runs = _teacher_forced(runtimes, steps=12)
    for a, b in zip(runs["cuda"], runs["cpu"], strict=True):
        assert ((a - b).norm() / b.norm()).item() < 1e-2


PROMPTS = [[5, 9, 17, 33, 64, 101, 7], [200, 3, 12], [44, 45, 46, 47, 48, 49, 50, 51]]


def _teacher_forced(runtimes: dict, steps: int = 10, prompts: list | None = None) -> dict:
    """Each runtime's logits over the same prompts (`PROMPTS` unless given) and the same next
    tokens (the first runtime's greedy choices)."""
    first, out = next(iter(runtimes)), {}
    for name, rt in runtimes.items():
        logits = [rt.prefill(prompts or PROMPTS).float().cpu()]
        for step in range(steps):
            tokens = (out[first][step] if name != first else logits[-1]).argmax(-1)
            logits.append(rt.step(tokens.to(rt.device)).float().cpu())
        out[name] = logits
    return out


def _calibrated_engine(tiny_dirs: dict, calibrated: dict, path: Path, max_batch: int = 4,
                       **config: str) -> Path:
    """The tiny GQA model built with its calibration (the sparse plan) and `config`."""
    build_engine(load_model(str(tiny_dirs["llama-gqa"])),
                 artifact.read_calibration(calibrated["llama-gqa"]),
                 BuildConfig(out=path, max_batch=max_batch, max_seq=64, **config))
    return path


@pytest.fixture(scope="module")
def fp8_weight_engine(tiny_dirs: dict, calibrated: dict, tmp_path_factory: pytest.TempPathFactory
                      ) -> Path:
    return _calibrated_engine(tiny_dirs, calibrated, tmp_path_factory.mktemp("w8") / "w8.plan",
                              dtype="fp32", weight_dtype="fp8")


def test_fp8_weights_kept_as_float8_match_the_dequantized_ones(fp8_weight_engine: Path) -> None:
    """The GPU's way (weights kept float8, every linear layer, the router rows and the LM head
    read through the kernels' FP8 linear) against the CPU's (dequantized once at load), on the
    CPU, where the FP8 linear is its reference: the same logits."""
    kept = load_engine(fp8_weight_engine, keep_fp8_weights=True)
    w = kept.model.weights
    assert w["layers.0.qkv.weight"].dtype == torch.float8_e4m3fn
    assert w["layers.0.qkv.weight"].dim() == 4  # tile by tile (`tile_fp8`), no q/k/v views
    assert "layers.0.k.weight" not in w
    spec = kept.model.spec
    assert w["layers.0.k.weight_scale"].shape == (spec.n_kv_heads * spec.head_dim,)
    assert kept.head_routers[1].weight.dtype == torch.float32  # its own calls: compute dtype
    runs = _teacher_forced({
        "dequantized": Runtime(load_engine(fp8_weight_engine), batch=3),
        "kept": Runtime(kept, batch=3)})
    for a, b in zip(runs["kept"], runs["dequantized"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp8_weights_on_cuda_match_cpu(fp8_weight_engine: Path) -> None:
    """On CUDA the weights stay float8 (the FP8 linear kernel in the CUDA-graph step, the
    widened weight for prefill) against the CPU path, teacher-forced on its tokens."""
    gpu = load_engine(fp8_weight_engine, device="cuda")
    assert gpu.model.weights["layers.0.qkv.weight"].dtype == torch.float8_e4m3fn
    runs = _teacher_forced({"cpu": Runtime(load_engine(fp8_weight_engine), batch=3),
                            "cuda": Runtime(gpu, batch=3, device="cuda")})
    for a, b in zip(runs["cuda"], runs["cpu"], strict=True):
        assert ((a - b).norm() / b.norm()).item() < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp8_weights_at_33_to_64_rows_on_cuda_match_cpu(tiny_dirs: dict, calibrated: dict,
                                                        tmp_path: Path) -> None:
    """A bf16 engine's step at 40 rows, where on Hopper the FP8 linear splits x into two float8
    terms (`split_rows_fp8`) instead of widening the weight, against the CPU path's."""
    from polarc.plugins._triton_util import has_wgmma
    from polarc.plugins.fp8_linear import launch_plan

    path = _calibrated_engine(tiny_dirs, calibrated, tmp_path / "w8.plan", max_batch=40,
                              dtype="bf16", weight_dtype="fp8")
    gpu = load_engine(path, device="cuda")
    w = gpu.model.weights["layers.0.qkv.weight"]
    plan = launch_plan(None, w, 40, w.shape[0] * w.shape[2], w.shape[1] * w.shape[3], sms=132,
                       fp8_products=has_wgmma(w.device))
    assert plan.x_pair == has_wgmma(w.device)
    prompts = [PROMPTS[i % 3][: 3 + i % 5] for i in range(40)]
    runs = _teacher_forced({"cpu": Runtime(load_engine(path), batch=40),
                            "cuda": Runtime(gpu, batch=40, device="cuda")}, steps=4,
                           prompts=prompts)
    for a, b in zip(runs["cuda"], runs["cpu"], strict=True):
        assert ((a - b).norm() / b.norm()).item() < 3e-2


def test_fp8_weights(tiny_dirs: dict, tmp_path: Path) -> None:
    """Every linear layer's weight stored as float8 with a scale per row; embeddings and norms
    as they were; the CPU path dequantizes them once, close to the originals."""
    from safetensors import safe_open

    model = load_model(str(tiny_dirs["llama-gqa"]))
    path = tmp_path / "w8.plan"
    build_engine(load_model(str(tiny_dirs["llama-gqa"])), None,
                 BuildConfig(out=path, dtype="fp32", max_batch=4, max_seq=64, kv_dtype="fp8",
                             weight_dtype="fp8"))
    with safe_open(str(path), "pt") as f:
        dtypes = {name: f.get_slice(name).get_dtype() for name in f.keys()}
    assert dtypes["weights.layers.0.qkv.weight"] == "F8_E4M3"
    assert dtypes["weights.layers.1.gate_up.weight"] == "F8_E4M3"
    assert dtypes["weights.embed.weight"] == "F32" and dtypes["weights.norm.weight"] == "F32"
    assert dtypes["weight_scales.layers.0.o.weight"] == "F32"
    eng = load_engine(path)
    assert eng.manifest["weight_dtype"] == "fp8_e4m3"
    for name in ("layers.0.qkv.weight", "layers.2.down.weight"):
        a, b = eng.model.weights[name], model.weights[name]
        assert a.dtype == torch.float32
        assert ((a - b).norm() / b.norm()).item() < 0.05
    code, _, stderr = run("run", path, "--prompt", "hi", "--max-new-tokens", "3", "--device",
                          "cpu", "--quiet")
    assert code == 0, stderr
    code, _, stderr = run("build", "-m", tiny_dirs["llama-gqa"], "-o", tmp_path / "x.plan",
                          "--weight-dtype", "int8")
    one_line_error(code, stderr, "--weight-dtype must be one of auto, fp8")


def test_fp8_on_a_gpu_older_than_ada_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernels widen float8 with an sm_89 instruction: an A100 (8.0) gets one line naming
    the capability needed; an H100 (9.0) passes."""
    from polarc.errors import PolarcError
    from polarc.runtime.torch_runtime import check_fp8_gpu

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    for kv, weights, what in ((True, False, "an FP8 KV cache"), (False, True, "FP8 weights")):
        with pytest.raises(PolarcError, match=f"{what} on the GPU needs compute capability "
                                              r"8.9 or newer .*NVIDIA A100 is 8.0"):
            check_fp8_gpu(torch.device("cuda"), kv=kv, weights=weights)
    check_fp8_gpu(torch.device("cuda"), kv=False, weights=False)  # nothing FP8: no check
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_fp8_gpu(torch.device("cuda"), kv=True, weights=True)


@pytest.fixture(scope="module")
def bf16_fp8_engine(tiny_dirs: dict, calibrated: dict, tmp_path_factory: pytest.TempPathFactory
                    ) -> Path:
    """bf16 compute, FP8 KV cache and FP8 weights, the calibration's sparse plan."""
    return _calibrated_engine(tiny_dirs, calibrated,
                              tmp_path_factory.mktemp("w8kv8") / "w8kv8.plan", dtype="bf16",
                              kv_dtype="fp8", weight_dtype="fp8")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_fp8_engine_on_cuda_matches_cpu(bf16_fp8_engine: Path) -> None:
    """The production dtypes on CUDA (bf16 compute, the fused rotary KV append writing a
    float8 cache, float8 gate_up with its SwiGLU in one launch, the CUDA-graph step) against
    the CPU's stage-by-stage references in bf16, teacher-forced on the CPU's tokens. Dense:
    sparse, one row of the first GPU run came out 0.34 apart (others close), likely a router
    score near a tie picking another group on each device in bf16."""
    runs = _teacher_forced({"cpu": Runtime(load_engine(bf16_fp8_engine), batch=3, dense=True),
                            "cuda": Runtime(load_engine(bf16_fp8_engine, device="cuda"),
                                            batch=3, device="cuda", dense=True)}, steps=12)
    for a, b in zip(runs["cuda"], runs["cpu"], strict=True):
        assert ((a - b).norm() / b.norm()).item() < 3e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rows", [3, 300])  # the FP8 linear kernel; prefill's widened weight
def test_tiled_fp8_linears_on_cuda_match_cpu(rows: int, fp8_weight_engine: Path) -> None:
    """Every float8 linear layer as a loaded engine keeps it on CUDA (tile by tile, gate_up's
    gate and up rows interleaved) through `Kernels.linear`, against the CPU's dequantized
    weights: the same outputs in the logical column order."""
    from polarc.runtime.kernels import kernels_for

    gpu, cpu = load_engine(fp8_weight_engine, device="cuda"), load_engine(fp8_weight_engine)
    kernels = {d: kernels_for(torch.device(d), gpu.model.spec.head_dim) for d in ("cpu", "cuda")}
    for name in ("layers.0.qkv", "layers.0.o", "layers.0.gate_up", "layers.0.down"):
        k = cpu.model.weights[name + ".weight"].shape[1]
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(0))
        want = kernels["cpu"].linear(cpu.model, x, name)
        got = kernels["cuda"].linear(gpu.model, x.cuda(), name).cpu()
        assert ((got - want).norm() / want.norm()).item() < 1e-3, name


def _small_llama_runtime(monkeypatch, variant: str):
    """A CUDA runtime on a 2-layer Llama-3-architecture engine (random weights, `variant`'s
    dtypes as in `bench_e2e`), 4 rows of 300 positions, sparse."""
    import polarc.benchmarks.bench_e2e as bench_e2e

    from polarc.models.presets import get_preset

    small = dataclasses.replace(get_preset("llama3-8b"), n_layers=2, hidden=1024, n_heads=8,
                                n_kv_heads=2, intermediate=2048, vocab=512)
    monkeypatch.setattr(bench_e2e, "get_preset", lambda name: small)
    return bench_e2e.case_runtime("small", 4, 300, 0.5, variant)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_residual_and_norms_inside_the_fp8_gemms_match_their_own_launches(monkeypatch
                                                                              ) -> None:
    """A decode step of a Llama-architecture model with float8 weights and KV cache, sparse:
    with each residual add and RMS norm inside the float8 GEMMs either side of it (the
    default, `Runtime.residual_ops`) against the same step with them as their own launches:
    the same logits and cache writes up to rounding, the same next tokens."""
    rt = _small_llama_runtime(monkeypatch, "fp8-all")
    assert rt.step_ops() is rt.residual_ops
    for b, length in enumerate((299, 1, 129, 0)):  # row 3 holds no sequence
        rt.cache.set_length(b, length)
    lengths = rt.seqlens.clone()
    state = [*rt.cache.k, *rt.cache.v]
    before = [t.clone() for t in state]
    tokens = torch.tensor([5, 7, 11, 13], device="cuda")
    runs = {}
    fused_ops = rt.residual_ops
    for fused in (True, False):
        for t, saved in zip(state, before, strict=True):
            t.copy_(saved)
        rt.seqlens.copy_(lengths)
        rt.residual_ops = fused_ops if fused else rt.ops
        runs[fused] = (rt.decode_step(tokens)[:3].float(), [t.float() for t in state])

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    assert rel(runs[True][0], runs[False][0]) < 2e-2
    assert torch.equal(runs[True][0].argmax(-1), runs[False][0].argmax(-1))
    for got, want, was in zip(runs[True][1], runs[False][1], before, strict=True):
        assert (want - was.float()).abs().sum() > 0  # the step wrote keys / values ...
        assert rel(got - was.float(), want - was.float()) < 5e-2  # ... and alike


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("variant", ["bf16", "fp8-kv"])
def test_gpu_16_bit_weights_through_the_linear_kernel_match_cublas(monkeypatch, variant: str
                                                                  ) -> None:
    """A sparse decode step of a Llama-architecture model with bf16 weights: its linear
    layers through the FP8 linear kernel (with the SwiGLU, residual add and RMS norm
    fusions) on their ``[N, K]`` rows (`Kernels.wide_linears`) and on tiles
    (`lay_out_wide_linears`), against the same step through cuBLAS and separate launches:
    the same logits up to rounding, the same next tokens; the rows laid out again give the
    kernel's logits bit for bit. The tiles at prefill's row counts (300: 128 rows a program;
    1,100: 256) give cuBLAS's products up to rounding."""
    from polarc.format.engine_file import lay_out_wide_linears

    rt = _small_llama_runtime(monkeypatch, variant)
    tokens = torch.tensor([5, 7, 11, 13], device="cuda")

    def step() -> torch.Tensor:
        rt.seqlens.fill_(299)
        return rt.decode_step(tokens).float()

    assert rt.model.weights["layers.0.gate_up.weight"].dim() == 2  # (tiles: opt-in)
    names = ("layers.0.qkv", "layers.0.o", "layers.0.gate_up", "layers.0.down", "lm_head")
    x = {(name, m): torch.randn(m, rt.model.weights[name + ".weight"].shape[1], device="cuda",
                                dtype=torch.bfloat16) for name in names for m in (300, 1100)}
    want = {(name, m): F.linear(x[name, m], rt.model.weights[name + ".weight"])
            for name, m in x}
    logits = {}
    for route in ("cublas", "kernel"):
        rt.kernels.wide_linears = route == "kernel"
        logits[route] = step()
    lay_out_wide_linears(rt.engine, tiles=True)
    assert rt.model.weights["layers.0.gate_up.weight"].dim() == 4
    tied = rt.model.spec.tie_embeddings
    assert rt.model.weights["lm_head.weight"].dim() == (2 if tied else 4)
    logits["tiles"] = step()
    for route in ("kernel", "tiles"):
        err = ((logits[route] - logits["cublas"]).norm() / logits["cublas"].norm()).item()
        assert err < 2e-2, route
        # the same next tokens, up to near ties (bf16 logits differ by ~0.01 between routes)
        picked = logits["cublas"].gather(1, logits[route].argmax(-1, keepdim=True))[:, 0]
        assert (logits["cublas"].max(-1).values - picked).max() < 0.05, route
    for key in x:
        got = rt.kernels.linear(rt.model, x[key], key[0]).float()
        assert (got - want[key]).norm() / want[key].float().norm() < 1e-2, key
    lay_out_wide_linears(rt.engine, tiles=False)
    assert torch.equal(step(), logits["kernel"])
