"""Every output option: parents made as `mkdir -p`, nothing replaced without --force, --force
only over regular files and polarc's own outputs, never over an input, one writer at a time,
nothing left behind by a killed or failing write."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from polarc.outputs import output_lock
from tests.conftest import SMALL, one_line_error, run


@pytest.fixture(scope="module")
def engine(tiny_dirs: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("engine") / "e.plan"
    code, _, stderr = run("build", "-m", tiny_dirs["llama-gqa"], "-o", path, "--max-batch", "2",
                          "--max-seq", "64")
    assert code == 0, stderr
    return path


def commands(out: Path, tiny: Path, engine: Path, calibration: Path) -> dict[str, list]:
    """One command per output option, writing `out`."""
    return {
        "models --json": ["models", "--json", out],
        "calibrate --out": ["calibrate", "-m", tiny, "--out", out, *SMALL, "--density", "0.5"],
        "eval --json": ["eval", "--calibration", calibration, "-m", tiny, "--tokens", "128",
                        "--quiet", "--json", out],
        "build -o": ["build", "-m", tiny, "-o", out, "--max-batch", "1", "--max-seq", "32"],
        "build --backend onnx -o": ["build", "-m", tiny, "--backend", "onnx", "-o", out,
                                    "--max-batch", "1", "--max-seq", "32"],
        "run --json": ["run", engine, "--prompt", "hi", "--max-new-tokens", "2", "--quiet",
                       "--json", out],
    }


OPTIONS = ["models --json", "calibrate --out", "eval --json", "build -o",
           "build --backend onnx -o", "run --json"]


@pytest.mark.parametrize("option", OPTIONS)
def test_missing_parents_are_made(option: str, tmp_path: Path, tiny_dirs: dict, engine: Path,
                                  calibrated: dict) -> None:
    out = tmp_path / "a" / "b" / "out.onnx"
    args = commands(out, tiny_dirs["llama-mha"], engine, calibrated["llama-mha"])[option]
    code, _, stderr = run(*args)
    assert code == 0, stderr
    assert out.exists()
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("option", OPTIONS)
def test_parent_that_is_a_file(option: str, tmp_path: Path, tiny_dirs: dict, engine: Path,
                               calibrated: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    import polarc.calibration.quality as quality

    monkeypatch.setattr(quality, "evaluate", lambda *a, **k: pytest.fail("work started"))
    args = commands(blocker / "out", tiny_dirs["llama-mha"], engine,
                    calibrated["llama-mha"])[option]
    code, _, stderr = run(*args)
    one_line_error(code, stderr, "is not a folder")
    assert blocker.read_text() == "x"


@pytest.mark.parametrize("option", OPTIONS)
def test_existing_output_needs_force(option: str, tmp_path: Path, tiny_dirs: dict,
                                     engine: Path, calibrated: dict) -> None:
    out = tmp_path / "out.onnx"
    out.write_text("keep me")
    args = commands(out, tiny_dirs["llama-mha"], engine, calibrated["llama-mha"])[option]
    code, _, stderr = run(*args)
    one_line_error(code, stderr, "already exists")
    assert out.read_text() == "keep me"
    code, _, stderr = run(*args, "--force")  # a regular file: --force replaces it
    assert code == 0, stderr
    assert out.is_dir() or out.read_bytes() != b"keep me"


def test_onnx_side_files_need_force(tmp_path: Path, tiny_dirs: dict) -> None:
    out = tmp_path / "m.onnx"
    side = tmp_path / "m.onnx.data"
    side.write_text("someone's data")
    code, _, stderr = run("build", "-m", tiny_dirs["llama-mha"], "--backend", "onnx", "-o", out)
    one_line_error(code, stderr, "m.onnx.data already exists")
    assert side.read_text() == "someone's data" and not out.exists()


@pytest.mark.parametrize("case", ["run engine", "eval calibration.json", "build calibration"])
def test_an_input_is_never_replaced(case: str, tmp_path: Path, tiny_dirs: dict, engine: Path,
                                    calibrated: dict) -> None:
    cal = calibrated["llama-mha"]
    if case == "run engine":
        target, args = engine, ["run", engine, "--prompt", "x", "--json", engine, "--force"]
    elif case == "eval calibration.json":
        target = cal / "calibration.json"
        args = ["eval", "--calibration", cal, "-m", tiny_dirs["llama-mha"], "--json", target,
                "--force"]
    else:
        target = cal / "routers.safetensors"
        args = ["build", "--calibration", cal, "-m", tiny_dirs["llama-mha"], "-o", target,
                "--force"]
    before = target.read_bytes()
    code, _, stderr = run(*args)
    one_line_error(code, stderr, "is one of this command's inputs")
    assert target.read_bytes() == before


def test_force_never_deletes_a_foreign_folder(tmp_path: Path, tiny_dirs: dict) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    code, _, stderr = run("calibrate", "-m", tiny_dirs["llama-mha"], "--out", precious, *SMALL,
                          "--density", "0.5", "--force")
    one_line_error(code, stderr, "polarc did not make")
    assert (precious / "thesis.tex").read_text() == "years of work"


@pytest.mark.parametrize("target, match", [("/dev/full", "not a regular file"),
                                           ("/dev/null", "not a regular file")])
def test_force_never_replaces_a_device(target: str, match: str, tiny_dirs: dict) -> None:
    code, _, stderr = run("build", "-m", tiny_dirs["llama-mha"], "-o", target, "--force")
    one_line_error(code, stderr, match)
    assert Path(target).is_char_device()


def test_force_never_replaces_a_symlink(tmp_path: Path) -> None:
    real = tmp_path / "real.json"
    real.write_text("{}")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    code, _, stderr = run("models", "--json", link, "--force")
    one_line_error(code, stderr, "symbolic link")
    assert link.is_symlink() and real.read_text() == "{}"


@pytest.mark.parametrize("path", ["/proc/polarc-test.json", "/sys/polarc-test.json",
                                  "/proc/polarc/a/b.json"])
def test_system_folders(path: str) -> None:
    code, _, stderr = run("models", "--json", path)
    one_line_error(code, stderr, "cannot write")


def test_second_writer_is_refused(tmp_path: Path, tiny_dirs: dict) -> None:
    out = tmp_path / "same.plan"
    with output_lock(out):
        code, _, stderr = run("build", "-m", tiny_dirs["llama-mha"], "-o", out)
    one_line_error(code, stderr, "another polarc is writing")
    assert not out.exists()
    code, _, stderr = run("build", "-m", tiny_dirs["llama-mha"], "-o", out)  # lock released
    assert code == 0, stderr
    assert not list(tmp_path.glob(".*lock*"))


def test_stale_temporaries_are_removed(tmp_path: Path, tiny_dirs: dict) -> None:
    dead = 4_000_000  # above any pid_max: no such process
    stale = [tmp_path / f".e.plan.polarc-tmp-{dead}", tmp_path / f".e.plan.tmp-{dead}",
             tmp_path / f".cal.polarc-tmp-{dead}", tmp_path / f".cal.tmp-{dead}"]
    for p in stale[:2]:
        p.write_bytes(b"\0" * 1000)
    for p in stale[2:]:
        p.mkdir()
        (p / "routers.safetensors").write_bytes(b"\0" * 1000)
    keep = tmp_path / f".e.plan.tmp-{os.getpid()}"  # a live process's (old naming): kept
    keep.write_text("busy")
    assert run("build", "-m", tiny_dirs["llama-mha"], "-o", tmp_path / "e.plan")[0] == 0
    assert run("calibrate", "-m", tiny_dirs["llama-mha"], "--out", tmp_path / "cal", *SMALL,
               "--density", "0.5")[0] == 0
    assert not any(p.exists() for p in stale)
    assert keep.exists()


_HOOKED_BUILD = """
import os, signal, sys
import safetensors.torch
import polarc.format.engine_file as engine
from polarc.cli import app

def hooked(tensors, path, metadata=None):
    with open(path, "wb") as f:  # part of the file exists when the signal comes
        f.write(b"\\0" * 4096)
    {action}

engine.save_file = hooked
sys.argv = ["polarc", *sys.argv[1:]]
app()
"""


def _hooked_build(action: str, out: Path, tiny: Path, *, preexec=None
                  ) -> subprocess.CompletedProcess:
    env = {**os.environ, "POLARC_SKIP_CACHE_SCAN": "1"}
    return subprocess.run([sys.executable, "-c", _HOOKED_BUILD.format(action=action), "build",
                           "-m", str(tiny), "-o", str(out)], capture_output=True, text=True,
                          env=env, preexec_fn=preexec, timeout=300)


def test_sigterm_during_build_leaves_nothing(tmp_path: Path, tiny_dirs: dict) -> None:
    out = tmp_path / "e.plan"
    proc = _hooked_build("os.kill(os.getpid(), signal.SIGTERM); import time; time.sleep(30)",
                         out, tiny_dirs["llama-mha"])
    assert proc.returncode == 143, proc.stderr
    assert proc.stderr.strip() == "Terminated: nothing was written."
    assert list(tmp_path.iterdir()) == []


def test_failing_write_is_one_line(tmp_path: Path, tiny_dirs: dict) -> None:
    import resource

    def small_files() -> None:  # writes past 64 KiB fail with EFBIG, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))

    out = tmp_path / "e.plan"
    env = {**os.environ, "POLARC_SKIP_CACHE_SCAN": "1"}
    proc = subprocess.run([sys.executable, "-m", "polarc.cli", "build", "-m",
                           str(tiny_dirs["llama-mha"]), "-o", str(out)], capture_output=True,
                          text=True, env=env, preexec_fn=small_files, timeout=300)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: cannot write {out}: "), proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_read_only_file_system(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder on a read-only file system is one line before any work (a real read-only
    tmpfs where this user may mount one; else the file system's answer is simulated)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)],
        capture_output=True).returncode == 0
    if not mounted:
        import polarc.outputs as outputs

        real_access = os.access
        monkeypatch.setattr(outputs.os, "access", lambda p, mode: False if Path(p) == ro
                            else real_access(p, mode))
        monkeypatch.setattr(outputs, "_read_only", lambda p: Path(p) == ro)
    try:
        code, _, stderr = run("models", "--json", ro / "sub" / "m.json")
        one_line_error(code, stderr, f"folder {ro} is on a read-only file system")
    finally:
        if mounted:
            subprocess.run(["umount", str(ro)], check=True)


def test_new_file_beside_an_input_is_fine(calibrated: dict, tiny_dirs: dict) -> None:
    """README's example: eval's JSON inside the calibration folder, then again with --force."""
    cal = calibrated["llama-mha"]
    args = ["eval", "--calibration", cal, "-m", tiny_dirs["llama-mha"], "--tokens", "128",
            "--quiet", "--json", cal / "eval.json"]
    try:
        assert run(*args)[0] == 0
        code, _, stderr = run(*args, "--force")
        assert code == 0, stderr
    finally:
        (cal / "eval.json").unlink(missing_ok=True)
