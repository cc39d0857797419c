"""`polarc bench`: benchmarks that need the lent GPU (method and targets: benchmarks/README.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from polarc.commands.options import ForceOpt
from polarc.console import user_errors
from polarc.errors import PolarcError
from polarc.outputs import check_output

bench_app = typer.Typer(
    help="Benchmarks on a CUDA GPU. Example: polarc bench kernels --json kernels.json",
    no_args_is_help=True,
)


def _need_gpu(json_path: Path | None, force: bool) -> None:
    import torch

    if json_path is not None:
        check_output(json_path, force=force)
    if not torch.cuda.is_available():
        raise PolarcError("benchmarks need a CUDA GPU and none is visible",
                          hint="run on a machine with an NVIDIA GPU")
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        raise PolarcError(f"benchmarks need triton ({exc})", hint="pip install 'polarc[kernels]'"
                          ) from None


@bench_app.command("kernels")
def kernels_cmd(
    json_path: Annotated[Path | None, typer.Option(
        "--json", help="Write one record per case (kernel, shape, density, ms, floor_ms, gbps) "
                       "to this file.")] = None,
    quick: Annotated[bool, typer.Option(
        "--quick", help="A subset of the shapes (B in {1, 64}, S in {1024, 8192}).")] = False,
    force: ForceOpt = False,
) -> None:
    """Selective attention and selective GEMM against torch SDPA / cuBLAS (benchmarks/README.md §1-2).

    Example: polarc bench kernels --json kernels.json
    """
    with user_errors():
        _need_gpu(json_path, force)
        from polarc.benchmarks.bench_kernels import run_kernel_benchmarks

        run_kernel_benchmarks(json_path, quick)


@bench_app.command("e2e")
def e2e_cmd(
    json_path: Annotated[Path | None, typer.Option(
        "--json", help="Write the records (step ms, floor ms, speedup, router share).")] = None,
    no_hf: Annotated[bool, typer.Option(
        "--no-hf", help="Skip the transformers generate baseline.")] = False,
    force: ForceOpt = False,
) -> None:
    """Whole decode steps of dense and sparse random-weight Llama-3-8B / Llama-2-7B engines
    against their byte floors and transformers generate (benchmarks/README.md §3).

    Example: polarc bench e2e --json e2e.json
    """
    with user_errors():
        _need_gpu(json_path, force)
        from polarc.benchmarks.bench_e2e import run_e2e_benchmarks

        run_e2e_benchmarks(json_path, with_hf=not no_hf)
