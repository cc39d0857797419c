"""The decode step's time under attention plans other than the planner's, for a §3 case
(default Llama-3-8B, B=32, S=8192, FP8 KV + FP8 weights), dense and sparse: the step as
`bench_e2e` times it, with the runtime's cached plan for each (batch, k) replaced.

    python -m polarc.benchmarks.sweep_step_attention [--cases llama3-8b:32:8192,...] [--variants fp8-all]
        [--plans "s1,s2,s3,s4,s2w8,..."] [--json OUT]

A plan spec is ``s<splits>`` with optional ``w<warps>``, ``st<stages>``, ``n<block>``; ``s1``
runs in one launch. Every spec is timed for the sparse step and, where it fits, the dense one;
``planner`` is the runtime's own plan (timed first and last, as the run's drift check).
`--linear "gate_up:s2,down:s8st4"` then times the sparse step with one FP8 GEMM's plan
replaced at a time (split-K ``s``, stages ``st``; the planner's tiles otherwise).
`--ablate append,norm` times the sparse step with a stage made a no-op (the KV append with
its rotary stage and top-k, a copy of a fixed selection left in its place; the residual add +
norm): its results are meaningless, its time is what fusing that stage away could save at
most. `--ablate residual` times it with the residual adds and norms as their own launches
(not inside the float8 GEMMs).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import re
from pathlib import Path
from typing import Any

import polarc.plugins.fp8_linear as fp8_linear_module
import torch
from polarc.benchmarks.bench_e2e import STEP_REPS, case_runtime
from polarc.benchmarks.bench_kernels import LINEAR_SHAPES
from polarc.benchmarks.timing import copy_bandwidth, environment, time_graph

_SPEC = re.compile(r"s(\d+)(?:w(\d+))?(?:st(\d+))?(?:n(\d+))?$")


def parse_plan_spec(spec: str) -> dict[str, int]:
    """``s2w8st4n64`` -> the AttentionPlan fields it names."""
    hit = _SPEC.match(spec)
    if hit is None:
        raise SystemExit(f"error: plan spec {spec!r} is not s<splits>[w<warps>][st<stages>][n<block>]")
    splits, warps, stages, block = (None if g is None else int(g) for g in hit.groups())
    fields = {"num_splits": splits, "one_launch": splits == 1}
    fields.update({k: v for k, v in (("num_warps", warps), ("num_stages", stages),
                                     ("block_n", block)) if v is not None})
    return fields


def parse_linear_spec(spec: str) -> tuple[str, int, int | None]:
    """``gate_up:s2st4`` -> (GEMM name, split-K, stages or None)."""
    gemm, _, plan_spec = spec.partition(":")
    hit = re.match(r"s(\d+)(?:st(\d+))?$", plan_spec)
    if gemm not in {name for name, _, _ in LINEAR_SHAPES} or hit is None:
        raise SystemExit(f"error: linear spec {spec!r} is not name:s<split>[st<stages>] with a "
                         f"name of {', '.join(name for name, _, _ in LINEAR_SHAPES)}")
    split, stages = hit.groups()
    return gemm, int(split), None if stages is None else int(stages)


ABLATIONS = ("append", "norm", "residual")


def sweep_case(case: str, variant: str, plan_specs: list[str], linear_specs: list[str],
               ablations: list[str] = ()) -> list[dict[str, Any]]:
    """The records of one model:batch:seqlen case (module docstring)."""
    name, batch, seqlen = case.split(":")
    batch, seqlen = int(batch), int(seqlen)
    device = torch.device("cuda")
    rt = case_runtime(name, batch, seqlen, 0.5, variant)  # as bench_e2e times it
    tokens = torch.randint(0, rt.engine.model.spec.vocab, (batch,), device=device)

    def step() -> Any:
        rt.seqlens.fill_(seqlen - 1)
        return rt.decode_step(tokens)

    records: list[dict[str, Any]] = []
    tag = f"{case} {variant}"
    for mode in ("sparse", "dense"):
        rt.set_dense(mode == "dense")
        step()
        own = dict(rt.kernels._plans)  # the planner's plans, one per (batch, k, ...)
        for key, ws in rt.kernels._workspaces.items():  # room for up to 8x the splits
            rt.kernels._workspaces[key] = dataclasses.replace(
                ws, partials=torch.empty(8 * ws.partials.numel(), dtype=torch.float32,
                                         device=device))
        for spec in ["planner", *plan_specs, "planner"]:
            rt.kernels._plans.clear()
            for key, plan in own.items():
                rt.kernels._plans[key] = plan if spec == "planner" else \
                    dataclasses.replace(plan, **parse_plan_spec(spec))
            try:
                ms = time_graph([step], reps=STEP_REPS)
            except Exception as exc:  # a plan that does not fit (shared memory) is skipped
                print(f"{tag} {mode:6s} {spec:10s} failed: {str(exc).splitlines()[0][:120]}",
                      flush=True)
                continue
            plans = sorted({str(p) for p in rt.kernels._plans.values()})
            records.append({"case": case, "variant": variant, "mode": mode, "spec": spec,
                            "step_ms": ms, "plans": plans})
            print(f"{tag} {mode:6s} {spec:10s} {ms:7.3f} ms  {' | '.join(plans)[:160]}",
                  flush=True)
        rt.kernels._plans.clear()
        rt.kernels._plans.update(own)
    rt.set_dense(False)
    shapes = {name: (n, k) for name, n, k in LINEAR_SHAPES}
    planner = fp8_linear_module.plan_fp8_linear
    for spec in (["planner", *linear_specs, "planner"] if linear_specs else []):
        change = None if spec == "planner" else parse_linear_spec(spec)

        def plan(m: int, n: int, k: int, *, sms: int, change=change) -> Any:
            own = planner(m, n, k, sms=sms)
            if change is None or (n, k) != shapes[change[0]]:
                return own
            return dataclasses.replace(own, split_k=change[1],
                                       num_stages=change[2] or own.num_stages)

        fp8_linear_module.plan_fp8_linear = plan
        try:
            ms = time_graph([step], reps=STEP_REPS)
        finally:
            fp8_linear_module.plan_fp8_linear = planner
        records.append({"case": case, "variant": variant, "mode": "sparse", "linear": spec,
                        "step_ms": ms})
        print(f"{tag} sparse {spec:14s} {ms:7.3f} ms", flush=True)
    kernels, ops, residual_ops = rt.kernels, rt.ops, rt.residual_ops

    def no_append(q: torch.Tensor, *args: Any, groups: torch.Tensor | None = None,
                  **kwargs: Any) -> torch.Tensor:
        if groups is not None:  # a fixed, valid selection (one copy launch) for the attention
            groups.copy_(rt.all_groups[:groups.shape[0], :groups.shape[1]])
        return q

    for what in (["none", *ablations] if ablations else []):
        if what == "append":
            rt.kernels = dataclasses.replace(kernels, rope_write_kv=no_append)
        elif what == "norm":
            rt.ops = rt.residual_ops = dataclasses.replace(
                ops, add_norm=lambda h, delta, w, b, eps: (h, h))
        elif what == "residual":
            rt.residual_ops = ops
        try:
            ms = time_graph([step], reps=STEP_REPS)
        finally:
            rt.kernels, rt.ops, rt.residual_ops = kernels, ops, residual_ops
        records.append({"case": case, "variant": variant, "mode": "sparse", "ablate": what,
                        "step_ms": ms})
        print(f"{tag} sparse without {what:8s} {ms:7.3f} ms", flush=True)
    return records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="llama3-8b:32:8192", help="model:batch:seqlen,...")
    ap.add_argument("--variants", default="fp8-all", help="bf16, fp8-kv, fp8-all (comma-separated)")
    ap.add_argument("--plans", default="s1,s2,s3,s4,s6,s8,s2st4,s3st4,s1w8,s2w8")
    ap.add_argument("--linear", default="", help="name:s<split>[st<stages>],... (FP8 GEMMs)")
    ap.add_argument("--ablate", default="", help=f"comma-separated: {', '.join(ABLATIONS)}")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    ablations = [a for a in args.ablate.split(",") if a]
    if set(ablations) - set(ABLATIONS):
        raise SystemExit(f"error: --ablate takes {', '.join(ABLATIONS)}, got {args.ablate!r}")
    plan_specs = args.plans.split(",")
    linear_specs = [s for s in args.linear.split(",") if s]
    for spec in plan_specs:  # bad specs fail here, not after an engine is built
        parse_plan_spec(spec)
    for spec in linear_specs:
        parse_linear_spec(spec)
    if not torch.cuda.is_available():
        raise SystemExit("error: sweep_step_attention times the decode step on a CUDA GPU; "
                         "none is available here")
    bw = copy_bandwidth(torch.device("cuda"))
    records = []
    for case in args.cases.split(","):
        for variant in args.variants.split(","):
            records += sweep_case(case, variant, plan_specs, linear_specs, ablations)
            gc.collect()
            torch.cuda.empty_cache()
    if args.json:
        args.json.write_text(json.dumps({"env": environment(bw), "records": records}, indent=1))


if __name__ == "__main__":
    main()
