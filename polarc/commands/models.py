"""`polarc models`: the presets, their shapes, and whether their weights are here."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.table import Table

from polarc.commands.options import ForceOpt
from polarc.console import out, user_errors
from polarc.models import DEFAULT_MODEL, PRESETS
from polarc.models.load import describe_weights_available
from polarc.outputs import check_output, write_json


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
        out.print("* default. heads: query heads; KV: KV groups; dim: head dim. Weights 'no': pass "
                  "--weights DIR (Hugging Face folder or .gguf), or --random-weights for speed work.",
                  highlight=False)
        if json_out:
            write_json(json_out, rows, force=force)
