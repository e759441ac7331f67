#!/usr/bin/env bash
# Set everything up, then run the main job: the scan benchmark (kernel vs reference).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python benchmarks/scan.py "$@"
