"""Instruction counts of kernel variants as compiled for a GPU, on a machine without one.

Triton compiles ahead of time for a named target (`GPUTarget("cuda", 90, 32)`: Hopper) with
the ptxas and cuobjdump it ships; this compiles the stage-1 selective attention kernel and
the FP8 linear kernel under chosen constants and prints, per variant, registers, spilled
bytes, shared memory, whether the loop's loads were pipelined (async copies in the TTGIR)
and the SASS count of the instructions that set the pace of a streaming kernel: MMAs
(HMMA / HGMMA), float8 conversions (F2FP), shared loads and stores, global-to-shared copies.

Counts are static (every instruction once, the loop body once), so they compare variants;
they are not times. Pointer and stride arguments are marked divisible by 16, as Triton's
launcher marks them at run time (without that it neither vectorizes nor pipelines), and
strides equal to 1 are constants, as the launcher specializes them. Use the Triton of the
GPU the numbers are for (codegen changes between releases): e.g. with a wheel unpacked
beside it, ``PYTHONPATH=/tmp/triton36 python -m polarc.benchmarks.sass_counts``.

    python -m polarc.benchmarks.sass_counts [--attention] [--fp8-linear] [--arch 90]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

COUNTED = ("HMMA", "HGMMA", "F2FP", "LDS", "LDSM", "STS", "LDGSTS", "UTMALDG", "PRMT", "BAR",
           "MUFU")


def compile_counts(fn: Any, types: dict[str, str], constants: dict[str, Any], *, arch: int,
                   num_warps: int, num_stages: int) -> dict[str, Any]:
    """Compile `fn` for sm_`arch` with argument `types` (Triton's signature strings) and
    `constants`; pointers, strides and the GEMM sizes N, K and k_per_split (multiples of 16
    at run time, as the launcher then marks them) are divisible by 16."""
    names = fn.arg_names
    signature = {n: "constexpr" if n in constants else types[n] for n in names}
    aligned = [n for n in names if n not in constants
               and (signature[n].startswith("*") or n.startswith("stride")
                    or n in ("N", "K", "k_per_split"))]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constants,
                                      attrs=attrs),
                            target=GPUTarget("cuda", arch, 32),
                            options=dict(num_warps=num_warps, num_stages=num_stages))
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        sass = subprocess.run([f"{tools}/cuobjdump", "-sass", cubin.name], check=True,
                              capture_output=True, text=True).stdout
        usage = subprocess.run([f"{tools}/cuobjdump", "--dump-resource-usage", cubin.name],
                               check=True, capture_output=True, text=True).stdout
    ops = re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", sass)
    return dict(regs=int(re.search(r"REG:(\d+)", usage)[1]),
                spill_bytes=int(re.search(r"STACK:(\d+)", usage)[1]),
                smem=kernel.metadata.shared,
                pipelined=kernel.asm["ttgir"].count("async_copy_global_to_local") > 0,
                instructions=len(ops), **{op: sum(o == op for o in ops) for op in COUNTED})


def attention_counts(arch: int) -> list[dict[str, Any]]:
    """Stage 1 of selective attention, Llama-3-8B's layer (groups of 4, D=128, 4 of 8 groups),
    paged, bf16 queries, with the constants the wrapper launches it with: the bf16 cache and
    float8 caches with V D-major or position-major."""
    from polarc.plugins import selective_attention as attention

    kernel = attention._selective_attention_kernel

    types = {n: "i32" for n in kernel.arg_names}
    types.update(Q="*bf16", Out="*bf16", K_Sink="*bf16", V_Sink="*bf16", Seqlens="*i32",
                 Groups="*i32", Block_Table="*i32", Partials="*fp32", K_Scale="*fp32",
                 V_Scale="*fp32", qk_scale_log2="fp32")
    rows = []
    for label, fp8, warps, v_position_major in (
            ("bf16, P=64", False, None, False),
            ("fp8, P=128, V D-major", True, None, False),
            ("fp8, P=128, V position-major", True, None, True),
            ("fp8, P=128, V position-major, 8 warps", True, 8, True)):
        page = 128 if fp8 else 64
        plan = attention.plan_selective_attention(32, 4, 4, 8192, 128, sms=132, page_size=page,
                                                  kv_fp8=fp8, num_warps=warps)
        constants = dict(attention._stage1_constants(plan, 4, 128, 4, False, page, fp8, fp8))
        warps, stages = constants.pop("num_warps"), constants.pop("num_stages")
        constants["stride_vs" if v_position_major else "stride_vd"] = 1
        kv = "*fp8e4nv" if fp8 else "*bf16"
        counts = compile_counts(kernel, dict(types, K_Cache=kv, V_Cache=kv), constants,
                                arch=arch, num_warps=warps, num_stages=stages)
        rows.append(dict(kernel="selective_attention", variant=label, **counts))
    return rows


def fp8_linear_counts(arch: int) -> list[dict[str, Any]]:
    """The weight-only FP8 linear at 16-64 bf16 rows, 128-channel tiles; at 64 rows on tiles
    as x's float8 terms (o / down with the step's flags: residual, prefetch), whole tiles with
    4 splits against `launch_plan`'s half tiles with 2; bf16 weights (nothing widened) at 16-64
    rows; at 128 rows on tiles, the transposed product; 16-bit tiles at prefill's row blocks."""
    from polarc.plugins.fp8_linear import _fp8_linear_kernel as kernel

    types = {n: "i32" for n in kernel.arg_names}
    types.update(X="*bf16", X2="*fp8e4nv", XScale="*fp32", W="*fp8e4nv", WDesc="*fp32",
                 Scale="*fp32",
                 Bias="*fp32", Y="*bf16",
                 Part="*fp32", Counters="*i32", Next="*u8", SumSq="*fp32", NormW="*bf16",
                 Scaled="*bf16", norm_eps="fp32")
    # every constexpr set (one left out would compile as a run-time argument)
    plain = dict(HAS_BIAS=False, DOT_FP16=True, EVEN_K=True, SWIGLU=False, TILED=False,
                 PREFETCH=False, SWAP_AB=False, RESIDUAL=False, NORM=False, SUMSQ_PAD=1,
                 X_PAIR=False, TILE_SLICES=1, W_WIDE=False, GROUP_M=1, W_TMA=False)
    rows = []
    for block_m, block_k in ((16, 128), (32, 128), (64, 64)):
        for warps in (4, 8):
            constants = dict(plain, BLOCK_M=block_m, BLOCK_N=128, BLOCK_K=block_k, SPLIT_K=2)
            counts = compile_counts(kernel, types, constants, arch=arch, num_warps=warps,
                                    num_stages=4)
            rows.append(dict(kernel="fp8_linear", variant=f"{block_m}x128x{block_k} w{warps}",
                             **counts))
    for label, block_n, split, part, stages in (
            ("64x128x128 w4 tiles x_pair split 4", 128, 4, "*fp32", 3),
            ("64x64x128 w4 half tiles x_pair split 2", 64, 2, "*bf16", 4)):
        constants = dict(plain, BLOCK_M=64, BLOCK_N=block_n, BLOCK_K=128, SPLIT_K=split,
                         TILED=True, X_PAIR=True, TILE_SLICES=128 // block_n, RESIDUAL=True,
                         PREFETCH=True)
        counts = compile_counts(kernel, dict(types, X="*fp8e4nv", Part=part), constants,
                                arch=arch, num_warps=4, num_stages=stages)
        rows.append(dict(kernel="fp8_linear", variant=f"{label} s{stages}", **counts))
    for block_m in (16, 32, 64):  # 16-bit weights (W_WIDE), tiles of 128 x 64 bf16 values
        constants = dict(plain, BLOCK_M=block_m, BLOCK_N=128, BLOCK_K=64, SPLIT_K=4,
                         TILED=True, PREFETCH=True, W_WIDE=True)
        counts = compile_counts(kernel, dict(types, W="*bf16", Part="*bf16"), constants,
                                arch=arch, num_warps=4, num_stages=4 if block_m < 64 else 3)
        rows.append(dict(kernel="fp8_linear", variant=f"{block_m}x128x64 w4 bf16 tiles split 4",
                         **counts))
    constants = dict(plain, BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, SPLIT_K=2, TILED=True,
                     SWAP_AB=True)
    counts = compile_counts(kernel, types, constants, arch=arch, num_warps=8, num_stages=3)
    rows.append(dict(kernel="fp8_linear", variant="128x128x128 w8 tiles swap_ab", **counts))
    for block_m, stages, tma in ((32, 4, False), (32, 4, True)):  # float8 tiles at decode rows
        constants = dict(plain, BLOCK_M=block_m, BLOCK_N=128, BLOCK_K=128, SPLIT_K=4,
                         TILED=True, PREFETCH=True, W_TMA=tma)
        desc = "tensordesc<fp8e4nv[128, 128]>" if tma else "*fp32"
        counts = compile_counts(kernel, dict(types, WDesc=desc, Part="*bf16"), constants,
                                arch=arch, num_warps=4, num_stages=stages)
        rows.append(dict(kernel="fp8_linear", variant=f"{block_m}x128x128 w4 s{stages} tiles split 4"
                         f"{' tma' if tma else ''}", **counts))
    # 16-bit tiles above decode rows (grouped, one split): `launch_plan`'s transposed plan up
    # to 256 rows and its prefill plans above, beside the transposed product on 256 rows
    for block_m, warps, stages, swap, tma in (
            (128, 8, 3, True, False), (128, 4, 4, False, False), (256, 8, 3, False, False),
            (256, 8, 3, True, False), (256, 8, 4, True, False), (128, 8, 3, True, True),
            (256, 8, 3, False, True), (256, 8, 3, True, True)):
        constants = dict(plain, BLOCK_M=block_m, BLOCK_N=128, BLOCK_K=64, SPLIT_K=1,
                         TILED=True, W_WIDE=True, SWAP_AB=swap, GROUP_M=8, W_TMA=tma)
        desc = "tensordesc<bf16[128, 64]>" if tma else "*fp32"
        counts = compile_counts(kernel, dict(types, W="*bf16", WDesc=desc), constants,
                                arch=arch, num_warps=warps, num_stages=stages)
        rows.append(dict(kernel="fp8_linear", variant=f"{block_m}x128x64 w{warps} s{stages} bf16 "
                         f"tiles{' swap_ab' if swap else ''}{' tma' if tma else ''}", **counts))
    return rows


def format_counts(rows: list[dict[str, Any]]) -> str:
    head = f"{'kernel':<20}{'variant':<40}{'regs':>5}{'spill':>6}{'smem':>7}{'pipe':>5}{'all':>6}"
    lines = [head + "".join(f"{op:>7}" for op in COUNTED)]
    for r in rows:
        lines.append(f"{r['kernel']:<20}{r['variant']:<40}{r['regs']:>5}{r['spill_bytes']:>6}"
                     f"{r['smem']:>7}{'yes' if r['pipelined'] else 'no':>5}{r['instructions']:>6}"
                     + "".join(f"{r[op]:>7}" for op in COUNTED))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--attention", action="store_true", help="only the attention variants")
    ap.add_argument("--fp8-linear", action="store_true", help="only the FP8 linear variants")
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90)")
    args = ap.parse_args()
    both = not (args.attention or args.fp8_linear)
    rows = (attention_counts(args.arch) if args.attention or both else []) \
        + (fp8_linear_counts(args.arch) if args.fp8_linear or both else [])
    print(f"triton {triton.__version__}, sm_{args.arch}: static counts (not times)")
    print(format_counts(rows))


if __name__ == "__main__":
    main()
