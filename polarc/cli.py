"""The `polarc` command: wires subcommands; each lives in `polarc/commands/`."""

from __future__ import annotations

import ctypes
import os

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


# glibc's mallopt parameter for the size from which allocations are mapped on their own
M_MMAP_THRESHOLD = -3


def return_freed_memory() -> None:
    """Make host buffers of 1 MiB and more go back to the system when freed (glibc only).

    By default glibc raises this threshold after each large free (up to 32 MiB), so the
    many 1-32 MiB tensors of calibration and evaluation are carved from the heap, which
    fragments and keeps what was freed. The default SmolLM2 plan search peaked at 3.60 GiB
    of RSS that way and at 2.52 GiB with the threshold fixed, for the same work. A user's own
    MALLOC_MMAP_THRESHOLD_ wins."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):
        pass  # not glibc: its allocator has its own policy


def main() -> None:
    return_freed_memory()
    app()


if __name__ == "__main__":
    main()
