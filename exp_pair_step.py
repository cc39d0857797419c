"""Scratch (branch fp8-x-pair): the fp8-all step at 64 rows with the FP8 GEMMs' x as two
float8 terms (the planner on Hopper) against the widened-weight product, in one process,
alternating; then at 32 rows (unchanged: the planner keeps widening there)."""
import gc, json, os
import torch
from polarc.benchmarks.bench_e2e import STEP_REPS, case_runtime
from polarc.benchmarks.timing import time_graph, copy_bandwidth, environment
from polarc.plugins import fp8_linear as F
real_wgmma = F._wgmma
recs, check = [], {}
for b, s in ((64, 4096),):
    rt = case_runtime("llama3-8b", b, s, 0.5, "fp8-all")
    tokens = torch.randint(0, rt.engine.model.spec.vocab, (b,), device="cuda")
    def step():
        rt.seqlens.fill_(s - 1)
        return rt.decode_step(tokens)
    def use(v):
        F._wgmma = real_wgmma if v == "pair" else (lambda d: False)
    lg = {}
    for v in ("widen", "pair"):
        use(v); lg[v] = step().float().clone()
    d = (lg["pair"] - lg["widen"]).norm() / lg["widen"].norm()
    agree = (lg["pair"].argmax(-1) == lg["widen"].argmax(-1)).float().mean()
    check[b] = dict(rel_diff=float(d), top1_agree=float(agree)); print(b, check[b], flush=True)
    for mode in ("sparse", "dense"):
        rt.set_dense(mode == "dense")
        for rnd in range(2 if mode == "sparse" else 1):
            for v in (("widen", "pair") if rnd % 2 == 0 else ("pair", "widen")):
                use(v)
                ms = time_graph([step], reps=STEP_REPS)
                recs.append(dict(B=b, S=s, mode=mode, variant=v, round=rnd, step_ms=ms))
                print(f"B={b} {mode} {v:6s} {ms:7.3f}", flush=True)
    del rt; gc.collect(); torch.cuda.empty_cache()
json.dump({"env": environment(copy_bandwidth(torch.device("cuda"))), "check": check,
           "records": recs}, open(os.path.join(os.environ.get("OUT", "/tmp"), "exp-pair-step.json"), "w"), indent=1)
