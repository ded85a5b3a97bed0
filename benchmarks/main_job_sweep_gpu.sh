#!/bin/bash
# The main job's settings swept on one GPU: each variant (a name and `advantageflow train`
# overrides, one per line of VARIANTS) on SEEDS, every run at once (CUDA MPS where it starts),
# the held-out ShapesEval evaluation every 6 epochs unless a variant sets eval.every; then a
# table of the mean gain per evaluation. Runs last the main job's epochs (45 since 2026-12-04 night,
# 36 in the recorded sweep) unless a variant sets train.epochs.
#
#   VARIANTS=my_variants.txt SEEDS="0 1 2" bash benchmarks/main_job_sweep_gpu.sh
#   # my_variants.txt:  lr2e-4_g16   train.lr=2e-4 train.group_size=16 train.prompts_per_epoch=8
#
# Writes $OUT/main_job_sweep.json (every run's evaluations) and prints the table
# (benchmarks/main_job_sweep_report.py). 18 runs of 36 epochs took 70-85 s on an H200, 9 of
# 120 epochs 126 s (2026-12-04; benchmarks/results/main_job_sweep_h200.md). GPU kernels are
# not bit-reproducible: a re-run of the same seed differs by up to 0.05 in its gain; the README's
# figures are CPU runs.
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}; WORK=${WORK:-/tmp/main_job_sweep}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=0
PY=${PYTHON:-python3}
[ -f "${VARIANTS:-}" ] || { echo "VARIANTS=FILE: one 'name overrides...' per line"; exit 2; }
nvidia-smi --query-gpu=name --format=csv,noheader || { echo "no NVIDIA GPU"; exit 1; }
source benchmarks/gpu_mps.sh
mps_start
t0=$(date +%s)
while read -r name overrides; do
  [ -z "$name" ] || [ "${name:0:1}" = "#" ] && continue
  for s in ${SEEDS:-0 1 2}; do
    # shellcheck disable=SC2086  # the overrides are words
    timeout ${LIMIT_S:-540} $PY -m advantageflow train device=cuda seed=$s eval.every=6 $overrides log.progress=false \
      log.tensorboard=false checkpoint.every=100000 --run-dir $WORK/${name}_s$s > $WORK.${name}_s$s.log 2>&1 &
  done
done < "$VARIANTS"
wait
echo "sweep wall $(( $(date +%s) - t0 )) s, MPS $MPS"
mps_stop
$PY benchmarks/main_job_sweep_report.py --runs $WORK --out $OUT/main_job_sweep.json
