"""The generation loop, over any runtime that implements `DecodeRuntime` (the torch runtime,
the TensorRT runtime): prefill, then one decode step at a time until every row is done."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from polarc.errors import PolarcError
from polarc.format.engine_file import Engine
from polarc.models.load import Model
from polarc.runtime.sampling import sample


class DecodeRuntime(Protocol):
    """What a generation loop needs of a runtime. Rows are slots ``0 .. batch-1``."""

    model: Model
    device: torch.device
    batch: int
    max_seq: int

    def prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        """Fill slots ``0 .. len(prompts)-1`` with the prompts; last-position logits [B, V]."""

    def capture(self) -> None:
        """Prepare the decode step (CUDA graphs: capture; elsewhere nothing)."""

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append ``tokens [b]`` to the first b slots; next-token logits [b, V]."""

    def bucket_for(self, rows: int) -> int:
        """The batch size a step for `rows` live rows runs at (>= rows)."""

    def compact(self, live: list[int], bucket: int) -> None:
        """Move slots `live` to the front; the next steps run on the first `bucket`."""

    def release(self, slots: list[int]) -> None:
        """Slots whose rows finished: they keep their place and read nothing."""


@dataclass
class GenerationStats:
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_tokens: int = 0
    step_ms: list[float] = field(default_factory=list)

    @property
    def decode_s(self) -> float:
        return sum(self.step_ms) / 1000

    def add(self, other: GenerationStats) -> None:
        self.prefill_tokens += other.prefill_tokens
        self.prefill_s += other.prefill_s
        self.decode_tokens += other.decode_tokens
        self.step_ms += other.step_ms

    def summary(self) -> dict[str, float]:
        steps = sorted(self.step_ms)
        return {
            "prefill_tokens_per_s": self.prefill_tokens / self.prefill_s if self.prefill_s else 0.0,
            "decode_tokens_per_s": self.decode_tokens / self.decode_s if self.decode_s else 0.0,
            "step_ms_median": steps[len(steps) // 2] if steps else 0.0,
            "decode_steps": len(steps),
        }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate(runtime: DecodeRuntime, prompts: list[list[int]], *, max_new_tokens: int | list[int],
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             stop_at_eos: bool = True) -> tuple[list[list[int]], GenerationStats]:
    """Generate up to `max_new_tokens` per prompt (one for all, or each its own); rows stop
    at EOS or at their own limit independently. Prompt i
    samples with seed `seed + i` (`sampling.sample`).

    When rows finish, the live ones are compacted to the front as soon as they fit a smaller
    batch bucket, so finished rows stop costing compute; until then a finished row keeps its
    slot and reads nothing."""
    stats = GenerationStats()
    eos = runtime.model.tokenizer.eos_id if stop_at_eos else None
    dev = runtime.device
    _sync(dev)
    t0 = time.perf_counter()
    logits = runtime.prefill(prompts)
    _sync(dev)
    stats.prefill_s = time.perf_counter() - t0
    stats.prefill_tokens = sum(len(p) for p in prompts)
    runtime.capture()
    outputs: list[list[int]] = [[] for _ in prompts]
    slots: list[int | None] = list(range(len(prompts)))  # slot -> prompt (None: padding)
    done = [False] * len(prompts)
    limits = (max_new_tokens if isinstance(max_new_tokens, list)
              else [max_new_tokens] * len(prompts))
    steps = min(max(limits), runtime.max_seq - max(len(p) for p in prompts))
    for step in range(steps):
        n = len(slots)
        seeds = torch.tensor([seed + (r if r is not None else 0) for r in slots], device=dev)
        nxt = sample(logits, temperature=torch.full((n,), float(temperature), device=dev),
                     top_p=torch.full((n,), float(top_p), device=dev), seeds=seeds,
                     counters=torch.full((n,), step, device=dev)).cpu()
        for slot, row in enumerate(slots):
            if row is not None and not done[row]:
                outputs[row].append(int(nxt[slot]))
                done[row] = (eos is not None and int(nxt[slot]) == eos) or \
                    len(outputs[row]) >= limits[row]
        live = [slot for slot, row in enumerate(slots) if row is not None and not done[row]]
        if not live or step == steps - 1:
            break
        bucket = runtime.bucket_for(len(live))
        if bucket < len(slots):
            runtime.compact(live, bucket)
            slots = [slots[s] for s in live] + [None] * (bucket - len(live))
            nxt = torch.cat([nxt[live], nxt.new_zeros(bucket - len(live))])
        elif len(live) < len(slots):
            runtime.release([s for s in range(len(slots)) if s not in live])
        _sync(dev)
        t = time.perf_counter()
        logits = runtime.step(nxt.to(dev))
        _sync(dev)
        stats.step_ms.append((time.perf_counter() - t) * 1000)
        stats.decode_tokens += len(live)
    return outputs, stats


def open_runtime(engine: Engine, *, batch: int, dense: bool, device: torch.device
                 ) -> DecodeRuntime:
    """The runtime for `engine`'s backend."""
    if engine.backend == "tensorrt":
        from polarc.format.tensorrt import require_tensorrt
        from polarc.runtime.tensorrt_runtime import TensorRTRuntime

        require_tensorrt()
        if dense or device.type != "cuda":
            raise PolarcError("a TensorRT engine runs its built plan on a CUDA GPU",
                              hint="for --dense, build with --backend tensorrt --dense")
        return TensorRTRuntime(engine, batch=batch, device=device)
    from polarc.runtime.torch_runtime import Runtime

    return Runtime(engine, batch=batch, dense=dense, device=device)


def run_prompts(engine: Engine, prompts: list[list[int]], *, batch: int, max_new_tokens: int,
                temperature: float, top_p: float, seed: int, dense: bool,
                device: torch.device, on_chunk: Callable[[int], None] | None = None
                ) -> tuple[list[list[int]], GenerationStats]:
    """`prompts` in chunks of `batch` rows, each chunk generated to its end (`polarc run`)."""
    outputs: list[list[int]] = []
    stats = GenerationStats()
    runtime = None
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        if runtime is None or runtime.batch != len(chunk):
            runtime = None  # free the last chunk's cache before making another
            runtime = open_runtime(engine, batch=len(chunk), dense=dense, device=device)
        if on_chunk is not None:
            on_chunk(len(chunk))
        outs, chunk_stats = generate(runtime, chunk,
                                     max_new_tokens=min(max_new_tokens, runtime.max_seq - 1),
                                     temperature=temperature, top_p=top_p, seed=seed)
        outputs += outs
        stats.add(chunk_stats)
    return outputs, stats
