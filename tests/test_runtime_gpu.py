"""The runtime on CUDA (Triton attention, CUDA graphs) against the CPU reference."""

from pathlib import Path

import pytest
import torch
from polarc.calibration import artifact
from polarc.exporters.engine import BuildConfig, build_engine

from polarc.format.engine_file import load_engine
from polarc.models import load_model
from polarc.runtime.generate import generate
from polarc.runtime.torch_runtime import Runtime

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

PROMPTS = [[5, 9, 17, 33, 64, 101, 7], [200, 3, 12], [44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54]]


def _run(engine_path: Path, device: str, steps: int, dense: bool = False) -> list[torch.Tensor]:
    rt = Runtime(load_engine(engine_path, device=device), batch=len(PROMPTS), dense=dense,
                 device=device)
    logits = [rt.prefill(PROMPTS).float().cpu()]
    if device == "cuda":
        rt.capture()
    for _ in range(steps):
        nxt = logits[-1].argmax(-1).to(device)
        logits.append(rt.step(nxt).float().cpu())
    return logits


@pytest.mark.parametrize("kind", ["llama-gqa", "llama-mha", "opt"])
def test_dense_bf16_on_gpu_matches_cpu_fp32(kind: str, tiny_dirs: dict, tmp_path: Path) -> None:
    model = load_model(str(tiny_dirs[kind]))
    ref_path, gpu_path = tmp_path / "fp32.plan", tmp_path / "bf16.plan"
    build_engine(model, None, BuildConfig(out=ref_path, dtype="fp32", max_batch=4, max_seq=64))
    build_engine(model, None, BuildConfig(out=gpu_path, dtype="bf16", max_batch=4, max_seq=64))
    ref = _run(ref_path, "cpu", 16)
    # Teacher-force the GPU run with the reference's tokens so both see the same sequences.
    rt = Runtime(load_engine(gpu_path, device="cuda"), batch=3, device="cuda")
    out = [rt.prefill(PROMPTS).float().cpu()]
    rt.capture()
    for step in range(16):
        out.append(rt.step(ref[step].argmax(-1).cuda()).float().cpu())
    for a, b in zip(out, ref, strict=True):
        assert ((a - b).norm() / b.norm()).item() < 2e-2


def test_sparse_fp32_on_gpu_matches_cpu(tiny_dirs: dict, tmp_path: Path, calibrated: dict) -> None:
    cal = artifact.read_calibration(calibrated["llama-gqa"])
    model = load_model(str(tiny_dirs["llama-gqa"]))
    path = tmp_path / "sparse.plan"
    build_engine(model, cal, BuildConfig(out=path, dtype="fp32", max_batch=4, max_seq=64))
    ref = _run(path, "cpu", 12)
    out = _run(path, "cuda", 12)
    for a, b in zip(out, ref, strict=True):
        assert (a - b).abs().max().item() < 1e-3


def test_generate_on_gpu(tiny_dirs: dict, tmp_path: Path) -> None:
    model = load_model(str(tiny_dirs["opt"]))
    path = tmp_path / "e.plan"
    build_engine(model, None, BuildConfig(out=path, dtype="fp32", max_batch=4, max_seq=64))
    cpu, _ = generate(Runtime(load_engine(path), batch=3), PROMPTS, max_new_tokens=10)
    gpu, stats = generate(Runtime(load_engine(path, device="cuda"), batch=3, device="cuda"),
                          PROMPTS, max_new_tokens=10)
    assert gpu == cpu
    assert stats.summary()["decode_tokens_per_s"] > 0


def test_sparse_mlp_on_gpu_matches_cpu(tiny_dirs: dict, tmp_path: Path, calibrated: dict) -> None:
    cal = artifact.read_calibration(calibrated["opt"])
    model = load_model(str(tiny_dirs["opt"]))
    path = tmp_path / "opt.plan"
    build_engine(model, cal, BuildConfig(out=path, dtype="fp32", max_batch=4, max_seq=64))
    outs = {}
    for device in ("cpu", "cuda"):
        engine = load_engine(path, device=device)
        for r in engine.mlp_routers.values():
            r.k = 128  # real neuron sparsity (N = 256)
        rt = Runtime(engine, batch=3, device=device)
        assert rt.mlp_k
        logits = [rt.prefill(PROMPTS).float().cpu()]
        rt.capture()
        for step in range(8):
            tokens = (outs["cpu"][step] if "cpu" in outs else logits[-1]).argmax(-1)
            logits.append(rt.step(tokens.to(device)).float().cpu())
        outs[device] = logits
    for a, b in zip(outs["cuda"], outs["cpu"], strict=True):
        assert (a - b).abs().max().item() < 1e-3


def test_bucket_graphs_with_compaction_match_cpu(tiny_dirs: dict, tmp_path: Path) -> None:
    """Rows finishing at different steps: per-bucket CUDA graphs after compaction give the
    CPU's tokens."""
    path = tmp_path / "e.plan"
    build_engine(load_model(str(tiny_dirs["llama-gqa"])), None,
                 BuildConfig(out=path, dtype="fp32", max_batch=8, max_seq=64))
    prompts = PROMPTS + [[7, 8, 9], [100, 101], [31, 41, 59, 26, 53]]
    full, _ = generate(Runtime(load_engine(path), batch=6), prompts, max_new_tokens=12,
                       stop_at_eos=False)
    early = [set(out[:8]) for out in full]
    eos = max({t for e in early for t in e}, key=lambda t: sum(t in e for e in early))
    outs = {}
    for device in ("cpu", "cuda"):
        engine = load_engine(path, device=device)
        engine.model.tokenizer.eos_id = eos
        rt = Runtime(engine, batch=6, device=device)
        outs[device], _ = generate(rt, prompts, max_new_tokens=12)
        if device == "cuda":
            assert len(rt.graphs) > 1  # more than the full-batch bucket was captured
    assert outs["cuda"] == outs["cpu"]


def test_cache_that_does_not_fit_is_refused(tiny_dirs: dict, tmp_path: Path) -> None:
    from polarc.errors import PolarcError

    path = tmp_path / "e.plan"
    build_engine(load_model(str(tiny_dirs["llama-gqa"])), None,
                 BuildConfig(out=path, dtype="fp32", max_batch=100_000_000, max_seq=512))
    engine = load_engine(path, device="cuda")
    with pytest.raises(PolarcError, match="a KV cache for batch 100000000") as info:
        Runtime(engine, batch=100_000_000, device="cuda")
    assert info.value.hint.startswith("the largest batch that fits is")
    fits = int(info.value.hint.rsplit(" ", 1)[1])
    per_row = 2 * 3 * 2 * 512 * 16 * 4  # K and V, layers, groups, positions, head dim, fp32
    free, _ = torch.cuda.mem_get_info()
    assert 0 < fits * per_row <= free
    Runtime(engine, batch=min(fits, 1024), device="cuda")  # a batch that fits is accepted
