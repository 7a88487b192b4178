#!/usr/bin/env bash
# The GPU suite (issue 7, item 6): one single-GPU machine, torch + transformers preinstalled, no network.
# Builds a ~0.75B-parameter Llama from config (no download) in bf16 and measures scoring and gradient-ascent
# throughput, MFU over a measured bf16 matmul peak, and peak memory. Writes gpu_bench.json into $OUT when set,
# else benchmarks/results/gpu_bench.json. About 2-4 minutes on an H100/H200 (must stay < 8).
#   bash benchmarks/gpu_suite.sh                 # on the GPU machine
#   GPU_SUITE_TINY=1 bash benchmarks/gpu_suite.sh   # logic check with a tiny model (CPU is fine)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && [ -z "${OUT:-}" ] && PY=.venv/bin/python
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
exec timeout 470 "$PY" benchmarks/gpu_bench.py "$@"
