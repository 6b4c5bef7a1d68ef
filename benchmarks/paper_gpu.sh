#!/usr/bin/env bash
# The flagship's `--preset paper` run (CelebA 128x128, DnCNN 17x64 with batch norm and spectral
# norm, Anderson, JFB; the split of --split-seed 0) sized for 7 minutes of one GPU:
#
#   bash benchmarks/paper_gpu.sh CELEBA_DIR [OUT] [extra flagship flags...]
#
# Training stops at TRAIN_SECONDS (default 330) by SIGINT, which the flagship turns into a
# checkpoint (last.pt; `--resume` would continue it), then the last weights are evaluated on
# TEST_LIMIT (default 1,600: all) whole 128x128 test images. The paper trains 20 epochs; this
# run does what fits (4 epochs at most; results.json records the steps and seconds). On the
# device machine the CelebA folder must travel with the tree (64 MiB in all): copy part of it
# into an ignored folder of the checkout and carry it, e.g.
#   mkdir -p .celeba && ls ../shared/data/celeba | head -6000 | sed 's|^|../shared/data/celeba/|' \
#     | xargs cp -t .celeba && echo /.celeba/ >> .git/info/exclude
# and `run` with carry [".celeba", ".venv"] and `bash benchmarks/paper_gpu.sh .celeba`.
set -euo pipefail
data=${1:?usage: bash benchmarks/paper_gpu.sh CELEBA_DIR [OUT] [flags...]}
out=${2:-runs/paper-gpu}
shift $(($# >= 2 ? 2 : 1))
script=examples/deblur_celeba.py
start=$SECONDS
timeout -s INT -k 60 "${TRAIN_SECONDS:-330}" python "$script" train --data-dir "$data" \
  --preset paper --epochs 4 --workers 8 --test-limit "${TEST_LIMIT:-1600}" --no-progress \
  --no-evaluate --output-dir "$out" "$@" || [ $? -eq 124 ]  # 124: stopped by the timeout
python "$script" evaluate --checkpoint "$out/last.pt" --output-dir "$out" --no-progress
echo "paper preset: $((SECONDS - start)) s in all; results in $out/results.md"
