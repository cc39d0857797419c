"""Scratch (branch fp8-x-pair): the fp8-all step with the FP8 GEMMs' x as two float8 terms
against the widened-weight product, in one process, alternating.
  widen    - no float8 products (the planner as on main)
  pair     - the planner on Hopper: x as two terms at 33-64 rows
(the transposed two-term product, tried in session 45, lost at 32 rows and is gone)"""
import gc, json, os, time
import torch
from polarc.benchmarks.bench_e2e import STEP_REPS, case_runtime
from polarc.benchmarks.timing import time_graph, copy_bandwidth, environment
from polarc.plugins import fp8_linear as F
real_wgmma = F.has_wgmma


def use(v):
    F.has_wgmma = (lambda d: False) if v == "widen" else real_wgmma


recs, check = [], []
env = environment(copy_bandwidth(torch.device('cuda')))
t0 = time.time()
for model, b, s, variants in (("llama3-8b", 64, 4096, ("widen", "pair")),):
    rt = case_runtime(model, b, s, 0.5, "fp8-all")
    tokens = torch.randint(0, rt.engine.model.spec.vocab, (b,), device="cuda")
    def step():
        rt.seqlens.fill_(s - 1)
        return rt.decode_step(tokens)
    lg = {}
    for v in variants:
        use(v); lg[v] = step().float().clone()
    for v in variants[1:]:
        d = (lg[v] - lg["widen"]).norm() / lg["widen"].norm()
        agree = (lg[v].argmax(-1) == lg["widen"].argmax(-1)).float().mean()
        check.append(dict(model=model, B=b, variant=v, rel_diff=float(d), top1_agree=float(agree)))
        print(check[-1], flush=True)
    for mode in ("sparse", "dense"):
        rt.set_dense(mode == "dense")
        for rnd in range(2 if mode == "sparse" else 1):
            for v in (variants if rnd % 2 == 0 else variants[::-1]):
                use(v)
                ms = time_graph([step], reps=STEP_REPS)
                recs.append(dict(model=model, B=b, S=s, mode=mode, variant=v, round=rnd, step_ms=ms))
                print(f"B={b} S={s} {mode} {v:8s} {ms:7.3f}  ({time.time() - t0:.0f} s)", flush=True)
    rt.set_dense(False)
    del rt; gc.collect(); torch.cuda.empty_cache()
    json.dump({"env": env, "check": check, "records": recs},
              open(os.path.join(os.environ.get("OUT", "/tmp"), "exp-pair-step.json"), "w"), indent=1)
