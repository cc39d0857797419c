"""The `polarc` command: wires subcommands; each lives in its own module."""

from __future__ import annotations

import typer

from polarc.commands import calibrate_cmd, eval_cmd, models_cmd

app = typer.Typer(
    name="polarc",
    help="Polar Sparsity toolchain: calibrate routers that pick attention heads (KV groups) "
         "per sequence, and measure what each density costs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("models")(models_cmd)
app.command("calibrate")(calibrate_cmd)
app.command("eval")(eval_cmd)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
