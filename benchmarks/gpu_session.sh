#!/usr/bin/env bash
# One GPU sitting: environment facts, GPU tests, layer benchmark, LSTM LM step benchmark. Writes logs to $OUT.
# STEPS picks what runs (default "tests layers lstm"; also "profile": the decoder's per-kernel GPU
# time); a device call is limited to 600 s, so a full sitting is usually one call per step:
# STEPS=tests, STEPS="profile lstm", STEPS=layers.
# Run from the repo root after `. .device/b/boot.sh` (see README, "GPU machine"). The package is
# staged as it installs (schedules/ and relay_passes/ inside pbtvm/), since the GPU machine has no
# pip index to install it from.
set -u
OUT=${OUT:-out}
mkdir -p "$OUT"
stage=/tmp/pbtvm-stage
rm -rf "$stage" && mkdir -p "$stage"
cp -r pbtvm tests benchmarks pyproject.toml "$stage/"
cp -r schedules "$stage/pbtvm/schedules"
cp -r relay_passes "$stage/pbtvm/relay_passes"
cd "$stage"
export PYTHONPATH="$stage:/tmp/site"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, tvm; print('torch', torch.__version__, 'tvm', tvm.__version__)" | tee -a "$OUT/device.txt"
STEPS=" ${STEPS:-tests layers lstm} "
if [[ $STEPS == *" tests "* ]]; then
  timeout "${TESTS_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_lstm_cell.py tests/test_decoder.py tests/test_cuda_codegen.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
fi
if [[ $STEPS == *" layers "* ]]; then
  timeout "${BENCH_TIMEOUT:-420}" python3 benchmarks/bench_layers.py --in-block ${BENCH_ARGS:-} --csv "$OUT/bench.csv" 2>&1 | tee "$OUT/bench.log" | tail -60
fi
if [[ $STEPS == *" profile "* ]]; then
  timeout 120 python3 benchmarks/profile_decoder.py ${PROFILE_ARGS:-} 2>&1 | tee "$OUT/profile.log" | tail -14
fi
if [[ $STEPS == *" lstm "* ]]; then
  timeout "${LSTM_TIMEOUT:-400}" python3 benchmarks/bench_lstm.py --target cuda --unfused --no-graph ${LSTM_ARGS:-} 2>&1 | tee "$OUT/bench_lstm.log" | tail -20
fi
