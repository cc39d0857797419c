"""Batched generation on an engine: static KV cache, dense prefill, sparse decode steps.

Decode step, per layer: norm → router → top-k groups per row → q/k/v → rotary/positions →
KV write → selective attention → output projection → MLP. Dense is the same step with every
group selected (`dense=True`), so dense and sparse share one code path.

Cache layout: per layer K and V `[B, Hkv, S_max, D]`; `seqlens [B]` int32 counts each row's
valid positions. On CUDA the attention is the Triton selective kernel; elsewhere a plain-torch
version of the same function (full attention over the valid positions, unselected groups
zeroed), so the embedded default runs on a CPU-only machine.
"""

from __future__ import annotations

import functools
import math
import os
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from polarc.errors import PolarcError
from polarc.models.forward import apply_rope, embed, final_logits, linear, norm, run_layer
from polarc.runtime.engine import Engine


def attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    seqlens: torch.Tensor, groups: torch.Tensor, scale: float) -> torch.Tensor:
    """Selective attention as plain torch (same contract as plugins.selective_attention)."""
    B, hq, D = q.shape
    hkv = k_cache.shape[1]
    s = int(seqlens.max().item())
    k, v = k_cache[:, :, :s].float(), v_cache[:, :, :s].float()
    qg = q.float().view(B, hkv, hq // hkv, D)
    scores = torch.einsum("bhgd,bhsd->bhgs", qg, k) * scale
    valid = torch.arange(s, device=q.device)[None, :] < seqlens[:, None]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    o = torch.einsum("bhgs,bhsd->bhgd", p, v)
    keep = torch.zeros(B, hkv, dtype=torch.bool, device=q.device).scatter_(1, groups.long(), True)
    return (o * keep[:, :, None, None]).reshape(B, hq, D).to(q.dtype)


def add_rms_norm(h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(h + delta, rms_norm(h + delta)): the residual add and the next norm, one pass."""
    h = h + delta
    hf = h.float()
    return h, weight * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)


def rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


def swiglu(gate_up: torch.Tensor, f: int) -> torch.Tensor:
    return F.silu(gate_up[:, :f]) * gate_up[:, f:]


def _elementwise_fns(device: torch.device) -> tuple:
    """The decode step's small element-wise stages; on CUDA each is compiled into one kernel
    (dozens of tiny launches per layer otherwise add up to milliseconds per step)."""
    fns = (add_rms_norm, rope_qk, swiglu)
    if device.type != "cuda" or os.environ.get("POLARC_NO_COMPILE") == "1":
        return fns
    return tuple(torch.compile(fn, fullgraph=True, dynamic=False) for fn in fns)


SPARSE_MLP_MAX_DENSITY = 0.6  # above it the gathered GEMM pair is no faster than dense cuBLAS


def _gemm_fns(device: torch.device) -> tuple:
    if device.type == "cuda":
        from polarc.plugins import selective_gemm_down, selective_gemm_up

        return (functools.partial(selective_gemm_up, check_indices=False),
                functools.partial(selective_gemm_down, check_indices=False))
    from polarc.plugins.selective_gemm import (
        selective_gemm_down_reference,
        selective_gemm_up_reference,
    )

    return selective_gemm_up_reference, selective_gemm_down_reference


def _attention_fn(device: torch.device):
    if device.type == "cuda":
        from polarc.plugins import selective_attention

        def fn(q, kc, vc, lens, groups, scale):
            return selective_attention(q, kc, vc, lens, groups, scale, check_indices=False)
        return fn
    return attention_torch


def _topk_fn(device: torch.device):
    """Top-k groups per row as int32: one Triton launch on CUDA (torch.topk + cast is several
    tiny kernels per layer), torch elsewhere."""
    if device.type == "cuda":
        from polarc.plugins.topk_groups import topk_groups

        return topk_groups
    return lambda scores, k: scores.topk(k, dim=-1).indices.to(torch.int32)


def _write_kv_fn(device: torch.device):
    """Append a token's K and V: one Triton launch on CUDA, indexed assignment elsewhere."""
    if device.type == "cuda":
        from polarc.plugins.kv_write import write_kv

        return write_kv

    def write(k, v, k_cache, v_cache, positions):  # the plugin's reference, without triton
        rows, pos = torch.arange(k.shape[0], device=k.device), positions.long()
        k_cache[rows, :, pos] = k
        v_cache[rows, :, pos] = v
    return write


@dataclass
class GenerationStats:
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_tokens: int = 0
    step_ms: list[float] = field(default_factory=list)

    @property
    def decode_s(self) -> float:
        return sum(self.step_ms) / 1000

    def summary(self) -> dict[str, float]:
        steps = sorted(self.step_ms)
        return {
            "prefill_tokens_per_s": self.prefill_tokens / self.prefill_s if self.prefill_s else 0.0,
            "decode_tokens_per_s": self.decode_tokens / self.decode_s if self.decode_s else 0.0,
            "step_ms_median": steps[len(steps) // 2] if steps else 0.0,
            "decode_steps": len(steps),
        }


class Runtime:
    """One engine on one device, with a static cache for `batch` rows of `max_seq` positions."""

    def __init__(self, engine: Engine, *, batch: int, max_seq: int | None = None,
                 dense: bool = False, device: str | torch.device = "cpu") -> None:
        self.engine = engine
        self.model = engine.model
        self.spec = spec = engine.model.spec
        self.device = torch.device(device)
        self.dense = dense
        limits = engine.limits
        self.max_seq = max_seq or limits["max_seq"]
        if batch > limits["max_batch"]:
            raise PolarcError(f"batch {batch} exceeds the engine's --max-batch "
                              f"{limits['max_batch']}", hint="rebuild with a larger --max-batch")
        self.batch = batch
        dtype = self.model.dtype
        per_row = 2 * spec.n_layers * spec.n_kv_heads * self.max_seq * spec.head_dim * \
            torch.finfo(dtype).bits // 8
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            if per_row * batch > free * 0.95:
                fits = int(free * 0.95 // per_row)
                raise PolarcError(f"a KV cache for batch {batch} x {self.max_seq} positions needs "
                                  f"{per_row * batch / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free",
                                  hint=f"the largest batch that fits is {fits}")
        shape = (batch, spec.n_kv_heads, self.max_seq, spec.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=dtype, device=self.device)
                        for _ in range(spec.n_layers)]
        self.v_cache = [torch.zeros(shape, dtype=dtype, device=self.device)
                        for _ in range(spec.n_layers)]
        self.seqlens = torch.zeros(batch, dtype=torch.int32, device=self.device)
        self.all_groups = torch.arange(spec.n_kv_heads, dtype=torch.int32, device=self.device
                                       ).expand(batch, -1).contiguous()
        self.k_per_layer = [spec.n_kv_heads] * spec.n_layers if dense else engine.k_per_layer
        self.scale = 1.0 / math.sqrt(spec.head_dim)
        self.attention = _attention_fn(self.device)
        self.topk = _topk_fn(self.device)
        self.write_kv = _write_kv_fn(self.device)
        # One captured decode step per batch-size bucket: when rows finish, the live ones are
        # compacted to the front and the step runs on the smallest bucket that holds them.
        self.buckets = batch_buckets(batch)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self._pool = None
        inv = self.model.rope_inv_freq
        self.rope_inv_freq = inv.to(self.device) if inv is not None else None
        self._fuse_projections()
        self.add_norm, self.rope_qk, self.swiglu = _elementwise_fns(self.device)
        self._prepare_sparse_mlp()

    def _prepare_sparse_mlp(self) -> None:
        """ReLU models: layers whose calibrated batch-union k is low enough to pay run the
        selective GEMM pair over the union index; the down weight is kept neuron-major."""
        self.mlp_k: dict[int, int] = {}
        if self.dense:
            return
        n = self.spec.intermediate
        w = self.model.weights
        for layer, router in self.engine.mlp_routers.items():
            if router.k / n > SPARSE_MLP_MAX_DENSITY:
                continue
            p = f"layers.{layer}."
            w[p + "down.weight"] = w[p + "down.weight"].to(self.device).T.contiguous().T
            self.mlp_k[layer] = router.k
        if self.mlp_k:
            self.gemm_up, self.gemm_down = _gemm_fns(self.device)

    def _fuse_projections(self) -> None:
        """One GEMM per layer for q, k, v and the router scores (they share the input), and
        one for gate and up. Decode-shaped GEMMs stream weights far better when fused, and
        the router then costs almost nothing. The model's separate weights become views into
        the fused ones, so nothing is stored twice."""
        spec, w = self.spec, self.model.weights
        self.qkvr_w: list[torch.Tensor] = []
        self.qkvr_b: list[torch.Tensor | None] = []
        self.gate_up_w: list[torch.Tensor | None] = []
        for layer in range(spec.n_layers):
            p = f"layers.{layer}."
            parts = [w[p + n + ".weight"] for n in ("q", "k", "v")]
            biases = [w.get(p + n + ".bias") for n in ("q", "k", "v")]
            router = self.engine.head_routers.get(layer)
            if router is not None:
                parts.append(router.weight.to(parts[0].dtype))
                biases.append(router.bias.to(parts[0].dtype))
            fused = torch.cat([t.to(self.device) for t in parts])
            bias = None
            if any(b is not None for b in biases):
                bias = torch.cat([(b if b is not None else torch.zeros(t.shape[0], dtype=t.dtype))
                                  .to(self.device) for b, t in zip(biases, parts, strict=True)])
            start = 0
            for name, t in zip(("q", "k", "v"), parts, strict=False):
                w[p + name + ".weight"] = fused[start:start + t.shape[0]]
                if biases[("q", "k", "v").index(name)] is not None:
                    w[p + name + ".bias"] = bias[start:start + t.shape[0]]
                start += t.shape[0]
            self.qkvr_w.append(fused)
            self.qkvr_b.append(bias)
            if spec.family == "llama":
                gu = torch.cat([w[p + "gate.weight"].to(self.device), w[p + "up.weight"].to(self.device)])
                f = spec.intermediate
                w[p + "gate.weight"], w[p + "up.weight"] = gu[:f], gu[f:]
                self.gate_up_w.append(gu)
            else:
                self.gate_up_w.append(None)

    def set_dense(self, dense: bool) -> None:
        """Switch between the engine's plan and all groups (drops a captured graph)."""
        self.dense = dense
        n_kv = self.spec.n_kv_heads
        self.k_per_layer = [n_kv] * self.spec.n_layers if dense else self.engine.k_per_layer
        self.graphs = {}
        self._pool = None  # a pool whose graphs are gone cannot take new captures
        self._prepare_sparse_mlp()

    def capture(self, bucket: int | None = None) -> None:
        """Capture one decode step for the first `bucket` rows (default: the whole batch) as
        a CUDA graph, replayed by `step` (no-op off CUDA or when already captured)."""
        bucket = bucket or self.batch
        if self.device.type != "cuda" or bucket in self.graphs:
            return
        tokens = torch.zeros(bucket, dtype=torch.long, device=self.device)
        saved = self.seqlens.clone()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: compile kernels, settle allocations
                self.decode_step(tokens)
                self.seqlens.copy_(saved)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()  # buckets replay one at a time: share
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self.decode_step(tokens)
        self.seqlens.copy_(saved)
        self.graphs[bucket] = (graph, tokens, logits)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """A decode step for the first len(tokens) rows: graph replay on CUDA (captured on
        first use of that bucket), eager elsewhere."""
        if self.device.type != "cuda":
            return self.decode_step(tokens)
        bucket = tokens.shape[0]
        self.capture(bucket)
        graph, static_tokens, logits = self.graphs[bucket]
        static_tokens.copy_(tokens)
        graph.replay()
        return logits

    def bucket_for(self, rows: int) -> int:
        return next(b for b in self.buckets if b >= rows)

    def compact(self, live: list[int], bucket: int) -> None:
        """Move rows `live` (slots, in order) to the front of the cache, so the next steps run
        on the first `bucket` rows; slots past the live ones read nothing (length zero)."""
        n = len(live)
        idx = torch.tensor(live, device=self.device)
        for cache in (*self.k_cache, *self.v_cache):
            cache[:n] = cache[idx]  # the gather copies first, so overlapping rows are safe
        self.seqlens[:n] = self.seqlens[idx]  # advanced indexing already copies
        self.seqlens[n:bucket] = 0

    def groups_for(self, layer: int, scores: torch.Tensor) -> torch.Tensor:
        """Selected KV groups [B, k] int32 from the router scores [B, Hkv] of the rows."""
        k = self.k_per_layer[layer]
        if k >= self.spec.n_kv_heads:
            return self.all_groups[: scores.shape[0]]
        return self.topk(scores, k)

    def mlp_union(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """The batch-union neuron index [k] int32: top-k of the router's summed probabilities."""
        r = self.engine.mlp_routers[layer]
        scores = F.linear(F.linear(x, r.w1), r.w2, r.b2)
        return torch.sigmoid(scores.float()).sum(0).topk(self.mlp_k[layer]).indices.to(torch.int32)

    def sparse_mlp(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        w, p = self.model.weights, f"layers.{layer}."
        idx = self.mlp_union(layer, x)
        hidden = self.gemm_up(x, w[p + "up.weight"], w.get(p + "up.bias"), idx)
        out = self.gemm_down(hidden, w[p + "down.weight"].T, idx)
        return out + w[p + "down.bias"] if p + "down.bias" in w else out

    @torch.no_grad()
    def prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        """Dense prefill of each row's prompt; returns last-position logits [B, vocab]."""
        if len(prompts) != self.batch:
            raise ValueError(f"expected {self.batch} prompts, got {len(prompts)}")
        last = []
        for b, prompt in enumerate(prompts):
            if not 0 < len(prompt) < self.max_seq:
                raise PolarcError(f"prompt {b} has {len(prompt)} tokens; the engine allows 1 to "
                                  f"{self.max_seq - 1}")
            ids = torch.tensor([prompt], device=self.device)
            h = embed(self.model, ids)
            for layer in range(self.spec.n_layers):
                kv: list[tuple[torch.Tensor, torch.Tensor]] = []
                h = run_layer(self.model, layer, h, kv_out=kv)
                self.k_cache[layer][b, :, : len(prompt)] = kv[0][0][0]
                self.v_cache[layer][b, :, : len(prompt)] = kv[0][1][0]
            self.seqlens[b] = len(prompt)
            last.append(final_logits(self.model, h[:, -1])[0])
        return torch.stack(last)

    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per row (tokens [B]) and return next-token logits [B, vocab]."""
        spec, model = self.spec, self.model
        B = tokens.shape[0]  # the first B rows of the cache (a batch-size bucket)
        seqlens = self.seqlens[:B]
        pos = seqlens.long()
        lens = seqlens + 1
        h = F.embedding(tokens, model.weights["embed.weight"])
        if spec.family == "opt":
            h = h + F.embedding(pos + 2, model.weights["pos_embed.weight"])
        else:
            freqs = pos.float()[:, None] * self.rope_inv_freq
            emb = torch.cat([freqs, freqs], dim=-1)
            s = model.rope_attention_scaling
            cos = (emb.cos() * s).to(h.dtype)[:, None, :]
            sin = (emb.sin() * s).to(h.dtype)[:, None, :]
        llama = spec.family == "llama"
        qd, kvd = spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
        w = model.weights
        delta = torch.zeros_like(h)  # the previous layer's MLP output, added with the next norm
        for layer in range(spec.n_layers):
            p = f"layers.{layer}"
            if llama:
                h, x = self.add_norm(h, delta, w[p + ".attn_norm.weight"], spec.norm_eps)
            else:
                x = norm(model, h, p + ".attn_norm")
            qkvr = F.linear(x, self.qkvr_w[layer], self.qkvr_b[layer])
            q = qkvr[:, :qd].view(B, spec.n_heads, spec.head_dim)
            k = qkvr[:, qd:qd + kvd].view(B, spec.n_kv_heads, spec.head_dim)
            v = qkvr[:, qd + kvd:qd + 2 * kvd].view(B, spec.n_kv_heads, spec.head_dim)
            groups = self.groups_for(layer, qkvr[:, qd + 2 * kvd:])
            if llama:
                q, k = self.rope_qk(q, k, cos, sin)
            self.write_kv(k, v, self.k_cache[layer], self.v_cache[layer], seqlens)
            o = self.attention(q, self.k_cache[layer][:B], self.v_cache[layer][:B], lens, groups,
                               self.scale)
            attn_out = linear(model, o.reshape(B, -1), p + ".o")
            if llama:
                h, x = self.add_norm(h, attn_out, w[p + ".mlp_norm.weight"], spec.norm_eps)
                gate_up = F.linear(x, self.gate_up_w[layer])
                delta = linear(model, self.swiglu(gate_up, spec.intermediate), p + ".down")
            else:
                h = h + attn_out
                x = norm(model, h, p + ".mlp_norm")
                if layer in self.mlp_k:
                    h = h + self.sparse_mlp(layer, x)
                else:
                    h = h + linear(model, F.relu(linear(model, x, p + ".up")), p + ".down")
        if llama:
            h = h + delta
        seqlens.copy_(lens)
        return final_logits(model, h)


def sample(logits: torch.Tensor, *, temperature: float, top_p: float,
           generator: torch.Generator | None) -> torch.Tensor:
    """Next tokens [B] from logits [B, vocab]: greedy at temperature 0, else nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        cut = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest set reaching top_p
        sorted_p = sorted_p.masked_fill(cut, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(logits.device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batch_buckets(batch: int) -> list[int]:
    """Batch sizes a decode step is captured for: powers of two below `batch`, and `batch`."""
    return sorted({1 << i for i in range(batch.bit_length()) if 1 << i < batch} | {batch})


def generate(runtime: Runtime, prompts: list[list[int]], *, max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             stop_at_eos: bool = True) -> tuple[list[list[int]], GenerationStats]:
    """Generate up to `max_new_tokens` per prompt; rows stop at EOS independently.

    When rows finish, the live ones are compacted to the front of the cache as soon as they
    fit a smaller batch-size bucket, so finished rows stop costing compute; until then a
    finished row keeps its slot with cache length zero (it reads almost nothing)."""
    stats = GenerationStats()
    gen = torch.Generator().manual_seed(seed)
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
    steps = min(max_new_tokens, runtime.max_seq - max(len(p) for p in prompts))
    for step in range(steps):
        nxt = sample(logits, temperature=temperature, top_p=top_p, generator=gen).cpu()
        for slot, row in enumerate(slots):
            if row is not None and not done[row]:
                outputs[row].append(int(nxt[slot]))
                done[row] = eos is not None and int(nxt[slot]) == eos
        live = [slot for slot, row in enumerate(slots) if row is not None and not done[row]]
        if not live or step == steps - 1:
            break
        bucket = runtime.bucket_for(len(live))
        if bucket < len(slots):
            runtime.compact(live, bucket)
            slots = [slots[s] for s in live] + [None] * (bucket - len(live))
            nxt = torch.cat([nxt[live], nxt.new_zeros(bucket - len(live))])
        elif len(live) < len(slots):
            gone = [s for s in range(len(slots)) if s not in live]
            runtime.seqlens[torch.tensor(gone, device=dev)] = 0
        _sync(dev)
        t = time.perf_counter()
        logits = runtime.step(nxt.to(dev))
        _sync(dev)
        stats.step_ms.append((time.perf_counter() - t) * 1000)
        stats.decode_tokens += len(live)
    return outputs, stats
