"""Terminal output shared by commands: results on stdout, progress and errors on stderr."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

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


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is so that cleanup runs as for Ctrl-C."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn user mistakes into one line on stderr and exit 1 (POLARC_DEBUG=1: traceback);
    Ctrl-C and SIGTERM clean up what was being written and exit 130 / 143."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main else None
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
    except (MemoryError, RuntimeError) as exc:  # torch.OutOfMemoryError is a RuntimeError
        oom = type(exc).__name__ in ("MemoryError", "OutOfMemoryError")
        if not oom or os.environ.get("POLARC_DEBUG") == "1":
            raise
        what = "host" if isinstance(exc, MemoryError) else "GPU"
        err.print(f"Error: out of {what} memory (a smaller --batch-size, or a shorter run, "
                  "may fit); nothing was written.", markup=False, highlight=False,
                  soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt as exc:
        what = "Terminated" if isinstance(exc, Terminated) else "Interrupted"
        err.print(f"{what}: nothing was written.", highlight=False)
        raise typer.Exit(143 if isinstance(exc, Terminated) else 130) from None
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)


def progress(quiet: bool = False) -> Progress:
    return Progress(
        TextColumn("{task.description:<20}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
        console=err, disable=quiet or not sys.stderr.isatty() and os.environ.get("CI") == "true",
    )
