#!/usr/bin/env bash
# The first thing to run on a GPU machine: set up if needed, then train the tiny SD3 and FLUX
# pipelines with every algorithm in bf16, check NCCL (and two processes if two GPUs exist),
# and print a table of speed and peak memory. Without CUDA it says so and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m advantageflow.gpu_check "$@"
