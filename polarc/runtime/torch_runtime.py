"""The torch runtime: an engine on one device with a paged KV cache (`kv_cache.py`), dense
prefill (whole prompts, or a prompt chunk by chunk) and the sparse decode step, each step a
captured CUDA graph per batch bucket on CUDA.

The decode step is the model's one layer definition (`polarc.models.layers`) with three
arguments of its own: the attention (append this token's K and V, pick each row's top-k KV
groups from the router scores that come out of the fused q/k/v GEMM, selective attention over
the cache), the MLP (ReLU layers with a cheap enough batch union: the selective GEMM pair),
and the element-wise stages compiled into one kernel each on CUDA. Dense is the same step
with every group selected (`dense=True`), so dense and sparse share one code path. On a CPU
the same step runs the kernels' plain-torch definitions, so the embedded default runs
anywhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any

import torch

from polarc.errors import PolarcError
from polarc.format.engine_file import Engine, lay_out_wide_linears
from polarc.format.plan import sparse_mlp_layers
from polarc.models.layers import (
    EAGER,
    Ops,
    add_norm,
    causal_attention,
    decoder_layer,
    embed,
    final_logits,
    rope_cos_sin,
    rope_qk,
    swiglu,
)
from polarc.plugins.reference import FP8, hadamard, quantize_kv, read_cache
from polarc.runtime.kernels import deferred_add_norm, kernels_for
from polarc.runtime.kv_cache import (
    PagedKVCache,
    cache_dtype,
    check_fits,
    default_page_size,
    pages_for,
    sink_dtype,
)

# SDPA backends for prefill on CUDA (names of torch.nn.attention.SDPBackend): not cuDNN's
PREFILL_SDPA = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")
# Prefill forwards of at least this many tokens (pack width included) run compiled
# element-wise stages; shorter ones eager (see Runtime.prefill_ops)
COMPILED_PREFILL_TOKENS = 512


def compile_stage(fn: Callable, device: torch.device, *, dynamic: bool = False) -> Callable:
    """`fn` compiled into one kernel on CUDA (dozens of tiny launches per layer otherwise add
    up to milliseconds per step); as it is elsewhere. `dynamic`: one kernel for every token
    count (prefill's chunks and packs vary), else one per shape (the decode step's batch
    buckets)."""
    if device.type != "cuda" or os.environ.get("POLARC_NO_COMPILE") == "1":
        return fn
    # One compiled kernel per batch bucket (and per runtime in a process that opens several):
    # more than dynamo's default of 8 shapes per function.
    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, limit, max(getattr(config, limit), 256))
    return torch.compile(fn, fullgraph=True, dynamic=dynamic)


def compiled_ops(device: torch.device, *, dynamic: bool = False) -> Ops:
    """A layer's element-wise stages, each through `compile_stage`."""
    return Ops(*(compile_stage(fn, device, dynamic=dynamic)
                 for fn in (add_norm, rope_qk, swiglu)))


def _rope_in_kv_append(q: torch.Tensor, k: torch.Tensor, rope: object
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The decode step's rotary stage: none, its KV append applies the rotary positions (and
    an FP8 cache's key rotation) in the same launch (`Kernels.rope_write_kv`)."""
    return q, k


def decode_inputs(model: Any, tokens: torch.Tensor, seqlens: torch.Tensor
                  ) -> tuple[torch.Tensor, ...]:
    """The decode step's inputs from its tokens [B] and the rows' lengths [B] before them:
    the embedded rows h [B, 1, d], a zero residual delta like h, the rotary (cos, sin)
    ``[B, 1, 1, D]`` (or None), the lengths after the step and the positions the KV append
    writes (-1 for a slot that holds no sequence). A dozen tiny element-wise launches eagerly:
    the runtime compiles it into a few (`compile_stage`)."""
    live = seqlens > 0
    positions = seqlens.long()[:, None]
    h = embed(model, tokens[:, None], positions)
    return (h, torch.zeros_like(h), rope_cos_sin(model, positions, h.dtype),
            seqlens + live.int(), torch.where(live, seqlens, -1))


def check_fp8_gpu(device: torch.device, *, kv: bool, weights: bool) -> None:
    """Refuse, in one line, what this GPU cannot run of an FP8 engine (its kernels widen
    float8 with an instruction that Ada and Hopper have)."""
    major, minor = torch.cuda.get_device_capability(device)
    if (kv or weights) and (major, minor) < (8, 9):
        what = "an FP8 KV cache" if kv else "FP8 weights"
        raise PolarcError(f"{what} on the GPU needs compute capability 8.9 or newer (Ada, "
                          f"Hopper); {torch.cuda.get_device_name(device)} is {major}.{minor}",
                          hint="run it with --device cpu, or build without the fp8 options")


def batch_buckets(batch: int) -> list[int]:
    """Batch sizes a decode step is captured for: powers of two below `batch`, and `batch`."""
    return sorted({1 << i for i in range(batch.bit_length()) if 1 << i < batch} | {batch})


class Runtime:
    """One engine on one device, with a paged cache for `batch` slots of up to `max_seq`
    positions each, `pages` pages in all (default: every slot can hold `max_seq` positions at
    once); implements `polarc.runtime.generate.DecodeRuntime`.

    `tile_linears`: lay the engine's 16-bit linear weights out as tiles, in place
    (`lay_out_wide_linears`; a later runtime on the same engine finds them so): on CUDA,
    decode steps of up to 32 rows 0.16-0.42 ms shorter (H100, RESULTS.md session 53), but a
    prefill's linear layers up to 14% longer than cuBLAS's on rows (session 55), so off by
    default."""

    def __init__(self, engine: Engine, *, batch: int, max_seq: int | None = None,
                 dense: bool = False, device: str | torch.device = "cpu",
                 page_size: int | None = None, pages: int | None = None,
                 quantized: bool = True, tile_linears: bool = False) -> None:
        self.engine = engine
        self.model = engine.model
        self.spec = spec = engine.model.spec
        self.device = torch.device(device)
        limits = engine.limits
        self.max_seq = max_seq or limits["max_seq"]
        if batch > limits["max_batch"]:
            raise PolarcError(f"batch {batch} exceeds the engine's --max-batch "
                              f"{limits['max_batch']}", hint="rebuild with a larger --max-batch")
        self.batch = batch
        # `quantized` False: a reference, the cache in the compute dtype whatever the engine's
        self.kv_dtype = cache_dtype(engine) if quantized else self.model.dtype
        fp8 = self.kv_dtype == FP8
        self.kv_scales = engine.kv_scales.to(self.device) if fp8 else None
        # rotated keys (and queries) for an FP8 cache built so; a quantized=False reference
        # keeps its keys as they are (the rotation leaves q.k unchanged, up to rounding)
        self.key_rotation = hadamard(spec.head_dim, self.model.dtype, self.device) \
            if fp8 and engine.key_rotation == "hadamard" else None
        # ... less their group's mean key (`fp8_cache_layout`: softmax ignores the shift)
        self.key_offset = engine.kv_key_offset.to(self.device, self.model.dtype) \
            if fp8 and engine.kv_key_offset is not None else None
        if self.device.type == "cuda":
            check_fp8_gpu(self.device, kv=fp8,
                          weights=any(t.dtype == FP8 for t in self.model.weights.values()))
        # (the FP8 linear kernel reads a tile's K block in one 16 KB run, rows' in 128 runs)
        if tile_linears:
            lay_out_wide_linears(engine, tiles=True)
        page_size = page_size or default_page_size(self.kv_dtype)
        per_row = pages_for(self.max_seq, page_size)
        pages = batch * per_row if pages is None else pages
        sinks = sink_dtype(engine) if fp8 else None  # position 0 unquantized (kv_cache.py)
        check_fits(spec, pages, page_size, self.kv_dtype, self.device, sinks=sinks,
                   what=f"batch {batch} x {self.max_seq} positions" if pages == batch * per_row
                   else f"{pages} pages of {page_size} positions",
                   hint=lambda fits: f"the largest batch that fits is {fits // per_row}"
                   if pages == batch * per_row else f"at most {fits} pages fit")
        self.cache = PagedKVCache.allocate(spec, slots=batch, max_seq=self.max_seq, pages=pages,
                                           page_size=page_size, dtype=self.kv_dtype,
                                           device=self.device, sinks=sinks)
        self.kernels = kernels_for(self.device, spec.head_dim)
        # The decode step's stages: float8 linear layers through the kernels, 16-bit ones too
        # at up to 32 rows (`Kernels.wide_linears`; a gate_up with its SwiGLU in one launch),
        # the rotary stage inside the KV append (both one launch where there were two and
        # three: -0.2 ms a Llama-3-8B step on the H100, RESULTS.md 2026-12-05)
        self.ops = dataclasses.replace(compiled_ops(self.device), linear=self.kernels.linear,
                                       linear_swiglu=self.kernels.linear_swiglu,
                                       rope_qk=_rope_in_kv_append)
        # ... and, where the kernel runs the GEMMs, each residual add and RMS norm inside the
        # GEMMs either side of it (the producing GEMM adds into the stream and sums squares, the consuming
        # one normalises as it reads): `step_ops`
        self.residual_ops = dataclasses.replace(
            self.ops, add_norm=deferred_add_norm(self.ops.add_norm),
            linear_residual=self.kernels.linear_residual)
        # Prefill compiles them too from COMPILED_PREFILL_TOKENS on: eager element-wise stages
        # made a 2,048-token prefill 16% slower on the H200 (66.6 against 57.5 ms), while the
        # compiled ones' per-call host cost made 64- and 256-token prompts slower (RESULTS.md,
        # 2026-12-04). The scheduler's packs are 2,048 wide, so they always take these.
        self.prefill_ops = dataclasses.replace(compiled_ops(self.device, dynamic=True),
                                               linear=self.kernels.linear,
                                               linear_swiglu=self.kernels.linear_swiglu)
        self.short_prefill_ops = dataclasses.replace(EAGER, linear=self.kernels.linear,
                                                     linear_swiglu=self.kernels.linear_swiglu)
        # the step's inputs in a few launches where eagerly there were about fifteen
        self.step_inputs = compile_stage(functools.partial(decode_inputs, self.model),
                                         self.device)
        self.prefill_sdpa: tuple[str, ...] | None = PREFILL_SDPA
        self.all_groups = torch.arange(spec.n_kv_heads, dtype=torch.int32, device=self.device
                                       ).expand(batch, -1).contiguous()
        # One captured decode step per batch-size bucket: when rows finish, the live ones are
        # compacted to the front and the step runs on the smallest bucket that holds them.
        self.buckets = batch_buckets(batch)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self._pool = None
        self.set_dense(dense)

    @property
    def seqlens(self) -> torch.Tensor:
        return self.cache.seqlens

    def set_dense(self, dense: bool) -> None:
        """Switch between the engine's plan and all groups (drops captured graphs)."""
        self.dense = dense
        n_kv, n_layers = self.spec.n_kv_heads, self.spec.n_layers
        self.k_per_layer = [n_kv] * n_layers if dense else self.engine.k_per_layer
        self.mlp_k = {} if dense else sparse_mlp_layers(
            {layer: r.k for layer, r in self.engine.mlp_routers.items()}, self.spec.intermediate)
        self.graphs = {}
        self._pool = None  # a pool whose graphs are gone cannot take new captures

    # ------------------------------------------------------------------ slots and buckets

    def bucket_for(self, rows: int) -> int:
        return next(b for b in self.buckets if b >= rows)

    def compact(self, live: list[int], bucket: int) -> None:
        """Move slots `live` to the front (table rows, not K/V); slots past them are empty."""
        for dst, src in enumerate(live):
            if src != dst:
                self.cache.free(dst)
                self.cache.move(src, dst)
        for slot in range(len(live), self.batch):
            self.cache.free(slot)

    def release(self, slots: list[int]) -> None:
        for slot in slots:
            self.cache.free(slot)

    # ------------------------------------------------------------------------- prefill

    @torch.no_grad()
    def prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        """Dense prefill of each row's whole prompt into slots 0..len-1, each given the pages
        for `max_seq` positions; returns last-position logits [B, vocab]."""
        if len(prompts) > self.batch:
            raise ValueError(f"expected at most {self.batch} prompts, got {len(prompts)}")
        last = []
        for b, prompt in enumerate(prompts):
            if not 0 < len(prompt) < self.max_seq:
                raise PolarcError(f"prompt {b} has {len(prompt)} tokens; the engine allows 1 to "
                                  f"{self.max_seq - 1}")
            self.cache.free(b)
            self.cache.grow(b, self.max_seq)
            last.append(self.prefill_chunk(b, prompt, 0))
            self.cache.set_length(b, len(prompt))
        self.cache.sync()
        return torch.stack(last)

    @torch.no_grad()
    def prefill_chunk(self, slot: int, ids: list[int], start: int) -> torch.Tensor:
        """Positions start..start+len(ids)-1 of the sequence in `slot`: `prefill_pack` of
        that one chunk. Returns its last position's logits [vocab]."""
        return self.prefill_pack([(slot, ids, start)])[0]

    @torch.no_grad()
    def prefill_pack(self, chunks: list[tuple[int, list[int], int]], width: int | None = None
                     ) -> list[torch.Tensor]:
        """Several sequences' prompt chunks in one forward. Each chunk (slot, ids, start) is
        positions start..start+len(ids)-1 of the sequence in `slot` (its pages must hold them;
        the earlier positions are in the cache): its K and V are written to the slot's pages,
        and it attends to them and causally to itself, alone (one attention call per chunk).
        With `width` the pack is padded to that many tokens, so its matrix products always
        have the same shape and a chunk's arithmetic does not depend on what shares the pack.
        Returns each chunk's last-position logits [vocab] (one row at a time, for the same
        reason). The slots' lengths on the device are left alone: a slot joins decode steps
        only when the caller sets it."""
        dev = self.device
        spans, ids_all, pos_all, pages_all, offs_all = [], [], [], [], []
        at = 0
        for slot, ids, start in chunks:
            n = len(ids)
            pages, offsets = self.cache.positions(slot, start, start + n)
            spans.append((at, n, start, self.cache.host_row(slot)))
            ids_all += ids
            pos_all.append(torch.arange(start, start + n))
            pages_all.append(pages)
            offs_all.append(offsets)
            at += n
        pad = max(0, (width or at) - at)
        ids_t = torch.tensor([ids_all + [0] * pad], device=dev)
        positions = torch.cat(pos_all + [torch.zeros(pad, dtype=torch.long)]).to(dev)
        pages, offsets = torch.cat(pages_all), torch.cat(offs_all)
        # an FP8 cache's sinks take the pack's positions 0 (from the host's spans: no sync)
        starts = [o for o, _, start, _ in spans if start == 0]
        if starts and self.cache.k_sink is not None:
            first = torch.tensor(starts, device=dev)
            first_pages = pages[first]
        else:
            first = None
        h = embed(self.model, ids_t, positions)
        rope = rope_cos_sin(self.model, positions, h.dtype)
        tables = [row.to(dev)[None] if start else None for _, _, start, row in spans]
        ops = self.prefill_ops if at + pad >= COMPILED_PREFILL_TOKENS else self.short_prefill_ops

        def attend(layer, x, q, k, v, extra):
            q, k = self.cache_basis(layer, q, k)
            k_pool, v_pool = self.cache.k[layer], self.cache.v[layer]
            k_scale, v_scale = self.layer_kv_scales(layer)
            k_sink, v_sink = self.layer_sinks(layer)
            if k_pool.dtype == FP8:
                k_pool[pages, :, offsets] = quantize_kv(k[0, :at], k_scale)
                v_pool[pages, :, offsets] = quantize_kv(v[0, :at], v_scale)
                if first is not None:
                    k_sink[first_pages] = k[0, first].to(k_sink.dtype)
                    v_sink[first_pages] = v[0, first].to(v_sink.dtype)
            else:
                k_pool[pages, :, offsets] = k[0, :at]
                v_pool[pages, :, offsets] = v[0, :at]
            out = torch.zeros_like(q)
            for (o, n, start, _), table in zip(spans, tables, strict=True):
                # copies, not views: a view's address depends on where the chunk sits in the
                # pack, and attention backends choose their kernel by alignment (or fault: a
                # one-token view counts as contiguous, so .contiguous() would not copy it)
                qs = q[:, o:o + n].clone()
                if start == 0:
                    out[:, o:o + n] = causal_attention(qs, k[:, o:o + n].clone(),
                                                       v[:, o:o + n].clone())
                else:
                    keys, values = (read_cache(p, s, sink, start + n, table, dtype=q.dtype)
                                    .transpose(1, 2) for p, s, sink in
                                    ((k_pool, k_scale, k_sink), (v_pool, v_scale, v_sink)))
                    out[:, o:o + n] = causal_attention(qs, keys, values, past=start)
            return out

        delta = torch.zeros_like(h)
        with self._prefill_attention():
            for layer in range(self.spec.n_layers):
                h, delta = decoder_layer(self.model, layer, h, delta, rope, attend,
                                         ops=ops)
        last = h + delta
        for slot, ids, start in chunks:
            self.cache.lengths[slot] = start + len(ids)
        return [final_logits(self.model, last[0, o + n - 1], ops)
                for o, n, _, _ in spans]

    def _prefill_attention(self) -> contextlib.AbstractContextManager:
        """The attention backends prefill may use: on CUDA, `PREFILL_SDPA` (flash and
        memory-efficient attention, not cuDNN's, which builds a graph for every new (query
        length, key length) and a stream of requests keeps making new ones); None: torch's
        choice."""
        if self.device.type != "cuda" or self.prefill_sdpa is None:
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([getattr(SDPBackend, name) for name in self.prefill_sdpa])

    # --------------------------------------------------------------------- decode step

    def cache_basis(self, layer: int, q: torch.Tensor, k: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries and keys ``[..., Hq or Hkv, D]`` as the cache holds them: rotated
        (`key_rotation`), keys less the layer's `key_offset` [Hkv, D]. Prefill's; the decode
        step does the same inside its KV append (`Kernels.rope_write_kv`)."""
        if self.key_rotation is not None:
            q, k = q @ self.key_rotation, k @ self.key_rotation
        if self.key_offset is not None:
            k = k - self.key_offset[layer]
        return q, k

    def layer_sinks(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(K sink, V sink) [pages, Hkv, D] of an FP8 cache's layer; (None, None) otherwise."""
        if self.cache.k_sink is None:
            return None, None
        return self.cache.k_sink[layer], self.cache.v_sink[layer]

    def layer_kv_scales(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(K scales, V scales) [Hkv] of an FP8 cache's layer; (None, None) otherwise."""
        if self.kv_scales is None:
            return None, None
        return self.kv_scales[0, layer], self.kv_scales[1, layer]

    def selection(self, layer: int, scores: torch.Tensor | None, rows: int
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The layer's selected KV groups [rows, k] int32, and the arguments that make the KV
        append fill them from the router scores [rows, Hkv] (none: a dense layer, every
        group)."""
        k = self.k_per_layer[layer]
        if k >= self.spec.n_kv_heads:
            return self.all_groups[:rows], {}
        groups = torch.empty(rows, k, dtype=torch.int32, device=scores.device)
        return groups, {"scores": scores, "groups": groups}

    def sparse_mlp(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """The selective GEMM pair over the batch-union neuron index (x [B, 1, d])."""
        w, p = self.model.weights, f"layers.{layer}."
        x = x[:, 0]
        idx = self.engine.mlp_routers[layer].union(x, self.mlp_k[layer])
        hidden = self.kernels.gemm_up(x, w[p + "up.weight"], w.get(p + "up.bias"), idx)
        out = self.kernels.gemm_down(hidden, w[p + "down.weight"].T, idx)
        out = out + w[p + "down.bias"] if p + "down.bias" in w else out
        return out[:, None]

    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per row (tokens [B]) and return next-token logits [B, vocab].
        A slot of length zero holds no sequence: it writes nothing, reads nothing and stays
        empty (its logits are meaningless)."""
        B = tokens.shape[0]  # the first B slots of the cache (a batch-size bucket)
        seqlens = self.cache.seqlens[:B]
        table = self.cache.block_table[:B]
        h, delta, rope, lens, write_at = self.step_inputs(tokens, seqlens)
        cos, sin = (None, None) if rope is None else (t[:, 0, 0] for t in rope)  # [B, D]

        def attend(layer, x, q, k, v, extra):
            # q and k come without rotary positions: the KV append applies them (and an FP8
            # cache's rotation and key offset) to k as it writes, and returns q alike
            k_pool, v_pool = self.cache.k[layer], self.cache.v[layer]
            scales, sinks = self.layer_kv_scales(layer), self.layer_sinks(layer)
            offset = self.key_offset[layer] if self.key_offset is not None else None
            groups, select = self.selection(layer, None if extra is None else extra[:, 0], B)
            q = self.kernels.rope_write_kv(
                q[:, 0], k[:, 0], v[:, 0], k_pool, v_pool, write_at, table, *scales, *sinks,
                k_offset=offset, cos=cos, sin=sin, rotation=self.key_rotation,
                **select)[:, None]
            return self.kernels.attention(q[:, 0], k_pool, v_pool, lens, groups, table,
                                          *scales, *sinks)[:, None]

        ops = self.step_ops()
        for layer in range(self.spec.n_layers):
            mlp = self.sparse_mlp if layer in self.mlp_k else None
            h, delta = decoder_layer(self.model, layer, h, delta, rope, attend, mlp=mlp,
                                     ops=ops)
        seqlens.copy_(lens)
        return final_logits(self.model, h, ops, delta)[:, 0]

    def step_ops(self) -> Ops:
        """The decode step's stages: `residual_ops` unless a layer runs a sparse MLP (whose
        router reads the normalised rows); `Kernels.linear_residual` itself declines every
        GEMM it has no kernel for (then the stages run as in `ops`)."""
        return self.ops if self.mlp_k else self.residual_ops

    # ---------------------------------------------------------------------- CUDA graphs

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
            for _ in range(2):  # warm-up: compile kernels, plans and workspaces
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
        self.cache.sync()
        if self.device.type != "cuda":
            logits = self.decode_step(tokens)
            self.cache.advance(tokens.shape[0])
            return logits
        bucket = tokens.shape[0]
        self.capture(bucket)
        graph, static_tokens, logits = self.graphs[bucket]
        static_tokens.copy_(tokens)
        graph.replay()
        self.cache.advance(bucket)
        return logits
