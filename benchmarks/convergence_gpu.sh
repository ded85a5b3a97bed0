#!/bin/bash
# The full ShapesEval convergence benchmark on one GPU: 7 methods, the lr sweep x{0.3, 1, 3} on
# tuning seed 1000, then seeds 0-2 at each method's chosen lr; every run of a wave at once
# (21 processes share the GPU, through CUDA MPS where it starts, so their small kernels overlap).
#
#   bash benchmarks/convergence_gpu.sh            # writes benchmarks/results/convergence_shapes_h200.*
#   OUT=DIR BUDGET_S=175 LIMIT_S=560 bash benchmarks/convergence_gpu.sh
#
# Each run stops at BUDGET_S seconds of its own training (train.max_wall_s; evaluation excluded)
# or 38400 rollout samples (300 epochs), whichever comes first.  The per-run wall-clock budget is
# what fits the whole benchmark in one 10-minute call on a lent H200 (2026-12-04: 185 s per run took
# 530 s from the v2.0 base; 175 s per run 532 s from the shipped base, start-up included); with 21
# processes sharing one GPU the seconds are not comparable between methods, so the table's
# comparisons rest on the trainer's FLOP and network-row counters.
# TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1: cuBLAS matmuls in TF32 (cuDNN convolutions already are by
# default); set it to 0 for plain fp32.
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
export TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=${TORCH_ALLOW_TF32_CUBLAS_OVERRIDE:-1}
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || { echo "no NVIDIA GPU"; exit 1; }
$PY -c "import torch,sys;print('python', sys.version.split()[0], 'torch', torch.__version__)"
source benchmarks/gpu_mps.sh
mps_start
t0=$(date +%s)
timeout ${LIMIT_S:-3600} $PY benchmarks/convergence.py --task shapes --budget-s ${BUDGET_S:-175} --budget-samples 38400 \
  --workers 21 --set device=cuda --out $OUT/convergence_shapes_h200 --work-dir /tmp/conv 2>&1 | grep -v "^\[advantageflow\]"
rc=$?
echo "benchmark wall $(( $(date +%s) - t0 )) s, MPS $MPS"
mps_stop
exit $rc
