"""Continuous batching: a stream of requests through a fixed set of decode slots over the paged
KV cache, each slot refilled as soon as its request finishes.

One iteration (`Scheduler.step`):

1. **Admit**: while a slot is free, the request at the head of the queue takes it if the pages
   it can ever need (prompt + max_tokens positions) can be promised beside what the running
   requests were promised; otherwise it waits. Pages are handed out as a sequence grows, but
   a running request never finds none left.
2. **Prefill**: requests whose prompt is not yet in the cache advance by whole chunks, oldest
   first: one pack per iteration, as many chunks as fit `prefill_chunk` (C) tokens, run as one
   forward padded to C tokens (several short prompts share the weight reads and the host's
   launch work; the matrix products always have the same shape), so a long prompt is spread
   over several iterations and never stalls the decode steps of the others. Chunk c of a
   prompt is always its tokens c·C .. (c+1)·C - 1, and each chunk's attention is its own
   call, whatever else is queued. A request whose last chunk is done samples its first token
   and joins the decode steps.
3. **Decode**: one step over every slot. Steps always run at the slot count (slots that hold
   no decoding sequence write and read nothing), so a row's arithmetic never depends on how
   many other requests run or which: greedy output is token for token the same alone or in a
   crowd, and sampling draws from each request's own seed (`sampling.sample`). On a GPU an
   idle slot costs little (a step reads the weights once for all rows; an idle row reads no
   KV). Requests that finish (EOS or a stop token, a stop string, max_tokens) leave at once:
   their pages go back and their slot takes the next request in the same iteration.

Each new token is handed out as an `Event` when it is made (`step` returns them), so a caller
can stream. A request that fails (its prompt too long, say) gets an error event and touches
nothing else. Not batch-independent by design: ReLU (OPT) engines whose MLP keeps the neurons
the whole batch needs.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from polarc.runtime.kv_cache import pages_for
from polarc.runtime.sampling import sample
from polarc.runtime.torch_runtime import Runtime


class RequestError(ValueError):
    """A request that cannot run (its own fault); others are not affected."""


@dataclass
class Request:
    prompt: list[int]
    max_tokens: int
    id: str = ""
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()  # stop strings: the output ends before the first one
    stop_ids: tuple[int, ...] = ()  # tokens that end the output (besides EOS)
    ignore_eos: bool = False


@dataclass
class Event:
    """What happened to a request in one iteration: a new token (and its text, when the
    scheduler detokenizes), and/or its end. The last event of a request has a
    `finish_reason` and, unless it failed, the whole output (`tokens`, and `output_text`:
    the text, cut before a stop string)."""

    request: Request
    token: int | None = None
    text: str = ""
    finish_reason: str | None = None  # "stop", "length", "error", "cancelled"
    error: str | None = None
    tokens: list[int] | None = None
    output_text: str | None = None


class _Detokenizer:
    """Text of an output as it grows: each new token's text, once it is whole (a token that
    ends inside a multi-byte character waits for the next). Decodes a short window, not the
    whole output, per token."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.prefix = 0
        self.read = 0
        self.text = ""

    def add(self, token: int) -> str:
        if not self.tokenizer.adds_text(token):
            # Not in the window: a random engine's outputs are mostly ids its byte tokenizer
            # has no byte for, and a window that grew with each made every decode cost the
            # whole output (decode drops such ids, so leaving them out changes no text).
            return ""
        self.tokens.append(token)
        before = self.tokenizer.decode(self.tokens[self.prefix:self.read])
        now = self.tokenizer.decode(self.tokens[self.prefix:])
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""
        delta = now[len(before):]
        self.prefix, self.read = self.read, len(self.tokens)
        self.text += delta
        return delta


@dataclass
class _Running:
    request: Request
    slot: int
    promised: int  # pages promised at admission, not yet handed out
    prefilled: int = 0  # prompt positions in the cache
    tokens: list[int] = field(default_factory=list)
    detok: _Detokenizer | None = None
    text_sent: int = 0  # characters of detok.text handed out (stop strings may hold some back)
    cut: int | None = None  # where a stop string begins in detok.text

    @property
    def decoding(self) -> bool:
        return self.prefilled == len(self.request.prompt)


@dataclass
class SchedulerStats:
    steps: int = 0
    busy_steps: int = 0  # decode steps taken while requests were waiting
    busy_rows: int = 0  # decoding rows summed over those steps
    rows: int = 0  # decoding rows summed over all steps
    context: int = 0  # their lengths summed over all steps
    prompt_tokens: int = 0
    output_tokens: int = 0
    finished: int = 0
    failed: int = 0
    peak_pages: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    recent_step_ms: deque = field(default_factory=lambda: deque(maxlen=10_000))

    def summary(self, slots: int) -> dict[str, float]:
        steps = sorted(self.recent_step_ms)
        return {
            "slots": slots,
            "decode_steps": self.steps,
            "mean_live_batch": self.rows / self.steps if self.steps else 0.0,
            "mean_context": self.context / self.rows if self.rows else 0.0,
            "slot_occupancy_while_queued": (self.busy_rows / (self.busy_steps * slots)
                                            if self.busy_steps else float("nan")),
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
            "requests_finished": self.finished,
            "requests_failed": self.failed,
            "peak_kv_pages": self.peak_pages,
            "prefill_s": self.prefill_s,
            "decode_s": self.decode_s,
            "step_ms_median": steps[len(steps) // 2] if steps else 0.0,
        }


class Scheduler:
    """Requests through `runtime`'s slots (module docstring). `detokenize`: events carry text,
    and stop strings are honoured (always on for requests that have stop strings)."""

    def __init__(self, runtime: Runtime, *, prefill_chunk: int = 2048,
                 detokenize: bool = False) -> None:
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be positive, got {prefill_chunk}")
        self.runtime = runtime
        self.cache = runtime.cache
        self.tokenizer = runtime.model.tokenizer
        self.eos = self.tokenizer.eos_id
        self.prefill_chunk = prefill_chunk
        self.detokenize = detokenize
        self.slots: list[_Running | None] = [None] * runtime.batch
        self.waiting: deque[Request] = deque()
        self.promised = 0  # pages promised to running requests and not yet handed out
        self.cancelled: set[int] = set()  # id() of requests to drop at the next step
        self.stats = SchedulerStats()
        self._order: list[_Running] = []  # running requests, oldest first
        # Called when the host is about to wait for the device's results (the device is busy
        # with this step): a server hands out the last step's tokens then, so that its HTTP
        # work, which shares the interpreter lock, runs in the device's time and not in the
        # host work that prepares the next step.
        self.before_wait: Callable[[], None] = _nothing

    # ------------------------------------------------------------------ requests

    def pages_needed(self, request: Request) -> int:
        return pages_for(len(request.prompt) + request.max_tokens, self.cache.page_size)

    def check(self, request: Request) -> None:
        """Raise `RequestError` (one line) for a request that can never run here."""
        limit = self.runtime.max_seq
        n = len(request.prompt)
        if n == 0:
            raise RequestError("the prompt is empty")
        if request.max_tokens < 1:
            raise RequestError(f"max_tokens must be at least 1, got {request.max_tokens}")
        if n + request.max_tokens > limit:
            raise RequestError(f"the prompt ({n} tokens) and max_tokens ({request.max_tokens}) "
                               f"exceed the engine's max sequence of {limit} tokens")
        if not request.temperature >= 0 or not 0 < request.top_p <= 1:
            raise RequestError("temperature must be >= 0 and top_p in (0, 1]")
        total = self.cache.pages_free + self.cache.pages_used
        if self.pages_needed(request) > total:
            raise RequestError(f"the request needs {self.pages_needed(request)} KV pages, the "
                               f"cache has {total}")

    def submit(self, request: Request) -> None:
        """Queue a request (checked first: `RequestError` if it can never run)."""
        self.check(request)
        self.waiting.append(request)

    def cancel(self, request: Request) -> None:
        """Drop a request at the next step, waiting or running (its slot and pages free)."""
        self.cancelled.add(id(request))

    @property
    def running(self) -> int:
        return len(self._order)

    @property
    def idle(self) -> bool:
        return not self.waiting and not self._order

    @torch.no_grad()
    def warm_up(self) -> None:
        """Pay now what the first requests would otherwise wait for: the decode step's
        capture (kernels compiled and loaded, a CUDA graph) and a prefill pack of each kind
        (a prompt's first chunk, and a later chunk that reads earlier pages). Only before any
        request; the cache is left empty and nothing is counted."""
        if not self.idle:
            raise RuntimeError("warm_up runs before any request")
        self.runtime.capture()
        room = self.cache.pages_free * self.cache.page_size  # idle: nothing promised
        n = min(self.prefill_chunk, self.runtime.max_seq, room) - 1
        if n < 1:
            return
        try:
            self.cache.grow(0, n + 1)
            self.runtime.prefill_pack([(0, [self.eos] * n, 0)], width=self.prefill_chunk)
            self.runtime.prefill_pack([(0, [self.eos], n)], width=self.prefill_chunk)
            if self.runtime.device.type == "cuda":
                torch.cuda.synchronize(self.runtime.device)
        finally:
            self.cache.free(0)

    # ------------------------------------------------------------------ one iteration

    @torch.no_grad()
    def step(self) -> list[Event]:
        events: list[Event] = []
        self._drop_cancelled(events)
        self._admit()
        self._prefill(events)
        self._decode(events)
        self.stats.peak_pages = max(self.stats.peak_pages, self.cache.pages_used)
        return events

    def _drop_cancelled(self, events: list[Event]) -> None:
        if not self.cancelled:
            return
        for req in [r for r in self.waiting if id(r) in self.cancelled]:
            self.waiting.remove(req)
            events.append(Event(req, finish_reason="cancelled"))
        for run in [r for r in self._order if id(r.request) in self.cancelled]:
            self._retire(run, events, "cancelled")
        self.cancelled.clear()

    def _admit(self) -> None:
        free = [s for s, r in enumerate(self.slots) if r is None]
        while free and self.waiting:
            req = self.waiting[0]
            need = self.pages_needed(req)
            if need > self.cache.pages_free - self.promised:
                break  # it waits for pages; so do those behind it (first come, first served)
            self.waiting.popleft()
            run = _Running(req, free.pop(0), promised=need)
            if self.detokenize or req.stop:
                run.detok = _Detokenizer(self.tokenizer)
            self.promised += need
            self.slots[run.slot] = run
            self._order.append(run)

    def _grow(self, run: _Running, positions: int) -> None:
        before = len(self.cache.slot_pages[run.slot])
        self.cache.grow(run.slot, positions)
        given = len(self.cache.slot_pages[run.slot]) - before
        run.promised -= given
        self.promised -= given

    def _prefill(self, events: list[Event]) -> None:
        """One pack: the next whole chunk of each request still prefilling, oldest first, as
        many as fit `prefill_chunk` tokens, run as one forward padded to that width (so a
        chunk's arithmetic never depends on its company); the requests whose prompt is done
        sample their first token and join the decode steps."""
        t0 = time.perf_counter()
        room = self.prefill_chunk
        pack: list[tuple[_Running, int]] = []
        for run in [r for r in self._order if not r.decoding]:
            prompt, start = run.request.prompt, run.prefilled
            stop = min(len(prompt), (start // self.prefill_chunk + 1) * self.prefill_chunk)
            if stop - start > room:
                continue  # a whole chunk or nothing: boundaries never depend on company
            try:
                self._grow(run, stop)
            except (RuntimeError, ValueError) as exc:
                self._retire(run, events, "error", error=f"prefill failed: {exc}")
                continue
            pack.append((run, stop))
            room -= stop - start
            if room == 0:
                break
        if not pack:
            return
        chunks = [(run.slot, run.request.prompt[run.prefilled:stop], run.prefilled)
                  for run, stop in pack]
        try:
            logits = self.runtime.prefill_pack(chunks, width=self.prefill_chunk)
        except (RuntimeError, ValueError) as exc:
            for run, _ in pack:
                self._retire(run, events, "error", error=f"prefill failed: {exc}")
            return
        ready = []
        for (run, stop), row in zip(pack, logits, strict=True):
            self.stats.prompt_tokens += stop - run.prefilled
            run.prefilled = stop
            if run.decoding:
                ready.append((run, row))
        if ready:
            firsts = self._sample(torch.stack([row for _, row in ready]), [r for r, _ in ready])
            for (run, _), token in zip(ready, firsts, strict=True):
                self.cache.set_length(run.slot, len(run.request.prompt))
                self._emit(run, token, events)
        self._sync()
        if not ready and self.runtime.device.type == "cuda":
            # A pack that completes no prompt samples nothing, so nothing waited for it: the
            # next decode step would (and its time would count prefill work as decoding).
            self.before_wait()
            torch.cuda.synchronize(self.runtime.device)
        self.stats.prefill_s += time.perf_counter() - t0

    def _decode(self, events: list[Event]) -> None:
        by_slot = [r if r is not None and r.decoding else None for r in self.slots]
        rows = [r for r in by_slot if r is not None]  # in slot order (slots[i].slot == i)
        if not rows:
            return
        t0 = time.perf_counter()
        tokens = [0] * len(self.slots)  # a list, one tensor made of it: per-row tensor
        for run in rows:  # writes cost more than the rest of this loop together
            self._grow(run, self.cache.lengths[run.slot] + 1)
            tokens[run.slot] = run.tokens[-1]
        logits = self.runtime.step(torch.tensor(tokens, device=self.runtime.device))
        nxt = self._sample(logits, by_slot)
        self.stats.steps += 1
        self.stats.rows += len(rows)
        self.stats.context += sum(self.cache.lengths[r.slot] for r in rows)
        if self.waiting:
            self.stats.busy_steps += 1
            self.stats.busy_rows += len(rows)
        for run in rows:
            self._emit(run, int(nxt[run.slot]), events)
        took = time.perf_counter() - t0
        self.stats.decode_s += took
        self.stats.recent_step_ms.append(took * 1000)

    def _sample(self, logits: torch.Tensor, runs: list[_Running | None]) -> list[int]:
        """Next tokens for `runs` (row i of logits is run i's; None: an idle row)."""
        self.before_wait()
        dev = logits.device
        temp = [r.request.temperature if r is not None else 0.0 for r in runs]
        if not any(temp):
            return logits.argmax(-1).tolist()
        top_p = [r.request.top_p if r is not None else 1.0 for r in runs]
        seeds = [r.request.seed if r is not None else 0 for r in runs]
        counters = [len(r.tokens) if r is not None else 0 for r in runs]
        out = sample(logits, temperature=torch.tensor(temp, device=dev),
                     top_p=torch.tensor(top_p, device=dev),
                     seeds=torch.tensor(seeds, device=dev, dtype=torch.long),
                     counters=torch.tensor(counters, device=dev, dtype=torch.long))
        return out.tolist()

    def _emit(self, run: _Running, token: int, events: list[Event]) -> None:
        """Hand out `token` of `run`, and retire it if it ends there."""
        req = run.request
        if token in req.stop_ids or (token == self.eos and not req.ignore_eos):
            self._retire(run, events, "stop")
            return
        run.tokens.append(token)
        self.stats.output_tokens += 1
        text, finish = "", None
        if run.detok is not None:
            run.detok.add(token)
            text, finish = self._new_text(run)
        if finish is None and len(run.tokens) >= req.max_tokens:
            finish = "length"
        if finish is None:
            events.append(Event(req, token, text))
        else:
            self._retire(run, events, finish, token=token, text=text)

    def _new_text(self, run: _Running) -> tuple[str, str | None]:
        """The output's text not yet handed out, and "stop" where a stop string appeared
        (the text ends before it). Text that could be the start of a stop string waits."""
        full = run.detok.text
        stops = run.request.stop
        cut = min((i for i in (full.find(s, max(0, run.text_sent - len(s) + 1)) for s in stops)
                   if i >= 0), default=-1)
        if cut >= 0:
            text = full[run.text_sent:cut]
            run.text_sent = run.cut = cut
            return text, "stop"
        hold = max((len(s) - 1 for s in stops), default=0)
        safe = max(run.text_sent, len(full) - hold)
        text = full[run.text_sent:safe]
        run.text_sent = safe
        return text, None

    def _retire(self, run: _Running, events: list[Event], reason: str, *,
                token: int | None = None, text: str = "", error: str | None = None) -> None:
        """The request's last event (with its whole output), and its slot and pages freed."""
        whole = None
        if reason not in ("error", "cancelled"):
            whole = self.tokenizer.decode(run.tokens)
            if run.cut is not None:
                whole = run.detok.text[:run.cut]
            elif run.detok is not None:
                text += whole[run.text_sent:]  # what stop strings held back, and the tail
        events.append(Event(run.request, token, text, finish_reason=reason, error=error,
                            tokens=list(run.tokens), output_text=whole))
        self.cache.free(run.slot)
        self.promised -= run.promised
        self.slots[run.slot] = None
        self._order.remove(run)
        if reason == "error":
            self.stats.failed += 1
        else:
            self.stats.finished += 1

    def _sync(self) -> None:
        self.cache.sync()


def _nothing() -> None:
    pass


def drive(scheduler: Scheduler, requests: Iterator[Request], *, max_waiting: int
          ) -> Iterator[Event]:
    """Every event of `requests` through `scheduler`, pulling requests only while fewer than
    `max_waiting` wait (memory stays bounded whatever the source's length). A request that
    can never run comes out as its own error event."""
    pending = True
    while True:
        while pending and len(scheduler.waiting) < max_waiting:
            req = next(requests, None)
            if req is None:
                pending = False
                break
            try:
                scheduler.submit(req)
            except RequestError as exc:
                yield Event(req, finish_reason="error", error=str(exc))
        if scheduler.idle and not pending:
            return
        yield from scheduler.step()
