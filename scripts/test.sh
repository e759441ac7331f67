#!/usr/bin/env bash
# Set everything up, then run the linter and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
# Two xdist workers (one torch thread each, see tests/conftest.py): the suite is mostly single-threaded
# Python and subprocess start-up, so two workers on two cores take ~0.75x the time of one process.
.venv/bin/python -m pytest -q -n "${GSPN_TEST_WORKERS:-2}" --dist worksteal "$@"
