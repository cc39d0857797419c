"""`polarc models`, `polarc calibrate` and `polarc eval`: parse options, call the pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.table import Table

from polarc.console import err, out, progress, user_errors
from polarc.errors import PolarcError
from polarc.models import DEFAULT_MODEL, PRESETS, load_model
from polarc.models.load import describe_weights_available
from polarc.outputs import check_output, write_json

ModelOpt = Annotated[str | None, typer.Option(
    "--model", "-m", help="Preset alias, Hugging Face folder, or .gguf file.")]
WeightsOpt = Annotated[Path | None, typer.Option(
    help="Weights for a preset alias: a Hugging Face folder (safetensors) or a .gguf file.")]
RandomOpt = Annotated[bool, typer.Option(
    "--random-weights", help="Random weights of the exact architecture (speed work only).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
ForceOpt = Annotated[bool, typer.Option(
    "--force", help="Replace existing outputs (regular files and polarc's own outputs only).")]


def dataset_input(dataset: str | None) -> Path | None:
    """The dataset as a local file (an input outputs must not replace), else None."""
    return Path(dataset) if dataset and Path(dataset).exists() else None


def model_inputs(model: str | None, weights: Path | None) -> tuple[Path, ...]:
    return tuple(Path(p) for p in (model, weights) if p is not None and Path(p).exists())


def models_cmd(
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the list as JSON.")] = None,
    force: ForceOpt = False,
) -> None:
    """List model presets with their shapes and whether weights are available here.

    Example: polarc models
    """
    with user_errors():
        if json_out:
            check_output(json_out, force=force)
        table = Table(title="polarc model presets", box=box.SIMPLE_HEAD)
        for col in ("alias", "family", "layers", "heads", "KV", "dim", "hidden", "MLP", "params",
                    "weights"):
            table.add_column(col, justify="left" if col in ("alias", "family", "weights")
                             else "right", no_wrap=True)
        rows = []
        for spec in PRESETS.values():
            where = describe_weights_available(spec)
            rows.append({"alias": spec.name, "family": spec.hf_model_type, "layers": spec.n_layers,
                         "q_heads": spec.n_heads, "kv_groups": spec.n_kv_heads,
                         "head_dim": spec.head_dim, "hidden": spec.hidden,
                         "mlp": spec.intermediate, "params": spec.n_params, "weights": where})
            name = spec.name + ("*" if spec.name == DEFAULT_MODEL else "")
            table.add_row(name, spec.hf_model_type, str(spec.n_layers), str(spec.n_heads),
                          str(spec.n_kv_heads), str(spec.head_dim), str(spec.hidden),
                          str(spec.intermediate), f"{spec.n_params / 1e9:.2f}B", where)
        out.print(table)
        out.print("* default. heads: query heads; KV: KV groups; dim: head dim. Weights 'no': pass --weights "
                  "DIR (Hugging Face folder or .gguf), or --random-weights for speed work.")
        if json_out:
            write_json(json_out, rows, force=force)


def calibrate_cmd(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder for the calibration artifact.")],
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    random_weights: RandomOpt = False,
    dataset: Annotated[str, typer.Option(
        help="'builtin', a .txt/.jsonl/.parquet file, or a hub dataset name[:config[:split]].")
    ] = "builtin",
    seq_len: Annotated[int, typer.Option(help="Tokens per calibration sequence.")] = 512,
    tokens: Annotated[int, typer.Option(help="Calibration tokens for router training.")] = 65536,
    tune_tokens: Annotated[int, typer.Option(
        help="Further tokens for choosing the plan (never used for training).")] = 4096,
    density: Annotated[float | None, typer.Option(
        help="Uniform plan: fraction of KV groups kept on every layer but the first.")] = None,
    quality_budget: Annotated[float, typer.Option(
        help="Without --density: allowed perplexity rise in percent; per-layer densities "
             "are chosen to read as few KV bytes as possible within it.")] = 3.0,
    batch_size: Annotated[int, typer.Option(help="Sequences per forward pass.")] = 8,
    max_samples: Annotated[int, typer.Option(help="Router training tokens kept per layer.")] = 65536,
    epochs: Annotated[int, typer.Option(help="Router training epochs.")] = 16,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    force: Annotated[bool, typer.Option(
        "--force", help="Replace an existing --out folder (only one polarc made).")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Profile a model on calibration text, fit per-layer routers, choose a density plan.

    Examples:

      polarc calibrate --out runs/smollm2            # embedded SmolLM2, 3% quality budget

      polarc calibrate --density 0.67 --out runs/d67  # uniform: 2 of 3 KV groups

      polarc calibrate -m ./my-llama --dataset notes.jsonl --quality-budget 1 -o runs/mine
    """
    from polarc.calibration.calibrate import CalibrateConfig, calibrate

    with user_errors():
        cfg = CalibrateConfig(out=out_dir, dataset=dataset, seq_len=seq_len, tokens=tokens,
                              tune_tokens=tune_tokens, density=density,
                              quality_budget=quality_budget, batch_size=batch_size,
                              max_samples=max_samples, epochs=epochs, seed=seed, force=force,
                              inputs=tuple(p for p in (dataset_input(dataset),
                                                       *model_inputs(model, weights)) if p))
        _check_positive(seq_len=seq_len, tokens=tokens, batch_size=batch_size,
                        max_samples=max_samples, epochs=epochs)
        if density is not None and not 0.0 < density <= 1.0:
            raise PolarcError(f"--density must be in (0, 1], got {density}")
        from polarc.calibration.artifact import is_calibration_folder

        check_output(out_dir, force=force, folder=True, ours=is_calibration_folder,
                     inputs=cfg.inputs)
        m = load_model(model, weights=weights, random_weights=random_weights)
        with progress(quiet) as bar:
            meta = calibrate(m, cfg, bar)
        _print_plan(meta)
        err.print(f"wrote {out_dir}/ (routers.safetensors, calibration.json, report.png)")


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value <= 0:
            raise PolarcError(f"--{name.replace('_', '-')} must be positive, got {value}")


def _print_plan(meta: dict) -> None:
    tune = meta["quality"]["tune"]
    plan = meta["plan"]
    ks = plan["k_per_layer"]
    out.print(f"model {meta['model']['name']}"
              + (" [random weights]" if meta["model"]["random_weights"] else "")
              + f": plan {plan['mode']}, k per layer {ks} of {plan['n_kv_groups']} KV groups")
    recalls = [e["router_recall"] for e in meta["layers"] if e["k"] < plan["n_kv_groups"]]
    mean_recall = sum(recalls) / len(recalls) if recalls else float("nan")
    out.print(f"KV density {plan['kv_density']:.3f}; tuning perplexity {tune['ppl_dense']:.3f} "
              f"dense -> {tune['ppl_plan']:.3f} ({tune['increase_pct']:+.2f}%); "
              f"mean router recall {mean_recall:.3f}")


def eval_cmd(
    calibration: Annotated[Path, typer.Option(help="Folder written by polarc calibrate.")],
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    random_weights: RandomOpt = False,
    dataset: Annotated[str | None, typer.Option(
        help="Held-out text (default: the calibration's dataset; only its held-out split is read).")
    ] = None,
    tokens: Annotated[int, typer.Option(help="Held-out tokens to evaluate.")] = 16384,
    batch_size: Annotated[int, typer.Option(help="Sequences per forward pass.")] = 8,
    seed: Annotated[int, typer.Option(help="Seed of the random selection.")] = 0,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the numbers as JSON.")] = None,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Perplexity on held-out text with dense, router, oracle and random selection.

    Example: polarc eval --calibration runs/smollm2 --json runs/smollm2/eval.json
    """
    from polarc.calibration import artifact
    from polarc.calibration.calibrate import model_source, same_model
    from polarc.calibration.data import load_sequences
    from polarc.calibration.quality import evaluate

    with user_errors():
        _check_positive(tokens=tokens, batch_size=batch_size)
        inputs = (calibration, dataset_input(dataset), *model_inputs(model, weights))
        if json_out:
            check_output(json_out, force=force, inputs=inputs)
        cal = artifact.read(calibration)
        rec = cal.meta["model"]
        if model is None:
            model = model_source(rec)
            random_weights = random_weights or rec["random_weights"]
        m = load_model(model, weights=weights, random_weights=random_weights)
        if not same_model(rec, m):
            raise PolarcError(f"{calibration} was made for another model ({rec['name']}, weights "
                              f"{rec['identity']['weights_sha256'][:12]}), not {m.spec.name} "
                              f"(weights {m.identity['weights_sha256'][:12]})",
                              hint="calibrate this model, or pass the model it was made for")
        ds = dataset or cal.meta["dataset"]["name"]
        seq_len = int(cal.meta["dataset"]["seq_len"])
        _, heldout = load_sequences(ds, m.tokenizer, seq_len=seq_len, calib_tokens=0,
                                    heldout_tokens=max(tokens, seq_len))
        with progress(quiet) as bar:
            report = evaluate(m, heldout.ids, cal.k_per_layer, routers=cal.head_routers,
                              batch_size=batch_size, seed=seed, progress=bar)
        res = report.as_json()
        res.update(model=m.spec.name, calibration=str(calibration), dataset=ds,
                   random_weights=m.random_weights)
        _print_eval(res)
        if json_out:
            write_json(json_out, res, force=force, inputs=inputs)


def _print_eval(res: dict) -> None:
    dense = res["ppl_dense"]
    table = Table(title=f"{res['model']} held-out ({res['tokens']} tokens, "
                        f"KV density {res['kv_density']:.3f})")
    for col in ("selection", "perplexity", "rise", "top-1 agree", "KL"):
        table.add_column(col, justify="right")
    for kind in ("dense", "sparse", "oracle", "random"):
        ppl = res[f"ppl_{kind}"]
        agree = "1.000" if kind == "dense" else f"{res[f'top1_agreement_{kind}']:.3f}"
        kl = "0" if kind == "dense" else f"{res[f'kl_{kind}']:.4f}"
        name = "routers" if kind == "sparse" else kind
        table.add_row(name, f"{ppl:.3f}", f"{(ppl / dense - 1) * 100:+.2f}%", agree, kl)
    out.print(table)
    out.print(f"router recall against the oracle: {res['router_recall']:.3f}")
