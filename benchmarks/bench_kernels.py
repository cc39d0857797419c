"""benchmarks/README.md §1–2: selective attention and the selective GEMM pair against torch SDPA and
cuBLAS, in one process on a CUDA GPU; and selective attention over a paged cache against the
same kernel over the contiguous one (`--paged`: that table alone), and over float8 caches
(`--fp8`: that table alone).

    python -m polarc.benchmarks.bench_kernels [--json OUT] [--quick]
        [--paged | --fp8 | --fp8-linear | --fp8-linear-sweep [--sweep-rows 32,64]
         | --fp8-linear-chain]

`--fp8-linear-sweep`: for each FP8-weight decode GEMM and row count, `fp8_linear` under a grid
of plans (tiles, split-K, warps, stages) beside the planner's own; prints the planner's and the
best plan per row, every timing in --json.
`--fp8-linear-chain`: a decode step's FP8 linear layers alone, in order, in one graph.
`--fp8`: the float8-cache table: the runtime's plan beside the contiguous D-major cache.

Random data, outputs and workspaces allocated once; every call (ours, SDPA with
``enable_gqa=True``, cuBLAS ``addmm`` + ``relu_`` and ``mm``) timed by `timing.time_graph`
over rotated input sets in one run. Floor = bytes a case must read ÷ the run's copy bandwidth.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from polarc.benchmarks.timing import (
    copy_bandwidth,
    environment,
    read_bandwidth,
    sets_to_rotate,
    time_graph,
)
from polarc.plugins._triton_util import num_sms
from polarc.plugins.reference import FP8
from polarc.plugins.selective_attention import (
    plan_selective_attention,
    selective_attention,
    selective_attention_workspace,
)
from polarc.plugins.selective_gemm import (
    plan_selective_gemm,
    selective_gemm_down,
    selective_gemm_up,
    selective_gemm_workspace,
)

from polarc.outputs import write_json

ATTN_MODELS = {"llama3-8b": (32, 8), "llama2-7b": (32, 32)}  # (query heads, KV groups)
HEAD_DIM = 128
BATCHES = (1, 16, 64, 256)
SEQLENS = (1024, 4096, 8192)
DENSITIES = (0.25, 0.5, 0.75, 1.0)
RAGGED_DENSITIES = (0.5, 1.0)
GEMM_D, GEMM_N = 4096, 16384  # OPT-6.7B MLP
GEMM_DENSITIES = (0.1, 0.3, 0.5, 0.8, 1.0)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- attention


def _attention_sets(n: int, b: int, hq: int, hkv: int, s: int, d: int, device: torch.device,
                    dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """`n` random (q, K cache, V cache) sets of one shape, to rotate through L2."""
    return [(torch.randn(b, hq, d, device=device, dtype=dtype),
             torch.randn(b, hkv, s, d, device=device, dtype=dtype),
             torch.randn(b, hkv, s, d, device=device, dtype=dtype)) for _ in range(n)]


def _random_groups(b: int, hkv: int, k: int, device: torch.device, gen: torch.Generator):
    return torch.stack([torch.randperm(hkv, generator=gen)[:k] for _ in range(b)]).int().to(device)


def attention_cases(
    *,
    quick: bool = False,
    bw: float,
    device: torch.device,
    shapes: list[tuple[str, int, int]] | None = None,
    densities: tuple[float, ...] = DENSITIES,
    ragged: bool = True,
    sdpa: bool = True,
) -> list[dict]:
    """§1: every (model, B, S), SDPA dense, the selective kernel at each density, ragged rows."""
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    if shapes is None:
        batches = (1, 64) if quick else BATCHES
        seqs = (1024, 8192) if quick else SEQLENS
        shapes = [(m, b, s) for m in ATTN_MODELS for b in batches for s in seqs]
    free = torch.cuda.mem_get_info(device)[0]
    records: list[dict] = []
    for model, b, s in shapes:
        hq, hkv = ATTN_MODELS[model]
        d = HEAD_DIM
        kv_bytes = 2 * b * hkv * s * d * 2
        if kv_bytes > 0.45 * free:
            _log(f"skip {model} B={b} S={s}: {kv_bytes / 1e9:.1f} GB of KV does not fit")
            continue
        # enough sets that the sparsest case's reads, rotated, overflow L2
        n_sets = sets_to_rotate(int(kv_bytes * min(densities)))
        sets = _attention_sets(n_sets, b, hq, hkv, s, d, device, dtype)
        full = torch.full((b,), s, dtype=torch.int32, device=device)
        base = dict(op="attention", model=model, B=b, S=s, Hq=hq, Hkv=hkv, D=d, dtype="bf16")
        sdpa_ms = None
        if sdpa:
            sdpa_ms = time_graph([
                lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q.unsqueeze(2), k, v,
                                                                     enable_gqa=True)
                for q, k, v in sets])
            records.append(_attn_record(base, "sdpa_dense", 1.0, False, sdpa_ms,
                                        kv_bytes, bw, None, sdpa_ms))
        cases = [(rho, False) for rho in densities]
        if ragged:
            cases += [(rho, True) for rho in RAGGED_DENSITIES]
        for rho, is_ragged in cases:
            n_sel = max(1, round(rho * hkv))
            if is_ragged:  # row lengths uniform in [S/8, S]
                lens = torch.randint(max(1, s // 8), s + 1, (b,), generator=gen, dtype=torch.int32)
                seqlens = lens.to(device)
                tokens = int(lens.sum())
            else:
                seqlens = full
                tokens = b * s
            plan = plan_selective_attention(b, n_sel, hq // hkv, s, d, sms=num_sms(device))
            fns = []
            for q, k, v in sets:
                groups = _random_groups(b, hkv, n_sel, device, gen)
                ws = selective_attention_workspace(q, k, n_sel, plan)
                out = torch.empty_like(q)
                fns.append(lambda q=q, k=k, v=v, g=groups, ws=ws, out=out, sl=seqlens, p=plan:
                           selective_attention(q, k, v, sl, g, out=out, workspace=ws, plan=p,
                                               check_indices=False))
            ms = time_graph(fns)
            need = 2 * tokens * n_sel * d * 2
            kernel = "selective_all" if n_sel == hkv else "selective"
            records.append(_attn_record(base, kernel, n_sel / hkv, is_ragged, ms, need, bw, plan,
                                        sdpa_ms))
            del fns
        del sets
        torch.cuda.empty_cache()
        _log(f"done {model} B={b} S={s}")
    return records


def _attn_record(base, kernel, density, ragged, ms, need_bytes, bw, plan, sdpa_ms) -> dict:
    rec = dict(base, kernel=kernel, density=density, ragged=ragged, ms=ms,
               floor_ms=need_bytes / bw * 1e3, gbps=need_bytes / (ms * 1e-3) / 1e9,
               bw_frac=need_bytes / (ms * 1e-3) / bw)
    if plan is not None:
        rec.update(splits=plan.num_splits, block_n=plan.block_n, num_warps=plan.num_warps,
                   num_stages=plan.num_stages)
    if sdpa_ms is not None and kernel != "sdpa_dense":
        rec["vs_sdpa"] = ms / sdpa_ms
        rec.update(_attn_target(rec))
    return rec


def _attn_target(rec: dict) -> dict:
    """The §1 targets that apply to this record (ragged rows have none: SDPA reads all)."""
    if rec["ragged"]:
        return {}
    big = rec["B"] * rec["S"] >= 32768
    small = rec["B"] <= 8 or rec["S"] <= 1024
    if rec["kernel"] == "selective_all":
        limit = 1.05 if big else 1.2 if small else None
    else:
        limit = rec["density"] + 0.05 if big else None
    if limit is None:
        return {}
    out = dict(target_vs_sdpa=limit, meets_target=rec["vs_sdpa"] <= limit)
    if big:
        out["meets_bw_target"] = rec["bw_frac"] >= 0.85
    return out


# ----------------------------------------------------------------------------- paged

PAGED_SHAPES = [("llama3-8b", 16, 4096), ("llama3-8b", 64, 1024), ("llama3-8b", 64, 4096),
                ("llama3-8b", 32, 8192), ("llama3-8b", 256, 1024), ("llama2-7b", 16, 4096)]
PAGE_SIZES = (16, 64, 128, 256)


def _shuffled_pools(k: torch.Tensor, v: torch.Tensor, page: int, gen: torch.Generator
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Contiguous caches [B, Hkv, S, D] as page pools in a shuffled order, and the table."""
    b, hkv, s, d = k.shape
    per_row = s // page
    order = torch.randperm(b * per_row, generator=gen).view(b, per_row)
    pools = []
    for c in (k, v):
        pool = torch.empty(b * per_row, hkv, page, d, device=c.device, dtype=c.dtype)
        pool[order.to(c.device)] = c.view(b, hkv, per_row, page, d).transpose(1, 2)
        pools.append(pool)
    return pools[0], pools[1], order.int().to(k.device)


def _kernel_calls(sets, groups, seqlens, plan, pages: int | None, gen: torch.Generator,
                  scales: torch.Tensor | None = None, v_position_major: bool = False) -> list:
    """One planned, workspace-holding selective_attention call per input set (paged when
    `pages` is given; a float8 cache, with its position-0 sinks as the runtime keeps them,
    when `scales` is; V stored position-major, as an FP8 page pool keeps it, when asked)."""
    fns = []
    for (q, k, v), g in zip(sets, groups, strict=True):
        table = None
        if pages is not None:
            k, v, table = _shuffled_pools(k, v, pages, gen)
        if v_position_major:
            v = v.transpose(2, 3).contiguous().transpose(2, 3)
        sink = torch.randn(k.shape[0], k.shape[1], k.shape[3], generator=gen).to(q.device, q.dtype) \
            if scales is not None else None
        ws = selective_attention_workspace(q, k, g.shape[1], plan, block_table=table)
        out = torch.empty_like(q)
        fns.append(lambda q=q, k=k, v=v, g=g, ws=ws, out=out, t=table, sink=sink:
                   selective_attention(q, k, v, seqlens, g, out=out, workspace=ws, plan=plan,
                                       check_indices=False, block_table=t, k_scale=scales,
                                       v_scale=scales, k_sink=sink, v_sink=sink))
    return fns


# (page, block, warps, stages, V position-major; None: the planner's): the contiguous D-major
# cache of the 2026-12-03 table and the runtime's plan (pages of 128, V position-major). The
# products transposed, `S^T = K q^T`, were within 2% of the runtime's plan on every row on
# the H100 (2026-12-06) and are gone.
FP8_VARIANTS = ((None, 128, None, None, False), (128, 128, None, None, True))


def _fp8_variant_label(page: int | None, block: int, warps: int | None,
                       stages: int | None, v_position_major: bool) -> str:
    return ("P=" + str(page) if page else "contig") + f" N={block}" \
        + (f" w{warps}" if warps else "") + (f" st{stages}" if stages else "") \
        + (" vT" if v_position_major else "")


def paged_cases(*, bw: float, device: torch.device, quick: bool = False,
                fp8_only: bool = False) -> list[dict]:
    """The selective kernel over page pools (pages of each row in a shuffled order, as a
    long-running server's would be) against the same kernel over contiguous rows, same data,
    same groups, rows of full length; densities 0.5 and 1. Then the same over float8 caches
    (contiguous and paged, blocks of 64 and 128 positions): bytes read halve; the target is
    >= 85% of copy bandwidth on them. `fp8_only`: the float8 rows and their bf16 baseline."""
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(2)
    records: list[dict] = []
    for model, b, s in PAGED_SHAPES[:2] if quick else PAGED_SHAPES:
        hq, hkv = ATTN_MODELS[model]
        d = HEAD_DIM
        kv_bytes = 2 * b * hkv * s * d * 2
        n_sets = sets_to_rotate(kv_bytes // 2, most=4)
        sets = _attention_sets(n_sets, b, hq, hkv, s, d, device, dtype)
        seqlens = torch.full((b,), s, dtype=torch.int32, device=device)
        sets8 = [(q, k.to(FP8), v.to(FP8)) for q, k, v in sets]
        ones = torch.ones(hkv, device=device)
        for rho in (0.5, 1.0):
            n_sel = max(1, round(rho * hkv))
            groups = [_random_groups(b, hkv, n_sel, device, gen) for _ in sets]
            base = dict(op="paged_attention", model=model, B=b, S=s, Hq=hq, Hkv=hkv, D=d,
                        dtype="bf16", density=n_sel / hkv)
            need = 2 * b * s * n_sel * d * 2
            plan = plan_selective_attention(b, n_sel, hq // hkv, s, d, sms=num_sms(device))
            contiguous_ms = time_graph(_kernel_calls(sets, groups, seqlens, plan, None, gen))
            records.append(dict(base, kernel="contiguous", page=None, ms=contiguous_ms,
                                bw_frac=need / (contiguous_ms * 1e-3) / bw))
            for page in () if fp8_only else PAGE_SIZES:
                pplan = plan_selective_attention(b, n_sel, hq // hkv, s, d, sms=num_sms(device),
                                                 page_size=page)
                ms = time_graph(_kernel_calls(sets, groups, seqlens, pplan, page, gen))
                records.append(dict(base, kernel="paged", page=page, ms=ms,
                                    vs_contiguous=ms / contiguous_ms,
                                    bw_frac=need / (ms * 1e-3) / bw,
                                    meets_target=ms / contiguous_ms <= 1.05 if page >= 64
                                    else None))
                torch.cuda.empty_cache()
            for variant in FP8_VARIANTS:  # FP8: half the bytes, same kernel
                page, block, warps, stages, v_pm = variant
                pplan = plan_selective_attention(b, n_sel, hq // hkv, s, d, sms=num_sms(device),
                                                 page_size=page, block_n=block, num_warps=warps,
                                                 num_stages=stages, kv_fp8=True)
                label = _fp8_variant_label(*variant)
                try:
                    ms = time_graph(_kernel_calls(sets8, groups, seqlens, pplan, page, gen, ones,
                                                  v_position_major=v_pm))
                except Exception as exc:  # a variant that does not fit must not lose the table
                    _log(f"fp8 variant {label}: {str(exc)[:200]}")
                    ms = float("nan")
                frac = need / 2 / (ms * 1e-3) / bw
                _log(f"fp8 {model} B={b} S={s} rho={n_sel / hkv:.2f} {label}: {ms:.4f} ms "
                     f"{frac:.0%} of copy bandwidth")
                records.append(dict(base, kernel="fp8", dtype="bf16/fp8", page=page,
                                    variant=label, block_n=pplan.block_n,
                                    num_warps=pplan.num_warps, num_stages=pplan.num_stages, ms=ms,
                                    vs_bf16=ms / contiguous_ms, bw_frac=frac,
                                    meets_bw_target=frac >= 0.85 if b * s >= 32768 else None))
                torch.cuda.empty_cache()
        del sets, sets8
        _log(f"done paged {model} B={b} S={s}")
    return records


def format_paged(records: list[dict]) -> str:
    paged = [r for r in records if r["op"] == "paged_attention" and r["kernel"] != "fp8"]
    if not paged:
        return ""
    lines = ["", "paged selective attention (bf16, D=128, shuffled pages): ms; x = paged / "
                 "contiguous; target x <= 1.05 at P >= 64; ! = missed",
             f"{'model':<10}{'B':>4}{'S':>6}{'rho':>5}{'contig':>8}"
             + "".join(f"{'P=' + str(p):>16}" for p in PAGE_SIZES)]
    for key in sorted({(r["model"], r["B"], r["S"], r["density"]) for r in paged}):
        rs = [r for r in paged if (r["model"], r["B"], r["S"], r["density"]) == key]
        c = next(r for r in rs if r["kernel"] == "contiguous")
        cells = []
        for page in PAGE_SIZES:
            r = next((r for r in rs if r["page"] == page), None)
            miss = "!" if r and r["meets_target"] is False else " "
            cells.append(f"{r['ms']:>8.3f} {r['vs_contiguous']:>5.2f}x{miss}" if r else f"{'-':>16}")
        lines.append(f"{key[0]:<10}{key[1]:>4}{key[2]:>6}{key[3]:>5.2f}{c['ms']:>8.3f}"
                     + "".join(cells))
    fp8 = [r for r in records if r["op"] == "paged_attention" and r["kernel"] == "fp8"]
    if fp8:
        lines += ["", "selective attention over a float8 cache: ms, x = / bf16 contiguous, % of "
                      "copy bandwidth on the float8 bytes; target >= 85% at B*S >= 32k; ! = missed",
                  f"{'model':<10}{'B':>4}{'S':>6}{'rho':>5}"
                  + "".join(f"{_fp8_variant_label(*v):>22}" for v in FP8_VARIANTS)]
        for key in sorted({(r["model"], r["B"], r["S"], r["density"]) for r in fp8}):
            cells = []
            for variant in FP8_VARIANTS:
                r = next(r for r in fp8 if (r["model"], r["B"], r["S"], r["density"]) == key
                         and r["variant"] == _fp8_variant_label(*variant))
                miss = "!" if r["meets_bw_target"] is False else " "
                cells.append(f"{r['ms']:>8.3f} {r['vs_bf16']:>5.2f}x {r['bw_frac'] * 100:>4.0f}%"
                             f"{miss}")
            lines.append(f"{key[0]:<10}{key[1]:>4}{key[2]:>6}{key[3]:>5.2f}" + "".join(cells))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- FP8 linear

# Llama-3-8B's decode GEMMs (N, K): fused q/k/v, o, fused gate/up, down, the LM head
LINEAR_SHAPES = [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096),
                 ("down", 4096, 14336), ("lm_head", 128256, 4096)]
LINEAR_ROWS = (1, 16, 64, 256)
SWEEP_ROWS = (1, 8, 16, 32, 64, 128, 256)


def _fp8_floor_ms(m: int, n: int, k: int, bw: float) -> float:
    """Bytes an fp8-weight GEMM must move (the weight, x and y in bf16) / copy bandwidth."""
    return (n * k + 2 * m * k + 2 * m * n) / bw * 1e3


def _linear_case(name: str, m: int, w16: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor,
                 bw: float) -> dict:
    """One (GEMM, rows) case of `linear_cases`."""
    from polarc.plugins.fp8_linear import fp8_linear, plan_fp8_linear

    n, k = w16.shape
    x = torch.randn(m, k, device=w16.device, dtype=torch.bfloat16)
    out = torch.empty(m, n, device=w16.device, dtype=torch.bfloat16)
    plan = plan_fp8_linear(m, n, k, sms=num_sms(w16.device))
    floor8 = _fp8_floor_ms(m, n, k, bw)
    floor16 = (2 * n * k + 2 * m * k + 2 * m * n) / bw * 1e3
    ms16 = time_graph([lambda: torch.mm(x, w16.T, out=out)])
    ms8 = time_graph([lambda: fp8_linear(x, w8, scale, out=out, plan=plan)])
    rec = dict(op="fp8_linear", name=name, M=m, N=n, K=k, bf16_ms=ms16,
               bf16_x_floor=ms16 / floor16, fp8_ms=ms8, fp8_x_floor=ms8 / floor8,
               floor8_ms=floor8, fp8_vs_bf16=ms8 / ms16, block_n=plan.block_n,
               split_k=plan.split_k)
    rows = max(16, -(-m // 16) * 16)  # _scaled_mm wants rows in multiples of 16

    def scaled() -> torch.Tensor:
        xp = torch.nn.functional.pad(x, (0, 0, 0, rows - m))
        sx = xp.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / 448.0
        x8 = (xp / sx).to(FP8)
        return torch._scaled_mm(x8, w8.T, scale_a=sx, scale_b=scale[None, :],
                                out_dtype=torch.bfloat16)
    try:
        rec["scaled_mm_ms"] = time_graph([scaled])
        rec["scaled_mm_x_floor"] = rec["scaled_mm_ms"] / floor8
    except Exception as exc:  # a torch without rowwise scaling: keep the table
        rec["scaled_mm_error"] = str(exc)[:200]
    return rec


PREFILL_ROWS = 2048


def _widen_case(name: str, w16: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor,
                bw: float) -> dict:
    """A prefill GEMM (`PREFILL_ROWS` rows) on a float8 weight kept tile by tile: widened for
    cuBLAS by the Triton `fp8_widen` (what `Kernels.linear` does) against its torch form
    `widen_fp8` and the eager composition before it (untile, fp32 product, cast), and bf16
    cuBLAS alone; the widen's floor = its bytes (one float8 read, one bf16 write) / copy
    bandwidth."""
    from polarc.plugins.fp8_linear import fp8_widen

    from polarc.format.engine_file import tile_fp8, untile_fp8, widen_fp8

    n, k = w16.shape
    swiglu = name == "gate_up"
    tiles = tile_fp8(w8, swiglu=swiglu)
    x = torch.randn(PREFILL_ROWS, k, device=w16.device, dtype=torch.bfloat16)

    def before() -> torch.Tensor:
        w = untile_fp8(tiles, n, k, swiglu=swiglu)
        return (w.float() * scale[:, None]).to(torch.bfloat16)

    def now() -> torch.Tensor:
        return widen_fp8(tiles, scale, k, torch.bfloat16, swiglu=swiglu)

    def kernel() -> torch.Tensor:
        return fp8_widen(tiles, scale, k, torch.bfloat16, swiglu=swiglu)

    assert torch.equal(before(), now()) and torch.equal(now(), kernel())
    widen_floor = 3 * n * k / bw * 1e3
    rec = dict(op="fp8_widen", name=name, M=PREFILL_ROWS, N=n, K=k,
               eager_widen_ms=time_graph([before]), widen_ms=time_graph([now]),
               kernel_widen_ms=time_graph([kernel]),
               widen_floor_ms=widen_floor, bf16_gemm_ms=time_graph([lambda: x @ w16.T]),
               fp8_gemm_ms=time_graph([lambda: x @ kernel().T]))
    rec["widen_x_floor"] = rec["widen_ms"] / widen_floor
    rec["kernel_widen_x_floor"] = rec["kernel_widen_ms"] / widen_floor
    return rec


def linear_cases(*, bw: float, device: torch.device) -> list[dict]:
    """FP8 weights for the decode GEMMs: the weight-only Triton kernel (`fp8_linear`) and
    `torch._scaled_mm` with the rows quantized per token (the quantization timed with it)
    against bf16 cuBLAS; floor = (weight bytes + x and y bytes) / copy bandwidth."""
    from polarc.format.engine_file import quantize_rows

    gen = torch.Generator().manual_seed(4)
    records = []
    for name, n, k in LINEAR_SHAPES:
        w16 = (torch.randn(n, k, generator=gen) / math.sqrt(k)).to(device, torch.bfloat16)
        w8, scale = (t.to(device) for t in quantize_rows(w16.float()))
        records += [_linear_case(name, m, w16, w8, scale, bw) for m in LINEAR_ROWS]
        records.append(_widen_case(name, w16, w8, scale, bw))
        _log(f"done fp8 linear {name}")
    return records


def format_linear(records: list[dict]) -> str:
    rows = [r for r in records if r["op"] == "fp8_linear"]
    if not rows:
        return ""
    lines = ["", "FP8 weights for Llama-3-8B's decode GEMMs: ms (x its byte floor); fp8_linear = "
                 "weight-only Triton, scaled_mm = torch._scaled_mm with rows quantized per token",
             f"{'gemm':<9}{'M':>5}{'bf16 cuBLAS':>18}{'fp8_linear':>18}{'scaled_mm':>18}"]
    for r in rows:
        sm = (f"{r['scaled_mm_ms']:>9.3f} ({r['scaled_mm_x_floor']:.2f}x)"
              if "scaled_mm_ms" in r else f"{'error':>18}")
        lines.append(f"{r['name']:<9}{r['M']:>5}{r['bf16_ms']:>9.3f} ({r['bf16_x_floor']:.2f}x)"
                     f"{r['fp8_ms']:>9.3f} ({r['fp8_x_floor']:.2f}x){sm}")
    widen = [r for r in records if r["op"] == "fp8_widen"]
    if widen:
        lines += ["", f"Prefill ({PREFILL_ROWS} rows) on tiled float8 weights: the widen for cuBLAS, "
                      "ms (x its byte floor), then the GEMM",
                  f"{'gemm':<9}{'eager widen':>12}{'widen_fp8':>18}{'fp8_widen':>18}"
                  f"{'widen+GEMM':>12}{'bf16 GEMM':>11}"]
        lines += [f"{r['name']:<9}{r['eager_widen_ms']:>12.3f}{r['widen_ms']:>9.3f} "
                  f"({r['widen_x_floor']:.2f}x){r['kernel_widen_ms']:>9.3f} "
                  f"({r['kernel_widen_x_floor']:.2f}x){r['fp8_gemm_ms']:>12.3f}"
                  f"{r['bf16_gemm_ms']:>11.3f}" for r in widen]
    return "\n".join(lines)


def _sweep_plans(m: int, chosen: Any) -> list[Any]:
    """The planner's plan, then a fixed grid per row regime (BLOCK_M 16, 32 or 64): M is not
    specialized by the kernel, so each grid entry compiles once per regime and is reused by
    every GEMM and row count in it (about 90 compiles for the whole sweep)."""
    from polarc.plugins.fp8_linear import Fp8LinearPlan

    if m <= 32:  # weight streaming: tile shape x split-K; (block_n, block_k, warps, stages)
        block_m, splits = (16 if m <= 16 else 32), (1, 2, 4, 8)
        tiles = [(16, 256, 4, 4), (32, 128, 4, 4), (32, 256, 4, 3), (32, 256, 4, 4),
                 (64, 128, 4, 4), (64, 256, 4, 3), (64, 256, 4, 4), (128, 128, 4, 4),
                 (256, 128, 8, 3)]  # 256 channels: half the rows' widening per weight byte
    else:
        block_m, splits = 64, (1, 2, 4)
        tiles = [(64, 128, 4, 3), (64, 128, 4, 4), (64, 256, 4, 3), (128, 64, 4, 4),
                 (128, 128, 4, 3), (128, 128, 8, 3), (128, 128, 8, 4)]
    grid = [Fp8LinearPlan(block_m, bn, bk, num_warps=w, num_stages=st, split_k=s)
            for bn, bk, w, st in tiles for s in splits]
    return [chosen] + [p for p in grid if p != chosen]


def _plan_label(p: Any) -> str:
    return f"{p.block_m}x{p.block_n}x{p.block_k} s{p.split_k} w{p.num_warps} st{p.num_stages}"


def _fp8_calls(x: torch.Tensor, weights: list[torch.Tensor], scale: torch.Tensor,
               out: torch.Tensor, plan: Any) -> list:
    """One `fp8_linear` call per weight copy (time_graph rotates them)."""
    from polarc.plugins.fp8_linear import fp8_linear

    return [lambda w=w: fp8_linear(x, w, scale, out=out, plan=plan) for w in weights]


def linear_sweep_cases(*, bw: float, device: torch.device,
                       rows: tuple[int, ...] = SWEEP_ROWS) -> list[dict]:
    """`fp8_linear` under every plan of `_sweep_plans` for each decode GEMM of `LINEAR_SHAPES`
    and each row count of `rows`: one record per (GEMM, rows, plan). The weight is
    rotated over copies that together exceed L2, so that every plan streams it from HBM as
    the byte floor assumes (the smaller GEMMs' fp8 weights would otherwise stay in L2)."""
    from polarc.plugins.fp8_linear import plan_fp8_linear

    from polarc.format.engine_file import quantize_rows

    sms = num_sms(device)
    records = []
    for name, n, k in LINEAR_SHAPES:
        w8, scale = quantize_rows(torch.randn(n, k, device=device) / math.sqrt(k))
        weights = [w8] + [w8.clone() for _ in range(sets_to_rotate(n * k) - 1)]
        w_ref = (w8.float() * scale[:, None]).to(torch.bfloat16)
        for m in rows:
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            out = torch.empty(m, n, device=device, dtype=torch.bfloat16)
            ref = (x @ w_ref.T).float()
            floor = _fp8_floor_ms(m, n, k, bw)
            chosen = plan_fp8_linear(m, n, k, sms=sms)
            # bf16 rows under every plan; fp16 rows (nothing to widen per tile: what the
            # rows' widening costs) under the planner's plan
            half = [(chosen, torch.float16)]
            for plan, x_dtype in [(p, torch.bfloat16) for p in _sweep_plans(m, chosen)] + half:
                rec = dict(op="fp8_linear_sweep", name=name, M=m, N=n, K=k, floor8_ms=floor,
                           planner=plan == chosen, x_dtype=str(x_dtype).removeprefix("torch."),
                           **dataclasses.asdict(plan))
                xs, outs = (x, out) if x_dtype == torch.bfloat16 else (x.half(), out.half())
                try:
                    outs.fill_(float("nan"))
                    ms = time_graph(_fp8_calls(xs, weights, scale, outs, plan))
                    err = ((outs.float() - ref).norm() / ref.norm()).item()  # the last replay's
                    rec.update(ms=ms, x_floor=ms / floor, rel_err=err)
                    if not err < 2e-2:  # NaN included: a split that never finished
                        _log(f"fp8 linear sweep {name} M={m} {_plan_label(plan)}: WRONG, "
                             f"relative error {err:.3g}")
                except Exception as exc:  # e.g. a tile over the shared memory: keep sweeping
                    _log(f"fp8 linear sweep {name} M={m} {_plan_label(plan)}: {str(exc)[:200]}")
                    rec["error"] = str(exc)[:200]
                records.append(rec)
        del w8, weights, w_ref
        torch.cuda.empty_cache()
        _log(f"done fp8 linear sweep {name}")
    return records


def format_linear_sweep(records: list[dict]) -> str:
    """Per (GEMM, rows): the planner's plan and the fastest correct one (wrong plans are
    logged by linear_sweep_cases and left out)."""
    rows = [r for r in records if r["op"] == "fp8_linear_sweep" and r.get("rel_err", 1) < 2e-2]
    if not rows:
        return ""
    lines = ["", "fp8_linear plan sweep, Llama-3-8B decode GEMMs: ms (x byte floor); plan = "
                 "BLOCK_MxBLOCK_NxBLOCK_K, split-K, warps, stages; bf16 rows, and the "
                 "planner's plan on fp16 rows",
             f"{'gemm':<9}{'M':>5}  {'planner':<24}{'ms':>16}  {'best':<30}{'ms':>16}{'plans':>7}"
             f"{'fp16 rows':>12}"]
    for key in dict.fromkeys((r["name"], r["M"]) for r in rows):
        every = [r for r in rows if (r["name"], r["M"]) == key]
        case = [r for r in every if r.get("x_dtype", "bfloat16") == "bfloat16"]
        half = [r for r in every if r.get("x_dtype") == "float16"]
        if not case:
            continue
        best = min(case, key=lambda r: r["ms"])
        ours = next((r for r in case if r["planner"]), None)
        cells = []
        for r in (ours, best):
            if r is None:
                cells.append(f"{'error':<24}{'':>16}")
                continue
            plan = _plan_label(SimpleNamespace(**r))
            width = 30 if r is best else 24
            cells.append(f"{plan:<{width}}{r['ms']:>7.4f} ({r['x_floor']:>5.2f}x)")
        fp16 = next((f"{r['ms']:>12.4f}" for r in half), f"{'-':>12}")
        lines.append(f"{key[0]:<9}{key[1]:>5}  {cells[0]}  {cells[1]}{len(case):>7}{fp16}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- GEMM


CHAIN_LAYERS = 32


def _step_order_chain(x: torch.Tensor, layers: list[dict], head: Any,
                      lin: Callable[..., torch.Tensor]) -> torch.Tensor:
    """x through each layer's qkv (its first 4096 outputs on), o, gate_up (SwiGLU), down,
    then the LM head: ``lin(x, name, weight, next_weight)``, next_weight being what the
    runtime's GEMM prefetches (o gate_up's, gate_up down's, down the next qkv's or the head's)."""
    for i, layer in enumerate(layers):
        after = layers[i + 1]["qkv"] if i + 1 < len(layers) else head
        a = lin(lin(x, "qkv", layer["qkv"])[:, :4096], "o", layer["o"], layer["gate_up"])
        x = lin(lin(a, "gate_up", layer["gate_up"], layer["down"]), "down", layer["down"], after)
    return lin(x, "lm_head", head)


def _plan_override(spec: tuple[int, ...], m: int, n: int, k: int,
                   device: torch.device) -> Any:
    """The planner's plan for an ``[m, k] x [k, n]`` GEMM with `spec`'s fields in place:
    ``(WARPS, STAGES[, BLOCK_M[, SPLIT[, SWAP[, PAIR[, GROUP[, TMA]]]]]])``, a SPLIT of 0 the
    planner's (GROUP: row blocks per weight block in launch order, `Fp8LinearPlan.group_m`;
    TMA 1: tiles read by TMA, `Fp8LinearPlan.tma`)."""
    from polarc.plugins.fp8_linear import plan_fp8_linear

    plan = plan_fp8_linear(m, n, k, sms=num_sms(device))
    warps, stages, *more = spec
    return dataclasses.replace(
        plan, num_warps=warps, num_stages=stages,
        block_m=more[0] if more else plan.block_m,
        split_k=more[1] if len(more) > 1 and more[1] else plan.split_k,
        swap_ab=bool(more[2]) if len(more) > 2 else plan.swap_ab,
        x_pair=bool(more[3]) if len(more) > 3 else plan.x_pair,
        group_m=more[4] if len(more) > 4 else plan.group_m,
        tma=bool(more[5]) if len(more) > 5 else plan.tma)


def _time_chain(what: str, x0: torch.Tensor, layers: list[dict], head: Any,
                lin: Callable[..., torch.Tensor], *, layout: str, floor: float,
                weight_gb: float) -> dict:
    """One chain (`_step_order_chain`) timed in a CUDA graph: its record, with the error
    where it cannot run (e.g. a plan over the shared memory), so a sweep keeps going."""
    m = x0.shape[0]
    rec = dict(op=f"{what}_linear_chain", M=m, layout=layout, floor_ms=floor,
               weight_gb=weight_gb)
    try:
        ms = time_graph([lambda: _step_order_chain(x0, layers, head, lin)], reps=15)
        rec.update(ms=ms, x_floor=ms / floor)
        _log(f"{what} linear chain M={m} {layout}: {ms:.3f} ms ({ms / floor:.2f}x floor)")
    except Exception as exc:
        rec["error"] = str(exc)[:200]
        _log(f"{what} linear chain M={m} {layout}: {str(exc)[:200]}")
    return rec


def linear_chain_cases(*, bw: float, device: torch.device, rows: tuple[int, ...] = (32,),
                       tiles: tuple[str, ...] = ()) -> list[dict]:
    """A decode step's FP8 linear layers alone, in step order: Llama-3-8B's 32 layers (qkv,
    o, gate_up with its SwiGLU, down; each input the previous output) then the LM head, in
    one CUDA graph: the GEMMs' time in a step, launch gaps and ramps included, without the
    step's other kernels; floor = all weight bytes / copy bandwidth. Three times: the weights
    as stored ([N, K]), laid out tile by tile as a loaded engine keeps them (`tile_fp8`), and
    tiled with each GEMM prefetching the next one's first bytes as the runtime's do (o the
    gate_up's, gate_up the down's, down the next qkv's or the LM head's); then once per entry
    of `tiles`, ``ROWSxKxWARPSxSTAGES[xBLOCK_M[xSPLIT[xSWAP[xPAIR]]]]`` (e.g. ``128x256x4x3``):
    tiles of that shape, the planner's plans with those warps and pipeline stages (and rows
    per program, split-K (0: the planner's), the transposed product and x as two float8
    terms, where given), with the prefetch."""
    from polarc.plugins.fp8_linear import fp8_linear

    from polarc.format.engine_file import FP8_TILE, quantize_rows, tile_fp8

    shapes = dict((name, (n, k)) for name, n, k in LINEAR_SHAPES)
    layers = [{name: quantize_rows(torch.randn(n, k, device=device) / math.sqrt(k))
               for name, (n, k) in shapes.items() if name != "lm_head"}
              for _ in range(CHAIN_LAYERS)]
    head = quantize_rows(torch.randn(*shapes["lm_head"], device=device) / 64)
    wbytes = sum(w.numel() for layer in layers for w, _ in layer.values()) + head[0].numel()
    floor = wbytes / bw * 1e3

    def tiled(tile):
        return ([{name: (tile_fp8(w, swiglu=name == "gate_up", tile=tile), s)
                  for name, (w, s) in layer.items()} for layer in layers],
                (tile_fp8(head[0], tile=tile), head[1]))

    def layouts():  # (label, layers, LM head, (warps, stages) or None, prefetch)
        yield "rows", layers, head, None, False  # (one layout's tiles built at a time)
        yield "tiles", *tiled(FP8_TILE), None, False
        yield "tiles+pf", *tiled(FP8_TILE), None, True
        for spec in tiles:
            bn, bk, warps, stages, *more = (int(v) for v in spec.split("x"))
            yield f"tiles {spec}", *tiled((bn, bk)), (warps, stages, *more), True

    records = []
    for layout, ws, lm, override, prefetch in layouts():
        for m in rows:
            x0 = torch.randn(m, 4096, device=device, dtype=torch.bfloat16)

            def lin(x, name, wp, nxt=None, m=m, override=override, prefetch=prefetch):
                plan = None if override is None else _plan_override(
                    override, m, wp[1].shape[0], x.shape[1], device)
                return fp8_linear(x, *wp, swiglu=name == "gate_up", plan=plan,
                                  prefetch=nxt[0] if prefetch and nxt else None)

            records.append(_time_chain("fp8", x0, ws, lm, lin, layout=layout, floor=floor,
                                       weight_gb=wbytes / 1e9))
        del ws, lm
        torch.cuda.empty_cache()
    return records


def bf16_linear_chain_cases(*, bw: float, device: torch.device, rows: tuple[int, ...] = (32,),
                            plans: tuple[str, ...] = ()) -> list[dict]:
    """`linear_chain_cases`' chain with bf16 weights, a step's linear layers when only the KV
    cache is float8: cuBLAS (`F.linear` on ``[N, K]``, the runtime's path; gate_up's output
    halved by slicing, its SwiGLU left out: the GEMMs alone) against `fp8_linear` on the same
    ``[N, K]`` rows (what the runtime could hand it without changing prefill's weights) and
    on 16-bit tiles of 128 x 64 values, no widening either way, SwiGLU in gate_up's epilogue,
    the tiles without and with the L2 prefetch; then once per entry of `plans`,
    ``BLOCK_NxBLOCK_KxWARPSxSTAGES[xBLOCK_M[xSPLIT[xSWAP]]]`` (e.g. ``128x64x4x5``): the kernel
    on the ``[N, K]`` rows with the planner's plans so changed (a SPLIT of 0 the planner's),
    or, as ``tWARPSxSTAGES[xBLOCK_M[xSPLIT[xSWAP[xPAIR[xGROUP[xTMA]]]]]]`` (`_plan_override`),
    on the tiles with the prefetch; above
    `FP8_KERNEL_ROWS` rows (prefill) also ``widen``: each tile widened back to ``[N, K]``
    (`fp8_widen`) for cuBLAS, what the runtime does there with float8 tiles; floor = the bf16
    weight bytes / copy bandwidth. (Rows padded to a stride off a power of two read like the
    rows, cuBLAS's too: H100, RESULTS.md session 53.)"""
    from polarc.plugins.fp8_linear import fp8_linear, fp8_widen

    from polarc.format.engine_file import tile_fp8
    from polarc.runtime.kernels import FP8_KERNEL_ROWS

    shapes = dict((name, (n, k)) for name, n, k in LINEAR_SHAPES)
    rows_first = [{name: torch.randn(n, k, device=device, dtype=torch.bfloat16) / math.sqrt(k)
                   for name, (n, k) in shapes.items() if name != "lm_head"}
                  for _ in range(CHAIN_LAYERS)]
    head = torch.randn(*shapes["lm_head"], device=device, dtype=torch.bfloat16) / 64
    wbytes = 2 * (sum(w.numel() for layer in rows_first for w in layer.values()) + head.numel())
    floor = wbytes / bw * 1e3
    ones = {name: torch.ones(n, device=device) for name, (n, _) in shapes.items()}
    tiles = [{name: tile_fp8(w, swiglu=name == "gate_up", tile=(128, 64))
              for name, w in layer.items()} for layer in rows_first]
    head_tiles = tile_fp8(head, tile=(128, 64))

    records = []
    for layout in ("cublas", "rows", "tiles", "tiles+pf", "widen",
                   *(f"tiles+pf {p[1:]}" if p.startswith("t") else f"rows {p}" for p in plans)):
        ws, lm = (tiles, head_tiles) if layout.startswith(("tiles", "widen")) else \
            (rows_first, head)
        spec = tuple(int(v) for v in layout.split()[1].split("x")) if " " in layout else None
        if spec is not None and layout.startswith("tiles"):  # (the tile fixes N and K)
            spec = (128, 64, *spec)
        for m in rows if layout != "widen" else [m for m in rows if m > FP8_KERNEL_ROWS]:
            x0 = torch.randn(m, 4096, device=device, dtype=torch.bfloat16)

            def lin(x, name, w, nxt=None, layout=layout, spec=spec, m=m):
                if layout in ("cublas", "widen"):
                    if layout == "widen":
                        w = fp8_widen(w, ones[name], x.shape[1], x.dtype, swiglu=name == "gate_up")
                    y = F.linear(x, w)
                    return y[:, :y.shape[1] // 2] if name == "gate_up" else y
                plan = None
                if spec is not None:  # (N from the scales: a tiled weight's first axis is N's tiles)
                    plan = dataclasses.replace(
                        _plan_override(spec[2:], m, ones[name].shape[0], x.shape[1], device),
                        block_n=spec[0], block_k=spec[1])
                return fp8_linear(x, w, ones[name], swiglu=name == "gate_up", plan=plan,
                                  prefetch=nxt if layout.startswith("tiles+pf") else None)

            records.append(_time_chain("bf16", x0, ws, lm, lin, layout=layout, floor=floor,
                                       weight_gb=wbytes / 1e9))
    return records


def format_linear_chain(records: list[dict]) -> str:
    lines = []
    for op, what in (("fp8_linear_chain", "FP8"), ("bf16_linear_chain", "bf16")):
        rows = [r for r in records if r["op"] == op and "ms" in r]
        if rows:
            lines += ["", f"A step's {what} linear layers alone (Llama-3-8B, {CHAIN_LAYERS} layers "
                          f"+ LM head, {rows[0]['weight_gb']:.2f} GB, floor "
                          f"{rows[0]['floor_ms']:.3f} ms)",
                      f"{'M':>4}  {'weights':<24}{'ms':>8}{'x floor':>9}"]
            lines += [f"{r['M']:>4}  {r['layout']:<24}{r['ms']:>8.3f}{r['x_floor']:>9.2f}"
                      for r in rows]
    return "\n".join(lines)


def gemm_cases(
    *,
    quick: bool = False,
    bw: float,
    device: torch.device,
    batches: tuple[int, ...] | None = None,
    densities: tuple[float, ...] = GEMM_DENSITIES,
) -> list[dict]:
    """§2: OPT-6.7B MLP, dense cuBLAS pair vs the selective pair at each union density."""
    dtype = torch.bfloat16
    d, n_total = GEMM_D, GEMM_N
    gen = torch.Generator().manual_seed(1)
    w1 = torch.randn(n_total, d, device=device, dtype=dtype) / math.sqrt(d)
    b1 = 0.1 * torch.randn(n_total, device=device, dtype=dtype)
    w2 = torch.randn(d, n_total, device=device, dtype=dtype) / math.sqrt(n_total)  # nn.Linear
    w2t = w2.T.contiguous()  # neuron-major, what the selective kernel streams
    batches = batches or ((1, 64) if quick else BATCHES)
    records: list[dict] = []
    for b in batches:
        x = torch.randn(b, d, device=device, dtype=dtype)
        base = dict(op="gemm", model="opt-6.7b", B=b, d=d, N=n_total, dtype="bf16")
        h_dense = torch.empty(b, n_total, device=device, dtype=dtype)
        o_dense = torch.empty(b, d, device=device, dtype=dtype)

        def dense_up(x=x, h=h_dense):
            torch.relu_(torch.addmm(b1, x, w1.T, out=h))

        def dense_down(h=h_dense, o=o_dense):
            torch.mm(h, w2.T, out=o)

        def dense_pair(up=dense_up, down=dense_down):
            up()
            down()

        w_bytes = n_total * d * 2
        dense = {}
        for name, fn, nbytes in (("cublas_up", dense_up, w_bytes), ("cublas_down", dense_down,
                                                                    w_bytes),
                                 ("cublas_pair", dense_pair, 2 * w_bytes)):
            dense[name] = time_graph([fn])
            records.append(_gemm_record(base, name, 1.0, n_total, dense[name], nbytes, bw,
                                        None, None))
        for rho in densities:
            n = n_total if rho >= 1.0 else max(128, round(rho * n_total / 128) * 128)
            up_plan = plan_selective_gemm(b, n, d, sms=num_sms(device), kind="up")
            down_plan = plan_selective_gemm(b, d, n, sms=num_sms(device))
            ws_up = selective_gemm_workspace(b, n, up_plan, device)
            ws_down = selective_gemm_workspace(b, d, down_plan, device)
            sel_bytes = n * d * 2
            # several index sets over the same weights, rotated: each set's rows are mostly
            # different rows, so a small selection is not served from L2 on the next call
            n_sets = sets_to_rotate(2 * sel_bytes, most=16)
            ups, downs, pairs = [], [], []
            for _ in range(n_sets):
                idx = torch.randperm(n_total, generator=gen)[:n].int().to(device)
                h = torch.empty(b, n, device=device, dtype=dtype)
                o = torch.empty(b, d, device=device, dtype=dtype)

                def up(x=x, idx=idx, h=h, ws=ws_up, plan=up_plan):
                    selective_gemm_up(x, w1, b1, idx, out=h, workspace=ws, plan=plan,
                                      check_indices=False)

                def down(idx=idx, h=h, o=o, ws=ws_down, plan=down_plan):
                    selective_gemm_down(h, w2t, idx, out=o, workspace=ws, plan=plan,
                                        check_indices=False)

                def pair(up=up, down=down):
                    up()
                    down()

                ups.append(up)
                downs.append(down)
                pairs.append(pair)

            for name, fns, nbytes, dense_name in (
                ("selective_up", ups, sel_bytes, "cublas_up"),
                ("selective_down", downs, sel_bytes, "cublas_down"),
                ("selective_pair", pairs, 2 * sel_bytes, "cublas_pair"),
            ):
                ms = time_graph(fns)
                plan = {"up": up_plan, "down": down_plan}.get(name.split("_")[1])
                records.append(_gemm_record(base, name, n / n_total, n, ms, nbytes, bw, plan,
                                            dense[dense_name]))
        _log(f"done gemm B={b}")
    return records


def _gemm_record(base, kernel, density, n, ms, need_bytes, bw, plan, dense_ms) -> dict:
    rec = dict(base, kernel=kernel, density=density, n=n, ms=ms, floor_ms=need_bytes / bw * 1e3,
               gbps=need_bytes / (ms * 1e-3) / 1e9, bw_frac=need_bytes / (ms * 1e-3) / bw)
    if plan is not None:
        rec.update(block_m=plan.block_m, block_n=plan.block_n, block_k=plan.block_k,
                   split_k=plan.split_k, num_warps=plan.num_warps, num_stages=plan.num_stages)
    if dense_ms is not None:
        rec["vs_cublas"] = ms / dense_ms
        if kernel == "selective_pair" and density < 1.0:
            rec["target_vs_cublas"] = density + 0.1
            rec["meets_target"] = rec["vs_cublas"] <= density + 0.1
    return rec


# ----------------------------------------------------------------------------- report


def format_table(records: list[dict], env: dict) -> str:
    """Plain-text tables: attention grouped by shape, then the GEMM pair."""
    lines = [f"{env['device']} | torch {env['torch']} | triton {env['triton']} | bf16 | "
             f"copy bandwidth {env['copy_bandwidth_gbps']:.0f} GB/s (read + write)"]
    attn = [r for r in records if r["op"] == "attention"]
    if attn:
        lines.append("")
        lines.append("§1 selective attention (decode, D=128): ms; x = time / SDPA dense; "
                     "%bw = bytes needed / time / copy bw; ! = target missed")
        hdr = (f"{'model':<10}{'B':>4}{'S':>6} {'rows':<6}{'SDPA':>7}"
               + "".join(f"{'rho=' + format(r, 'g'):>18}" for r in DENSITIES))
        lines.append(hdr)
        keys = sorted({(r["model"], r["B"], r["S"], r["ragged"]) for r in attn},
                      key=lambda t: (t[0], t[1], t[2], t[3]))
        for model, b, s, ragged in keys:
            rs = [r for r in attn if (r["model"], r["B"], r["S"], r["ragged"])
                  == (model, b, s, ragged)]
            sd = next((r for r in attn if r["kernel"] == "sdpa_dense" and r["model"] == model
                       and r["B"] == b and r["S"] == s), None)
            cells = []
            for rho in DENSITIES:
                r = next((r for r in rs if r["kernel"] != "sdpa_dense"
                          and abs(r["density"] - rho) < 1e-6), None)
                if r is None:
                    cells.append(f"{'-':>18}")
                    continue
                x = f"{r['vs_sdpa']:.2f}x" if "vs_sdpa" in r else ""
                miss = "!" if r.get("meets_target") is False or r.get("meets_bw_target") is False \
                    else " "
                cells.append(f"{r['ms']:>7.3f} {x:>6}{r['bw_frac'] * 100:>3.0f}%{miss}")
            sdpa = f"{sd['ms']:>7.3f}" if sd else f"{'-':>7}"
            lines.append(f"{model:<10}{b:>4}{s:>6} {'ragged' if ragged else 'equal':<6}{sdpa}"
                         + "".join(cells))
    gemm = [r for r in records if r["op"] == "gemm"]
    if gemm:
        lines.append("")
        lines.append("§2 selective GEMM pair (OPT-6.7B MLP, d=4096, N=16384): ms; x = time / "
                     "dense cuBLAS pair; target x <= rho + 0.1; ! = missed")
        dens = sorted({r["density"] for r in gemm if r["kernel"] == "selective_pair"})
        lines.append(f"{'B':>4}{'cuBLAS':>8}" + "".join(f"{'rho=' + format(r, '.2g'):>18}"
                                                       for r in dens))
        for b in sorted({r["B"] for r in gemm}):
            dense = next(r for r in gemm if r["B"] == b and r["kernel"] == "cublas_pair")
            cells = []
            for rho in dens:
                r = next((r for r in gemm if r["B"] == b and r["kernel"] == "selective_pair"
                          and r["density"] == rho), None)
                if r is None:
                    cells.append(f"{'-':>18}")
                    continue
                miss = "!" if r.get("meets_target") is False else " "
                cells.append(f"{r['ms']:>7.3f} {r['vs_cublas']:>5.2f}x{r['bw_frac'] * 100:>3.0f}%"
                             f"{miss}")
            lines.append(f"{b:>4}{dense['ms']:>8.3f}" + "".join(cells))
    return "\n".join(lines)


def run_kernel_benchmarks(json_path: Path | None = None, quick: bool = False,
                          *, attention: bool = True, gemm: bool = True,
                          paged: bool = True, fp8_only: bool = False,
                          linear: bool = False, linear_sweep: bool = False,
                          sweep_rows: tuple[int, ...] = SWEEP_ROWS,
                          linear_chain: bool = False, chain_rows: tuple[int, ...] = (32,),
                          chain_tiles: tuple[str, ...] = (), chain_plans: tuple[str, ...] = (),
                          bf16_chain: bool = False) -> list[dict]:
    """Run §1 and §2 on the current CUDA device; print the tables; write JSON if asked.

    Returns the records (one per case). Raises RuntimeError without CUDA (the CLI turns that
    into a one-line error).
    """
    if not torch.cuda.is_available():
        raise RuntimeError("kernel benchmarks need a CUDA GPU")
    device = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(0)
    bw = copy_bandwidth(device)
    env = environment(bw, device)
    env["read_bandwidth_gbps"] = read_bandwidth(device) / 1e9
    _log(f"{env['device']}: copy bandwidth {bw / 1e9:.0f} GB/s, read-only "
         f"{env['read_bandwidth_gbps']:.0f} GB/s")
    records: list[dict] = []
    if attention:
        records += attention_cases(quick=quick, bw=bw, device=device)
    if gemm:
        records += gemm_cases(quick=quick, bw=bw, device=device)
    if paged:
        records += paged_cases(bw=bw, device=device, quick=quick, fp8_only=fp8_only)
    if linear:
        records += linear_cases(bw=bw, device=device)
    if linear_sweep:
        records += linear_sweep_cases(bw=bw, device=device, rows=sweep_rows)
    if linear_chain:
        records += linear_chain_cases(bw=bw, device=device, rows=chain_rows, tiles=chain_tiles)
    if bf16_chain:
        records += bf16_linear_chain_cases(bw=bw, device=device, rows=chain_rows,
                                           plans=chain_plans)
    print(format_table(records, env) + format_paged(records) + format_linear(records)
          + format_linear_sweep(records) + format_linear_chain(records))
    if json_path is not None:
        write_json(json_path, {"environment": env, "records": records}, force=True)
    return records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="write one record per case to this file")
    ap.add_argument("--quick", action="store_true", help="a subset of the shapes")
    ap.add_argument("--no-attention", action="store_true")
    ap.add_argument("--no-gemm", action="store_true")
    ap.add_argument("--paged", action="store_true", help="only the paged table")
    ap.add_argument("--fp8", action="store_true", help="only the float8-cache table")
    ap.add_argument("--fp8-linear", action="store_true",
                    help="only the FP8-weight GEMM table")
    ap.add_argument("--fp8-linear-sweep", action="store_true",
                    help="only the FP8-weight GEMM plan sweep (planner's plan vs the best found)")
    ap.add_argument("--fp8-linear-chain", action="store_true",
                    help="only a step's FP8 linear layers, in step order in one graph")
    ap.add_argument("--bf16-linear-chain", action="store_true",
                    help="only a step's bf16 linear layers in one graph: cuBLAS against "
                         "fp8_linear on 16-bit tiles")
    ap.add_argument("--chain-rows", default="32",
                    help="the chain's row counts, comma-separated (default: %(default)s)")
    ap.add_argument("--chain-tiles", default="",
                    help="also tiles ROWSxKxWARPSxSTAGES[xBLOCK_M[xSPLIT[xSWAP[xPAIR[xGROUP"
                         "[xTMA]]]]]], comma-separated (e.g. 128x256x4x3, "
                         "256x128x8x3x64x0x0x1, 128x128x4x4x32x0x0x0x1x1)")
    ap.add_argument("--chain-plans", default="",
                    help="the bf16 chain also on [N, K] rows with plans "
                         "BLOCK_NxBLOCK_KxWARPSxSTAGES[xBLOCK_M[xSPLIT[xSWAP]]], or on tiles "
                         "with tWARPSxSTAGES[xBLOCK_M[xSPLIT[xSWAP[xPAIR[xGROUP[xTMA]]]]]], "
                         "comma-separated (e.g. 128x64x4x5,t8x3x256x0x1x0x8x1)")
    ap.add_argument("--sweep-rows", default=",".join(map(str, SWEEP_ROWS)),
                    help="the sweep's row counts, comma-separated (default: %(default)s)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("Error: kernel benchmarks need a CUDA GPU (none is visible here).")
    linear_only = args.fp8_linear or args.fp8_linear_sweep or args.fp8_linear_chain \
        or args.bf16_linear_chain
    only = args.paged or args.fp8 or linear_only
    run_kernel_benchmarks(args.json, args.quick, attention=not (args.no_attention or only),
                          gemm=not (args.no_gemm or only), paged=not linear_only,
                          fp8_only=args.fp8, linear=args.fp8_linear,
                          linear_sweep=args.fp8_linear_sweep,
                          sweep_rows=tuple(int(m) for m in args.sweep_rows.split(",")),
                          linear_chain=args.fp8_linear_chain,
                          chain_rows=tuple(int(m) for m in args.chain_rows.split(",")),
                          chain_tiles=tuple(t for t in args.chain_tiles.split(",") if t),
                          chain_plans=tuple(t for t in args.chain_plans.split(",") if t),
                          bf16_chain=args.bf16_linear_chain)


if __name__ == "__main__":
    main()
