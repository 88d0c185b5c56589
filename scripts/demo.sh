#!/usr/bin/env bash
# The main job on the built-in data set (scikit-learn's 8x8 digits, nothing to download):
#   1. train a small DDPM++ with likelihood weighting and importance sampling of t;
#   2. test bits/dim of every snapshot by the probability-flow ODE (uniform dequantisation),
#      with a PNG of bits/dim against training step;
#   3. the variational bound of the final snapshot;
#   4. train the Flow++ variational dequantiser against the frozen model, then the ODE bits/dim
#      with it;
#   5. samples of the final snapshot as a PNG grid.
# Usage: bash scripts/demo.sh [WORKDIR]   (default workdirs/digits_demo; re-running resumes)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh

WORKDIR=${1:-workdirs/digits_demo}
CONFIG=configs/small/digits_vp.py
# Small tensor operations are faster on one thread on machines with few cores.
if [ "$(nproc)" -le 2 ]; then export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}; fi
run() { .venv/bin/scoreflow --config "$CONFIG" --workdir "$WORKDIR" "$@"; }

echo "== 1/5 training (likelihood weighting + importance sampling) -> $WORKDIR"
run --mode train \
  --config.training.likelihood_weighting=True --config.training.importance_weighting=True

echo "== 2/5 test bits/dim of every snapshot, probability-flow ODE"
run --mode eval --eval_folder eval_ode

echo "== 3/5 variational bound of the final snapshot"
run --mode eval --eval_folder eval_bound --config.eval.bound=True \
  --config.eval.begin_ckpt=3 --config.eval.end_ckpt=3

echo "== 4/5 Flow++ variational dequantiser, then ODE bits/dim with it"
run --mode train_deq
run --mode eval --eval_folder eval_deq --config.eval.dequantizer=True \
  --config.eval.begin_ckpt=3 --config.eval.end_ckpt=3

echo "== 5/5 samples of the final snapshot"
run --mode eval --eval_folder eval_samples --config.eval.enable_bpd=False \
  --config.eval.enable_sampling=True --config.eval.sample_metrics=False \
  --config.eval.begin_ckpt=3 --config.eval.end_ckpt=3

.venv/bin/python scripts/summarize.py "$WORKDIR"
