#!/usr/bin/env bash
# The generation demo (run through `bash scripts/demo.sh dit`, which sets up and writes the shards).
# For each of GSPN-DiT and the DiT baseline: train for 12 minutes on the CPU, draw 1,000 samples
# (100 per class, DDIM 25 steps, guidance 2), then score them: FID/KID against the 1,000 held-out
# digits, sample class accuracy under the classification demo's trained GSPN (trained first if
# missing), and a 10x10 grid. Reports land in runs/digits_{gspn_dit,dit}/report.json.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
if [ ! -f runs/demo_mnist/checkpoints/last.ckpt ]; then
  echo "== training the classification demo (its GSPN scores the samples)"
  "$PY" cli.py fit --config configs/classification/demo_mnist.yaml
fi
for name in gspn_dit dit; do
  root=runs/digits_$name
  cfg=(--config configs/dit/digits.yaml)
  [ "$name" = dit ] && cfg+=(--config configs/dit/overlays/digits_dit.yaml)
  echo "== [$name] training (12 minutes)"
  rm -rf "$root"
  start=$(date +%s)
  "$PY" cli.py fit "${cfg[@]}" "$@"
  echo "train_wall_s=$(( $(date +%s) - start ))" > "$root/train_time.txt"
  echo "== [$name] sampling 1,000 digits"
  "$PY" -m gspn_lightning.tasks.sample --ckpt "$root/checkpoints/last.ckpt" --out "$root/samples" \
    --num-samples 1000 --sampler ddim --steps 25 --guidance-scale 2.0 --batch-size 100
  echo "== [$name] FID, sample accuracy, grid"
  "$PY" -m gspn_lightning.tasks.evaluate_samples --samples "$root/samples/samples.npz" \
    --real data/demo_mnist/val --classifier runs/demo_mnist/checkpoints/last.ckpt \
    --grid "$root/grid.png" --out "$root/report.json" --no-progress
done
