"""Options shared by several commands, and the checks of option values (one place each)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import torch
import typer

from polarc.errors import PolarcError

ModelOpt = Annotated[str | None, typer.Option(
    "--model", "-m", help="Preset alias, Hugging Face folder, or .gguf file.")]
WeightsOpt = Annotated[Path | None, typer.Option(
    help="Weights for a preset alias: a Hugging Face folder (safetensors) or a .gguf file.")]
RandomOpt = Annotated[bool, typer.Option(
    "--random-weights", help="Random weights of the exact architecture (speed work only).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
ForceOpt = Annotated[bool, typer.Option(
    "--force", help="Replace existing outputs (regular files and polarc's own outputs only).")]
DeviceOpt = Annotated[str, typer.Option(help="auto (the GPU when there is one), cpu or cuda.")]
ComputeDtypeOpt = Annotated[str, typer.Option(
    "--dtype", help="auto (bf16 on a GPU, fp32 on a CPU), fp32, bf16 or fp16.")]
GpuMemoryOpt = Annotated[float | None, typer.Option(
    help="At most this many GB of GPU memory (default: what is free). Less memory keeps "
         "fewer layers resident, so the run reads weights more often.")]
COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_positive(**values: int | None) -> None:
    """Every given value is >= 1 (None: not given)."""
    for name, value in values.items():
        if value is not None and value <= 0:
            raise PolarcError(f"--{name.replace('_', '-')} must be positive, got {value}")


def check_finite(**values: float) -> None:
    for name, value in values.items():
        if not math.isfinite(value):
            raise PolarcError(f"--{name.replace('_', '-')} must be a finite number, got {value}")


def resolve_device(device: str) -> torch.device:
    """auto → the GPU when there is one; cpu; cuda or cuda:N (which must exist)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        if not torch.cuda.is_available():
            raise PolarcError(f"--device {device} but no CUDA GPU is available",
                              hint="use --device cpu")
        dev = torch.device(device)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise PolarcError(f"--device {device}: there are {torch.cuda.device_count()} GPUs")
        return dev
    raise PolarcError(f"--device must be auto, cpu or cuda, got {device!r}")


def resolve_device_memory(device: str, gpu_memory: float | None) -> torch.device:
    """`resolve_device`, then the --gpu-memory cap for the rest of the run."""
    dev = resolve_device(device)
    if gpu_memory is not None:
        check_finite(gpu_memory=gpu_memory)
        if dev.type != "cuda":
            raise PolarcError("--gpu-memory is for a GPU run", hint=f"this run is on {dev.type}")
        from polarc.models.memory import limit_gpu_memory

        limit_gpu_memory(dev, int(gpu_memory * 1e9))
    return dev


def compute_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The dtype a model computes in on `device`: auto is bf16 on a GPU, fp32 on a CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in COMPUTE_DTYPES:
        raise PolarcError(f"--dtype must be auto or one of {', '.join(COMPUTE_DTYPES)}, "
                          f"got {dtype!r}")
    return COMPUTE_DTYPES[dtype]


def existing_inputs(*paths: str | Path | None) -> tuple[Path, ...]:
    """The given paths that exist here: inputs that no output may replace."""
    return tuple(Path(p) for p in paths if p is not None and Path(p).exists())
