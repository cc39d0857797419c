"""`polarc run`: requests from the command line or a file through the scheduler, results
printed or appended to a JSONL file as each request finishes."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from polarc.commands.options import (
    DeviceOpt,
    ForceOpt,
    QuietOpt,
    check_finite,
    check_positive,
    existing_inputs,
    resolve_device,
)
from polarc.console import err, out, progress, user_errors
from polarc.errors import PolarcError
from polarc.format.plan import kv_density
from polarc.outputs import appending, check_output, write_json

DEMO_PROMPTS = [
    "The capital of Germany is",
    "Permission is hereby granted, free of charge, to any person",
    "A good way to learn a new programming language is",
    "The three primary colors are",
]
REQUEST_KEYS = {"id", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop"}
DEFAULT_MAX_TOKENS = 48


@dataclass
class Defaults:
    """What a request that does not say otherwise gets (the command's options)."""

    max_tokens: int
    temperature: float
    top_p: float
    seed: int


@dataclass
class BadLine:
    """A line of the prompts file that is not a request."""

    where: str
    why: str


def _text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 file, read as it goes."""
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                yield n, line.rstrip("\r\n")
    except UnicodeDecodeError as exc:
        raise PolarcError(f"prompts file {path} is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise PolarcError(f"cannot read prompts file {path}: {exc.strerror}") from None


def _number(record: dict, key: str, kind: type, default: Any) -> Any:
    value = record.get(key, default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) or (
            kind is float and not math.isfinite(value)):
        raise ValueError(f'"{key}" must be {"an integer" if kind is int else "a number"}')
    return value


def _request_of(record: Any, n: int, defaults: Defaults) -> dict[str, Any]:
    """The fields of one JSONL request; ValueError (one line) for a bad one."""
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    prompt = record.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise ValueError('needs a non-empty string "prompt"')
    rid = record.get("id", n)
    if not isinstance(rid, str | int) or isinstance(rid, bool):
        raise ValueError('"id" must be a string or an integer')
    stop = record.get("stop", [])
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise ValueError('"stop" must be a string or a list of non-empty strings')
    unknown = sorted(set(record) - REQUEST_KEYS)
    if unknown:
        raise ValueError(f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}")
    return {"id": rid, "prompt": prompt, "stop": tuple(stop),
            "default_max_tokens": "max_tokens" not in record,
            "max_tokens": _number(record, "max_tokens", int, defaults.max_tokens),
            "temperature": _number(record, "temperature", float, defaults.temperature),
            "top_p": _number(record, "top_p", float, defaults.top_p),
            "seed": _number(record, "seed", int, defaults.seed)}


def read_requests(path: Path, defaults: Defaults) -> Iterator[dict[str, Any] | BadLine]:
    """Requests of a prompts file, read as it goes: `.jsonl` (one JSON object a line: "prompt",
    and optionally "id", "max_tokens", "temperature", "top_p", "seed", "stop"), or any other
    text file (one prompt a line, its id the line number). A line that is not a request comes
    out as a `BadLine` (the caller skips it or stops)."""
    if not path.is_file():
        raise PolarcError(f"prompts file {path} does not exist")
    jsonl = path.suffix in (".jsonl", ".json")
    seen: set[str] = set()
    for n, line in _text_lines(path):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        if not jsonl:
            fields: dict[str, Any] = {"id": n, "prompt": line.strip(), "stop": (),
                                      **defaults.__dict__}
        else:
            try:
                fields = _request_of(json.loads(line), n, defaults)
            except json.JSONDecodeError:
                yield BadLine(where, "not valid JSON")
                continue
            except ValueError as exc:
                yield BadLine(where, str(exc))
                continue
        key = json.dumps(fields["id"])
        if key in seen:
            yield BadLine(where, f"id {key} repeats an earlier line's")
            continue
        seen.add(key)
        yield fields


def run_cmd(
    engine: Annotated[Path, typer.Argument(help="Engine file from polarc build.")],
    prompt: Annotated[list[str] | None, typer.Option(help="A prompt (repeatable).")] = None,
    prompts: Annotated[Path | None, typer.Option(
        help="A prompts file: .jsonl (one request a line: prompt, and optionally id, "
             "max_tokens, temperature, top_p, seed, stop) or text (one prompt a line).")] = None,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Append one JSON line per finished request (its id, the "
                               "completion); run again with the same file to go on.")] = None,
    batch: Annotated[int | None, typer.Option(
        "--batch", "--slots", help="Decode slots (rows per step). Default: the prompts given "
                                   "on the command line; for a file, as many as memory holds "
                                   "at the engine's max sequence, up to its max batch.")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(
        help="Tokens to generate per request (a JSONL request's max_tokens overrides). "
             "Default: 48, fewer where the prompt leaves less room.")] = None,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Sampling seed of each request that has none.")] = 0,
    prefill_chunk: Annotated[int | None, typer.Option(
        help="Prompt tokens prefilled per iteration, in one forward of several prompts' "
             "chunks (longer prompts take several). Default: 2048 on a GPU, 256 on a CPU.")
    ] = None,
    page_size: Annotated[int | None, typer.Option(
        help="KV cache page, in positions. Default: 64, 128 for an FP8 cache.")] = None,
    on_bad_line: Annotated[str, typer.Option(
        help="A prompts-file line that is not a request: stop (the results so far stay) or "
             "skip (say so and go on).")] = "stop",
    dense: Annotated[bool, typer.Option("--dense", help="Run with every KV group selected.")] = False,
    device: DeviceOpt = "auto",
    json_out: Annotated[Path | None, typer.Option(
        "--json", help="Write the run's numbers (and, without --output, its outputs) as JSON.")
    ] = None,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Generation on an engine: requests stream through a fixed set of decode slots, each slot
    refilled as soon as its request finishes (continuous batching over a paged KV cache).

    Examples:

      polarc run smollm2.plan --prompt "The capital of Germany is"

      polarc run smollm2.plan --prompts requests.jsonl --output results.jsonl

      polarc run smollm2.plan --prompts prompts.txt --batch 8 --dense --json run.json
    """
    from polarc.format.engine_file import load_engine

    with user_errors():
        check_positive(max_new_tokens=max_new_tokens, batch=batch, prefill_chunk=prefill_chunk,
                       page_size=page_size)
        fit_default = max_new_tokens is None
        max_new_tokens = DEFAULT_MAX_TOKENS if fit_default else max_new_tokens
        check_finite(temperature=temperature, top_p=top_p)
        if temperature < 0 or not 0 < top_p <= 1:
            raise PolarcError("--temperature must be >= 0 and --top-p in (0, 1]")
        if on_bad_line not in ("stop", "skip"):
            raise PolarcError(f"--on-bad-line must be stop or skip, got {on_bad_line!r}")
        if prompt and prompts:
            raise PolarcError("give --prompt or --prompts, not both")
        inputs = existing_inputs(engine, prompts)
        if output is not None:  # an existing one is continued, not replaced
            check_output(output, force=True, inputs=inputs)
        if json_out is not None:
            check_output(json_out, force=force, inputs=(*inputs, output))
        defaults = Defaults(max_new_tokens, temperature, top_p, seed)
        texts: list[str] = []
        if prompts is not None:
            source = read_requests(prompts, defaults)
            first = next(source, None)
            if first is None:
                raise PolarcError(f"prompts file {prompts} has no prompts",
                                  hint="one prompt per line, or one JSON request per line")
            source = _chain(first, source)
        else:
            texts = list(prompt or []) or DEMO_PROMPTS
            source = iter([{"id": i, "prompt": t, "stop": (), **defaults.__dict__}
                           for i, t in enumerate(texts, 1)])
        dev = resolve_device(device)
        eng = load_engine(engine, device=dev)
        limit = eng.limits["max_batch"]
        if batch is not None and batch > limit:
            raise PolarcError(f"--batch {batch} exceeds the engine's max batch {limit}",
                              hint="rebuild with a larger --max-batch")
        if eng.backend == "tensorrt":
            _run_tensorrt(eng, dev, source, batch=batch or min(total_hint(prompts, texts), limit),
                          max_new_tokens=max_new_tokens, dense=dense,
                          skip_bad=on_bad_line == "skip")
            return
        job = _Job(eng, dev, batch=batch if batch is not None else (
            None if prompts is not None else min(len(texts), limit)), dense=dense,
            prefill_chunk=prefill_chunk, page_size=page_size, quiet=quiet,
            fit_default=fit_default)
        total = total_hint(prompts, texts)
        try:
            summary = job.run(source, total=total, output=output, force=force, inputs=inputs,
                              skip_bad=on_bad_line == "skip", keep=json_out is not None and
                              output is None)
        except KeyboardInterrupt as exc:
            if output is None:
                raise
            from polarc.console import Terminated

            err.print(f"{'Terminated' if isinstance(exc, Terminated) else 'Interrupted'}: the "
                      f"finished requests are in {output}; the same command goes on from there.",
                      markup=False, highlight=False)
            raise typer.Exit(143 if isinstance(exc, Terminated) else 130) from None
        if json_out is not None:
            write_json(json_out, summary, force=force, inputs=inputs)
        if summary["failed"]:
            raise PolarcError(f"{summary['failed']} of {summary['done'] + summary['failed']} "
                              "requests failed" + (f" (their errors are in {output})"
                                                   if output is not None else ""))


def total_hint(prompts: Path | None, texts: list[str] | None) -> int:
    return _count(prompts) if prompts is not None else len(texts or [])


def _run_tensorrt(eng: Any, dev: Any, source: Iterator[dict[str, Any] | BadLine], *, batch: int,
                  max_new_tokens: int, dense: bool, skip_bad: bool) -> None:
    """A TensorRT engine: its plans have a static cache and no scheduler, so the prompts go in
    chunks of `batch`, each chunk to its end (the generation loop of `runtime.generate`)."""
    from polarc.runtime.generate import run_prompts

    items = []
    for item in source:
        if isinstance(item, BadLine):
            if not skip_bad:
                raise PolarcError(f"{item.where}: {item.why}")
            continue
        items.append(item)
    tok = eng.model.tokenizer
    first = items[0]
    outputs, _ = run_prompts(eng, [tok.encode(i["prompt"]) for i in items], batch=batch,
                             max_new_tokens=max_new_tokens, temperature=first["temperature"],
                             top_p=first["top_p"], seed=first["seed"], dense=dense, device=dev)
    for item, ids in zip(items, outputs, strict=True):
        out.print(f"[bold]{escape(item['prompt'])}[/bold]{escape(tok.decode(ids))}",
                  highlight=False)


def _chain(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest


def _count(path: Path) -> int:
    """Non-empty lines of the prompts file (for the progress bar), read as it goes."""
    return sum(1 for _, line in _text_lines(path) if line.strip())


def make_scheduler(eng: Any, dev: Any, *, batch: int | None, dense: bool,
                   prefill_chunk: int | None, page_size: int | None, detokenize: bool = False
                   ) -> Any:
    """The runtime and its scheduler for `polarc run` and `polarc serve`: `batch` slots
    (default: as many as memory holds at the engine's max sequence, up to its max batch),
    pages for a full sequence in every slot where memory allows (fewer otherwise: requests
    then wait for pages), prefill packs of `prefill_chunk` tokens (2048 on a GPU, 256 on a
    CPU), pages of `page_size` positions (default: `kv_cache.default_page_size`)."""
    from polarc.runtime.kv_cache import (
        cache_dtype,
        check_fits,
        default_page_size,
        page_bytes,
        pages_for,
        pages_that_fit,
        sink_dtype,
    )
    from polarc.runtime.scheduler import Scheduler
    from polarc.runtime.torch_runtime import Runtime

    spec, max_seq = eng.model.spec, eng.limits["max_seq"]
    kv_dtype, sinks = cache_dtype(eng), sink_dtype(eng)
    page_size = page_size or default_page_size(kv_dtype)
    per_row = pages_for(max_seq, page_size)
    fits = pages_that_fit(spec, page_size, kv_dtype, dev, sinks=sinks)
    slots = batch if batch is not None else max(1, min(eng.limits["max_batch"], fits // per_row))
    if slots > eng.limits["max_batch"]:
        raise PolarcError(f"--batch {slots} exceeds the engine's max batch "
                          f"{eng.limits['max_batch']}", hint="rebuild with a larger --max-batch")
    # Slots beyond what fits at the max sequence are fine (requests wait for pages), but
    # each slot needs room for one page at least.
    check_fits(spec, slots, page_size, kv_dtype, dev, sinks=sinks,
               what=f"batch {slots} (a page of {page_size} positions per slot at least)",
               hint=lambda n: f"the largest batch that fits is {n}")
    pages = min(slots * per_row, fits)
    if pages < 1:
        need = page_bytes(spec, page_size, kv_dtype, sinks) / 2**20
        raise PolarcError(f"no room for a KV cache on {dev.type}: one page of {page_size} "
                          f"positions needs {need:.1f} MiB")
    runtime = Runtime(eng, batch=slots, dense=dense, device=dev, page_size=page_size,
                      pages=pages)
    if prefill_chunk is None:
        prefill_chunk = 2048 if dev.type == "cuda" else 256
    return Scheduler(runtime, prefill_chunk=prefill_chunk, detokenize=detokenize)


class _Job:
    """One `polarc run`: the runtime, its scheduler, and where results go."""

    def __init__(self, eng: Any, dev: Any, *, batch: int | None, dense: bool,
                 prefill_chunk: int | None, page_size: int | None, quiet: bool,
                 fit_default: bool
                 ) -> None:
        self.eng, self.dev, self.quiet = eng, dev, quiet
        self.scheduler = make_scheduler(eng, dev, batch=batch, dense=dense,
                                        prefill_chunk=prefill_chunk, page_size=page_size)
        self.runtime = self.scheduler.runtime
        self.dense = dense
        self.fit_default = fit_default  # the default max tokens: cut to what the prompt leaves

    def run(self, source: Iterator[dict[str, Any] | BadLine], *, total: int,
            output: Path | None, force: bool, inputs: tuple[Path, ...], skip_bad: bool,
            keep: bool) -> dict[str, Any]:
        from polarc.runtime.scheduler import Request, drive

        tok = self.eng.model.tokenizer
        sched = self.scheduler
        kept: list[dict[str, Any]] = []
        results = {"done": 0, "failed": 0, "skipped": 0, "bad_lines": 0}
        prompts: dict[int, str] = {}  # id(request) -> its text, while it runs
        t0 = time.perf_counter()
        with appending(output, force=force, inputs=inputs) as (sink, done), \
                progress(self.quiet) as bar:
            task = bar.add_task("requests", total=max(0, total - len(done)))
            self._say(f"{self.runtime.batch} slots, {self.runtime.cache.pages_free} KV pages "
                      f"of {self.runtime.cache.page_size} positions on {self.dev.type}"
                      + (f"; {len(done)} requests already in {output}" if done else ""))

            def finish(record: dict[str, Any]) -> None:
                if sink is not None:
                    sink.write(json.dumps(record, ensure_ascii=False) + "\n")
                    sink.flush()
                else:
                    self._print(record)
                if keep:
                    kept.append(record)
                results["failed" if "error" in record else "done"] += 1
                bar.advance(task)
                elapsed = time.perf_counter() - t0
                bar.update(task, description=f"{sched.stats.output_tokens / elapsed:,.0f} tok/s")

            def requests() -> Iterator[Request]:
                for item in source:
                    if isinstance(item, BadLine):
                        if not skip_bad:
                            raise PolarcError(f"{item.where}: {item.why}",
                                              hint="fix the line, or pass --on-bad-line skip; "
                                                   "the results so far are kept")
                        results["bad_lines"] += 1
                        err.print(f"skipped {item.where}: {item.why}", markup=False,
                                  highlight=False, soft_wrap=True)
                        continue
                    if json.dumps(item["id"]) in done:
                        results["skipped"] += 1
                        continue
                    ids = tok.encode(item["prompt"]) or [tok.eos_id or 0]
                    most = item["max_tokens"]
                    if self.fit_default and item.get("default_max_tokens", True):
                        most = max(1, min(most, self.runtime.max_seq - len(ids)))
                    req = Request(prompt=ids, max_tokens=most, id=item["id"],
                                  temperature=item["temperature"], top_p=item["top_p"],
                                  seed=item["seed"], stop=item["stop"])
                    prompts[id(req)] = item["prompt"]
                    yield req

            for ev in drive(sched, requests(), max_waiting=2 * self.runtime.batch):
                if ev.finish_reason is None:
                    continue
                text = prompts.pop(id(ev.request), "")
                record: dict[str, Any] = {"id": ev.request.id}
                if ev.error is not None:
                    record["error"] = ev.error
                else:
                    record.update(completion=ev.output_text, tokens=len(ev.tokens),
                                  prompt_tokens=len(ev.request.prompt),
                                  finish_reason=ev.finish_reason)
                if sink is None or keep:
                    record["prompt"] = text
                finish(record)
        elapsed = time.perf_counter() - t0
        stats = sched.stats.summary(self.runtime.batch)
        density = 1.0 if self.dense else kv_density(self.eng.k_per_layer,
                                                     self.eng.model.spec.n_kv_heads)
        summary = {**results, **stats, "seconds": elapsed,
                   "output_tokens_per_s": stats["output_tokens"] / elapsed if elapsed else 0.0,
                   "prefill_tokens_per_s": stats["prompt_tokens"] / stats["prefill_s"]
                   if stats["prefill_s"] else 0.0,
                   "decode_tokens_per_s": stats["output_tokens"] / stats["decode_s"]
                   if stats["decode_s"] else 0.0,
                   "kv_density": density, "device": self.dev.type, "dense": self.dense}
        if keep:
            summary["outputs"] = kept
        out.print(f"{results['done']} requests done, {results['failed']} failed"
                  + (f", {results['skipped']} already done" if results["skipped"] else "")
                  + (f", {results['bad_lines']} bad lines skipped" if results["bad_lines"] else "")
                  + f"; {summary['output_tokens_per_s']:.1f} output tok/s, prefill "
                  f"{summary['prefill_tokens_per_s']:.1f} tok/s, mean live batch "
                  f"{stats['mean_live_batch']:.1f} of {self.runtime.batch}; KV density "
                  f"{density:.3f} ({'dense' if self.dense else 'engine plan'}); {self.dev.type}",
                  highlight=False, markup=False)
        return summary

    def _say(self, text: str) -> None:
        if not self.quiet:
            err.print(text, markup=False, highlight=False)

    def _print(self, record: dict[str, Any]) -> None:
        if "error" in record:
            err.print(f"request {record['id']}: {record['error']}", markup=False,
                      highlight=False, soft_wrap=True)
            return
        out.print(f"[bold]{escape(record['prompt'])}[/bold]{escape(record['completion'])}",
                  highlight=False)
