"""`polarc build` and `polarc run`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from polarc.commands.options import (
    DeviceOpt,
    ForceOpt,
    ModelOpt,
    QuietOpt,
    RandomOpt,
    WeightsOpt,
    check_finite,
    check_positive,
    existing_inputs,
    resolve_device,
)
from polarc.console import err, out, user_errors
from polarc.errors import PolarcError
from polarc.format.plan import kv_density
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
    from polarc.calibration.artifact import artifact_files
    from polarc.exporters.engine import BuildConfig, build

    with user_errors():
        check_positive(max_batch=max_batch, max_seq=max_seq)
        inputs = (*(artifact_files(calibration) if calibration else ()),
                  *existing_inputs(model, weights))
        outputs = [output]
        if backend == "onnx":
            from polarc.exporters.onnx_export import data_path, prefill_path

            outputs += [prefill_path(output), data_path(output)]
        for path in outputs:
            check_output(path, force=force, inputs=inputs)
        cfg = BuildConfig(out=output, dtype=dtype, max_batch=max_batch, max_seq=max_seq,
                          density=density, force=force, inputs=inputs, backend=backend,
                          dense=dense)
        built = build(model, weights=weights, random_weights=random_weights,
                      calibration=calibration, cfg=cfg)
        m, manifest = built.model, built.manifest
        ks = manifest["plan"]["k_per_layer"]
        kind = "dense" if dense or all(k == m.spec.n_kv_heads for k in ks) else "sparse"
        limits = manifest["limits"]
        what = {"torch": "engine", "onnx": "decode and prefill graphs (onnx.checker passed)",
                "tensorrt": "TensorRT engine (decode + prefill plans)"}[backend]
        marks = [s for s, on in (("random weights", m.random_weights),
                                 ("random routers", manifest["random_routers"])) if on]
        out.print(f"wrote {', '.join(str(p) for p in built.paths)}: {m.spec.name} {kind} {what}, "
                  f"{cfg.dtype}, max batch {limits['max_batch']}, max seq {limits['max_seq']}"
                  + (f" ({', '.join(marks)}: speed only)" if marks else ""),
                  soft_wrap=True, highlight=False, markup=False)


def read_prompts(path: Path) -> list[str]:
    """One prompt per non-empty line of a UTF-8 text file."""
    if not path.is_file():
        raise PolarcError(f"prompts file {path} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise PolarcError(f"prompts file {path} is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise PolarcError(f"cannot read prompts file {path}: {exc.strerror}") from None
    texts = [ln.strip() for ln in lines if ln.strip()]
    if not texts:
        raise PolarcError(f"prompts file {path} has no prompts", hint="one prompt per line")
    return texts


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
    device: DeviceOpt = "auto",
    json_out: Annotated[Path | None, typer.Option("--json", help="Write results as JSON.")] = None,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Batched generation on an engine; prints generations and decode speed.

    Examples:

      polarc run smollm2.plan --prompt "The capital of Germany is"

      polarc run smollm2.plan --prompts prompts.txt --batch 8 --dense --json run.json
    """
    from polarc.format.engine_file import load_engine
    from polarc.runtime.generate import run_prompts
    from polarc.runtime.kv_cache import check_fits

    with user_errors():
        check_positive(max_new_tokens=max_new_tokens, batch=batch)
        check_finite(temperature=temperature, top_p=top_p)
        if temperature < 0 or not 0 < top_p <= 1:
            raise PolarcError("--temperature must be >= 0 and --top-p in (0, 1]")
        inputs = existing_inputs(engine, prompts)
        if json_out:
            check_output(json_out, force=force, inputs=inputs)
        texts = list(prompt or []) + (read_prompts(prompts) if prompts is not None else [])
        texts = texts or DEMO_PROMPTS
        dev = resolve_device(device)
        eng = load_engine(engine, device=dev)
        limit = eng.limits["max_batch"]
        bsz = batch or min(len(texts), limit)
        if bsz > limit:
            raise PolarcError(f"--batch {bsz} exceeds the engine's max batch {limit}",
                              hint="rebuild with a larger --max-batch")
        if eng.backend == "torch":  # before any work on the prompts: does the batch fit?
            check_fits(eng.model.spec, bsz, eng.limits["max_seq"], eng.model.dtype, dev)
        if bsz > len(texts):
            texts = (texts * (bsz // len(texts) + 1))[:bsz]
        tok = eng.model.tokenizer
        encoded = [tok.encode(t) or [tok.eos_id or 0] for t in texts]

        def starting(rows: int) -> None:
            if not quiet:
                err.print(f"generating {rows} rows on {dev.type}...", highlight=False)

        outputs, stats = run_prompts(eng, encoded, batch=bsz, max_new_tokens=max_new_tokens,
                                     temperature=temperature, top_p=top_p, seed=seed,
                                     dense=dense, device=dev, on_chunk=starting)
        results = [{"prompt": t, "completion": tok.decode(ids), "tokens": len(ids)}
                   for t, ids in zip(texts, outputs, strict=True)]
        for r in results:
            out.print(f"[bold]{escape(r['prompt'])}[/bold]{escape(r['completion'])}",
                      highlight=False)
        summary = stats.summary()
        n_kv = eng.model.spec.n_kv_heads
        density = 1.0 if dense else kv_density(eng.k_per_layer, n_kv)
        out.print(f"prefill {summary['prefill_tokens_per_s']:.1f} tok/s; decode "
                  f"{summary['decode_tokens_per_s']:.1f} tok/s; median step "
                  f"{summary['step_ms_median']:.2f} ms; KV density {density:.3f} "
                  f"({'dense' if dense else 'engine plan'}); batch {bsz}; {dev.type}",
                  highlight=False, markup=False)
        if json_out:
            write_json(json_out, {**summary, "kv_density": density, "batch": bsz,
                                  "device": dev.type, "dense": dense, "outputs": results},
                       force=force, inputs=inputs)
