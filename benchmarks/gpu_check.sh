#!/usr/bin/env bash
# One call on the lent GPU machine: install polarc from the checkout, run the GPU-marked and
# kernel tests, then the benchmarks named as arguments (tests, e2e, step, kernels, load), logs
# under $OUT. Run from the repository root: bash benchmarks/gpu_check.sh tests e2e
set -uo pipefail
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
OUT=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | grep -v "root. user" | tail -3
[ -d .devcarry/wheels ] && python3 -m pip install -q --no-index --no-deps .devcarry/wheels/*.whl 2>&1 | tail -3
python3 -c "import polarc, polarc.plugins.selective_attention, torch; print('polarc', polarc.__version__, 'torch', torch.__version__, torch.cuda.get_device_name())"
# pytest-xdist, where carried: the fp8-tests stage on 8 workers (on a bare machine compiling each
# kernel plan is most of a test run: 269 FP8 tests in 109 s on 8 workers; one ran out of 200 s)
XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
cal() {  # cal NAME ARGS: a timed calibration to /tmp/NAME; its calibration.json and log to $OUT
  local name=$1; shift
  /usr/bin/time -v polarc calibrate "$@" --out /tmp/$name --force > $OUT/cal-$name.log 2>&1
  grep -E "^model|^KV density|wrote|Error|Elapsed|Maximum resident" $OUT/cal-$name.log
  cp /tmp/$name/calibration.json $OUT/cal-$name.json 2>/dev/null
  python3 -c "import json; m=json.load(open('$OUT/cal-$name.json')); print('timings', m['timings_s'], 'memory', m['memory'])" 2>/dev/null
}
for what in "$@"; do
  case $what in
    tests) timeout 420 python3 -m pytest -q -p no:cacheprovider tests/test_runtime_gpu.py tests/test_selective_attention.py \
             tests/test_selective_gemm.py tests/test_kv_write.py \
             tests/test_tensorrt_plugin.py tests/test_runtime.py tests/test_scheduler.py \
             tests/test_calibrate_device.py tests/test_streaming.py 2>&1 | tee $OUT/tests.log | tail -15 ;;
    sched) timeout 150 python3 -m pytest -q -p no:cacheprovider --tb=line -rf tests/test_runtime_gpu.py tests/test_scheduler.py -k "${SCHED_K:-not nothing}" 2>&1 | tee $OUT/sched-tests.log | tail -25 ;;
    fp8-kernels) timeout 420 python3 -m polarc.benchmarks.bench_kernels --fp8 --json $OUT/fp8-kernels.json 2>&1 | tee $OUT/fp8-kernels.log | tail -16 ;;
    fp8-linear) timeout 200 python3 -m polarc.benchmarks.bench_kernels --fp8-linear --json $OUT/fp8-linear.json 2>&1 | tee $OUT/fp8-linear.log | tail -32 ;;
    # a step's linear layers with bf16 weights: cuBLAS against fp8_linear on 16-bit rows / tiles
    bf16-chain) timeout ${CHAIN_TIMEOUT:-400} python3 -m polarc.benchmarks.bench_kernels --bf16-linear-chain ${CHAIN_ROWS:+--chain-rows $CHAIN_ROWS} ${CHAIN_PLANS:+--chain-plans $CHAIN_PLANS} --json $OUT/bf16-chain.json 2>&1 | tee $OUT/bf16-chain.log | tail -${CHAIN_TAIL:-12} ;;
    fp8-chain) timeout 400 python3 -m polarc.benchmarks.bench_kernels --fp8-linear-chain ${CHAIN_ROWS:+--chain-rows $CHAIN_ROWS} ${CHAIN_TILES:+--chain-tiles $CHAIN_TILES} --json $OUT/fp8-chain.json 2>&1 | tee $OUT/fp8-chain.log | tail -22 ;;
    # Nsight Compute over the fp8-all step's GEMMs and attention at NCU_ROWS rows (memory workload, stalls)
    fp8-ncu) timeout 400 ncu --nvtx --nvtx-include "profile/" --section SpeedOfLight \
               --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy \
               --section SchedulerStats --section LaunchStats -f -o /tmp/fp8-ncu \
               python3 -m polarc.benchmarks.profile_fp8_step --rows ${NCU_ROWS:-32} > $OUT/fp8-ncu.log 2>&1
             tail -4 $OUT/fp8-ncu.log
             ncu --import /tmp/fp8-ncu.ncu-rep --csv --page details > $OUT/fp8-ncu.csv; wc -l $OUT/fp8-ncu.csv ;;
    sweep-step) timeout ${SWEEP_STEP_TIMEOUT:-500} python3 -m polarc.benchmarks.sweep_step_attention ${SWEEP_STEP_ARGS:-} \
                  --json $OUT/sweep-step.json 2>&1 | tee $OUT/sweep-step.log | grep -v Warning | tail -60 ;;
    fp8-sweep) timeout ${SWEEP_TIMEOUT:-480} python3 -m polarc.benchmarks.bench_kernels --fp8-linear-sweep ${SWEEP_ROWS:+--sweep-rows $SWEEP_ROWS} --json $OUT/fp8-sweep.json 2>&1 | tee $OUT/fp8-sweep.log | tail -40 ;;
    paged) timeout 240 python3 -m polarc.benchmarks.bench_kernels --paged --json $OUT/paged.json 2>&1 | tee $OUT/paged.log | tail -16 ;;
    launch-floor) timeout ${LF_TIMEOUT:-300} python3 -m polarc.benchmarks.bench_launch_floor ${LF_ARGS:-} $( [ -f $OUT/e2e-fp8.json ] && echo --e2e $OUT/e2e-fp8.json ) --json $OUT/launch-floor.json 2>&1 | tee $OUT/launch-floor.log | tail -${LF_TAIL:-34} ;;
    stream) timeout ${STREAM_TIMEOUT:-590} python3 -m polarc.benchmarks.bench_stream ${STREAM_ARGS:-} --json $OUT/stream.json 2>&1 | tee $OUT/stream.log | tail -16 ;;
    fp8-tests) timeout ${FP8_TESTS_TIMEOUT:-300} python3 -m pytest -q $XDIST -p no:cacheprovider --tb=short -rf tests/test_fp8.py \
                 tests/test_kv_write.py tests/test_selective_attention.py tests/test_fp8_linear.py tests/test_runtime_gpu.py \
                 -k "fp8 or gpu_paged or paged_write or gpu_llama or rope or runtime_gpu" \
                 2>&1 | tee $OUT/fp8-tests.log | tail -15 ;;
    e2e-fp8) timeout ${E2E_TIMEOUT:-200} python3 -m polarc.benchmarks.bench_e2e --no-hf --variants ${E2E_VARIANTS:-bf16,fp8-kv,fp8-all} ${E2E_CASES:+--cases $E2E_CASES} ${E2E_PROFILE:+--profile} ${E2E_LINEARS:+--linears $E2E_LINEARS} ${E2E_PREFILL:+--prefill} \
               --json $OUT/e2e-fp8.json 2>&1 | tee $OUT/e2e-fp8.log | grep -v "^{" | tail -${E2E_TAIL:-10} ;;
    first-pass) timeout 300 python3 -m polarc.benchmarks.bench_stream --requests 0 --modes '' --first-pass \
                  --json $OUT/first-pass.json 2>&1 | tee $OUT/first-pass.log | grep -E "first pass|Error" ;;
    # §5 through the server (issue 12): SERVE_REQUESTS at saturation, then SERVE_RATES (each
    # with SERVE_RATE_REQUESTS), for the sparse engine, or every group with SERVE_DENSE=1;
    # SERVE_SLOTS=103 matches the offline stream's slots (it measures free memory later).
    serve) [ -f /tmp/l3.plan ] || polarc build -m llama3-8b --random-weights --density 0.5 --max-seq 8192 \
             --max-batch 256 -o /tmp/l3.plan --force 2>&1 | tail -1
           # SERVE_FAST=1: uvloop and httptools (carried in .devcarry/fast), which uvicorn then
           # picks by itself, as a production deployment would (`uvicorn[standard]`)
           [ -n "${SERVE_FAST:-}" ] && python3 -m pip install -q --no-index --no-deps .devcarry/fast/*.whl
           m=${SERVE_DENSE:+dense}; m=${m:-sparse}
           polarc serve /tmp/l3.plan --port 8011 --max-waiting 4096 ${SERVE_DENSE:+--dense} ${SERVE_SLOTS:+--slots $SERVE_SLOTS} > $OUT/serve-$m.log 2>&1 &
           spid=$!
           for _ in $(seq 120); do python3 -c "import httpx; httpx.get('http://127.0.0.1:8011/health').raise_for_status()" \
             2>/dev/null && break; kill -0 $spid 2>/dev/null || break; sleep 2; done
           kill -0 $spid 2>/dev/null || { echo "server died:"; tail -3 $OUT/serve-$m.log; continue; }
           # SERVE_PYSPY=S: which thread holds the interpreter lock, S seconds into saturation
           # (py-spy from the carried wheels; needs ptrace in the container)
           [ -n "${SERVE_PYSPY:-}" ] && (sleep 20; py-spy record --gil --threads --nonblocking -r 100 \
             -d $SERVE_PYSPY --format raw -o $OUT/serve-$m-pyspy.txt --pid $spid > $OUT/pyspy.log 2>&1) &
           # SERVE_REQUESTS=0: no saturation run (only the rates)
           [ "${SERVE_REQUESTS:-2000}" != 0 ] && python3 -m polarc.benchmarks.bench_serve --url http://127.0.0.1:8011 \
             --requests ${SERVE_REQUESTS:-2000} --rate inf --json $OUT/serve-$m-saturation.json 2>&1 | tail -12
           for r in ${SERVE_RATES:-4 8}; do
             python3 -m polarc.benchmarks.bench_serve --url http://127.0.0.1:8011 --requests ${SERVE_RATE_REQUESTS:-300} \
               --rate $r --json $OUT/serve-$m-rate$r.json 2>&1 | tail -6
           done
           python3 -c "import httpx; print(httpx.get('http://127.0.0.1:8011/metrics').text)" \
             > $OUT/serve-$m-metrics.txt 2>&1  # the server's own view (Prometheus text)
           kill -TERM $spid; wait $spid; echo "server exit $?"
           tail -1 $OUT/serve-$m.log ;;  # the engine thread's prefill and decode seconds
    # Leave one domain out on SmolLM2 (issue 15): the GGUF from the two carried parts;
    # LODO_DOMAINS picks folds ('none' = in domain), about 2 minutes each on an H200.
    lodo) timeout ${LODO_TIMEOUT:-590} python3 -m polarc.benchmarks.bench_lodo --model ${LODO_MODEL:-/root/smollm2.gguf} \
            --device cuda --domains ${LODO_DOMAINS:-code narrative none} --json $OUT/lodo.json 2>&1 \
            | tee $OUT/lodo.log | grep -v '^{' | tail -12 ;;
    e2e) timeout 170 python3 -m polarc.benchmarks.bench_e2e --no-hf --json $OUT/e2e.json 2>&1 | tee $OUT/e2e.log | tail -14 ;;
    step) python3 -m polarc.benchmarks.bench_step_kernels --json $OUT/step.json 2>&1 | tail -8 ;;
    kernels) python3 -m polarc.benchmarks.bench_kernels --json $OUT/kernels.json 2>&1 | tee $OUT/kernels.log | tail -80 ;;
    load) /usr/bin/time -v polarc build -m llama3-8b --random-weights --density 0.5 -o /tmp/l3.plan --force 2>&1 | grep -E "wrote|Elapsed|Maximum resident"
          python3 -m polarc.benchmarks.bench_load /tmp/l3.plan --device cuda --json $OUT/load.json 2>&1 | tail -3 ;;
    # Calibration at scale (issue 14): `calibrate NAME ARGS...` via the cal helper below.
    cal-smoke) cal s8 -m llama3-8b --random-weights --tokens 8192 --tune-tokens 1024
               cal s70 -m llama3-70b --random-weights --tokens 2048 --tune-tokens 512 ;;
    cal-8b) cal c8 -m llama3-8b --random-weights
            /usr/bin/time -v polarc eval --calibration /tmp/c8 --tokens 16384 --json $OUT/eval-c8.json --force 2>&1 \
              | grep -vE "^\s+(Average|Exit|Socket|Signals|Swaps|File|Page size|Volun|Invol|Major|Minor|Percent|System time|User time)" | tail -25 ;;
    # --gpu-memory 80: what an H100 gives (the target is for one), on whichever GPU is lent
    cal-70b) cal c70 -m llama3-70b --random-weights --tokens 16384 --gpu-memory 80 ;;
  esac
done
