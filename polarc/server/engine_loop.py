"""The scheduler on its own thread, for a server: HTTP handlers submit requests and read their
events from asyncio queues; the thread runs iterations whenever there is work, so handling
HTTP never stalls the GPU and a slow client never stalls a step.

Everything the scheduler owns is touched by the loop thread alone: submissions and
cancellations reach it through a thread-safe command queue, events go back through the
handlers' event loop (`call_soon_threadsafe`). Metrics (Prometheus) are updated by the thread
as it goes.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import threading
import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from polarc.runtime.scheduler import Event, Request, RequestError, Scheduler

# Latency buckets (seconds): time to first token spans prefill queues, inter-token latency
# one decode step.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)
ITL_BUCKETS = (0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5)


class QueueFull(RuntimeError):
    """More requests wait than the server takes; the client should come back later."""


class Draining(RuntimeError):
    """The server is shutting down and takes no new requests."""


@dataclass
class Stream:
    """One request's events, as the loop thread makes them."""

    request: Request
    events: asyncio.Queue
    submitted: float = field(default_factory=time.perf_counter)
    last_token: float | None = None


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.running = Gauge("polarc_requests_running", "Requests in a decode slot", registry=r)
        self.waiting = Gauge("polarc_requests_waiting", "Requests queued for a slot", registry=r)
        self.occupancy = Gauge("polarc_slot_occupancy", "Share of decode slots in use", registry=r)
        self.kv_pages = Gauge("polarc_kv_pages_used", "KV cache pages in use", registry=r)
        self.kv_pages_total = Gauge("polarc_kv_pages_total", "KV cache pages", registry=r)
        self.tokens_per_s = Gauge("polarc_generation_tokens_per_second",
                                  "Output tokens per second over the last 10 s", registry=r)
        self.output_tokens = Counter("polarc_generation_tokens", "Output tokens made",
                                     registry=r)
        self.prompt_tokens = Counter("polarc_prompt_tokens", "Prompt tokens prefilled",
                                     registry=r)
        # Where the engine thread's time goes: next to the wall time these tell a slow
        # server (steps slower than offline) from a starved one (the thread waiting for work).
        self.prefill_seconds = Counter("polarc_prefill_seconds", "Time spent prefilling",
                                       registry=r)
        self.decode_seconds = Counter("polarc_decode_seconds", "Time spent in decode steps",
                                      registry=r)
        self.decode_steps = Counter("polarc_decode_steps", "Decode steps run", registry=r)
        self.requests = Counter("polarc_requests", "Requests that ended, by how",
                                ["finish_reason"], registry=r)
        self.rejected = Counter("polarc_requests_rejected", "Requests refused, by why",
                                ["reason"], registry=r)
        self.ttft = Histogram("polarc_time_to_first_token_seconds", "Time to first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("polarc_inter_token_latency_seconds", "Time between tokens",
                             buckets=ITL_BUCKETS, registry=r)


class EngineLoop:
    """`scheduler` run by a thread of its own; at most `max_waiting` requests queue."""

    def __init__(self, scheduler: Scheduler, *, max_waiting: int) -> None:
        self.scheduler = scheduler
        self.max_waiting = max_waiting
        self.metrics = Metrics()
        self.metrics.kv_pages_total.set(scheduler.cache.pages_free + scheduler.cache.pages_used)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[int, tuple[Stream, asyncio.AbstractEventLoop]] = {}
        self._pending = 0  # submitted, not yet taken by the thread
        self._lock = threading.Lock()
        self._draining = False
        self._stop = threading.Event()
        self._recent: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens)
        self._recent_tokens = 0  # summed over _recent
        self._seen: dict[Counter, float] = {}  # scheduler totals already counted
        self._held: list[Event] = []  # the last step's events, not yet handed out
        self.thread = threading.Thread(target=self._run, name="polarc-engine", daemon=True)
        self.error: BaseException | None = None

    # ---------------------------------------------------------------- handler side

    def start(self) -> None:
        self.thread.start()

    def submit(self, request: Request) -> Stream:
        """Queue `request` (checked first: `RequestError`); its events arrive on the stream.
        `QueueFull` when too many wait, `Draining` once shutdown began."""
        if self._draining:
            self.metrics.rejected.labels("draining").inc()
            raise Draining("the server is shutting down")
        self.scheduler.check(request)
        with self._lock:
            if self._pending + len(self.scheduler.waiting) >= self.max_waiting:
                self.metrics.rejected.labels("queue_full").inc()
                raise QueueFull(f"the server is at capacity ({self.max_waiting} requests "
                                "waiting); retry later")
            self._pending += 1
        stream = Stream(request, asyncio.Queue())
        self._commands.put(("submit", stream, asyncio.get_running_loop()))
        return stream

    def cancel(self, request: Request) -> None:
        """Drop a request (a client that went away): its slot and pages free at the next step."""
        self._commands.put(("cancel", request, None))

    def drain(self) -> None:
        """Take no new requests; the running ones go on."""
        self._draining = True

    @property
    def busy(self) -> bool:
        return bool(self._streams) or self._pending > 0

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._commands.put(("wake", None, None))
        self.thread.join(timeout)

    # ---------------------------------------------------------------- the thread

    def _run(self) -> None:
        sched = self.scheduler
        # A step's events go out while the device runs the next step (`before_wait`): the
        # handlers' work then overlaps the device's, not the host work before each launch.
        sched.before_wait = self._hand_out
        try:
            while not self._stop.is_set():
                self._take_commands(block=sched.idle)
                if sched.idle:
                    self._refresh()
                    continue
                events = sched.step()
                self._hand_out()  # the last step's, where this one never waited on the device
                self._refresh()  # before its events go out: a client sees its tokens counted
                self._held = events
                if sched.idle:
                    self._hand_out()
            self._hand_out()
        except BaseException as exc:  # the loop died: every open stream hears of it
            self.error = exc
            for stream, loop in list(self._streams.values()):
                loop.call_soon_threadsafe(stream.events.put_nowait, Event(
                    stream.request, finish_reason="error", error=f"engine failure: {exc}"))
            self._streams.clear()

    def _take_commands(self, *, block: bool) -> None:
        while True:
            try:
                kind, item, loop = self._commands.get(timeout=0.5) if block else \
                    self._commands.get_nowait()
            except queue.Empty:
                return
            block = False
            if kind == "submit":
                with self._lock:
                    self._pending -= 1
                try:
                    self.scheduler.submit(item.request)
                except RequestError as exc:
                    loop.call_soon_threadsafe(item.events.put_nowait, Event(
                        item.request, finish_reason="error", error=str(exc)))
                    continue
                self._streams[id(item.request)] = (item, loop)
            elif kind == "cancel":
                self.scheduler.cancel(item)

    def _hand_out(self) -> None:
        if self._held:
            events, self._held = self._held, []
            self._deliver(events)

    def _deliver(self, events: list[Event]) -> None:
        now = time.perf_counter()
        tokens = 0
        # One wake-up of each handlers' loop per step, not one per event: with a hundred rows
        # a step, per-event wake-ups kept the loop thread (and the GIL) busy.
        batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Event]]] = {}
        for ev in events:
            entry = self._streams.get(id(ev.request))
            if entry is None:
                continue
            stream, loop = entry
            if ev.token is not None:
                tokens += 1
                if stream.last_token is None:
                    self.metrics.ttft.observe(now - stream.submitted)
                else:
                    self.metrics.itl.observe(now - stream.last_token)
                stream.last_token = now
            if ev.finish_reason is not None:
                self.metrics.requests.labels(ev.finish_reason).inc()
                del self._streams[id(ev.request)]
            batches.setdefault(loop, []).append((stream.events, ev))
        self.metrics.output_tokens.inc(tokens)
        self._recent.append((now, tokens))
        self._recent_tokens += tokens
        for loop, batch in batches.items():
            loop.call_soon_threadsafe(_put_each, batch)

    def _refresh(self) -> None:
        sched, m = self.scheduler, self.metrics
        m.running.set(sched.running)
        m.waiting.set(len(sched.waiting))
        m.occupancy.set(sched.running / len(sched.slots))
        m.kv_pages.set(sched.cache.pages_used)
        now = time.perf_counter()
        while self._recent and now - self._recent[0][0] > 10.0:  # steps of the last 10 s
            self._recent_tokens -= self._recent.popleft()[1]
        span = now - self._recent[0][0] if self._recent else 0.0
        m.tokens_per_s.set(self._recent_tokens / span if span > 0 else 0.0)
        st = sched.stats
        for counter, total in ((m.prompt_tokens, st.prompt_tokens), (m.prefill_seconds,
                               st.prefill_s), (m.decode_seconds, st.decode_s),
                               (m.decode_steps, st.steps)):
            seen = self._seen.get(counter, 0)
            if total > seen:
                counter.inc(total - seen)
                self._seen[counter] = total


def _put_each(batch: list[tuple[asyncio.Queue, Event]]) -> None:
    for events, ev in batch:
        events.put_nowait(ev)
