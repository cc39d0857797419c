"""The `polarc` command: wires subcommands; each lives in `polarc/commands/`."""

from __future__ import annotations

import typer

from polarc.commands.bench import bench_app
from polarc.commands.calibrate import calibrate_cmd, eval_cmd
from polarc.commands.engine import build_cmd
from polarc.commands.models import models_cmd
from polarc.commands.run import run_cmd
from polarc.commands.serve import serve_cmd

app = typer.Typer(
    name="polarc",
    help="Polar Sparsity toolchain: calibrate routers that pick attention heads (KV groups) "
         "per sequence, build an engine, and run batched generation that reads only them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("models")(models_cmd)
app.command("calibrate")(calibrate_cmd)
app.command("eval")(eval_cmd)
app.command("build")(build_cmd)
app.command("run")(run_cmd)
app.command("serve")(serve_cmd)
app.add_typer(bench_app, name="bench")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
