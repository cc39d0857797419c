"""`polarc build`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from polarc.commands.options import (
    ModelOpt,
    RandomOpt,
    WeightsOpt,
    check_positive,
    existing_inputs,
)
from polarc.console import out, user_errors
from polarc.outputs import check_output


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
    kv_dtype: Annotated[str, typer.Option(
        help="auto (the KV cache in --dtype) or fp8 (float8 e4m3, a scale per layer and KV "
             "group from the calibration's statistics, or a short pass when it has none).")
    ] = "auto",
    weight_dtype: Annotated[str, typer.Option(
        help="auto (--dtype) or fp8 (the linear layers' weights in float8 e4m3, a scale per "
             "output channel; embeddings and norms stay in --dtype).")] = "auto",
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
                          dense=dense, kv_dtype=kv_dtype, weight_dtype=weight_dtype)
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
        kv = f", FP8 KV (scales from the {manifest['kv_scales_source']})" \
            if manifest.get("kv_dtype") else ""
        kv += ", FP8 weights" if manifest.get("weight_dtype") else ""
        out.print(f"wrote {', '.join(str(p) for p in built.paths)}: {m.spec.name} {kind} {what}, "
                  f"{cfg.dtype}{kv}, max batch {limits['max_batch']}, max seq {limits['max_seq']}"
                  + (f" ({', '.join(marks)}: speed only)" if marks else ""),
                  soft_wrap=True, highlight=False, markup=False)
