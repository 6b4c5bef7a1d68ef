#!/usr/bin/env bash
# The flagship on one CUDA GPU, in about 11 minutes: the GPU benchmark suite (about 4 minutes),
# then the paper preset (DE-GRAD with the paper's DnCNN 17x64, batch and spectral norm, bf16
# autocast for f where the GPU has bf16) trained for TRAIN_SECONDS and scored on whole 128x128
# test images (about 7 minutes):
#
#   bash benchmarks/paper_gpu.sh CELEBA_DIR [OUT] [extra flagship flags...]
#
# CELEBA_DIR holds the img_align_celeba JPEGs (or their parent folder); the split is the
# flagship's (--split-seed 0: 6,336 train, 64 validation, 1,600 test images). OUT (default
# runs/paper-gpu) receives bench/ (the suite: results.json, results.md) and paper/ (the run:
# log.jsonl, last.pt, results.json, results.md, figures). Training stops at TRAIN_SECONDS by
# SIGINT, which the flagship turns into a checkpoint: continue it later with
#   python examples/deblur_celeba.py train --output-dir OUT/paper --resume
# On a cluster, run it inside a one-GPU allocation, e.g.
#   srun --gres=gpu:1 --time=00:20:00 bash benchmarks/paper_gpu.sh /data/celeba
#
# Settings (environment): TRAIN_SECONDS (330), TEST_LIMIT (256 test images; 1600: all),
# SUITE (gpu; "none" skips the suite), DEVICE (cuda; cpu for a dry run), PYTHON (python).
# The test suite runs this script on the CPU at tiny sizes (tests/examples/test_paper_gpu.py).
set -euo pipefail
data=${1:?usage: bash benchmarks/paper_gpu.sh CELEBA_DIR [OUT] [flags...]}
out=${2:-runs/paper-gpu}
shift $(($# >= 2 ? 2 : 1))
python=${PYTHON:-python}
device=${DEVICE:-cuda}
script=examples/deblur_celeba.py
start=$SECONDS
if [ "${SUITE:-gpu}" != none ]; then
  "$python" -m benchmarks run --suite "${SUITE:-gpu}" --device "$device" --out "$out/bench" \
    --no-progress
  echo "benchmark suite: $((SECONDS - start)) s; results in $out/bench"
fi
trained=$SECONDS
timeout -s INT -k 60 "${TRAIN_SECONDS:-330}" "$python" "$script" train --data-dir "$data" \
  --preset paper --device "$device" --workers 4 --test-limit "${TEST_LIMIT:-256}" \
  --no-progress --no-evaluate --output-dir "$out/paper" "$@" || [ $? -eq 124 ]  # 124: timeout
"$python" "$script" evaluate --checkpoint "$out/paper/last.pt" --no-progress --quiet
echo "paper preset: $((SECONDS - trained)) s; results in $out/paper/results.md"
echo "in all: $((SECONDS - start)) s"
