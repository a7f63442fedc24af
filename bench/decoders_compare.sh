#!/usr/bin/env bash
# Short side-by-side comparison of the merge, inject and attention decoders (issue 6) on the same
# features, vocabulary, batch size, learning rate, seed and number of epochs. One command:
#     bash bench/decoders_compare.sh [EPOCHS] [EVAL_IMAGES]
# Writes runs/decoders_<decoder>/ (run directories), runs/decoders_<decoder>.log (per-epoch Keras
# lines with their times) and runs/decoders_<decoder>/eval_dev.json (dev metrics, beam 3).
# train.py refuses to overwrite a run: remove runs/decoders_{merge,inject,attention} to run it again.
set -euo pipefail
cd "$(dirname "$0")/.."
EPOCHS=${1:-3}
EVAL_IMAGES=${2:-300}
FEATURES=features/store/flickr8k_efficientnet_lite0.pkl
for decoder in merge inject attention; do
  out=runs/decoders_${decoder}
  nice -n 15 python train.py --decoder "$decoder" --features "$FEATURES" --epochs "$EPOCHS" --batch-size 64 \
    --seed 0 --out "$out" > "runs/decoders_${decoder}.log" 2>&1
  nice -n 15 python evaluate.py --model "$out" --split dev --beam 3 --limit "$EVAL_IMAGES" --features "$FEATURES" \
    --json "$out/eval_dev.json" >> "runs/decoders_${decoder}.log" 2>&1
  grep -E "^[0-9]+/[0-9]+ - |epochs in|BLEU-4|CIDEr|METEOR" "runs/decoders_${decoder}.log" | sed "s/^/${decoder}: /"
done
