#!/usr/bin/env bash
# GPU benchmark in one command (no network; jax[cuda], flax, torch, transformers preinstalled), < 8 min:
#   W1 (64 x 128/128) and W2 (1 x 32/128) in bf16, then the large-batch bf16 workload W4 (256 x 128/128),
#   each against HF transformers generate on the same card. JSON results go to $OUT (or benchmarks/).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.5}"  # leave room for torch
out="${OUT:-benchmarks}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 220 python benchmarks/throughput.py --workloads W1,W2 --dtype bfloat16 --max-slots 64 \
  --decode-steps 32 --max-seq-len 256 --json-out "$out/gpu_w1_w2.json"
timeout 220 python benchmarks/throughput.py --workloads W4 --dtype bfloat16 --max-slots 256 \
  --decode-steps 32 --max-seq-len 256 --json-out "$out/gpu_w4.json"
