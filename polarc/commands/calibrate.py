"""`polarc calibrate` and `polarc eval`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.markup import escape
from rich.table import Table

from polarc.commands.options import (
    ComputeDtypeOpt,
    DeviceOpt,
    ForceOpt,
    GpuMemoryOpt,
    ModelOpt,
    QuietOpt,
    RandomOpt,
    WeightsOpt,
    check_finite,
    check_positive,
    compute_dtype,
    existing_inputs,
    resolve_device_memory,
)
from polarc.console import err, out, progress, user_errors
from polarc.errors import PolarcError
from polarc.format.plan import check_density
from polarc.models import load_model
from polarc.outputs import check_output, write_json

DomainOpt = Annotated[list[str] | None, typer.Option(
    "--domain", help="Only this domain of the dataset (repeatable; the builtin mix has "
                     "narrative, expository, reference, conversational, code).")]
SkipDomainOpt = Annotated[list[str] | None, typer.Option(
    "--skip-domain", help="Leave this domain of the dataset out (repeatable).")]


def calibrate_cmd(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder for the calibration artifact.")],
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    random_weights: RandomOpt = False,
    dataset: Annotated[str, typer.Option(
        help="'mix' (the builtin broad mix: narrative, expository, reference, conversational, "
             "code), 'builtin' (licence texts), a .txt/.jsonl/.parquet file, or a hub dataset "
             "name[:config[:split]].")
    ] = "mix",
    seq_len: Annotated[int, typer.Option(help="Tokens per calibration sequence.")] = 512,
    tokens: Annotated[int, typer.Option(help="Calibration tokens for router training.")] = 65536,
    tune_tokens: Annotated[int, typer.Option(
        help="Further tokens for choosing the plan (never used for training).")] = 8192,
    cost_tokens: Annotated[int, typer.Option(
        help="Of the tuning tokens, how many rank each layer's moves (one run per layer and "
             "k); whole plans are always measured on all of them.")] = 2560,
    density: Annotated[float | None, typer.Option(
        help="Uniform plan: fraction of KV groups kept on every layer but the first.")] = None,
    quality_budget: Annotated[float, typer.Option(
        help="Without --density: allowed perplexity rise in percent; per-layer densities "
             "are chosen to read as few KV bytes as possible within it.")] = 3.0,
    batch_size: Annotated[int, typer.Option(help="Sequences per forward pass.")] = 8,
    max_samples: Annotated[int, typer.Option(help="Router training tokens kept per layer.")] = 65536,
    epochs: Annotated[int, typer.Option(help="Router training epochs.")] = 16,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    device: DeviceOpt = "auto",
    dtype: ComputeDtypeOpt = "auto",
    gpu_memory: GpuMemoryOpt = None,
    domain: DomainOpt = None,
    skip_domain: SkipDomainOpt = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Replace an existing --out folder (only one polarc made).")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Profile a model on calibration text, fit per-layer routers, choose a density plan.

    Examples:

      polarc calibrate --out runs/smollm2            # embedded SmolLM2, 3% quality budget

      polarc calibrate --density 0.67 --out runs/d67  # uniform: 2 of 3 KV groups

      polarc calibrate -m ./my-llama --dataset notes.jsonl --quality-budget 1 -o runs/mine

      polarc calibrate --dataset mix --skip-domain code -o runs/no-code  # leave one out
    """
    from polarc.calibration.artifact import is_calibration_folder
    from polarc.calibration.calibrate import CalibrateConfig, calibrate

    with user_errors():
        check_positive(seq_len=seq_len, tokens=tokens, tune_tokens=tune_tokens,
                       cost_tokens=cost_tokens, batch_size=batch_size, max_samples=max_samples, epochs=epochs)
        check_finite(quality_budget=quality_budget)
        if density is not None:
            check_density(density)
        cfg = CalibrateConfig(out=out_dir, dataset=dataset, seq_len=seq_len, tokens=tokens,
                              tune_tokens=tune_tokens, cost_tokens=cost_tokens, density=density,
                              quality_budget=quality_budget, batch_size=batch_size,
                              max_samples=max_samples, epochs=epochs, seed=seed, force=force,
                              inputs=existing_inputs(dataset, model, weights),
                              domains=tuple(domain or ()), skip_domains=tuple(skip_domain or ()))
        check_output(out_dir, force=force, folder=True, ours=is_calibration_folder,
                     inputs=cfg.inputs)
        dev = resolve_device_memory(device, gpu_memory)
        dt = compute_dtype(dtype, dev)
        m = load_model(model, weights=weights, random_weights=random_weights, dtype=dt,
                       device=dev, stream=True)
        with progress(quiet) as bar:
            meta = calibrate(m, cfg, bar)
        _print_plan(meta)
        err.print(f"wrote {escape(str(out_dir))}/ (routers.safetensors, calibration.json, "
                  "report.png)", highlight=False)


def _print_plan(meta: dict[str, Any]) -> None:
    tune = meta["quality"]["tune"]
    plan = meta["plan"]
    ks = plan["k_per_layer"]
    out.print(f"model {meta['model']['name']}"
              + (" [random weights]" if meta["model"]["random_weights"] else "")
              + f": plan {plan['mode']}, k per layer {ks} of {plan['n_kv_groups']} KV groups",
              markup=False, highlight=False)
    recalls = [e["router_recall"] for e in meta["layers"] if e["k"] < plan["n_kv_groups"]]
    mean_recall = sum(recalls) / len(recalls) if recalls else float("nan")
    out.print(f"KV density {plan['kv_density']:.3f}; tuning perplexity {tune['ppl_dense']:.3f} "
              f"dense -> {tune['ppl_plan']:.3f} ({tune['increase_pct']:+.2f}%); "
              f"mean router recall {mean_recall:.3f}", markup=False, highlight=False)


def eval_cmd(
    calibration: Annotated[Path | None, typer.Option(
        help="Folder written by polarc calibrate: its plan and routers in the masked forward.")
    ] = None,
    engine: Annotated[Path | None, typer.Option(
        help="An engine file: held-out text teacher-forced through its own decode path, "
             "against the same engine with every KV group.")] = None,
    prefix: Annotated[int, typer.Option(
        help="With --engine: tokens of each sequence prefilled before the decode steps.")] = 64,
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    random_weights: RandomOpt = False,
    dataset: Annotated[str | None, typer.Option(
        help="Held-out text. Default: the calibration's dataset, of which only the held-out "
             "documents are read; any other dataset is evaluated whole.")] = None,
    tokens: Annotated[int, typer.Option(help="Held-out tokens to evaluate.")] = 16384,
    batch_size: Annotated[int, typer.Option(help="Sequences per forward pass.")] = 8,
    seed: Annotated[int, typer.Option(help="Seed of the random selection.")] = 0,
    device: DeviceOpt = "auto",
    dtype: ComputeDtypeOpt = "auto",
    gpu_memory: GpuMemoryOpt = None,
    domain: DomainOpt = None,
    skip_domain: SkipDomainOpt = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the numbers as JSON.")] = None,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Perplexity on held-out text: a calibration's plan with dense, router, oracle and random
    selection (--calibration), or an engine through its own decode path (--engine).

    Examples:

      polarc eval --calibration runs/smollm2 --json runs/smollm2/eval.json

      polarc eval --calibration runs/no-code --domain code   # text it never saw

      polarc eval --engine runs/smollm2.plan --json runs/engine-eval.json
    """
    from polarc.calibration.artifact import artifact_files
    from polarc.calibration.quality import evaluate_calibration

    with user_errors():
        check_positive(tokens=tokens, batch_size=batch_size, prefix=prefix)
        if (calibration is None) == (engine is None):
            raise PolarcError("give --calibration or --engine (one of them)")
        if engine is not None:
            _eval_engine(engine, dataset=dataset, tokens=tokens, batch_size=batch_size,
                         prefix=prefix, device=device, domains=tuple(domain or ()),
                         json_out=json_out, force=force, quiet=quiet)
            return
        inputs = (*artifact_files(calibration), *existing_inputs(dataset, model, weights))
        if json_out:
            check_output(json_out, force=force, inputs=inputs)
        dev = resolve_device_memory(device, gpu_memory)
        with progress(quiet) as bar:
            res = evaluate_calibration(calibration, model=model, weights=weights,
                                       random_weights=random_weights, dataset=dataset,
                                       tokens=tokens, batch_size=batch_size, seed=seed,
                                       device=dev, dtype=compute_dtype(dtype, dev),
                                       domains=tuple(domain or ()),
                                       skip_domains=tuple(skip_domain or ()), progress=bar)
        _print_eval(res)
        if json_out:
            write_json(json_out, res, force=force, inputs=inputs)


def _print_eval(res: dict[str, Any]) -> None:
    dense = res["ppl_dense"]
    table = Table(title=escape(f"{res['model']} on {res['tokens']} held-out tokens of "
                               f"{res['dataset']} ({res['heldout']}), KV density "
                               f"{res['kv_density']:.3f}"))
    for col in ("selection", "perplexity", "rise", "top-1 agree", "KL"):
        table.add_column(col, justify="right")
    for kind in ("dense", "sparse", "oracle", "random"):
        ppl = res[f"ppl_{kind}"]
        agree = "1.000" if kind == "dense" else f"{res[f'top1_agreement_{kind}']:.3f}"
        kl = "0" if kind == "dense" else f"{res[f'kl_{kind}']:.4f}"
        name = "routers" if kind == "sparse" else kind
        table.add_row(name, f"{ppl:.3f}", f"{(ppl / dense - 1) * 100:+.2f}%", agree, kl)
    out.print(table)
    out.print(f"router recall against the oracle: {res['router_recall']:.3f}", highlight=False)
    if "by_domain" in res:
        per = Table(title="per domain")
        for col in ("domain", "tokens", "dense", "routers", "oracle", "random", "recall"):
            per.add_column(col, justify="right")
        for d, v in res["by_domain"].items():
            per.add_row(escape(d or "-"), str(v["tokens"]), f"{v['ppl_dense']:.3f}",
                        *(f"{v[f'increase_pct_{k}']:+.2f}%" for k in ("sparse", "oracle", "random")),
                        f"{v['router_recall']:.3f}")
        out.print(per)
    check = res.get("budget_check")
    if check:
        verdict = "within" if check["within_budget"] else "EXCEEDS"
        where = ", ".join(d for d in check["unseen_domains"] if d) or res["dataset"]
        out.print(f"on text the calibration never saw ({where}): worst rise "
                  f"{check['worst_rise_pct']:+.2f}% {verdict} the plan's {check['budget_pct']:g}% "
                  "budget", markup=False, highlight=False)


def _eval_engine(engine: Path, *, dataset: str | None, tokens: int, batch_size: int,
                 prefix: int, device: str, domains: tuple[str, ...], json_out: Path | None,
                 force: bool, quiet: bool) -> None:
    """`polarc eval --engine`: held-out text through the engine's decode path (module
    `polarc.runtime.forced`)."""
    from polarc.calibration.data import PACKAGED, load_sequences
    from polarc.format.engine_file import load_engine
    from polarc.format.plan import kv_density
    from polarc.runtime.forced import teacher_forced
    from polarc.runtime.torch_runtime import Runtime

    seq_len = 512
    inputs = existing_inputs(engine, dataset)
    if json_out:
        check_output(json_out, force=force, inputs=inputs)
    dev = resolve_device_memory(device, None)
    eng = load_engine(engine, device=dev)
    if eng.backend != "torch":
        raise PolarcError("eval --engine runs torch engines", hint="build with --backend torch")
    ds = dataset or "mix"
    seq_len = min(seq_len, eng.limits["max_seq"])
    if prefix >= seq_len:
        raise PolarcError(f"--prefix {prefix} leaves no token to score in sequences of "
                          f"{seq_len}")
    _, held = load_sequences(ds, eng.model.tokenizer, seq_len=seq_len, calib_tokens=0,
                             heldout_tokens=max(tokens, seq_len), split=ds in PACKAGED,
                             domains=domains)
    rows = min(batch_size, held.ids.shape[0], eng.limits["max_batch"])
    engine_rt = Runtime(eng, batch=rows, max_seq=seq_len, device=dev)
    reference_rt = Runtime(eng, batch=rows, max_seq=seq_len, device=dev, dense=True,
                           quantized=False)
    with progress(quiet) as bar:
        task = bar.add_task("teacher-forced", total=held.ids.shape[0])
        quality = teacher_forced(engine_rt, reference_rt, held.ids, prefix=prefix,
                                 on_batch=lambda n: bar.advance(task, n))
    res = quality.as_json()
    spec = eng.model.spec
    elem = torch.empty((), dtype=eng.model.dtype).element_size()
    res.update(kv_bytes_ratio=kv_density(eng.k_per_layer, spec.n_kv_heads)
               * (1 / elem if eng.kv_dtype else 1.0), kv_dtype=eng.kv_dtype or eng.manifest["dtype"],
               increase_pct=(res["ppl_engine"] / res["ppl_reference"] - 1) * 100,
               engine=str(engine), model=spec.name, dataset=ds,
               heldout="every 10th document" if ds in PACKAGED else "the whole dataset",
               prefix=prefix, seq_len=seq_len, device=dev.type, dtype=eng.manifest["dtype"],
               random_weights=eng.model.random_weights)
    table = Table(title=f"{spec.name} engine on {res['tokens']} teacher-forced tokens of {ds}")
    for col in ("engine", "reference (every group)", "rise", "top-1 agree", "KL",
                "KV bytes"):
        table.add_column(col, justify="right")
    table.add_row(f"{res['ppl_engine']:.3f}", f"{res['ppl_reference']:.3f}",
                  f"{res['increase_pct']:+.2f}%", f"{res['top1_agreement']:.3f}",
                  f"{res['kl']:.4f}", f"{res['kv_bytes_ratio']:.3f}")
    out.print(table)
    if json_out:
        write_json(json_out, res, force=force, inputs=inputs)
