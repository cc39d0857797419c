"""Scratch: activation quantization of every linear layer's input (LM head excluded) in the
ENGINE runtime of `polarc eval --engine` (the reference runtime is left untouched).

usage: python exp_pair_quality.py SCHEME [--scales S.json] -- <polarc eval args>
       python exp_pair_quality.py record --scales S.json --engine E.plan --calib-tokens N
SCHEME: none | K (pair exactly as split_rows_fp8, LM head too) | A (pair, dynamic row scale) | B (pair, static per-layer) | C (single, static)
"""
import json
import sys
from collections import Counter, defaultdict

import torch

from polarc.runtime import torch_runtime
from polarc.plugins.reference import FP8
from polarc.runtime.kernels import NormedRows

FMAX = 448.0
scheme = sys.argv.pop(1)
scales_path = None
if len(sys.argv) > 2 and sys.argv[1] == "--scales":
    scales_path = sys.argv[2]
    del sys.argv[1:3]

calls = Counter()
clamped = Counter()
numel = Counter()
amax = defaultdict(float)
static = json.load(open(scales_path)) if scheme in ("B", "C") else None


def quantize(x: torch.Tensor, name: str) -> torch.Tensor:
    xf = x.float()
    if scheme == "K":  # the kernel's split_rows_fp8 exactly: lo rounded in units of s
        t = xf
        am = t.abs().amax(-1, keepdim=True).clamp_min(1e-30)
        t = (t * (FMAX / am)).clamp(-FMAX, FMAX)
        hi = t.to(FP8)
        lo = (t - hi.float()).to(FP8)
        return ((am / FMAX) * (hi.float() + lo.float())).to(x.dtype)
    if scheme == "A":
        s = (xf.abs().amax(-1, keepdim=True) / FMAX).clamp_min(1e-12)
        y = xf / s
    else:
        s = torch.tensor(2.0 * static[name] / FMAX, dtype=torch.float32)
        y = xf / s
        over = y.abs() > FMAX
        clamped[name] += int(over.sum())
        numel[name] += y.numel()
        y = y.clamp(-FMAX, FMAX)
    q1 = y.to(FP8).float()
    if scheme == "C":
        return (s * q1).to(x.dtype)
    r = xf - q1 * s
    q2 = (r * 16 / s).clamp(-FMAX, FMAX).to(FP8).float()
    return (s * (q1 + q2 / 16)).to(x.dtype)


orig_init = torch_runtime.Runtime.__init__


def init(self, engine, **kw):
    orig_init(self, engine, **kw)
    if not kw.get("quantized", True):
        return  # the reference runtime: untouched
    base = self.kernels.linear

    def linear(model, x, name):
        if (name != "lm_head" or scheme == "K") and not isinstance(x, NormedRows):
            calls[name] += 1
            if scheme == "record":
                amax[name] = max(amax[name], float(x.detach().abs().max()))
            elif scheme != "none":
                x = quantize(x, name)
        else:
            calls["<excluded:" + name + ">"] += 1
        return base(model, x, name)

    import dataclasses
    for attr in ("ops", "residual_ops", "prefill_ops", "short_prefill_ops"):
        setattr(self, attr, dataclasses.replace(getattr(self, attr), linear=linear))


torch_runtime.Runtime.__init__ = init


def report():
    tot = sum(v for k, v in calls.items() if not k.startswith("<"))
    print(f"PATCH scheme={scheme} patched-calls={tot} layers={sum(1 for k in calls if not k.startswith('<'))} "
          f"excluded={ {k: v for k, v in calls.items() if k.startswith('<')} }", file=sys.stderr)
    if numel:
        c, n = sum(clamped.values()), sum(numel.values())
        print(f"SATURATED {c} of {n} elements ({c / n:.3e}); layers with any: "
              f"{ {k: v for k, v in clamped.items() if v} }", file=sys.stderr)


if scheme == "record":
    # calibration-split text (not the held-out documents eval scores), teacher-forced
    # through the engine's own prefill + decode path
    import argparse
    from pathlib import Path
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine")
    ap.add_argument("--calib-tokens", type=int, default=4096)
    a = ap.parse_args(sys.argv[1:])
    from polarc.calibration.data import load_sequences
    from polarc.format.engine_file import load_engine
    from polarc.runtime.forced import teacher_forced
    eng = load_engine(Path(a.engine), device="cpu")
    calib, _ = load_sequences("mix", eng.model.tokenizer, seq_len=512,
                              calib_tokens=a.calib_tokens, heldout_tokens=512, split=True)
    rows = min(8, calib.ids.shape[0])
    e = torch_runtime.Runtime(eng, batch=rows, max_seq=512, device="cpu")
    r = torch_runtime.Runtime(eng, batch=rows, max_seq=512, device="cpu", dense=True,
                              quantized=False)
    q = teacher_forced(e, r, calib.ids, prefix=64)
    print("calib", calib.ids.shape, q.as_json(), file=sys.stderr)
    json.dump(dict(amax), open(scales_path, "w"), indent=1)
    report()
else:
    import atexit
    atexit.register(report)
    from polarc.cli import main
    sys.argv = ["polarc", "eval"] + sys.argv[1:]
    main()
