"""benchmarks/README.md §5 through the server: a load generator on loopback against a running
`polarc serve` (or any OpenAI-compatible server that takes token-id prompts and
`ignore_eos`, as vLLM's does).

    python -m polarc.benchmarks.bench_serve --url http://127.0.0.1:8000 [--rate inf] [--json OUT]
    polarc bench serve --url http://127.0.0.1:8000 --rate 4 --requests 500

It sends the §5 workload (`bench_stream.workload`: same seed, same requests as the offline
run) as streamed completions, all at once (`--rate inf`) or with Poisson arrivals at `--rate`
requests/s, stops sending after `--requests` or `--max-seconds`, and reports what `vllm bench
serve` reports: request and output-token throughput, time to first token and inter-token
latency (p50 / p99; one gap per streamed chunk), end-to-end latency, and errors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from polarc.benchmarks.bench_stream import workload

from polarc.outputs import write_json


@dataclass
class Outcome:
    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    latency: float = 0.0


async def _one(client: httpx.AsyncClient, url: str, model: str, prompt: list[int],
               max_tokens: int) -> Outcome:
    out = Outcome(prompt_tokens=len(prompt))
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    last = None
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                out.error = f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}"
                return out
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    out.error = chunk["error"].get("message", "error")
                    return out
                if chunk.get("usage"):
                    out.output_tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices"):  # a token (its text may be empty: random weights'
                    # byte tokenizer gives text for few ids)
                    now = time.perf_counter()
                    if last is None:
                        out.ttft = now - t0
                    else:
                        out.gaps.append(now - last)
                    last = now
        out.ok = True
    except httpx.HTTPError as exc:
        out.error = f"{type(exc).__name__}: {exc}"
    finally:
        out.latency = time.perf_counter() - t0
    return out


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(math.ceil(q / 100 * len(s))) - 1)]


async def run_load(url: str, model: str, requests: list[tuple[list[int], int]], *, rate: float,
                   max_seconds: float, api_key: str | None = None, seed: int = 0
                   ) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    rng = random.Random(seed)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=30), limits=limits,
                                 headers=headers) as client:
        t0 = time.perf_counter()
        tasks = []
        for prompt, n in requests:
            if time.perf_counter() - t0 > max_seconds:
                break
            tasks.append(asyncio.create_task(_one(client, url, model, prompt, n)))
            if math.isfinite(rate):
                await asyncio.sleep(rng.expovariate(rate))
        left = max(1.0, max_seconds - (time.perf_counter() - t0))
        done, pending = await asyncio.wait(tasks, timeout=left)
        for task in pending:
            task.cancel()
        wall = time.perf_counter() - t0
    outcomes = [t.result() for t in done]
    ok = [o for o in outcomes if o.ok]
    gaps = [g for o in ok for g in o.gaps]
    ttfts = [o.ttft for o in ok if o.ttft is not None]
    out_tokens = sum(o.output_tokens for o in ok)
    return {
        "url": url, "model": model, "rate": rate, "sent": len(tasks), "completed": len(ok),
        "failed": len(outcomes) - len(ok), "unfinished": len(pending), "seconds": wall,
        "requests_per_s": len(ok) / wall, "output_tokens_per_s": out_tokens / wall,
        "prompt_tokens": sum(o.prompt_tokens for o in ok), "output_tokens": out_tokens,
        "ttft_p50_ms": _pct(ttfts, 50) * 1e3, "ttft_p99_ms": _pct(ttfts, 99) * 1e3,
        "itl_p50_ms": _pct(gaps, 50) * 1e3, "itl_p99_ms": _pct(gaps, 99) * 1e3,
        "latency_p50_s": _pct([o.latency for o in ok], 50),
        "errors": sorted({o.error for o in outcomes if not o.ok})[:5],
    }


def serve_benchmark(url: str, *, model: str | None = None, n: int = 2000, rate: float = math.inf,
                    max_seconds: float = 600.0, prompt_len: tuple[int, int] = (64, 4096),
                    output_len: tuple[int, int] = (16, 1024), api_key: str | None = None
                    ) -> dict[str, Any]:
    """The §5 workload against the server at `url` (its model and vocabulary asked of
    /v1/models when not given); a summary dict."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    info = httpx.get(url + "/v1/models", headers=headers, timeout=30).json()["data"][0]
    model = model or info["id"]
    reqs = workload(n, vocab=int(info.get("vocab_size", 128256)), prompt=prompt_len,
                    output=output_len)
    return asyncio.run(run_load(url, model, reqs, rate=rate, max_seconds=max_seconds,
                                api_key=api_key))


def format_summary(r: dict[str, Any]) -> str:
    rate = "all at once" if not math.isfinite(r["rate"]) else f"{r['rate']:g} req/s (Poisson)"
    return (f"{r['model']} at {r['url']}, {rate}: {r['completed']}/{r['sent']} completed, "
            f"{r['failed']} failed, {r['unfinished']} unfinished in {r['seconds']:.1f} s\n"
            f"  {r['requests_per_s']:.2f} req/s, {r['output_tokens_per_s']:.0f} output tok/s\n"
            f"  TTFT p50 {r['ttft_p50_ms']:.0f} ms, p99 {r['ttft_p99_ms']:.0f} ms; ITL p50 "
            f"{r['itl_p50_ms']:.1f} ms, p99 {r['itl_p99_ms']:.1f} ms; latency p50 "
            f"{r['latency_p50_s']:.1f} s" + (f"\n  errors: {r['errors']}" if r["errors"] else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default=None)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--rate", type=float, default=math.inf, help="requests/s; inf = all at once")
    ap.add_argument("--max-seconds", type=float, default=600.0)
    ap.add_argument("--prompt-len", type=int, nargs=2, default=(64, 4096))
    ap.add_argument("--output-len", type=int, nargs=2, default=(16, 1024))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    r = serve_benchmark(args.url, model=args.model, n=args.requests, rate=args.rate,
                        max_seconds=args.max_seconds, prompt_len=tuple(args.prompt_len),
                        output_len=tuple(args.output_len))
    print(format_summary(r))
    if args.json is not None:
        write_json(args.json, r, force=True)


if __name__ == "__main__":
    main()
