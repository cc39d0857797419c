"""polarc's benchmarks (method and targets: benchmarks/README.md); each prints its tables,
``--json OUT`` writes records.

- `timing`: the one timing method (CUDA-graph replays, median) and copy-bandwidth probe.
- `bench_kernels` (§1–2, = ``polarc bench kernels``): selective attention vs SDPA, the
  selective GEMM pair vs cuBLAS, with byte floors.
- `bench_e2e` (§3, = ``polarc bench e2e``): dense and sparse decode steps of random-weight
  Llama-3-8B / Llama-2-7B engines vs their floors, router share, transformers ``generate``.
- `bench_step_kernels`: the step's top-k and KV-append kernels vs the torch ops.
- `bench_plugin_aot`: the TensorRT plugin's ahead-of-time kernel, without TensorRT.
- `bench_quality` (§4, CPU): perplexity, agreement, KL, recall of plans on SmolLM2.
- `bench_load`: loading an engine with its checksum and shape checks.

After ``pip install -e .`` (on the lent GPU machine ``pip install --no-deps
--no-build-isolation -e .``): ``python -m polarc.benchmarks.bench_e2e --json OUT``. All but
`bench_quality` need a CUDA GPU. Results and the commands that made them: ``RESULTS.md``.
"""
