#!/usr/bin/env bash
# Set everything up, then run the main job on the bundled demo data: write the 5,000 MNIST digits
# to webdataset shards, train a small GSPN on the CPU (a few minutes), and report validation top-1.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m gspn_lightning.data.mnist_demo --out data/demo_mnist
.venv/bin/python cli.py fit --config configs/classification/demo_mnist.yaml "$@"
echo "== validating the last checkpoint (raw weights and their EMA)"
.venv/bin/python cli.py validate --config configs/classification/demo_mnist.yaml --ckpt_path last "$@"
