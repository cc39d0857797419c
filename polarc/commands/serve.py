"""`polarc serve`: the engine behind an OpenAI-compatible HTTP API (uvicorn)."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path
from typing import Annotated

import typer

from polarc.commands.options import DeviceOpt, check_positive, existing_inputs, resolve_device
from polarc.console import err, user_errors
from polarc.errors import PolarcError


def serve_cmd(
    engine: Annotated[Path, typer.Argument(help="Engine file from polarc build.")],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    api_key: Annotated[str | None, typer.Option(
        envvar="POLARC_API_KEY",
        help="Requests must send 'Authorization: Bearer KEY' (or set POLARC_API_KEY).")] = None,
    model_name: Annotated[str | None, typer.Option(
        help="The model name clients ask for (default: the engine file's name).")] = None,
    batch: Annotated[int | None, typer.Option(
        "--batch", "--slots", help="Decode slots. Default: as many as memory holds at the "
                                   "engine's max sequence, up to its max batch.")] = None,
    max_waiting: Annotated[int | None, typer.Option(
        help="Requests that may wait for a slot; beyond it, 503. Default: 8 x slots.")] = None,
    grace: Annotated[float, typer.Option(
        help="On SIGTERM or Ctrl-C: seconds running requests get to finish.")] = 30.0,
    prefill_chunk: Annotated[int | None, typer.Option(
        help="Prompt tokens prefilled per iteration. Default: 2048 on a GPU, 256 on a CPU.")
    ] = None,
    page_size: Annotated[int | None, typer.Option(
        help="KV cache page, in positions. Default: 64, 128 for an FP8 cache.")] = None,
    dense: Annotated[bool, typer.Option("--dense", help="Every KV group selected.")] = False,
    device: DeviceOpt = "auto",
) -> None:
    """Serve an engine over HTTP with the OpenAI API: /v1/completions, /v1/chat/completions
    (streamed with "stream": true), /v1/models, /health and /metrics (Prometheus).

    Examples:

      polarc serve smollm2.plan --port 8000

      curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"model": "smollm2", "prompt": "The capital of Germany is", "max_tokens": 16}'
    """
    from polarc.commands.run import make_scheduler
    from polarc.format.engine_file import load_engine

    with user_errors():
        check_positive(port=port, batch=batch, max_waiting=max_waiting,
                       prefill_chunk=prefill_chunk, page_size=page_size)
        if not grace >= 0:
            raise PolarcError(f"--grace must be >= 0, got {grace}")
        existing_inputs(engine)
        _check_port(host, port)
        dev = resolve_device(device)
        eng = load_engine(engine, device=dev)
        if eng.backend != "torch":
            raise PolarcError("polarc serve runs torch engines (the scheduler needs the paged "
                              "runtime)", hint="build with the default --backend torch")
        scheduler = make_scheduler(eng, dev, batch=batch, dense=dense,
                                   prefill_chunk=prefill_chunk, page_size=page_size,
                                   detokenize=True)
        with err.status("warming up (decode graph, prefill)"):
            scheduler.warm_up()
        name = model_name or engine.stem
        serve(scheduler, name=name, host=host, port=port, api_key=api_key,
              max_waiting=max_waiting or 8 * scheduler.runtime.batch, grace=grace)


def _check_port(host: str, port: int) -> None:
    """A one-line error, before the engine loads, when the address cannot be bound."""
    if not 0 < port < 65536:
        raise PolarcError(f"--port must be in 1..65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise PolarcError(f"--host {host!r} cannot be resolved ({exc.strerror})") from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as exc:
            raise PolarcError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def serve(scheduler, *, name: str, host: str, port: int, api_key: str | None,  # noqa: ANN001
          max_waiting: int, grace: float) -> None:
    """Run the server until SIGTERM / Ctrl-C: then no new requests, running ones get `grace`
    seconds, and the process exits 0."""
    import uvicorn

    from polarc.server.app import Server, make_app
    from polarc.server.engine_loop import EngineLoop

    loop = EngineLoop(scheduler, max_waiting=max_waiting)
    app = make_app(Server(loop, model_name=name, api_key=api_key))

    config = uvicorn.Config(app, host=host, port=port, log_level="warning",
                            timeout_graceful_shutdown=grace, lifespan="on")
    server = uvicorn.Server(config)
    original = server.handle_exit

    def handle_exit(sig, frame):  # noqa: ANN001, ANN202
        loop.drain()  # refuse new requests at once; uvicorn waits for the running ones
        original(sig, frame)

    server.handle_exit = handle_exit
    loop.start()
    rt = scheduler.runtime
    err.print(f"serving {name!r} on http://{host}:{port} ({rt.batch} slots, "
              f"{rt.cache.pages_free} KV pages of {rt.cache.page_size} positions, "
              f"{rt.device.type}); Ctrl-C stops", markup=False, highlight=False)
    # uvicorn takes SIGINT / SIGTERM while it runs and raises them again once it has shut
    # down; ignored then, so a graceful stop exits 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    started = time.perf_counter()
    server.run()
    loop.stop()
    st = scheduler.stats
    err.print(f"stopped after {time.perf_counter() - started:.1f} s: {st.finished} requests, "
              f"{st.output_tokens} tokens; the engine prefilled for {st.prefill_s:.1f} s and "
              f"ran {st.steps} decode steps in {st.decode_s:.1f} s", markup=False, soft_wrap=True,
              highlight=False)
