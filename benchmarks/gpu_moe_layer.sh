#!/usr/bin/env bash
# The MoE layer benchmark on a GPU, as run on CPU in docs/BENCHMARKS.md:
# every dispatcher (einsum, indices, dropless) against the dense FFN of equal
# active FLOPs, training step and no-drop evaluation, the E-scaling rows and
# the Model Garden / keras-hub peers, all in one process.
#
#   bash benchmarks/gpu_moe_layer.sh [output_dir]
#
# Needs the environment of `make venv` (or `pip install -c
# requirements/constraints.txt -e '.[bench]'`) with a CUDA build of
# TensorFlow. Writes <output_dir>/moe_layer_gpu.jsonl and prints the ratios.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${1:-${OUT:-/tmp}}"
mkdir -p "$out"
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
TF_CPP_MIN_LOG_LEVEL=2 "$PYTHON" -m apps.benchmark --device=GPU:0 \
    --repeats=10 --output="$out/moe_layer_gpu.jsonl"
