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


@bench_app.command("serve")
def serve_bench_cmd(
    url: Annotated[str, typer.Option(help="A running polarc serve.")] = "http://127.0.0.1:8000",
    requests: Annotated[int, typer.Option(help="Requests of the §5 workload to send.")] = 2000,
    rate: Annotated[float, typer.Option(
        help="Requests per second, Poisson arrivals; inf sends them all at once.")] = float("inf"),
    max_seconds: Annotated[float, typer.Option(
        help="Stop sending, and stop waiting, after this long.")] = 600.0,
    prompt_len: Annotated[tuple[int, int], typer.Option(
        help="Prompt lengths, log-uniform between these.")] = (64, 4096),
    output_len: Annotated[tuple[int, int], typer.Option(
        help="Output lengths (forced), log-uniform between these.")] = (16, 1024),
    api_key: Annotated[str | None, typer.Option(envvar="POLARC_API_KEY")] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the summary.")] = None,
    force: ForceOpt = False,
) -> None:
    """The §5 request stream against a running server on loopback: throughput, time to first
    token and inter-token latency (p50/p99), as `vllm bench serve` reports them.

    Example: polarc serve l3.plan & polarc bench serve --rate 8 --requests 500
    """
    import math

    import httpx

    with user_errors():
        if requests < 1 or not max_seconds > 0 or not rate > 0 or \
                not 1 <= prompt_len[0] <= prompt_len[1] or not 1 <= output_len[0] <= output_len[1]:
            raise PolarcError("--requests, --rate and --max-seconds must be positive, and each "
                              "length range LO HI with 1 <= LO <= HI")
        if json_path is not None:
            check_output(json_path, force=force)
        from polarc.benchmarks.bench_serve import format_summary, serve_benchmark

        try:
            r = serve_benchmark(url, n=requests, rate=rate if math.isfinite(rate) else math.inf,
                                max_seconds=max_seconds, prompt_len=prompt_len,
                                output_len=output_len, api_key=api_key)
        except httpx.HTTPError as exc:
            raise PolarcError(f"cannot reach a server at {url}: {exc}") from None
        print(format_summary(r))
        if json_path is not None:
            from polarc.outputs import write_json

            write_json(json_path, r, force=force)
