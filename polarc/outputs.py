"""Everything polarc writes goes through here: checks before the work starts, an exclusive lock
while writing, a temporary sibling renamed into place, and cleanup of what a killed run left.

Rules (README "Outputs"):
- a missing parent folder is created (as ``mkdir -p``); a parent that is a file or cannot be
  written is a one-line error, found before any work;
- an existing output is replaced only with ``--force``, and even then only if it is a regular
  file or something polarc made (a calibration folder, an empty folder); never a device, a
  symbolic link, a folder of other files, or one of the command's own inputs;
- two polarc processes never write one output at once: the second one stops and says so;
- temporaries are named ``.NAME.polarc-tmp-PID``; a run that takes the lock removes those a
  killed run left behind (and the older ``.NAME.tmp-PID`` names of dead processes).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import stat
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from polarc.errors import PolarcError, first_line

TMP_TAG = ".polarc-tmp-"
OLD_TAG = ".polarc-old-"
LOCK_TAG = ".polarc-lock"

# Is this existing folder something polarc made (so --force may replace it)?
FolderCheck = Callable[[Path], bool]


def _nearest_existing(path: Path) -> Path:
    p = path
    while not os.path.lexists(p):
        if p.parent == p:
            break
        p = p.parent
    return p


def check_parent(path: Path) -> None:
    """The folder that will hold `path` exists or can be made, and can be written."""
    parent = Path(os.path.abspath(path)).parent
    anchor = _nearest_existing(parent)
    if not anchor.is_dir():
        raise PolarcError(f"cannot write {path}: {anchor} is not a folder")
    if not os.access(anchor, os.W_OK | os.X_OK):
        why = "is on a read-only file system" if _read_only(anchor) else "is not writable"
        raise PolarcError(f"cannot write {path}: folder {anchor} {why}")


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def make_parent(path: Path) -> None:
    parent = Path(os.path.abspath(path)).parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PolarcError(f"cannot write {path}: cannot make folder {parent}: {first_line(exc)}") from None


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def check_output(
    path: Path,
    *,
    force: bool,
    folder: bool = False,
    ours: FolderCheck | None = None,
    inputs: Iterable[Path | None] = (),
    option: str = "--force",
) -> None:
    """Check an output before any work (see the module docstring). `folder`: the output is a
    folder; `ours` tells whether an existing folder may be replaced (besides empty ones)."""
    for inp in inputs:
        if inp is None:
            continue
        inp = Path(inp)
        exists = os.path.lexists(path)
        # the input itself, something already inside an input folder, or (a folder output)
        # a folder that holds an input; a new file inside an input folder is harmless
        clash = _same(path, inp) or (exists and inp.is_dir() and _inside(path, inp)) or (
            folder and exists and _inside(inp, path))
        if clash:
            raise PolarcError(f"{path} is one of this command's inputs ({inp})",
                              hint="write the output somewhere else")
    check_parent(path)
    if not os.path.lexists(path):
        return
    mode = os.lstat(path).st_mode
    if stat.S_ISLNK(mode):
        raise PolarcError(f"{path} is a symbolic link; polarc does not replace it",
                          hint="remove it or choose another output path")
    if stat.S_ISDIR(mode):
        empty = not any(Path(path).iterdir())
        if not folder:
            raise PolarcError(f"{path} is a folder", hint="give a file name")
        if not (empty or (ours is not None and ours(Path(path)))):
            raise PolarcError(f"{path} is a folder that polarc did not make; --force replaces "
                              "only polarc's own outputs", hint="choose another output folder")
    elif not stat.S_ISREG(mode):
        raise PolarcError(f"{path} is not a regular file (a device, pipe or socket); polarc "
                          "does not replace it", hint="choose another output path")
    if not force:
        raise PolarcError(f"{path} already exists", hint=f"pass {option} to replace it")
    if not os.access(path, os.W_OK) and not folder and _read_only(Path(path).parent):
        raise PolarcError(f"cannot write {path}: it is on a read-only file system")


def _inside(path: Path, folder: Path) -> bool:
    try:
        Path(os.path.abspath(path)).relative_to(os.path.abspath(folder))
        return True
    except ValueError:
        return False


# ------------------------------------------------------------------------------------ lock


@contextmanager
def output_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` for this process (a lock file beside it, removed after)."""
    lock = Path(os.path.abspath(path)).parent / f".{Path(path).name}{LOCK_TAG}"
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise PolarcError(f"cannot write {path}: {first_line(exc)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise PolarcError(f"another polarc is writing {path}",
                              hint="wait for it to finish, or write elsewhere") from None
        try:  # the holder before us may have removed the file we opened: lock the current one
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        with suppress(OSError):
            os.unlink(lock)
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(path: Path) -> None:
    """Temporaries of `path` left by killed runs (call with the lock held)."""
    parent = Path(os.path.abspath(path)).parent
    name = re.escape(Path(path).name)
    ours = re.compile(rf"^\.{name}({re.escape(TMP_TAG)}|{re.escape(OLD_TAG)})\d+(\..*)?$")
    legacy = re.compile(rf"^\.{name}\.(tmp|old)-(\d+)$")
    try:
        entries = list(parent.iterdir())
    except OSError:
        return
    for entry in entries:
        m = legacy.match(entry.name)
        if ours.match(entry.name) or (m and not _pid_alive(int(m.group(2)))):
            _remove(entry)


def _remove(p: Path) -> None:
    with suppress(OSError):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


# ------------------------------------------------------------------------------- writing


@contextmanager
def writing(path: Path, *, force: bool, folder: bool = False, ours: FolderCheck | None = None,
            inputs: Iterable[Path | None] = ()) -> Iterator[Path]:
    """Yield a temporary path beside `path` (an empty folder when `folder`); when the block
    ends without error it replaces `path` in one rename, otherwise it is removed. The lock is
    held throughout; an output that appeared meanwhile is checked again."""
    path = Path(path)
    check_output(path, force=force, folder=folder, ours=ours, inputs=inputs)
    make_parent(path)
    with output_lock(path):
        check_output(path, force=force, folder=folder, ours=ours, inputs=inputs)
        remove_stale(path)
        tmp = path.with_name(f".{path.name}{TMP_TAG}{os.getpid()}")
        try:
            if folder:
                tmp.mkdir()
            yield tmp
            _replace(tmp, path, folder)
        except OSError as exc:
            raise PolarcError(f"cannot write {path}: {first_line(exc)}") from None
        finally:
            _remove(tmp)


def _replace(tmp: Path, path: Path, folder: bool) -> None:
    old = None
    if folder and os.path.lexists(path):  # rename cannot put a folder over an existing path
        old = path.with_name(f".{path.name}{OLD_TAG}{os.getpid()}")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        _remove(old)


def write_json(path: Path, data: Any, *, force: bool,
               inputs: Iterable[Path | None] = ()) -> None:
    """Write JSON atomically, under the rules of `writing`."""
    text = json.dumps(data, indent=2) + "\n"
    with writing(path, force=force, inputs=inputs) as tmp:
        tmp.write_text(text)


def write_failure(path: Path, exc: BaseException) -> PolarcError:
    """A one-line error for a failed write of `path` (OSError, SafetensorError, ...)."""
    return PolarcError(f"cannot write {path}: {first_line(exc)}")


@contextmanager
def appending(path: Path | None, *, force: bool, inputs: Iterable[Path | None] = ()
              ) -> Iterator[tuple[Any, set[str]]]:
    """An output of JSON lines written as results come (each line flushed at once), under the
    lock: ``(file, ids)`` where `ids` are the results already there (each line's "id" as JSON
    text). An existing file is continued: its complete lines are kept, a last line that a
    killed run left half-written is dropped, and a file whose lines are not JSON objects with
    an "id" is refused (polarc did not make it). `force` starts it over. `path` None: no file
    (``(None, set())``)."""
    if path is None:
        yield None, set()
        return
    path = Path(path)
    check_output(path, force=True, inputs=inputs)
    make_parent(path)
    with output_lock(path):
        check_output(path, force=True, inputs=inputs)
        remove_stale(path)
        done: set[str] = set()
        try:
            if os.path.lexists(path) and not force:
                done = _result_ids(path)
            f = open(path, "a" if done or not force else "w", encoding="utf-8")
        except OSError as exc:
            raise PolarcError(f"cannot write {path}: {first_line(exc)}") from None
        try:
            yield f, done
        except OSError as exc:
            raise PolarcError(f"cannot write {path}: {first_line(exc)}") from None
        finally:
            f.close()


def _result_ids(path: Path) -> set[str]:
    """The ids of a results file's complete lines; a half-written last line is cut off."""
    ids: set[str] = set()
    with open(path, "rb+") as f:
        data = f.read()
        end = data.rfind(b"\n") + 1
        for n, line in enumerate(data[:end].splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                record = None
            if not isinstance(record, dict) or "id" not in record:
                raise PolarcError(f"{path} is not a polarc results file (line {n} is not a "
                                  "JSON object with an id); polarc does not append to it",
                                  hint="choose another --output, or --force to start it over")
            ids.add(json.dumps(record["id"]))
        if end < len(data):
            f.truncate(end)
    return ids
