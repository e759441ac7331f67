#!/usr/bin/env bash
# Set everything up, then run the linter and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
# Two xdist workers (one torch thread each, see tests/conftest.py): the suite is mostly single-threaded
# Python and subprocess start-up, so two workers on two cores take ~0.75x the time of one process.
# -m "slow or not slow": every test, the slow end-to-end ones too (a plain `pytest` leaves them out, see
# pyproject.toml); arguments given to this script come after it, so their own -m replaces it.
.venv/bin/python -m pytest -q -n "${GSPN_TEST_WORKERS:-2}" --dist worksteal -m "slow or not slow" "$@"
