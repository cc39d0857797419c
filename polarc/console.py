"""Terminal output shared by commands: results on stdout, progress and errors on stderr."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from polarc.errors import PolarcError

# Wide enough for tables when piped (rich would assume 80 columns).
out = Console(width=None if sys.stdout.isatty() else 120)
err = Console(stderr=True)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn user mistakes into one line on stderr and exit 1 (POLARC_DEBUG=1: traceback)."""
    try:
        yield
    except PolarcError as exc:
        if os.environ.get("POLARC_DEBUG") == "1":
            raise
        msg = f"Error: {exc}"
        if exc.hint:
            msg += f" ({exc.hint})"
        err.print(msg, markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err.print("Interrupted: nothing was written.", highlight=False)
        raise typer.Exit(130) from None


def progress(quiet: bool = False) -> Progress:
    return Progress(
        TextColumn("{task.description:<20}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
        console=err, disable=quiet or not sys.stderr.isatty() and os.environ.get("CI") == "true",
    )


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    if not path.resolve().parent.is_dir():
        raise PolarcError(f"cannot write {path}: its folder does not exist")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise PolarcError(f"cannot write {path}: {exc.strerror}") from None
