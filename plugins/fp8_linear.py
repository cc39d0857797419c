"""Weight-only FP8 linear layer: ``y = x @ (w * scale[:, None]).T (+ bias)``, the weight
streamed as float8 e4m3 (one byte a value) and widened in registers.

Decode GEMMs have 1-256 rows and are bound by the weight bytes they read, so halving those
bytes halves their floor; the activations stay in their dtype (no activation quantization).

Layouts:

- ``x``      ``[M, K]`` bf16/fp16/fp32, last axis contiguous (any row stride).
- ``w``      ``[N, K]`` float8_e4m3fn, last axis contiguous (any row stride >= K):
  ``nn.Linear(K, N).weight`` quantized row by row (row n = output channel n), as
  `polarc.format.engine_file.quantize_rows` stores it;
  or laid out tile by tile, ``[cdiv(N, TN), cdiv(K, TK), TN, TK]`` (tile (i, j): rows TN*i..,
  columns TK*j.., zero-padded; with ``swiglu`` its rows interleaved gate 0, up 0, gate 1, ...),
  as `polarc.format.engine_file.tile_fp8` keeps a loaded engine's weights on CUDA: each K
  block a program reads is then one contiguous run of bytes (-7% for a step's FP8 GEMMs on
  the H100); the tiles set BLOCK_K and BLOCK_N (or BLOCK_N is a slice of their
  rows: `launch_plan`), and N comes from ``scale``. Or the same in x's bf16 / fp16: 16-bit
  weights, nothing to widen (``scale`` ones): the runtime's bf16 / fp16 linears at decode
  sizes up to 32 rows, on their ``[N, K]`` rows (`Kernels.wide_linears`), or as 128 x 64
  tiles (`Runtime(tile_linears=True)`, `lay_out_wide_linears`).
- ``scale``  ``[N]`` float32: output channel n's weights are ``w[n] * scale[n]``.
- ``bias``   ``[N]`` x's dtype, or None.
- out        ``[M, N]`` x's dtype; ``[M, N / 2]`` with ``swiglu`` (w = ``[gate; up]``).

Algorithm: one program per (block of BLOCK_N output channels, block of BLOCK_M rows, split of
K); it streams its weight rows over its K range in blocks of BLOCK_K, widens each float8 block
to fp16 (one conversion instruction per two values on sm_89+; bf16 would take three) and
accumulates ``x_block @ w_block.T`` in fp32 on the tensor cores with the rows of x cast to fp16
(fp32 x: fp32 math throughout). The scale, the bias and the cast to x's dtype are the epilogue.
With ``plan.x_pair`` (the planner's choice for 33-64 rows on Hopper) the weight is not widened:
x is first split per row into two float8 terms and a scale (`split_rows_fp8`, one launch;
together about bf16's precision) and each K block is two float8 x float8 products on wgmma,
which at 64 rows is the multiply and widening work that held the GEMMs at 1.8x their floor.

Split-K (``plan.split_k > 1``): a decode GEMM with few output blocks would otherwise leave SMs
idle and run a long serial K loop per program, so K is cut into ``split_k`` equal ranges (a
whole number of BLOCK_K each). Each split stores its partial to a workspace
``[split_k, M, N]``, fp32, or in x's dtype with ``plan.narrow_partials`` (the planner's
choice: the last split's wait for and read-back of the others' partials is most of a split
GEMM's tail, and half the bytes took 0.47 ms off a Llama-3-8B step at 64 rows, 0.15 ms at
32; H100), and bumps its output tile's int32 counter (acq_rel atomic); the split that sees
``split_k - 1`` adds the partials in split order (deterministic whichever finishes last),
runs the epilogue and resets the counter to 0. One launch, no host sync, no memset:
CUDA-graph safe. The partials are allocated per call (caching allocator, no launch); the
counters once per device, zeroed, and kept zero by the kernel (`_tile_counters`). So split
calls on one device must not run concurrently on two streams (they would share counters);
calls in sequence on one stream, graphs included, are fine.

Prefill (hundreds of rows and up, bound by arithmetic) on float8 weights hands cuBLAS a bf16
weight instead: `fp8_widen` makes it from the tiles in one pass. 16-bit tiles have nothing to
widen and run here at every row count (`launch_plan`'s prefill plans).

The plan depends on shapes only (CUDA-graph safe). fp16 holds every e4m3 value exactly;
activations must stay within fp16's range (|x| < 65504), true of the normalised inputs and MLP
products of the models polarc builds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ._triton_util import (
    cdiv,
    check_launchable,
    has_tma,
    has_wgmma,
    next_pow2,
    num_sms,
    prefetch_l2,
)
from .reference import FP8, fp8_linear_reference
from .reference import split_rows_fp8 as split_rows_fp8_reference

__all__ = ["Fp8LinearPlan", "RmsNormParts", "fp8_linear", "fp8_linear_reference", "fp8_widen",
           "plan_fp8_linear", "split_rows_fp8", "split_rows_fp8_reference"]

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _fp8_linear_operands(Scale, Bias, Y, SumSq, NormW, offs_m, rows, mask_m, mask_n, stride_ym,
                         sumsq_cols, HAS_BIAS: tl.constexpr, RESIDUAL: tl.constexpr,
                         NORM: tl.constexpr, SUMSQ_PAD: tl.constexpr):
    """What the epilogue reads besides the product: each column's scale and bias, each row's
    sums of squares (NORM), the residual rows and the next norm's weight (RESIDUAL). Loaded
    before the K loop, their round trips overlap the stream; after it, each would add one to
    the GEMM's tail (a load waits behind the stores before it, and split-K's handover is
    three round trips already). Unused ones are stand-ins."""
    scale = tl.load(Scale + rows, mask=mask_n, other=0.0)
    bias = scale
    if HAS_BIAS:
        bias = tl.load(Bias + rows, mask=mask_n, other=0.0).to(tl.float32)
    sumsq = scale
    if NORM:
        offs_c = tl.arange(0, SUMSQ_PAD)
        sumsq = tl.load(SumSq + offs_m[:, None].to(tl.int64) * sumsq_cols + offs_c[None, :],
                        mask=mask_m[:, None] & (offs_c < sumsq_cols)[None, :], other=0.0)
    h = scale
    g = scale
    if RESIDUAL:
        h = tl.load(Y + offs_m[:, None].to(tl.int64) * stride_ym + rows[None, :],
                    mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        # [1, BLOCK_N], the layout of its use: a vector would be converted through shared
        # memory before the loop, its warps waiting on the load there
        g = tl.load(NormW + rows[None, :], mask=mask_n[None, :], other=0.0).to(tl.float32)
    return scale, bias, sumsq, h, g


@triton.jit
def _fp8_linear_finish(acc, scale, bias, sumsq, h, g, Y, offs_m, rows, mask_m, mask_n, stride_ym,
                       pid_n, N, K, SumSq, Scaled, sumsq_cols, norm_eps, HAS_BIAS: tl.constexpr,
                       SWIGLU: tl.constexpr, BLOCK_N: tl.constexpr, RESIDUAL: tl.constexpr,
                       NORM: tl.constexpr):
    """Epilogue (`_fp8_linear_operands` gave its inputs): per-channel scale, bias (of weight
    rows `rows`), SwiGLU, cast, store.
    NORM: each row first times ``rsqrt(sum(SumSq[row, :sumsq_cols]) / K + norm_eps)``.
    RESIDUAL: Y is the residual stream: ``Y += product`` (the product rounded to Y's dtype
    first, as the unfused add sees it); each row's sum of squares over this block's columns
    of the new Y goes to ``SumSq[row, pid_n]`` and the new Y times NormW to Scaled."""
    if NORM:
        acc = acc * (1.0 / tl.sqrt(tl.sum(sumsq, axis=1) / K + norm_eps))[:, None]
    acc = acc * scale[None, :]
    if HAS_BIAS:
        acc = acc + bias[None, :]
    if RESIDUAL:
        mask = mask_m[:, None] & mask_n[None, :]
        at = offs_m[:, None].to(tl.int64) * stride_ym + rows[None, :]
        h = h.to(tl.float32) + acc.to(Y.dtype.element_ty).to(tl.float32)
        h = h.to(Y.dtype.element_ty)
        tl.store(Y + at, h, mask=mask)
        tl.store(Scaled + at, (h.to(tl.float32) * g).to(Y.dtype.element_ty), mask=mask)
        hf = tl.where(mask, h.to(tl.float32), 0.0)
        tl.store(SumSq + offs_m.to(tl.int64) * sumsq_cols + pid_n, tl.sum(hf * hf, axis=1),
                 mask=mask_m)
    elif SWIGLU:  # columns gate, up, gate, up, ... (`_weight_rows`): pair them
        gate, up = tl.split(tl.reshape(acc, [acc.shape[0], BLOCK_N // 2, 2]))
        offs_c = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        tl.store(Y + offs_m[:, None].to(tl.int64) * stride_ym + offs_c[None, :],
                 (gate * tl.sigmoid(gate) * up).to(Y.dtype.element_ty),
                 mask=mask_m[:, None] & (offs_c < N // 2)[None, :])
    else:
        tl.store(Y + offs_m[:, None].to(tl.int64) * stride_ym + rows[None, :],
                 acc.to(Y.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _weight_rows(pid_n, N, BLOCK_N: tl.constexpr, SWIGLU: tl.constexpr):
    """The weight rows of output block pid_n: BLOCK_N consecutive ones; with SWIGLU (w = [gate;
    up], N = 2F) the gate and up rows of BLOCK_N / 2 channels, interleaved."""
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if SWIGLU:
        return offs_n // 2 + (offs_n % 2) * (N // 2)
    return offs_n


# M varies call to call (batch size): not specializing it (M == 1, M % 16) keeps one compile
# per plan instead of three; the row mask is all M feeds.
@triton.jit(do_not_specialize=["M"])
def _fp8_linear_kernel(
    X, X2, XScale, W, WDesc, Scale, Bias, Y, Part, Counters, Next, SumSq, NormW, Scaled,
    M, N, K, k_per_split, next_segs, next_seg_stride, next_seg_len, sumsq_cols, norm_eps,
    stride_xm, stride_ym, stride_pk, stride_wn,
    HAS_BIAS: tl.constexpr, DOT_FP16: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, SWIGLU: tl.constexpr = False, TILED: tl.constexpr = False,
    PREFETCH: tl.constexpr = False, SWAP_AB: tl.constexpr = False,
    RESIDUAL: tl.constexpr = False, NORM: tl.constexpr = False, SUMSQ_PAD: tl.constexpr = 1,
    X_PAIR: tl.constexpr = False, TILE_SLICES: tl.constexpr = 1, W_WIDE: tl.constexpr = False,
    GROUP_M: tl.constexpr = 1, W_TMA: tl.constexpr = False,
):
    """Grid (cdiv(N, BLOCK_N), cdiv(M, BLOCK_M), SPLIT_K): one output block and one K range
    (``k_per_split`` long, a multiple of BLOCK_K) per program. EVEN_K: K % BLOCK_K == 0, so
    no block needs a K mask. SWIGLU: w is [gate; up] and the program's block pairs the two
    (`_weight_rows`), so the epilogue writes ``silu(gate) * up`` of BLOCK_N / 2 channels (y
    is ``[M, N / 2]``).
    TILED: w is laid out tile by tile (module docstring), so each K block of a program's
    weight is one contiguous BLOCK_N x BLOCK_K run of bytes, zero-padded past N and K; the
    tiles hold TILE_SLICES x BLOCK_N channels, and program pid_n reads slice pid_n % TILE_SLICES
    of tile pid_n // TILE_SLICES (its rows are the same ones: a tile's rows are consecutive).
    PREFETCH: once its own work is done, each program asks L2 for a share of the next GEMM's
    first weight bytes (`_prefetch_segments`). SWAP_AB: the product formed as ``w @ x.T``, the
    widened weight tile as the MMA's register operand and x from shared memory (fp16 dots
    only; the same sums, transposed back before the epilogue).
    RESIDUAL: Y is the residual stream, updated in place, and the next RMS norm's parts are
    written; NORM: the rows are scaled by the norm they stand for (`_fp8_linear_finish`): the
    K loop is the same either way.
    X_PAIR: x comes as two float8 terms, ``x ~ XScale[:, None] * (X + X2)`` (`split_rows_fp8`),
    and each K block is two float8 products of the stored weight tile: no widening at all.
    W_WIDE: w holds x's 16-bit dtype, not float8: the dots run in that dtype, nothing widened.
    GROUP_M > 1 (several row blocks): programs in launch order take GROUP_M row blocks of one
    weight block before the next weight block, so a weight block comes from DRAM once per group
    of row blocks, not once per row block (x's rows stay in L2 meanwhile).
    W_TMA: the tiles are read through WDesc, a TMA descriptor of W viewed as
    ``[NT * KT * TN, TK]`` with ``[BLOCK_N, BLOCK_K]`` boxes: a K block is one bulk copy into
    shared memory, with no per-thread addresses or loads."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    if GROUP_M > 1:
        blocks_n = tl.num_programs(0)
        pid = pid_m * blocks_n + pid_n  # launch order (axis 0 first)
        first_m = pid // (GROUP_M * blocks_n) * GROUP_M
        group_rows = tl.minimum(tl.num_programs(1) - first_m, GROUP_M)
        pid_m = first_m + pid % (GROUP_M * blocks_n) % group_rows
        pid_n = pid % (GROUP_M * blocks_n) // group_rows
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # the block's columns of [M, N]
    rows = _weight_rows(pid_n, N, BLOCK_N, SWIGLU)  # ... and their weight rows
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    x_ptrs = X + offs_m[:, None].to(tl.int64) * stride_xm + (k_lo + offs_k)[None, :]
    x_lo_ptrs = X2 + offs_m[:, None].to(tl.int64) * stride_xm + (k_lo + offs_k)[None, :]
    if TILED:  # tile (pid_n / S, k_lo / BLOCK_K) of [N / (S BLOCK_N), K / BLOCK_K, S BLOCK_N, BLOCK_K]
        tile = (pid_n // TILE_SLICES) * tl.cdiv(K, BLOCK_K) + k_lo // BLOCK_K
        w_ptrs = W + tile.to(tl.int64) * (TILE_SLICES * BLOCK_N * BLOCK_K) \
            + ((pid_n % TILE_SLICES) * BLOCK_N + tl.arange(0, BLOCK_N))[:, None] * BLOCK_K \
            + offs_k[None, :]
        w_row = tile * (TILE_SLICES * BLOCK_N) + (pid_n % TILE_SLICES) * BLOCK_N  # (W_TMA)
    else:
        w_ptrs = W + rows[:, None].to(tl.int64) * stride_wn + (k_lo + offs_k)[None, :]
    scale, bias, sumsq, h, g = _fp8_linear_operands(
        Scale, Bias, Y, SumSq, NormW, offs_m, rows, mask_m, mask_n, stride_ym, sumsq_cols,
        HAS_BIAS, RESIDUAL, NORM, SUMSQ_PAD)
    if X_PAIR:  # (loaded with the other epilogue operands, before the K loop)
        x_scale = tl.load(XScale + offs_m[:, None], mask=mask_m[:, None], other=0.0)
    if SWAP_AB and DOT_FP16:
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if EVEN_K:
            x_mask = mask_m[:, None]
        else:
            mask_k = (k0 + offs_k) < K
            x_mask = mask_m[:, None] & mask_k[None, :]
        x = tl.load(x_ptrs, mask=x_mask, other=0.0)
        if X_PAIR:
            x_lo = tl.load(x_lo_ptrs, mask=x_mask, other=0.0)
            x_lo_ptrs += BLOCK_K
        if W_TMA:
            w = WDesc.load([w_row, 0])
            w_row += TILE_SLICES * BLOCK_N
        elif TILED:  # padded: no mask
            w = tl.load(w_ptrs)
        elif EVEN_K:
            w = tl.load(w_ptrs, mask=mask_n[:, None], other=0.0)
        else:
            w = tl.load(w_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        if X_PAIR:
            acc = tl.dot(x, tl.trans(w), acc)
            acc = tl.dot(x_lo, tl.trans(w), acc)
        elif DOT_FP16:
            if W_WIDE:
                xd = x.to(W.dtype.element_ty)
                wd = w
            else:
                xd = x.to(tl.float16)
                wd = w.to(tl.float16)
            if SWAP_AB:
                acc = tl.dot(wd, tl.trans(xd), acc)
            else:
                acc = tl.dot(xd, tl.trans(wd), acc)
        else:
            acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc,
                         input_precision="ieee")
        x_ptrs += BLOCK_K
        w_ptrs += TILE_SLICES * BLOCK_N * BLOCK_K if TILED else BLOCK_K
    if SWAP_AB and DOT_FP16:
        acc = tl.trans(acc)
    if X_PAIR:
        acc = acc * x_scale
    if SPLIT_K == 1:
        _fp8_linear_finish(acc, scale, bias, sumsq, h, g, Y, offs_m, rows, mask_m, mask_n,
                           stride_ym, pid_n, N, K, SumSq, Scaled, sumsq_cols, norm_eps, HAS_BIAS,
                           SWIGLU, BLOCK_N, RESIDUAL, NORM)
    else:
        mask = mask_m[:, None] & mask_n[None, :]
        part = Part + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
        tl.store(part + pid_k.to(tl.int64) * stride_pk, acc.to(Part.dtype.element_ty),
                 mask=mask)
        tl.debug_barrier()  # every thread's partial stores precede the release below
        tile = pid_m * tl.num_programs(0) + pid_n
        done = tl.atomic_add(Counters + tile, 1, sem="acq_rel", scope="gpu")
        if done == SPLIT_K - 1:  # the last split of this tile: the others' partials are visible
            total = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for _ in tl.static_range(SPLIT_K):  # split order, not arrival order: deterministic
                total += tl.load(part, mask=mask, other=0.0,
                                 cache_modifier=".cg").to(tl.float32)  # skip L1
                part += stride_pk
            _fp8_linear_finish(total, scale, bias, sumsq, h, g, Y, offs_m, rows, mask_m,
                               mask_n, stride_ym, pid_n, N, K, SumSq, Scaled, sumsq_cols,
                               norm_eps, HAS_BIAS, SWIGLU, BLOCK_N, RESIDUAL, NORM)
            tl.atomic_xchg(Counters + tile, 0, sem="relaxed", scope="gpu")  # zero for next call
    if PREFETCH:
        _prefetch_next(Next, next_segs, next_seg_stride, next_seg_len)


@triton.jit
def _prefetch_next(Next, segs, seg_stride, seg_len):
    """Asks L2 for the first `seg_len` bytes of each segment ``Next + i * seg_stride``
    (segment i from program i mod programs), 128-byte lines, 1,024 lines a pass; no wait."""
    programs = tl.num_programs(0) * tl.num_programs(1) * tl.num_programs(2)
    pid = (tl.program_id(2) * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(0) \
        + tl.program_id(0)
    lines = tl.arange(0, 1024) * 128
    for seg in range(pid, segs, programs):
        base = Next + seg.to(tl.int64) * seg_stride
        for off in range(0, seg_len, 1024 * 128):
            prefetch_l2(base + tl.minimum(off + lines, seg_len - 128))


@triton.jit
def _split_rows_kernel(X, Hi, Lo, S, K, stride_xm, BLOCK_K: tl.constexpr):
    """Grid (M,): one row, whole (BLOCK_K >= K), in one load."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    mask = offs < K
    x = tl.load(X + row * stride_xm + offs, mask=mask, other=0.0).to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-30)
    fp8_max = tl.full([], 448.0, tl.float32)
    # IEEE division (Triton's `/` is approximate), so the terms are the reference's bit for bit
    t = tl.clamp(x * tl.math.div_rn(fp8_max, amax), -448.0, 448.0)
    hi = t.to(tl.float8e4nv)
    tl.store(Hi + row * K + offs, hi, mask=mask)
    tl.store(Lo + row * K + offs, (t - hi.to(tl.float32)).to(tl.float8e4nv), mask=mask)
    tl.store(S + row, tl.math.div_rn(amax, fp8_max))


def split_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`split_rows_fp8_reference` in one launch: x ``[M, K]`` bf16/fp16/fp32 (last axis
    contiguous) -> hi, lo ``[M, K]`` float8_e4m3fn contiguous and s ``[M]`` float32, with
    ``x ~ s[:, None] * (hi + lo)``."""
    if x.dim() != 2 or x.dtype not in _DTYPES or x.stride(-1) != 1:
        raise ValueError(f"split_rows_fp8: x must be [M, K] bf16/fp16/fp32 with a contiguous "
                         f"last axis, got {x.dtype} {tuple(x.shape)}")
    check_launchable(_split_rows_kernel, x.device, "split_rows_fp8")
    m, k = x.shape
    hi = torch.empty(m, k, dtype=FP8, device=x.device)
    lo = torch.empty_like(hi)
    s = torch.empty(m, dtype=torch.float32, device=x.device)
    if m:
        block = next_pow2(k)
        _split_rows_kernel[(m,)](x, hi, lo, s, k, x.stride(0), BLOCK_K=block,
                                 num_warps=8 if block > 4096 else 4)
    return hi, lo, s


@triton.jit
def _fp8_widen_kernel(W, Scale, Out, N, K, stride_on, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, SWIGLU: tl.constexpr):
    """Grid (cdiv(N, BLOCK_N), cdiv(K, BLOCK_K)): one program per tile of the tiled layout,
    widened, scaled by its rows' scales in fp32, rounded once, stored to its rows of Out."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    tile = pid_n * tl.num_programs(1) + pid_k
    w = tl.load(W + tile.to(tl.int64) * (BLOCK_N * BLOCK_K)
                + tl.arange(0, BLOCK_N)[:, None] * BLOCK_K + tl.arange(0, BLOCK_K)[None, :])
    rows = _weight_rows(pid_n, N, BLOCK_N, SWIGLU)
    mask_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N) < N
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    scale = tl.load(Scale + rows, mask=mask_n, other=0.0)
    tl.store(Out + rows[:, None].to(tl.int64) * stride_on + cols[None, :],
             (w.to(tl.float32) * scale[:, None]).to(Out.dtype.element_ty),
             mask=mask_n[:, None] & (cols < K)[None, :])


def fp8_widen(w: torch.Tensor, scale: torch.Tensor, k: int, dtype: torch.dtype, *,
              swiglu: bool = False) -> torch.Tensor:
    """The dequantized weight ``[N, k]`` from a float8 weight laid out tile by tile (module
    docstring; `swiglu`: a gate_up's paired rows, put back in order), N = ``len(scale)``:
    ``w[n] * scale[n]`` in fp32, rounded once to `dtype`: what prefill hands cuBLAS. One read
    of the tiles and one write (about 3 bytes a value for bf16, against 5 and two passes for
    its torch form, `polarc.format.engine_file.widen_fp8`, which defines it bitwise). Tiles
    of `dtype` itself (16-bit weights kept tile by tile, scale ones) come back untiled.

    Example::

        w16 = fp8_widen(tiles, scale, 4096, torch.bfloat16)  # tiles [112, 32, 128, 128]
    """
    check_launchable(_fp8_widen_kernel, w.device, "fp8_widen")
    n = scale.shape[0]
    if w.dtype not in (FP8, dtype) or w.dim() != 4 or not w.is_contiguous() or tuple(
            w.shape[:2]) != (cdiv(n, w.shape[2]), cdiv(k, w.shape[3])):
        raise ValueError(f"fp8_widen: w must be contiguous float8_e4m3fn (or {dtype}) tiles "
                         f"[cdiv(N={n}, TN), cdiv(K={k}, TK), TN, TK], got {w.dtype} "
                         f"{tuple(w.shape)}")
    if scale.dtype != torch.float32 or scale.dim() != 1 or scale.stride(0) != 1:
        raise ValueError(f"fp8_widen: scale must be contiguous float32 [N], got {scale.dtype} "
                         f"{tuple(scale.shape)}")
    if swiglu and (n % 2 or w.shape[2] % 2):
        raise ValueError(f"fp8_widen: swiglu needs an even N and tile, got N={n}")
    out = torch.empty(n, k, dtype=dtype, device=w.device)
    _fp8_widen_kernel[w.shape[:2]](w, scale, out, n, k, out.stride(0), BLOCK_N=w.shape[2],
                                   BLOCK_K=w.shape[3], SWIGLU=swiglu, num_warps=8)
    return out


@dataclass(frozen=True)
class RmsNormParts:
    """The RMS norm of residual rows h ``[M, K]`` in the two parts a ``residual`` call of
    `fp8_linear` leaves: ``scaled = h * weight`` (h's dtype) and ``sumsq`` ``[M, C]`` float32,
    the rows' sums of squares in parts; ``norm(h) = scaled * rsqrt(sumsq.sum(1) / K + eps)``.
    A call with ``norm=`` takes x = ``scaled`` and applies the rsqrt to its rows' products:
    the residual add and the norm then cost no launch, and neither GEMM's K loop changes."""

    scaled: torch.Tensor
    sumsq: torch.Tensor
    eps: float


@dataclass(frozen=True)
class Fp8LinearPlan:
    """Tiles and split-K of one fp8_linear call; a pure function of the shapes."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    split_k: int = 1
    swap_ab: bool = False  # the product formed transposed, the weight tile as the left operand
    x_pair: bool = False  # x as two float8 terms (`split_rows_fp8`): float8 products, no widening
    narrow_partials: bool = False  # split-K partials stored in x's dtype, not fp32
    group_m: int = 1  # consecutive programs take up to this many row blocks of one weight block
    tma: bool = False  # tiles read by TMA, one bulk copy a K block (sm_90+; an experiment)


_SWAP_ROWS = 64  # above, tiled weights take `launch_plan`'s transposed product ...
_PREFILL_ROWS = 256  # ... up to here; above, 16-bit tiles take its prefill plans
_DECODE_ROWS = 32  # up to here a GEMM streams its weight (decode); above, MMA work grows
_SPLIT_8_ROWS = 16  # up to here K may be split 8 ways; above, at most 4
_PROGRAMS_PER_SM = 1.5
# Above this many rows a GEMM has several row blocks (BLOCK_M is at most 64 on rows, 128 on
# tiles), and consecutive programs share a weight block over up to 8 of them: launched weight
# block by weight block instead, each block was read once per row block (at 256 rows, up to
# twice the bytes; at a prefill pack's 2,048, sixteen times), and x's rows a group reads stay
# in L2
_GROUP_ROWS = 64
_GROUP_M = 8


def plan_fp8_linear(m: int, n: int, k: int, *, sms: int) -> Fp8LinearPlan:
    """Tiles and split-K for an ``[m, k] x [k, n]`` product on `sms` SMs.

    Fitted to a sweep of 21-32 plans for each of Llama-3-8B's five decode GEMMs at 1-256 rows
    on the H200 (`bench_kernels --fp8-linear-sweep`, RESULTS.md): one rule came within 1.05x
    of each point's best plan on geometric mean (worst 1.2x). Weight tiles of 128 channels
    (16 KB per stage at BLOCK_K 128) keep enough bytes in flight; what a small-N GEMM lacks
    is programs, and 2 KB tiles or a long serial K loop ran at 3x the floor. So K is split
    into the fewest of 1, 2, 4, 8 equal ranges that give 1.5 programs per SM; above 16 rows
    splits stop at 4 (at 32 rows on the H100 a split of 8 reduced more partials than it
    gained: 8% of a layer's GEMM time, 2026-12-05 sweeps; the H200 within 0.4% either way),
    and above 32 rows BLOCK_K drops to 64 (the MMA work per byte grows, and more stages fit).
    BLOCK_M is the MMA's 16, else the rows' next power of two up to 64. Pipeline stages: 3
    for decode rows (a step's GEMMs on tiled weights 2-3% faster than 4 on the H100; 2 and 5
    slower, 2026-12-06), except 4 where the GEMM has at most one program per SM (the bytes
    one program keeps in flight are then all its SM streams: a step's GEMMs 1.5% faster at
    32 rows on the H100, 2026-12-06), and 4 above decode rows (K blocks of 64; `fp8_linear`
    caps it at 3 on tiled weights, whose K blocks of 128 hold twice the bytes a stage).
    Above 64 rows (several row blocks) programs are grouped by weight block (`_GROUP_ROWS`).
    """
    block_m = min(64, max(16, next_pow2(m)))
    decode = m <= _DECODE_ROWS
    block_k = 128 if decode else 64
    tiles = cdiv(m, block_m) * cdiv(n, 128)
    k_blocks = cdiv(k, block_k)
    splits = [s for s in ((1, 2, 4, 8) if m <= _SPLIT_8_ROWS else (1, 2, 4)) if s <= k_blocks]
    split = next((s for s in splits if tiles * s >= _PROGRAMS_PER_SM * sms), splits[-1])
    few = tiles * split <= sms
    return Fp8LinearPlan(block_m, 128, block_k, num_warps=4,
                         num_stages=4 if few or not decode else 3, split_k=split,
                         narrow_partials=split > 1, group_m=_GROUP_M if m > _GROUP_ROWS else 1)


def launch_plan(plan: Fp8LinearPlan | None, w: torch.Tensor, m: int, n: int, k: int, *,
                sms: int, fp8_products: bool = False) -> Fp8LinearPlan:
    """The plan `fp8_linear` launches for weight `w` (rows or tiles): `plan`, else the
    planner's; on tiles, the tile is the program's block of N and K. `fp8_products`: the
    device runs float8 x float8 products on wgmma (sm_90) and x is bf16 / fp16. A plan's
    block_n that divides the tile's channels reads a slice of each tile (the kernel's
    TILE_SLICES); any other is the tile's."""
    tiled = w.dim() == 4
    if plan is None:
        plan = plan_fp8_linear(m, n, k, sms=sms)
        planned_stage = plan.block_n * plan.block_k  # float8 weight bytes a stage holds
        if tiled:
            plan = dataclasses.replace(plan, block_n=w.shape[2])
        prefill = tiled and m > _PREFILL_ROWS and w.dtype != FP8
        if prefill:
            # prefill on 16-bit tiles: a step's 129 GEMMs at 512 / 1,024 / 2,048 rows 13.50 /
            # 24.97 / 52.17 ms with the transposed plan below; 128 rows and 4 warps a program
            # 12.53 at 512; 256 rows and 8 warps 23.46 / 45.83 at 1,024 / 2,048 (H100 chain
            # benchmark, 2026-12-07). The stage count is set here, not capped below
            wide = m >= 1024
            plan = dataclasses.replace(plan, block_m=256 if wide else 128,
                                       num_warps=8 if wide else 4,
                                       num_stages=3 if wide else 4, swap_ab=False)
        elif tiled and m > _SWAP_ROWS:
            # 128 rows a program, 8 warps, the product transposed (the weight tile as wgmma's
            # register operand): a step's 129 GEMMs at 128 / 256 rows 7.70 / 13.55 -> 7.36 /
            # 12.58 ms (H100 chain benchmark, 2026-12-06; the same plan untransposed 7.82 /
            # 13.14; at 64 rows half of each program's rows would be padding: 6.93)
            plan = dataclasses.replace(plan, block_m=128, num_warps=8, num_stages=3,
                                       swap_ab=True)
        elif tiled and fp8_products and w.dtype == FP8 and m > _DECODE_ROWS:
            # 33-64 rows: x as two float8 terms, no widening. A step's 129 GEMMs at 64 rows
            # (inputs split beforehand, H200 2026-12-06): 4.45 -> 3.37 ms; the step with the
            # split's launches (Llama-3-8B B=64 fp8-all sparse, H100): 9.04 -> 8.59 ms. At 32
            # rows it loses, transposed onto wgmma or not (GEMMs 2.96 -> 3.49 ms; step 6.93 ->
            # 7.49 ms)
            plan = dataclasses.replace(plan, x_pair=True)
            if plan.split_k > 1 and w.shape[2] % 2 == 0:
                # half a tile's channels a program and half the splits: as many programs,
                # each with half the partials to store and merge (the merge was most of the
                # GEMMs' tail). Llama-3-8B B=64 fp8-all step (qkv, o, down; fp32 partials;
                # H100, 2026-12-07): 8.42 -> 7.36 ms sparse, 11.20 -> 10.15 dense. At 32 rows
                # (widened fp16 products) 64-column tiles lose: 6.77 -> 7.06 ms
                plan = dataclasses.replace(plan, block_n=w.shape[2] // 2,
                                           split_k=plan.split_k // 2)
        if (tiled and not prefill
                and plan.block_n * w.shape[3] * w.element_size() > planned_stage):
            # the tiles' K block holds more bytes a stage than the plan's: 3 stages, not 4
            # (a step's 129 GEMMs at 64 / 128 rows 5.52 -> 4.49 / 10.08 -> 7.58 ms, H100
            # chain benchmark, 2026-12-06). Half tiles hold the plan's: the B=64 step with
            # 4 stages, not 3: 7.26 -> 7.03 ms sparse, 10.05 -> 9.83 dense (H100, 2026-12-07)
            plan = dataclasses.replace(plan, num_stages=min(plan.num_stages, 3))
    if tiled:
        block_n = plan.block_n if w.shape[2] % plan.block_n == 0 else w.shape[2]
        plan = dataclasses.replace(plan, block_n=block_n, block_k=w.shape[3])
    return plan


_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _tile_counters(device: torch.device, tiles: int) -> torch.Tensor:
    """At least `tiles` int32 split-K counters on `device`, all zero (the kernel resets each
    one it uses). Allocated once per device and grown when needed: a per-call torch.zeros
    would cost a memset launch per call. Under CUDA-graph capture a too-small cache is not
    replaced (the new buffer would live in the graph's private pool and its memset runs only
    on replay): that graph gets its own zeroed buffer, its memset captured with it."""
    have = _COUNTERS.get(device)
    if have is not None and have.numel() >= tiles:
        return have
    fresh = torch.zeros(max(1024, next_pow2(tiles)), dtype=torch.int32, device=device)
    if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        _COUNTERS[device] = fresh
    return fresh


# What a GEMM prefetches of the next one's weight. At 32 rows on the H100 (2026-12-06), a step's
# 129 GEMMs alone: 3.315 ms without, 3.255 / 3.272 / 3.359 / 3.438 ms with 4 / 8 / 16 / 32 MB;
# the fp8-all step 0.07 ms shorter with 4 MB than without, 0.03 with 2 MB. More competes with
# the GEMM's own stream: what is gained is the DRAM time a tail and a launch ramp leave unused.
PREFETCH_BYTES = 4 << 20


def _prefetch_segments(nxt: torch.Tensor | None, m: int,
                       device: torch.device) -> tuple[int, int, int]:
    """(segments, stride, length) in bytes of what to prefetch from `nxt` (tiled
    ``[NT, KT, TN, TK]``, module docstring): the start of each of its programs' K ranges under
    its plan for `m` rows, `PREFETCH_BYTES` in all; zeros where nothing is prefetched."""
    if nxt is None:
        return 0, 0, 0
    if nxt.dtype not in (FP8, torch.bfloat16, torch.float16) or nxt.dim() != 4 or \
            not nxt.is_contiguous() or nxt.device != device:
        raise ValueError(f"fp8_linear: prefetch must be a contiguous float8_e4m3fn (or 16-bit) "
                         f"tiled weight [NT, KT, TN, TK] on {device}, got {nxt.dtype} "
                         f"{tuple(nxt.shape)} on {nxt.device}")
    if device.type != "cuda":  # (inline PTX: the interpreter cannot run it)
        return 0, 0, 0
    nt, kt, tn, tk = nxt.shape
    split = plan_fp8_linear(m, nt * tn, kt * tk, sms=num_sms(device)).split_k
    split = split if kt % split == 0 else 1
    stride = kt // split * tn * tk * nxt.element_size()
    length = min(stride, PREFETCH_BYTES // (nt * split)) // 128 * 128
    return (nt * split, stride, length) if length else (0, 0, 0)


def _check_norm(norm: RmsNormParts | None, m: int, device: torch.device) -> None:
    if norm is None:
        return
    ss = norm.sumsq
    if ss.dtype != torch.float32 or ss.dim() != 2 or ss.shape[0] != m or not ss.is_contiguous():
        raise ValueError(f"fp8_linear: norm.sumsq must be contiguous float32 [M={m}, C], got "
                         f"{ss.dtype} {tuple(ss.shape)}")
    if ss.device != device:
        raise ValueError(f"fp8_linear: norm.sumsq must be on {device}")


def _check(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor,
           bias: torch.Tensor | None) -> None:
    if not all(isinstance(t, torch.Tensor) for t in (x, w, scale)):
        raise ValueError("fp8_linear: x, w and scale must be torch.Tensors")
    if x.dim() != 2 or x.dtype not in _DTYPES or x.stride(-1) != 1:
        raise ValueError(f"fp8_linear: x must be [M, K] bf16/fp16/fp32 with a contiguous last "
                         f"axis, got {x.dtype} {tuple(x.shape)}")
    k = x.shape[1]
    n = scale.shape[0] if w.dim() == 4 and scale.dim() == 1 else w.shape[0]
    tiled_shape = w.dim() == 4 and tuple(w.shape[:2]) == (cdiv(n, w.shape[2]),
                                                          cdiv(k, w.shape[3]))
    wide = w.dtype == x.dtype and x.dtype != torch.float32  # 16-bit weights, x's dtype
    rows = w.dim() == 2 and w.shape[1] == k and w.stride(1) == 1 and w.stride(0) >= k
    if (w.dtype != FP8 and not wide) or not (rows or (tiled_shape and w.is_contiguous())):
        raise ValueError(f"fp8_linear: w must be float8_e4m3fn (or x's bf16 / fp16) [N, K={k}] "
                         f"rows with a contiguous last axis, or its contiguous tiles (module "
                         f"docstring), got {w.dtype} {tuple(w.shape)} with strides "
                         f"{w.stride()} for {x.dtype} x")
    if scale.dtype != torch.float32 or tuple(scale.shape) != (n,) or scale.stride(0) != 1:
        raise ValueError(f"fp8_linear: scale must be contiguous float32 [N={n}], got "
                         f"{scale.dtype} {tuple(scale.shape)}")
    if bias is not None and (tuple(bias.shape) != (n,) or bias.stride(0) != 1):
        raise ValueError(f"fp8_linear: bias must be contiguous [N={n}], got {tuple(bias.shape)}")
    devices = {t.device for t in (x, w, scale, bias) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"fp8_linear: all tensors must be on one device, got {devices}")


def fp8_linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor,
               bias: torch.Tensor | None = None, *, out: torch.Tensor | None = None,
               plan: Fp8LinearPlan | None = None, swiglu: bool = False,
               prefetch: torch.Tensor | None = None, residual: torch.Tensor | None = None,
               norm_weight: torch.Tensor | None = None, eps: float = 0.0,
               norm: RmsNormParts | None = None) -> torch.Tensor | RmsNormParts:
    """``x @ (w * scale[:, None]).T + bias`` (layouts: module docstring); returns ``[M, N]``.
    `swiglu`: w holds a SwiGLU MLP's gate rows then its up rows (``[2F, K]``, the fused
    ``gate_up``); returns ``silu(gate) * up`` ``[M, F]``, computed in fp32 before the one
    rounding to x's dtype, with no ``[M, 2F]`` product written or read again.
    `prefetch`: the tiled float8 weight of the GEMM that runs next on the same rows (CUDA
    only; results unchanged): its programs' first weight bytes, `PREFETCH_BYTES` in all, are
    requested into L2 as this call's programs finish, so the next launch's first loads need
    not wait on DRAM while this one's tail leaves DRAM bandwidth unused.
    `residual` (``[M, N]``, x's dtype) with `norm_weight` ``[N]`` and `eps`: the product is
    added into it in place (rounded to its dtype first, as ``residual + y`` would be) instead
    of being returned; the call returns the RMS norm (`norm_weight`, `eps`) of the new rows
    in parts (`RmsNormParts`, sums of squares ``[M, cdiv(N, BLOCK_N)]``). `norm`: x is
    ``norm.scaled`` and the product is that of the norm. Together they put a decoder layer's
    residual add and RMS norm inside the GEMMs either side of it.

    Example::

        y = fp8_linear(x, w8, scale)  # x [B, 4096] bf16, w8 [14336, 4096] float8_e4m3fn
    """
    _check(x, w, scale, bias)
    check_launchable(_fp8_linear_kernel, x.device, "fp8_linear")
    m, k = x.shape
    n = scale.shape[0]
    tiled = w.dim() == 4
    if swiglu and n % 2:
        raise ValueError(f"fp8_linear: swiglu needs gate and up rows, an even N, got N={n}")
    n_out = n // 2 if swiglu else n
    _check_norm(norm, m, x.device)
    if residual is not None:
        if swiglu or out is not None:
            raise ValueError("fp8_linear: residual takes neither swiglu nor out")
        if norm_weight is None or norm_weight.shape != (n,) or norm_weight.stride(0) != 1:
            raise ValueError(f"fp8_linear: residual needs the next norm's weight, contiguous "
                             f"[N={n}]")
        out = residual
    if out is None:
        out = torch.empty(m, n_out, dtype=x.dtype, device=x.device)
    elif out.shape != (m, n_out) or out.dtype != x.dtype or out.stride(-1) != 1:
        raise ValueError(f"fp8_linear: {'residual' if residual is not None else 'out'} must be "
                         f"{x.dtype} [{m}, {n_out}] with a contiguous last axis")
    if m == 0:
        return out if residual is None else RmsNormParts(
            torch.empty_like(out), torch.zeros(0, 1, device=x.device), eps)
    plan = launch_plan(plan, w, m, n, k, sms=num_sms(x.device),
                       fp8_products=x.dtype != torch.float32 and has_wgmma(x.device))
    if plan.x_pair and (x.dtype == torch.float32 or plan.swap_ab or w.dtype != FP8):
        raise ValueError("fp8_linear: plan.x_pair needs bf16 / fp16 x, float8 w and no swap_ab")
    split = plan.split_k
    if not isinstance(split, int) or split < 1:
        raise ValueError(f"fp8_linear: plan.split_k must be an int >= 1, got {split!r}")
    if not isinstance(plan.group_m, int) or plan.group_m < 1:
        raise ValueError(f"fp8_linear: plan.group_m must be an int >= 1, got {plan.group_m!r}")
    w_desc = scale  # (unused unless plan.tma)
    if plan.tma:
        if not tiled or (x.device.type == "cuda" and not has_tma(x.device)):
            raise ValueError("fp8_linear: plan.tma reads tiles (w [NT, KT, TN, TK]) on sm_90+")
        w_desc = TensorDescriptor.from_tensor(w.view(-1, w.shape[3]),
                                              [plan.block_n, w.shape[3]])
    if swiglu and plan.block_n % 2:
        raise ValueError(f"fp8_linear: swiglu needs an even plan.block_n, got {plan.block_n}")
    grid = (cdiv(n, plan.block_n), cdiv(m, plan.block_m), split)
    k_per_split = cdiv(cdiv(k, split), plan.block_k) * plan.block_k
    if split > 1:
        part = torch.empty(split, m, n, device=x.device,
                           dtype=x.dtype if plan.narrow_partials else torch.float32)
        counters = _tile_counters(x.device, grid[0] * grid[1])
    else:  # single pass: no workspace (any tensor serves as the unused pointers)
        part = counters = scale
    segs, seg_stride, seg_len = _prefetch_segments(prefetch, m, x.device)
    sumsq, scaled = (norm.sumsq if norm is not None else scale), scale
    if residual is not None:
        sumsq = torch.empty(m, grid[0], dtype=torch.float32, device=x.device)
        scaled = torch.empty(m, n, dtype=x.dtype, device=x.device)
        if residual.stride(0) != n:
            raise ValueError("fp8_linear: residual must be contiguous")
    # x as two float8 terms and their row scales, or x itself (the other two unused)
    x_hi, x_lo, x_scale = split_rows_fp8(x) if plan.x_pair else (x, x, scale)
    _fp8_linear_kernel[grid](
        x_hi, x_lo, x_scale, w, w_desc, scale, bias if bias is not None else scale, out, part, counters,
        prefetch.view(torch.uint8) if seg_len else scale, sumsq,
        norm_weight if residual is not None else scale, scaled,
        m, n, k, k_per_split, segs, seg_stride, seg_len, sumsq.shape[-1],
        float(norm.eps) if norm is not None else 0.0, x_hi.stride(0), out.stride(0), m * n,
        0 if tiled else w.stride(0),
        HAS_BIAS=bias is not None, DOT_FP16=x.dtype != torch.float32,
        EVEN_K=k % plan.block_k == 0, BLOCK_M=plan.block_m, BLOCK_N=plan.block_n,
        BLOCK_K=plan.block_k, SPLIT_K=split, SWIGLU=swiglu,
        TILED=tiled, PREFETCH=seg_len > 0, SWAP_AB=plan.swap_ab, RESIDUAL=residual is not None,
        NORM=norm is not None, SUMSQ_PAD=next_pow2(sumsq.shape[-1]) if norm is not None else 1,
        X_PAIR=plan.x_pair, TILE_SLICES=w.shape[2] // plan.block_n if tiled else 1,
        W_WIDE=w.dtype != FP8, GROUP_M=plan.group_m, W_TMA=plan.tma,
        num_warps=plan.num_warps, num_stages=plan.num_stages)
    return out if residual is None else RmsNormParts(scaled, sumsq, eps)
