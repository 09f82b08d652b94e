#!/usr/bin/env bash
# The whole path on a 2-core CPU in a few minutes: install, write a synthetic Cityscapes tree,
# train a small U-Net with torchrun on 2 processes, evaluate it on val, print the mIoU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
DATA=${DATA:-data/demo}
OUT=${OUT:-runs/demo}
if [ ! -d "$DATA/leftImg8bit" ]; then
  python -m cityseg.synthetic --out "$DATA" --num-train 64 --num-val 16 --num-test 4 --size 128x256 --seed 0
fi
torchrun --standalone --nproc_per_node=2 train.py --config cityseg/configs/demo.yaml \
  --data-root "$DATA" --out-dir "$OUT" "$@"
torchrun --standalone --nproc_per_node=2 evaluate.py --checkpoint "$OUT/best.pt" --data-root "$DATA" \
  --split val --device cpu --workers 1
