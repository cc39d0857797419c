"""`polarc build` and `polarc run`: write an engine file, generate text from it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import torch
import typer

from polarc.commands import (
    ForceOpt,
    ModelOpt,
    QuietOpt,
    RandomOpt,
    WeightsOpt,
    _check_positive,
    model_inputs,
)
from polarc.console import err, out, user_errors
from polarc.errors import PolarcError
from polarc.models import load_model
from polarc.outputs import check_output, write_json

DEMO_PROMPTS = [
    "The capital of Germany is",
    "Permission is hereby granted, free of charge, to any person",
    "A good way to learn a new programming language is",
    "The three primary colors are",
]


def build_cmd(
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    random_weights: RandomOpt = False,
    calibration: Annotated[Path | None, typer.Option(
        help="Folder from polarc calibrate (routers and density plan). Without it: dense.")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Engine file to write.")] = Path(
        "engine.plan"),
    dtype: Annotated[str, typer.Option(
        help="bf16, fp16 or fp32; auto = fp32 below 1B parameters, else bf16.")] = "auto",
    max_batch: Annotated[int, typer.Option(help="Largest batch the engine will run.")] = 32,
    max_seq: Annotated[int | None, typer.Option(
        help="Longest sequence (prompt + generation); default min(2048, the model's).")] = None,
    density: Annotated[float | None, typer.Option(
        help="With --random-weights and no --calibration: random routers of this density "
             "(a speed-only engine).")] = None,
    backend: Annotated[str, typer.Option(
        help="torch (the engine file polarc run uses), onnx (decode + prefill graphs with the "
             "SelectiveHeadAttention custom op) or tensorrt (needs TensorRT >= 10.9).")] = "torch",
    dense: Annotated[bool, typer.Option(
        "--dense", help="onnx/tensorrt: export with every KV group selected.")] = False,
    force: Annotated[bool, typer.Option(
        "--force", help="Replace an existing output (a regular file; never an input).")] = False,
) -> None:
    """Pack weights, routers, tokenizer and plan into one engine file.

    Examples:

      polarc build --calibration runs/smollm2 -o smollm2.plan

      polarc build -m llama3-8b --random-weights --density 0.5 -o l3-sparse.plan

      polarc build --calibration runs/smollm2 --backend onnx -o smollm2.onnx
    """
    from polarc.calibration import artifact
    from polarc.calibration.calibrate import model_source, same_model
    from polarc.exporters.engine import BuildConfig, build_engine

    with user_errors():
        _check_positive(max_batch=max_batch, max_seq=max_seq or 1)
        if backend not in ("torch", "onnx", "tensorrt"):
            raise PolarcError(f"--backend must be torch, onnx or tensorrt, got {backend!r}")
        if backend == "tensorrt":
            from polarc.exporters.tensorrt import require_tensorrt

            require_tensorrt()
        if dense and backend == "torch":
            raise PolarcError("--dense is for --backend onnx/tensorrt",
                              hint="a torch engine runs dense with polarc run --dense")
        inputs = (calibration, *model_inputs(model, weights))
        if backend == "onnx":
            from polarc.exporters.onnx_export import data_path, prefill_path

            for path in (output, prefill_path(output), data_path(output)):
                check_output(path, force=force, inputs=inputs)
        else:
            check_output(output, force=force, inputs=inputs)
        if density is not None and not 0.0 < density <= 1.0:
            raise PolarcError(f"--density must be in (0, 1], got {density}")
        cal = artifact.read(calibration) if calibration is not None else None
        if cal is not None and model is None:
            rec = cal.meta["model"]
            model = model_source(rec)
            random_weights = random_weights or rec["random_weights"]
        from polarc.exporters.engine import DTYPES
        from polarc.models.load import source_spec

        if dtype == "auto":  # decided before loading, so an 8B model never exists in fp32
            spec = source_spec(model)
            dtype = "bf16" if spec is not None and spec.n_params >= 1e9 else "auto"
        if dtype not in (*DTYPES, "auto"):
            raise PolarcError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        m = load_model(model, weights=weights, random_weights=random_weights,
                       dtype=DTYPES.get(dtype, torch.float32))
        if cal is not None and not same_model(cal.meta["model"], m):
            raise PolarcError(f"{calibration} was made for another model, not {m.spec.name}",
                              hint="pass the model it was made for, or calibrate this one")
        max_seq = max_seq or min(2048, m.spec.max_positions)
        if dtype == "auto":
            dtype = "fp32" if m.spec.n_params < 1e9 else "bf16"
        cfg = BuildConfig(out=output, dtype=dtype, max_batch=max_batch, max_seq=max_seq,
                          density=density, force=force,
                          inputs=tuple(p for p in inputs if p is not None))
        if backend != "torch":
            _build_graph_backend(backend, m, cal, cfg, calibration, dense)
            return
        manifest = build_engine(m, cal, cfg, calibration_path=calibration)
        ks = manifest["plan"]["k_per_layer"]
        kind = "dense" if all(k == m.spec.n_kv_heads for k in ks) else "sparse"
        marks = [s for s, on in (("random weights", m.random_weights),
                                 ("random routers", manifest["random_routers"])) if on]
        out.print(f"wrote {output}: {m.spec.name} {kind} engine, {dtype}, max batch {max_batch}, "
                  f"max seq {max_seq}" + (f" ({', '.join(marks)}: speed only)" if marks else ""),
                  soft_wrap=True, highlight=False)


def _build_graph_backend(backend: str, m, cal, cfg, calibration: Path | None, dense: bool) -> None:
    from polarc.exporters.engine import engine_parts, in_memory_engine
    from polarc.exporters.onnx_export import export_onnx

    parts = engine_parts(m, cal, cfg, calibration, backend=backend)
    engine = in_memory_engine(m, parts)
    if backend == "onnx":
        paths = export_onnx(engine, cfg.out, dense=dense, dtype=cfg.dtype, force=cfg.force,
                            inputs=cfg.inputs)
        out.print(f"wrote {', '.join(str(p) for p in paths)}: {m.spec.name} decode and prefill "
                  f"graphs, {cfg.dtype}, {'dense' if dense else 'engine plan'}; onnx.checker passed",
                  soft_wrap=True, highlight=False)
        return
    from polarc.exporters.tensorrt import build_tensorrt_engine

    build_tensorrt_engine(engine, cfg, dense=dense)
    out.print(f"wrote {cfg.out}: {m.spec.name} TensorRT engine (decode + prefill plans), "
              f"{cfg.dtype}, max batch {cfg.max_batch}, max seq {cfg.max_seq}",
              soft_wrap=True, highlight=False)


def run_cmd(
    engine: Annotated[Path, typer.Argument(help="Engine file from polarc build.")],
    prompt: Annotated[list[str] | None, typer.Option(help="A prompt (repeatable).")] = None,
    prompts: Annotated[Path | None, typer.Option(help="A file with one prompt per line.")] = None,
    batch: Annotated[int | None, typer.Option(
        help="Rows per batch (default: the number of prompts, up to the engine's max batch); "
             "prompts are repeated to fill a larger batch.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate per prompt.")] = 48,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    dense: Annotated[bool, typer.Option("--dense", help="Run with every KV group selected.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    json_out: Annotated[Path | None, typer.Option("--json", help="Write results as JSON.")] = None,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Batched generation on an engine; prints generations and decode speed.

    Examples:

      polarc run smollm2.plan --prompt "The capital of Germany is"

      polarc run smollm2.plan --prompts prompts.txt --batch 8 --dense --json run.json
    """
    from polarc.runtime.decode import Runtime, generate
    from polarc.runtime.engine import load_engine

    with user_errors():
        _check_positive(max_new_tokens=max_new_tokens)
        if temperature < 0 or not 0 < top_p <= 1:
            raise PolarcError("--temperature must be >= 0 and --top-p in (0, 1]")
        if json_out:
            check_output(json_out, force=force, inputs=(engine, prompts))
        texts = list(prompt or [])
        if prompts is not None:
            if not prompts.is_file():
                raise PolarcError(f"prompts file {prompts} does not exist")
            texts += [ln.strip() for ln in prompts.read_text().splitlines() if ln.strip()]
        texts = texts or DEMO_PROMPTS
        dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                           ("cpu" if device == "auto" else device))
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise PolarcError("--device cuda but no CUDA GPU is available")
        eng = load_engine(engine, device=dev)
        if eng.backend == "tensorrt":
            from polarc.exporters.tensorrt import require_tensorrt

            require_tensorrt()
            if dense or dev.type != "cuda":
                raise PolarcError("a TensorRT engine runs its built plan on a CUDA GPU",
                                  hint="for --dense, build with --backend tensorrt --dense")
        limit = eng.limits["max_batch"]
        bsz = batch or min(len(texts), limit)
        if bsz > limit:
            raise PolarcError(f"--batch {bsz} exceeds the engine's max batch {limit}",
                              hint="rebuild with a larger --max-batch")
        tok = eng.model.tokenizer
        encoded = [tok.encode(t) or [tok.eos_id or 0] for t in texts]
        if bsz > len(encoded):
            encoded = (encoded * (bsz // len(encoded) + 1))[:bsz]
            texts = (texts * (bsz // len(texts) + 1))[:bsz]
        max_seq = eng.limits["max_seq"]
        results, all_stats = [], []
        for start in range(0, len(encoded), bsz):
            chunk = encoded[start:start + bsz]
            if eng.backend == "tensorrt":
                from polarc.runtime.tensorrt_runtime import TensorRTRuntime

                rt = TensorRTRuntime(eng, batch=len(chunk), device=dev)
            else:
                rt = Runtime(eng, batch=len(chunk), dense=dense, device=dev)
            if not quiet:
                err.print(f"generating {len(chunk)} rows on {dev.type}...", highlight=False)
            outs, stats = generate(rt, chunk, max_new_tokens=min(max_new_tokens, max_seq - 1),
                                   temperature=temperature, top_p=top_p, seed=seed)
            all_stats.append(stats)
            for text, ids in zip(texts[start:start + bsz], outs, strict=True):
                results.append({"prompt": text, "completion": tok.decode(ids), "tokens": len(ids)})
        for r in results:
            out.print(f"[bold]{r['prompt']}[/bold]{r['completion']}", highlight=False)
        merged = all_stats[0]
        for s in all_stats[1:]:
            merged.prefill_tokens += s.prefill_tokens
            merged.prefill_s += s.prefill_s
            merged.decode_tokens += s.decode_tokens
            merged.step_ms += s.step_ms
        summary = merged.summary()
        ks = [eng.model.spec.n_kv_heads] * len(eng.k_per_layer) if dense else eng.k_per_layer
        density = sum(ks) / (eng.model.spec.n_kv_heads * len(ks))
        out.print(f"prefill {summary['prefill_tokens_per_s']:.1f} tok/s; decode "
                  f"{summary['decode_tokens_per_s']:.1f} tok/s; median step "
                  f"{summary['step_ms_median']:.2f} ms; KV density {density:.3f} "
                  f"({'dense' if dense else 'engine plan'}); batch {bsz}; {dev.type}")
        if json_out:
            write_json(json_out, {**summary, "kv_density": density, "batch": bsz,
                                  "device": dev.type, "dense": dense, "outputs": results},
                       force=force, inputs=(engine, prompts))
