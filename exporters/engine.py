"""`polarc build`: a model (and its calibration) → an engine: the torch-backend engine file
(layout: `polarc.format.engine_file`), or the ONNX / TensorRT exports of the same engine."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from polarc.calibration.artifact import Calibration, read_calibration

from polarc import __version__
from polarc.errors import PolarcError
from polarc.format.engine_file import (
    DTYPES,
    ENGINE_FORMAT,
    ENGINE_FORMAT_VERSION,
    Engine,
    attach_routers,
    engine_tensors,
    resolve_dtype,
    write_container,
)
from polarc.format.plan import check_density, uniform_plan
from polarc.format.routers import HeadRouter, MLPRouter
from polarc.models.load import (
    Model,
    check_same_model,
    load_model,
    model_record,
    model_source,
    source_spec,
)
from polarc.models.presets import ModelSpec

BACKENDS = ("torch", "onnx", "tensorrt")
DEFAULT_MAX_SEQ = 2048


@dataclass
class BuildConfig:
    out: Path
    dtype: str = "bf16"  # bf16 | fp16 | fp32 (build() resolves "auto" before loading)
    max_batch: int = 32
    max_seq: int | None = None  # default: min(2048, the model's positions)
    density: float | None = None  # with random weights and no calibration: random routers
    seed: int = 0
    force: bool = False  # replace an existing output (see polarc.outputs)
    inputs: tuple[Path, ...] = ()  # files the build reads, which the output must never replace
    backend: str = "torch"
    dense: bool = False  # onnx/tensorrt: export with every KV group selected
    kv_dtype: str = "auto"  # auto: the KV cache in `dtype`; fp8: float8 e4m3 with scales
    weight_dtype: str = "auto"  # auto: `dtype`; fp8: the linear layers' weights in float8


KV_DTYPES = ("auto", "fp8")
KV_SHORT_PASS_TOKENS = 4096  # text for the FP8 KV scales when a calibration has no statistics


@dataclass
class KVStats:
    """What an FP8 cache's layout is made from, per layer and KV group."""

    absmax: torch.Tensor  # [2 (K, V), layers, Hkv]: the largest |K| and |V| seen (post-rope)
    key_mean: torch.Tensor | None  # [layers, Hkv, D]: the mean K (post-rope); None: no offset


def kv_stats_of(calibration: Calibration | None) -> KVStats | None:
    """The calibration's KV statistics, if it has them all (calibrations made before key
    offsets have no key means)."""
    if calibration is None or calibration.key_means is None:
        return None
    layers = calibration.meta["layers"]
    if not all(e.get("kv_absmax") for e in layers):
        return None
    absmax = torch.tensor([[e["kv_absmax"]["k"] for e in layers],
                           [e["kv_absmax"]["v"] for e in layers]], dtype=torch.float32)
    return KVStats(absmax, torch.stack([calibration.key_means[i] for i in range(len(layers))]))


@torch.no_grad()
def measure_kv_stats(model: Model, tokens: int = KV_SHORT_PASS_TOKENS) -> KVStats:
    """The KV statistics over `tokens` of the builtin mix (the short pass a build makes when
    its calibration has none)."""
    from polarc.calibration.data import MIX, load_sequences

    from polarc.models.forward import forward

    seq_len = min(512, model.spec.max_positions)
    seqs, _ = load_sequences(MIX, model.tokenizer, seq_len=seq_len, calib_tokens=tokens,
                             heldout_tokens=0)
    spec = model.spec
    absmax = torch.zeros(2, spec.n_layers, spec.n_kv_heads)
    key_sum = torch.zeros(spec.n_layers, spec.n_kv_heads, spec.head_dim, dtype=torch.float64)

    def observe(obs) -> None:  # noqa: ANN001
        absmax[:, obs.layer] = torch.maximum(absmax[:, obs.layer], obs.kv_absmax.cpu())
        key_sum[obs.layer] += obs.key_sum.cpu()

    for batch in seqs.ids.split(4):
        forward(model, batch, observe=observe)
    return KVStats(absmax, (key_sum / seqs.ids.numel()).float())


@dataclass
class FP8CacheLayout:
    """How an FP8 cache stores K and V (the runtime's `cache_basis` applies it)."""

    scales: torch.Tensor  # [2 (K, V), layers, Hkv]: float8 value x scale = stored value
    key_rotation: str | None  # "hadamard": keys (and queries) rotated; None: as they are
    key_offset: torch.Tensor | None  # [layers, Hkv, D]: subtracted from every stored key


def fp8_cache_layout(stats: KVStats, head_dim: int) -> FP8CacheLayout:
    """Scales that put the largest value seen at float8's ±448; keys rotated by
    `reference.hadamard` where the head dim is a power of two; and keys stored less their
    group's mean key, in the same basis.

    The offset is exact: q.(k - m) = q.k - q.m moves every logit of a query by the same
    amount, which softmax ignores, so attention is unchanged; but e4m3's rounding is relative
    to each stored value, and the part all keys share no longer takes its share of it (on
    SmolLM2's dense engine, KL to the unquantized engine 0.0040 without, 0.0032 with;
    RESULTS, session 23).

    Headroom, so that K never saturates: a rotated entry is at most the vector's norm, at most
    sqrt(D) times its largest entry; and |k - m| is at most twice the largest |k|. It costs
    nothing that matters (float8 keeps its relative precision over 2^15 of range; margins of
    2x and 4x measured as noise)."""
    from polarc.plugins.reference import FP8_MAX, hadamard

    scales = stats.absmax.clamp_min(1e-6) / FP8_MAX
    rotation = None if head_dim & (head_dim - 1) else "hadamard"
    offset = stats.key_mean
    if rotation is not None:
        scales[0] *= head_dim ** 0.5
        if offset is not None:
            offset = offset @ hadamard(head_dim)
    if offset is not None:
        scales[0] *= 2
    return FP8CacheLayout(scales, rotation, offset)


def random_routers(model: Model, density: float, seed: int) -> tuple[list[int], dict[int, HeadRouter]]:
    """Speed-only routers: random weights, a uniform plan of `density` (marked in the manifest)."""
    spec = model.spec
    plan = uniform_plan(spec.n_layers, spec.n_kv_heads, density)
    gen = torch.Generator().manual_seed(seed)
    routers = {
        layer: HeadRouter(weight=torch.randn(spec.n_kv_heads, spec.hidden, generator=gen),
                          bias=torch.zeros(spec.n_kv_heads), k=k, recall=float("nan"))
        for layer, k in enumerate(plan) if k < spec.n_kv_heads}
    return plan, routers


# What "one GPU" means when the building machine has none: the 80 GB class (H100, A100).
ONE_GPU_BYTES = 80 * 10**9
# Of a GPU's memory, what an engine's weights and KV may take: the rest is the CUDA context,
# the kernels' workspaces and the step's activations.
GPU_SHARE = 0.9
# A build holds the whole model on the host, and a little more (measured: 19.05 GB of peak
# RSS for the 16.06 GB Llama-3-8B, 1.19x).
HOST_FACTOR = 1.25


def check_fits(spec: ModelSpec, dtype: torch.dtype, cfg: BuildConfig) -> None:
    """Refuse, before any weight is made or read, an engine whose weights and the KV cache of
    one sequence at --max-seq cannot fit one GPU (engines run on one GPU: no tensor
    parallelism yet; --max-batch is a limit, `polarc run` checks the batch it allocates), or
    whose build cannot fit this machine's host memory."""
    import psutil

    elem = torch.empty((), dtype=dtype).element_size()
    max_seq = cfg.max_seq if cfg.max_seq is not None else min(DEFAULT_MAX_SEQ, spec.max_positions)
    weights = spec.n_params * elem
    kv = 2 * spec.n_layers * spec.n_kv_heads * spec.head_dim * elem * max_seq
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu, name = props.total_memory, f"this machine's {props.name}"
    else:
        gpu, name = ONE_GPU_BYTES, "an 80 GB GPU (H100/A100 class)"
    if weights + kv > GPU_SHARE * gpu:
        raise PolarcError(f"{spec.name} does not fit one GPU: {weights / 1e9:.0f} GB of "
                          f"{cfg.dtype} weights (+ {kv / 1e9:.2f} GB of KV per sequence at "
                          f"--max-seq {max_seq}) > {GPU_SHARE:.0%} of the {gpu / 1e9:.0f} GB "
                          f"of {name}",
                          hint="engines run on one GPU (tensor parallelism is not supported "
                               "yet); in bf16 models up to about 35B parameters fit 80 GB")
    host = psutil.virtual_memory().available
    if weights * HOST_FACTOR > host:
        raise PolarcError(f"building {spec.name} needs about {weights * HOST_FACTOR / 1e9:.0f} "
                          f"GB of host memory ({cfg.dtype} weights), {host / 1e9:.0f} GB are "
                          "available", hint="build on a machine with more memory")


def assemble(model: Model, calibration: Calibration | None, cfg: BuildConfig,
             calibration_path: Path | None = None) -> Engine:
    """Check the build options and assemble the engine (plan, routers, manifest) in memory,
    as `load_engine` would return it once written. The head routers are attached to `model`'s
    q/k/v weights in place (`attach_routers`): the model is the build's own."""
    if cfg.dtype not in DTYPES:
        raise PolarcError(f"--dtype must be one of {', '.join(DTYPES)}, got {cfg.dtype!r}")
    if cfg.weight_dtype not in KV_DTYPES:
        raise PolarcError(f"--weight-dtype must be one of {', '.join(KV_DTYPES)}, got "
                          f"{cfg.weight_dtype!r}")
    if cfg.kv_dtype not in KV_DTYPES:
        raise PolarcError(f"--kv-dtype must be one of {', '.join(KV_DTYPES)}, got "
                          f"{cfg.kv_dtype!r}")
    spec = model.spec
    max_seq = cfg.max_seq if cfg.max_seq is not None else min(DEFAULT_MAX_SEQ, spec.max_positions)
    if cfg.max_batch <= 0 or max_seq <= 1:
        raise PolarcError("--max-batch must be positive and --max-seq at least 2")
    if max_seq > spec.max_positions:
        raise PolarcError(f"--max-seq {max_seq} exceeds {spec.name}'s "
                          f"{spec.max_positions} positions")
    random_rt = False
    mlp: dict[int, MLPRouter] = {}
    if calibration is not None:
        plan, head, mlp = calibration.k_per_layer, calibration.head_routers, calibration.mlp_routers
        if cfg.density is not None:
            raise PolarcError("--density goes with a random-weights build, not --calibration")
    elif cfg.density is not None:
        if not model.random_weights:
            raise PolarcError("--density without --calibration builds random routers: only for "
                              "--random-weights speed engines", hint="calibrate the model first")
        plan, head = random_routers(model, check_density(cfg.density), cfg.seed)
        random_rt = True
    else:
        plan, head = [spec.n_kv_heads] * spec.n_layers, {}
    tok = model.tokenizer
    manifest: dict[str, Any] = {
        "format": ENGINE_FORMAT, "format_version": ENGINE_FORMAT_VERSION,
        "polarc_version": __version__, "backend": cfg.backend,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "spec": dataclasses.asdict(spec), "dtype": cfg.dtype,
        "limits": {"max_batch": cfg.max_batch, "max_seq": max_seq},
        "plan": {"k_per_layer": list(plan), "n_kv_groups": spec.n_kv_heads,
                 "mlp_k": {str(layer): r.k for layer, r in mlp.items()}},
        "model": model_record(model),
        "calibration": None if calibration is None else {
            "path": str(calibration_path), "created": calibration.meta.get("created"),
            "mode": calibration.meta["plan"]["mode"],
            "meta_sha256": hashlib.sha256(json.dumps(calibration.meta, sort_keys=True)
                                          .encode()).hexdigest()},
        "random_routers": random_rt,
        "tokenizer": {"kind": tok.kind, "eos_id": tok.eos_id, "bos_id": tok.bos_id,
                      "chat_template": tok.chat_template},
        "rope_attention_scaling": model.rope_attention_scaling,
    }
    layout = None
    if cfg.kv_dtype == "fp8":
        stats = kv_stats_of(calibration)
        manifest["kv_scales_source"] = "calibration"
        if stats is None:
            stats = measure_kv_stats(model)
            manifest["kv_scales_source"] = f"short pass over {KV_SHORT_PASS_TOKENS} tokens of mix"
        layout = fp8_cache_layout(stats, model.spec.head_dim)
        if layout.key_rotation is not None:
            manifest["kv_key_rotation"] = layout.key_rotation
        if layout.key_offset is not None:
            manifest["kv_key_offset"] = True
        manifest["kv_dtype"] = "fp8_e4m3"
    if cfg.weight_dtype == "fp8":
        manifest["weight_dtype"] = "fp8_e4m3"
    return Engine(path=Path("<memory>"), manifest=manifest, model=model, k_per_layer=list(plan),
                  head_routers=attach_routers(model, head), mlp_routers=mlp,
                  kv_scales=None if layout is None else layout.scales,
                  kv_key_offset=None if layout is None else layout.key_offset)


def build_engine(model: Model, calibration: Calibration | None, cfg: BuildConfig,
                 calibration_path: Path | None = None) -> dict[str, Any]:
    """Write the torch-backend engine to `cfg.out` atomically; return its manifest."""
    engine = assemble(model, calibration, cfg, calibration_path)
    tensors = engine_tensors(model, engine.mlp_routers, DTYPES[cfg.dtype], engine.kv_scales,
                             engine.kv_key_offset, fp8_weights=cfg.weight_dtype == "fp8")
    write_container(tensors, engine.manifest, cfg.out, force=cfg.force, inputs=cfg.inputs)
    return engine.manifest


@dataclass
class Built:
    """What `build` made, for the command's summary line."""

    model: Model
    cfg: BuildConfig
    manifest: dict[str, Any]
    paths: list[Path]


def build(model: str | None, *, weights: Path | None, random_weights: bool,
          calibration: Path | None, cfg: BuildConfig) -> Built:
    """`polarc build`: load what the options name (the calibration's model by default), check
    that calibration and model belong together, and write the engine with `cfg.backend`."""
    if cfg.backend not in BACKENDS:
        raise PolarcError(f"--backend must be one of {', '.join(BACKENDS)}, got {cfg.backend!r}")
    if "fp8" in (cfg.kv_dtype, cfg.weight_dtype) and cfg.backend != "torch":
        raise PolarcError(f"--kv-dtype / --weight-dtype fp8 build torch engines only; --backend "
                          f"{cfg.backend} does not export FP8 yet", hint="drop the fp8 option "
                          "or build the torch engine")
    if cfg.dense and cfg.backend == "torch":
        raise PolarcError("--dense is for --backend onnx/tensorrt",
                          hint="a torch engine runs dense with polarc run --dense")
    if cfg.backend == "tensorrt":
        from polarc.format.tensorrt import require_tensorrt

        require_tensorrt()
    if cfg.density is not None:
        check_density(cfg.density)
    cal = read_calibration(calibration) if calibration is not None else None
    if cal is not None and model is None:
        model = model_source(cal.meta["model"])
        random_weights = random_weights or cal.meta["model"]["random_weights"]
    if cfg.dtype == "auto":  # decided before loading, so an 8B model never exists in fp32
        spec = source_spec(model)
        if spec is not None:
            cfg.dtype = resolve_dtype("auto", spec.n_params)
    else:
        resolve_dtype(cfg.dtype, 0)  # checks the name
    spec = source_spec(model)
    if spec is not None and cfg.dtype in DTYPES:
        check_fits(spec, DTYPES[cfg.dtype], cfg)
    m = load_model(model, weights=weights, random_weights=random_weights,
                   dtype=DTYPES.get(cfg.dtype, torch.float32))
    if cal is not None:
        check_same_model(cal.meta["model"], m, what=str(calibration))
    cfg.dtype = resolve_dtype(cfg.dtype, m.spec.n_params)
    if cfg.backend == "torch":
        manifest = build_engine(m, cal, cfg, calibration_path=calibration)
        return Built(m, cfg, manifest, [cfg.out])
    engine = assemble(m, cal, cfg, calibration_path=calibration)
    if cfg.backend == "onnx":
        from polarc.exporters.onnx_export import export_onnx

        paths = export_onnx(engine, cfg.out, dense=cfg.dense, dtype=cfg.dtype, force=cfg.force,
                            inputs=cfg.inputs)
        return Built(m, cfg, engine.manifest, paths)
    from polarc.exporters.tensorrt import build_tensorrt_engine

    build_tensorrt_engine(engine, cfg, dense=cfg.dense)
    return Built(m, cfg, engine.manifest, [cfg.out])
