#!/usr/bin/env bash
# Run an unlearnbench stage on this machine, with the accelerate config picked from the hardware:
#   no GPU  -> accelerate_configs/cpu_ddp.yaml, 2 CPU processes (gloo DDP, ACCELERATE_USE_CPU=1)
#   1 GPU   -> accelerate_configs/single_gpu.yaml
#   N GPUs  -> accelerate_configs/multi_gpu.yaml --num_processes N
# Usage:  launch/local.sh STAGE [--preset NAME] [--force] [key=value ...]
#   launch/local.sh run --preset smoke train.steps=50
#   CONFIG=deepspeed_zero3.yaml launch/local.sh train --preset paper
# Environment (all optional):
#   CONFIG         an accelerate config file, or a file name under accelerate_configs/ (overrides the choice)
#   NUM_PROCESSES  process count (default: the GPU count; the config's own count on CPU)
#   NUM_GPUS       GPUs to assume (default: torch.cuda.device_count(), which honours CUDA_VISIBLE_DEVICES)
#   PORT           rendezvous port (default: a free one)
#   ACCELERATE     the accelerate executable (default: the one on PATH, else .venv/bin/accelerate)
#   DRY_RUN=1      print the command instead of running it
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ $# -lt 1 ] || [[ "$1" == -h || "$1" == --help ]]; then
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"
    exit 2
fi

if [ -z "${ACCELERATE:-}" ]; then
    if [ -x "$ROOT/.venv/bin/accelerate" ]; then ACCELERATE="$ROOT/.venv/bin/accelerate"
    elif command -v accelerate >/dev/null 2>&1; then ACCELERATE="$(command -v accelerate)"
    else echo "launch/local.sh: accelerate not found; run \`make install\` or activate the environment" >&2; exit 2
    fi
fi
PYTHON="$(dirname "$ACCELERATE")/python"
[ -x "$PYTHON" ] || PYTHON=python3

NUM_GPUS="${NUM_GPUS:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)}"

if [ -n "${CONFIG:-}" ]; then
    [ -f "$CONFIG" ] || CONFIG="$ROOT/accelerate_configs/$CONFIG"
    [ -f "$CONFIG" ] || { echo "launch/local.sh: no accelerate config '$CONFIG'" >&2; exit 2; }
    CONFIG="$(cd "$(dirname "$CONFIG")" && pwd)/$(basename "$CONFIG")"
elif [ "$NUM_GPUS" -eq 0 ]; then
    CONFIG="$ROOT/accelerate_configs/cpu_ddp.yaml"
elif [ "$NUM_GPUS" -eq 1 ]; then
    CONFIG="$ROOT/accelerate_configs/single_gpu.yaml"
else
    CONFIG="$ROOT/accelerate_configs/multi_gpu.yaml"
fi

ARGS=(launch --config_file "$CONFIG")
ENV=()
distributed_type="$(sed -n 's/^distributed_type: *//p' "$CONFIG" | tr -d "'\"")"
if [ -n "${NUM_PROCESSES:-}" ]; then
    ARGS+=(--num_processes "$NUM_PROCESSES")
elif [ "$NUM_GPUS" -ge 1 ] && [ "$distributed_type" != "NO" ]; then
    ARGS+=(--num_processes "$NUM_GPUS")
fi
if [ "$NUM_GPUS" -eq 0 ]; then
    if [ "$distributed_type" = "MULTI_GPU" ]; then
        # gloo DDP on CPU; without this accelerate starts N independent runs (unlearnbench refuses them)
        ENV+=(ACCELERATE_USE_CPU=1)
    fi
    # one thread per process: N processes x all cores oversubscribes the CPU
    ENV+=("OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}")
fi
# DeepSpeed compiles its ops on first use; keep them with the checkout
ENV+=("TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$ROOT/.torch_extensions}")

free_port='import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
PORT="${PORT:-$("$PYTHON" -c "$free_port")}"
ARGS+=(--main_process_port "$PORT" -m unlearnbench "$@")

echo "launch/local.sh: $NUM_GPUS GPU(s), config $(basename "$CONFIG"): ${ENV[*]} $ACCELERATE ${ARGS[*]}" >&2
if [ "${DRY_RUN:-0}" = "1" ]; then
    exit 0
fi
exec env "${ENV[@]}" "$ACCELERATE" "${ARGS[@]}"
