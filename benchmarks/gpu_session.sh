#!/usr/bin/env bash
# One GPU sitting: environment facts, GPU tests, layer benchmark. Writes logs to $OUT.
# Run from the repo root after `. .device/b/boot.sh` (see README, "GPU machine").
set -u
OUT=${OUT:-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, tvm; print('torch', torch.__version__, 'tvm', tvm.__version__)" | tee -a "$OUT/device.txt"
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_cuda_codegen.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
timeout "${BENCH_TIMEOUT:-420}" python3 benchmarks/bench_layers.py ${BENCH_ARGS:-} --csv "$OUT/bench.csv" 2>&1 | tee "$OUT/bench.log" | tail -60
