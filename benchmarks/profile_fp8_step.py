"""The fp8-all decode step's big kernels, each once inside an NVTX range ``profile``, for Nsight
Compute (compiles and warm-up outside the range): Llama-3-8B's five GEMMs through `fp8_linear`
on tiled float8 weights at `--rows` rows, then selective attention over a float8 page pool as
the runtime keeps it (pages of 128, V position-major, sinks; the runtime's plan) at B=`--rows`,
S=`--seqlen`, 4 and 8 of 8 KV groups. Run by `gpu_check.sh fp8-ncu`:

    ncu --nvtx --nvtx-include "profile/" --section MemoryWorkloadAnalysis ... \\
        python -m polarc.benchmarks.profile_fp8_step --rows 32
"""

from __future__ import annotations

import argparse
import sys

import torch
from polarc.benchmarks.bench_kernels import (
    ATTN_MODELS,
    HEAD_DIM,
    LINEAR_SHAPES,
    _attention_sets,
    _kernel_calls,
    _random_groups,
)
from polarc.plugins._triton_util import num_sms
from polarc.plugins.fp8_linear import fp8_linear
from polarc.plugins.reference import FP8
from polarc.plugins.selective_attention import plan_selective_attention

from polarc.format.engine_file import quantize_rows, tile_fp8


def _profiled(label: str, fn) -> None:
    fn()  # compile and warm up outside the range
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_push("profile")
    fn()
    torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()
    print(f"profiled {label}", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=32, help="rows / batch (default: %(default)s)")
    ap.add_argument("--seqlen", type=int, default=8192, help="cache length (default: %(default)s)")
    args = ap.parse_args()
    m, device = args.rows, torch.device("cuda")
    for name, n, k in LINEAR_SHAPES:
        w, scale = quantize_rows(torch.randn(n, k, device=device) / k ** 0.5)
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        tiles = tile_fp8(w, swiglu=name == "gate_up")
        _profiled(f"fp8_linear {name} at {m} rows",
                  lambda x=x, t=tiles, s=scale, g=name == "gate_up": fp8_linear(x, t, s, swiglu=g))
        del w, tiles
    hq, hkv = ATTN_MODELS["llama3-8b"]
    gen = torch.Generator().manual_seed(0)
    sets = [(q, k.to(FP8), v.to(FP8)) for q, k, v in
            _attention_sets(1, m, hq, hkv, args.seqlen, HEAD_DIM, device, torch.bfloat16)]
    seqlens = torch.full((m,), args.seqlen, dtype=torch.int32, device=device)
    for n_sel in (hkv // 2, hkv):
        plan = plan_selective_attention(m, n_sel, hq // hkv, args.seqlen, HEAD_DIM,
                                        sms=num_sms(device), page_size=128, kv_fp8=True)
        groups = [_random_groups(m, hkv, n_sel, device, gen)]
        (call,) = _kernel_calls(sets, groups, seqlens, plan, 128, gen,
                                torch.ones(hkv, device=device), v_position_major=True)
        _profiled(f"selective_attention float8, {n_sel} of {hkv} groups, {plan}", call)


if __name__ == "__main__":
    main()
