#!/usr/bin/env bash
# One-call GPU benchmark of the Pallas kernels (JAX 0.11 + CUDA, no network, random weights).
# Writes JSON lines to $OUT/gpu_kernels.jsonl. Run from the repository root:
#   OUT=/some/dir bash experiments/gpu_kernels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/experiments/results}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
"$PY" -c "import jax; print('jax', jax.__version__, jax.devices())"
# Correctness + hardware tests first (fast), then the benchmark within ~7 minutes.
"$PY" -m pytest -q -p no:cacheprovider -o addopts="" tests/test_pallas_gpu.py 2>&1 | tail -15 \
  | tee "$OUT/gpu_tests.txt" || true
timeout 480 "$PY" experiments/gpu_kernels.py --out "$OUT" --budget_s 400 \
  --shapes smollm2_up,7b_qkvo,7b_up,7b_down,70b_up --rows 1,8,32,128 --iters 20 --sweep
