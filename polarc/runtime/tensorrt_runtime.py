"""Generation on a TensorRT-backend engine: the same `generate` loop as the torch runtime,
with prefill and decode steps executed by the engine's two TensorRT plans.

Caches are torch CUDA tensors ``[B, Hkv, S_max, D]`` per layer, in two sets: a step reads
``past_*`` from one and writes ``present_*`` into the other, then they swap. Not executed in
polarc's development workplace (no TensorRT there); see exporters/tensorrt.py.
"""

from __future__ import annotations

import torch

from polarc.errors import PolarcError
from polarc.format.engine_file import DTYPES, Engine
from polarc.format.tensorrt import require_tensorrt


class TensorRTRuntime:
    """Runs an engine's TensorRT plans for `batch` rows (implements
    `polarc.runtime.generate.DecodeRuntime`)."""

    def __init__(self, engine: Engine, *, batch: int, device: str | torch.device = "cuda") -> None:
        trt = require_tensorrt()
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise PolarcError("a TensorRT engine runs on a CUDA GPU only")
        if batch > engine.limits["max_batch"]:
            raise PolarcError(f"batch {batch} exceeds the engine's --max-batch "
                              f"{engine.limits['max_batch']}")
        self.engine, self.model, self.batch = engine, engine.model, batch
        self.spec = spec = engine.model.spec
        self.max_seq = engine.limits["max_seq"]
        self.trt = trt
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.contexts = {}
        self._plans = {}
        for name in ("decode", "prefill"):
            plan = runtime.deserialize_cuda_engine(engine.plans[name])
            if plan is None:
                raise PolarcError(f"TensorRT could not load the {name} plan of {engine.path}",
                                  hint="rebuild it with this TensorRT version")
            self._plans[name] = plan
            self.contexts[name] = plan.create_execution_context()
        self.dtype = DTYPES[engine.manifest["dtype"]]
        shape = (batch, spec.n_kv_heads, self.max_seq, spec.head_dim)
        self.caches = [[torch.zeros(shape, dtype=self.dtype, device=self.device)
                        for _ in range(2 * spec.n_layers)] for _ in range(2)]
        self.current = 0
        self.seqlens = torch.zeros(batch, dtype=torch.int32, device=self.device)

    def capture(self) -> None:
        """TensorRT schedules its own kernels; nothing to capture."""

    def bucket_for(self, rows: int) -> int:
        """One bucket (the whole batch): finished rows keep their slot and read nothing."""
        return self.batch

    def compact(self, live: list[int], bucket: int) -> None:
        """Move slots `live` to the front (bucket_for never asks for it: one bucket)."""
        idx = torch.tensor(live, device=self.device)
        for cache in self.caches[self.current]:
            cache[: len(live)] = cache[idx]
        self.seqlens[: len(live)] = self.seqlens[idx]
        self.seqlens[len(live):bucket] = 0

    def release(self, slots: list[int]) -> None:
        if slots:
            self.seqlens[torch.tensor(slots, device=self.device)] = 0

    def _execute(self, name: str, inputs: dict[str, torch.Tensor],
                 outputs: dict[str, torch.Tensor]) -> None:
        ctx = self.contexts[name]
        for key, t in inputs.items():
            ctx.set_input_shape(key, tuple(t.shape))
            ctx.set_tensor_address(key, t.data_ptr())
        for key, t in outputs.items():
            ctx.set_tensor_address(key, t.data_ptr())
        if not ctx.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise PolarcError(f"TensorRT failed to run the {name} plan")

    def _kv_names(self, prefix: str) -> list[str]:
        return [f"{prefix}_{kind}_{i}" for i in range(self.spec.n_layers) for kind in ("key", "value")]

    @torch.no_grad()
    def prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        spec, last = self.spec, []
        caches = self.caches[self.current]
        for b, prompt in enumerate(prompts):
            if not 0 < len(prompt) < self.max_seq:
                raise PolarcError(f"prompt {b} has {len(prompt)} tokens; the engine allows 1 to "
                                  f"{self.max_seq - 1}")
            ids = torch.tensor([prompt], dtype=torch.long, device=self.device)
            logits = torch.empty(1, spec.vocab, dtype=self.dtype, device=self.device)
            kv = [torch.empty(1, spec.n_kv_heads, len(prompt), spec.head_dim, dtype=self.dtype,
                              device=self.device) for _ in caches]
            self._execute("prefill", {"input_ids": ids},
                          {"logits": logits, **dict(zip(self._kv_names("present"), kv, strict=True))})
            for cache, new in zip(caches, kv, strict=True):
                cache[b, :, : len(prompt)] = new[0]
            self.seqlens[b] = len(prompt)
            last.append(logits[0])
        return torch.stack(last)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        past, present = self.caches[self.current], self.caches[1 - self.current]
        logits = torch.empty(self.batch, self.spec.vocab, dtype=self.dtype, device=self.device)
        inputs = {"input_ids": tokens.view(-1, 1).long().contiguous(), "past_seqlens": self.seqlens,
                  **dict(zip(self._kv_names("past"), past, strict=True))}
        self._execute("decode", inputs,
                      {"logits": logits, **dict(zip(self._kv_names("present"), present, strict=True))})
        self.current = 1 - self.current
        self.seqlens += 1
        return logits
