#!/usr/bin/env bash
# One GPU sitting: environment facts, GPU tests, benchmarks. Every step writes its full output to a
# file under $OUT (nothing filtered) and runs under its own `timeout`; the console gets the tail.
# STEPS picks what runs. The default, "exact pdl", fits one call: the BMMA and generate() GPU tests
# (on an H200, 2026-12-04, 63 s; since then four PDL-vs-plain tests, which compile two models each:
# ~120 s estimated) and the BMMA layers in the three programmatic-launch modes (on / start / off,
# ~120 s estimated). The second call: STEPS="models generate-bench" (whole models in the three PDL
# modes, ~4 min; generate() tokens/s vs torch, 67 s); then profile (the decoder's per-kernel time, 54 s).
# Call it right after the bundle's first call: the machine stays warm (and /tmp/boot/part0 with it)
# only 30 s.
#   bmma        tests/test_bmma_gpu.py: the binary-tensor-core kernel equals the numpy reference
#               (k = 1..8, 16; act_bits 4/8/16; batch 1/3/8/64; odd N; K % 256 != 0; every bitlayers);
#               tests/test_bmma_lstm.py: the BMMA LSTM step, the mma16x256 decoder and its generate()
#   bmma-bench  benchmarks/bench_bmma.py --fused --compiled: BMMA layer (ballot pack + BMMA kernel), the
#               one-launch kernel and the layer as compile builds it for any batch (one launch at batch 1,
#               pack + kernel above) vs torch fp16 (cuBLAS), int4 tinygemm, roofline; CSV written row by
#               row (its ~140 kernels are built first, one process per core)
#   tests       every other `gpu`-marked test (test_gpu, test_lstm_cell, test_decoder, test_lstm_lowering)
#   bmma-tune   benchmarks/tune_layers.py --layout mma16x256 on three shapes (MetaSchedule on the GPU)
#   layers / profile / lstm   the CUDA-core PB layer benchmark, decoder profile, LSTM step benchmark
#   sanitize    the W1 K=2048 candidate ptxas once miscompiled (tests/test_gpu.py ...[1-2048], fixed on
#               the CPU side, unconfirmed on a GPU) under compute-sanitizer racecheck, then synccheck (<= 4 min)
#   generate    issue 16: tests/test_generate.py on the GPU (generate() == the stepwise decoder, greedy and
#               seeded sampling), then benchmarks/bench_generate.py: tokens/s of generate() at W1/W2/W4/W8,
#               batch 1 and 8, vs torch fp32/fp16 eager and in a CUDA graph, each W-k with the default
#               layout (binary tensor cores on sm_80+; GEN_ARGS="--layouts auto,kNW" adds the CUDA-core
#               popcount rows), the decoders compiled first, one process per core (~70 s); then
#               benchmarks/bench_pick.py: the pick kernel alone per top_k, vocab 10,000 and 50,257 (~50 s);
#               its three parts are also steps of their own: generate-tests, generate-bench, pick
#   exact       bmma's tests and generate-tests in one pytest run (one worker start-up for both issues)
#   sweep       benchmarks/sweep_bmma.py: many BMMA configs per (shape, batch), W4, best vs default (CSV
#               row by row; SWEEP_TIME_LIMIT stops the timing, SWEEP_ARGS picks the grid)
#   pdl         benchmarks/bench_bmma.py --pdl all --fused --compiled on W4 shapes of issue 13's bar
#               (PDL_ARGS), batch 1/8/16: every PB kernel with programmatic dependent launch (compile's
#               default on sm_90: it starts while the kernel before it runs and prefetches its weights
#               into L2; the next launches after its wait), with the next launching as it starts
#               (PBTVM_CUDA_PDL=start: kernels run ahead more than one deep) and without
#               (PBTVM_CUDA_PDL=0), a row each, side by side
#   models      benchmarks/bench_models_gpu.py: whole compiled models (2 pre-norm feed-forward blocks at
#               4096/11008 + head; an 8-layer 4096 ReLU MLP), W4, batch 1 and 8, in the three PDL modes
#               (on / start / off; TVM's add/norm kernels wait first, ReLU and GELU are in the layers),
#               each in a torch CUDA graph, vs torch fp16 in a graph and the roofline (MODELS_ARGS; 6
#               compiles first, ~4 min estimated): the second call
#   crossover   benchmarks/bench_bmma.py --fused --compiled at K between 650 and 1500 (CROSSOVER_ARGS), W4,
#               batch 2-16: where one launch stops beating pack + kernel (cuda_bmma.one_launch_max_batch
#               uses 650, the largest K timed where it won past batch 1)
#   ncu         Nsight Compute sections of the BMMA kernel alone (benchmarks/ncu_bmma.py), 4096x4096 W4,
#               batch 1 and 64 (NCU_SHAPE, NCU_BATCHES); Firecracker machines only (gVisor has no counters)
# Steps run in the order STEPS names them. A device call is limited to 600 s: set DEADLINE_S a little
# under the call's timeout_s (every step's limit is cut to what is left), or run further steps in
# another call (STEPS=bmma-tune ...). Per-step limits: BMMA_TESTS_TIMEOUT, BMMA_BENCH_TIMEOUT, ...
# Run from the repo root after `. .device/b/boot.sh` (see README, "GPU machine"). The package is
# staged as it installs (schedules/ and relay_passes/ inside pbtvm/), since the GPU machine has no
# pip index to install it from.
set -u
OUT=${OUT:-out}
OUT=$(mkdir -p "$OUT" && cd "$OUT" && pwd)
stage=/tmp/pbtvm-stage
rm -rf "$stage" && mkdir -p "$stage"
cp -r pbtvm tests benchmarks pyproject.toml "$stage/"
cp -r schedules "$stage/pbtvm/schedules"
cp -r relay_passes "$stage/pbtvm/relay_passes"
cd "$stage"
export PYTHONPATH="$stage:/tmp/site"
export PBTVM_REQUIRE_GPU=1  # tests/conftest.py: no GPU reachable stops pytest with the reason, never a green skip
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  echo "kernel $(uname -r), $(nproc) cores"
  python3 -c "import torch, tvm; print('torch', torch.__version__, 'tvm', tvm.__version__)"
  date -u
} > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

# step NAME SECONDS COMMAND...: run COMMAND under `timeout`, all output to $OUT/NAME.log.
# DEADLINE_S (seconds since this script started, 0: none) caps every step's limit, so a device call
# with a timeout_s just above it ends with every log written and packed; a step left under 20 s is
# skipped and says so.
step() {
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  if [ "${DEADLINE_S:-0}" -gt 0 ]; then
    local left=$((DEADLINE_S - SECONDS - 5))
    if [ "$left" -lt 20 ]; then
      echo "== $name: skipped, $left s left before DEADLINE_S=$DEADLINE_S" | tee -a "$OUT/steps.txt"
      return 0
    fi
    [ "$left" -lt "$limit" ] && limit=$left
  fi
  # -k: a process stuck in a CUDA call (a hung kernel) ignores SIGTERM's KeyboardInterrupt; KILL it
  timeout -k 15 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0)) s (limit $limit s), log $OUT/$name.log" | tee -a "$OUT/steps.txt"
  tail -n "${TAIL_LINES:-25}" "$OUT/$name.log"
}

# -n 8: the tests build their kernels with nvcc on the CPU side, 8 processes share the GPU
PYTEST_SERIAL=(python3 -m pytest -q -p no:cacheprovider -rfEs)
PYTEST=("${PYTEST_SERIAL[@]}" -n 8)
BMMA_TEST_FILES=(tests/test_bmma_gpu.py tests/test_bmma_lstm.py)
GENERATE_TEST_FILES=(tests/test_generate.py)
run_step() {
  case $1 in
    bmma)
      step bmma_tests "${BMMA_TESTS_TIMEOUT:-150}" "${PYTEST[@]}" -m gpu "${BMMA_TEST_FILES[@]}" ;;
    bmma-bench)
      step bmma_bench "${BMMA_BENCH_TIMEOUT:-240}" python3 benchmarks/bench_bmma.py ${BMMA_BENCH_ARGS:---fused --compiled} \
        --csv "$OUT/bmma_bench.csv" ;;
    pdl)
      step bmma_pdl "${PDL_TIMEOUT:-200}" python3 benchmarks/bench_bmma.py --pdl all --fused --compiled \
        ${PDL_ARGS:---shapes 4096x4096 11008x4096 2600x650 --batches 1 8 16 --bits 4} \
        --csv "$OUT/bmma_pdl.csv" ;;
    models)
      step bench_models "${MODELS_TIMEOUT:-400}" python3 benchmarks/bench_models_gpu.py ${MODELS_ARGS:-} \
        --csv "$OUT/bench_models.csv" ;;
    crossover)
      step bmma_crossover "${CROSSOVER_TIMEOUT:-180}" python3 benchmarks/bench_bmma.py --fused --compiled \
        ${CROSSOVER_ARGS:---shapes 4096x800 4096x1024 4096x1280 --batches 2 4 8 16 --bits 4} \
        --csv "$OUT/bmma_crossover.csv" ;;
    exact)
      step exact_tests "${EXACT_TESTS_TIMEOUT:-200}" "${PYTEST[@]}" -m gpu "${BMMA_TEST_FILES[@]}" "${GENERATE_TEST_FILES[@]}" ;;
    tests)
      step gpu_tests "${TESTS_TIMEOUT:-150}" "${PYTEST[@]}" -m gpu tests/test_gpu.py tests/test_lstm_cell.py \
        tests/test_decoder.py tests/test_lstm_lowering.py ;;
    bmma-tune)
      step bmma_tune "${TUNE_TIMEOUT:-540}" python3 benchmarks/tune_layers.py --target cuda --layout mma16x256 \
        --shapes "${TUNE_SHAPES:-4096x4096,11008x4096,2600x650}" --batch "${TUNE_BATCH:-1}" \
        --trials "${TUNE_TRIALS:-32}" --work-dir "$OUT/bmma_tune_logs" ;;
    layers)
      step bench_layers "${BENCH_TIMEOUT:-420}" python3 benchmarks/bench_layers.py --in-block ${BENCH_ARGS:-} \
        --csv "$OUT/bench.csv" ;;
    profile)
      step profile "${PROFILE_TIMEOUT:-120}" python3 benchmarks/profile_decoder.py ${PROFILE_ARGS:-} ;;
    lstm)
      step bench_lstm "${LSTM_TIMEOUT:-400}" python3 benchmarks/bench_lstm.py --target cuda --no-graph ${LSTM_ARGS:-} ;;
    sanitize)
      local tool
      for tool in racecheck synccheck; do
        step "sanitize_$tool" "${SANITIZE_TIMEOUT:-120}" compute-sanitizer --tool "$tool" --print-limit 20 \
          "${PYTEST_SERIAL[@]}" "tests/test_gpu.py::test_sampled_tunable_schedules_exact_on_gpu[1-2048]"
      done ;;
    sweep)
      step bmma_sweep "${SWEEP_TIMEOUT:-300}" python3 benchmarks/sweep_bmma.py --csv "$OUT/bmma_sweep.csv" \
        --time-limit "${SWEEP_TIME_LIMIT:-240}" ${SWEEP_ARGS:---max-configs 48 --register-budget 200} ;;
    ncu)
      # Nsight Compute on the BMMA kernel alone (why its time grows with batch): one launch per batch
      local b ncu
      ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)
      for b in ${NCU_BATCHES:-1 64}; do
        step "ncu_bmma_b$b" "${NCU_TIMEOUT:-90}" "${ncu:-ncu}" --clock-control none --section SpeedOfLight \
          --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis --section WarpStateStats \
          --section Occupancy --section LaunchStats -k regex:main_kernel --launch-skip 2 --launch-count 1 \
          python3 benchmarks/ncu_bmma.py --shape "${NCU_SHAPE:-4096x4096}" --bits 4 --batch "$b"
      done ;;
    generate)
      run_step generate-tests
      run_step generate-bench
      run_step pick ;;
    generate-tests)
      step generate_tests "${GEN_TESTS_TIMEOUT:-120}" "${PYTEST[@]}" -m gpu "${GENERATE_TEST_FILES[@]}" ;;
    generate-bench)
      step bench_generate "${GEN_BENCH_TIMEOUT:-300}" python3 benchmarks/bench_generate.py --target cuda \
        --bits "${GEN_BITS:-4,1,2,8}" --batch 1,8 ${GEN_ARGS:---layouts auto --sample 0.8,40} ;;
    pick)
      step bench_pick "${PICK_BENCH_TIMEOUT:-90}" python3 benchmarks/bench_pick.py --target cuda --vocab 10000 50257 ;;
    *)
      echo "== unknown step '$1' (see the list at the top of this script)" | tee -a "$OUT/steps.txt" ;;
  esac
}
# Steps run in the order STEPS names them.
for name in ${STEPS:-exact pdl}; do
  run_step "$name"
done
# The device tool returns at most 8 files from $OUT: past that, everything goes into one archive
# (a call cut off at its limit returns what it wrote, up to 8 files).
files=$(find "$OUT" -type f | wc -l)
if [ "$files" -gt 8 ]; then
  tar -czf /tmp/gpu_session_results.tgz -C "$OUT" . && find "$OUT" -mindepth 1 -delete && mv /tmp/gpu_session_results.tgz "$OUT/"
  echo "== $files result files packed into $OUT/gpu_session_results.tgz (the tool returns 8 at most)"
fi
