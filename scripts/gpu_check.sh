#!/usr/bin/env bash
# The GPU check: on a bare GPU machine, in one command, build the CUDA extension for the visible GPU,
# run every op/layer/model test (the CUDA-parametrised cases included), time the scan against the copy
# roofline and against a per-line baseline, a GSPN mixer against flash attention, a gspn_t
# training step, GSPN-DiT-XL/2 / DiT-XL/2 training steps at 256² and 512², and one SD-XL UNet step with
# GSPN against SDPA self-attention at 1024² to 4096² (needs diffusers on PYTHONPATH, else skipped); write
# JSON + a markdown table into the results folder and print the short table last.  Each section runs in
# its own process under its own time limit, so a slow or failing section cannot eat the others; a
# failure never stops the later sections.  The sections are benchmarks/gpu_check/<section>.py, run as
# `python -m benchmarks.gpu_check SECTION` from the repository root (no install needed); the tests
# section is pytest.
#
#   bash scripts/gpu_check.sh                    # on a GPU machine (its own python3 is used)
#   bash scripts/gpu_check.sh --cpu-rehearsal    # the same script on the CPU, tiny sizes (a test runs it)
#
# Environment: PYTHON (interpreter; default .venv/bin/python in a rehearsal, else python3),
# GPU_CHECK_OUT (results folder; default benchmarks/results/gpu_check, a temporary one in a rehearsal),
# OUT (if set, as on the lent GPU machine, which brings back at most 8 files: gets gpu_check.tgz of the
# whole results folder, gpu_check.md and gpu_check.json), GSPN_EXTENSIONS_DIR (build cache; default
# ./.gspn_cache on the GPU machine), GPU_CHECK_SCALE (multiplies every time limit; default 1),
# GPU_CHECK_SECTIONS (the sections to run, space-separated; default all: env build tests scan baseline
# mixer train gen sdxl profile), GPU_CHECK_TESTS (the tests section's files and selection, word-split,
# in place of the default list).  To compare two trees, run the check in each into its own
# GPU_CHECK_OUT, then `python -m benchmarks.gpu_check compare --out DIR --trees a=DIR_A b=DIR_B`.
set -uo pipefail
cd "$(dirname "$0")/.."

REHEARSAL=0
for arg in "$@"; do
  case "$arg" in
    --cpu-rehearsal) REHEARSAL=1 ;;
    -h|--help) sed -n '2,/^set /{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$arg' (only --cpu-rehearsal)" >&2; exit 2 ;;
  esac
done

# The interpreter: $PYTHON, else in a rehearsal the project's .venv, else python3.
if [ -z "${PYTHON:-}" ]; then
  PYTHON=python3
  [ "$REHEARSAL" = 1 ] && [ -x .venv/bin/python ] && PYTHON="$PWD/.venv/bin/python"
fi
# The results folder, as an absolute path: $GPU_CHECK_OUT, else a new temporary folder in a rehearsal
# (a rehearsal never replaces real results), else benchmarks/results/gpu_check.
RESULTS="${GPU_CHECK_OUT:-}"
if [ -z "$RESULTS" ]; then
  RESULTS=benchmarks/results/gpu_check
  [ "$REHEARSAL" = 1 ] && RESULTS="$(mktemp -d -t gspn_gpu_check_rehearsal.XXXXXX)"
fi
mkdir -p "$RESULTS" && RESULTS="$(cd "$RESULTS" && pwd)" || exit 1
if [ "$REHEARSAL" = 0 ]; then
  # in the working tree, so a warm device machine keeps the build between calls
  export GSPN_EXTENSIONS_DIR="${GSPN_EXTENSIONS_DIR:-$PWD/.gspn_cache}"
fi
export PYTHONDONTWRITEBYTECODE=1
SCALE="${GPU_CHECK_SCALE:-1}"
ALL_SECTIONS="env build tests scan baseline mixer train gen sdxl profile"
SECTIONS_WANTED="${GPU_CHECK_SECTIONS:-$ALL_SECTIONS}"
for s in $SECTIONS_WANTED; do
  case " $ALL_SECTIONS " in
    *" $s "*) ;;
    *) echo "gpu_check.sh: unknown section '$s' in GPU_CHECK_SECTIONS (sections: $ALL_SECTIONS)" >&2; exit 2 ;;
  esac
done
wanted() { case " $SECTIONS_WANTED " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
: > "$RESULTS/sections.tsv"

if [ "$REHEARSAL" = 1 ]; then
  FLAG=--rehearsal
  B_ENV=20; B_BUILD=240; B_TESTS=120; B_SCAN=40; B_BASE=60; B_MIXER=40; B_TRAIN=40; B_GEN=40; B_SDXL=60
  B_PROFILE=60
  TEST_ARGS=(tests/test_nn.py -k "mixer_shapes")
  # shellcheck disable=SC2206  # the build section builds; tests marked `build` would build again
  [ -n "${GPU_CHECK_TESTS:-}" ] && TEST_ARGS=($GPU_CHECK_TESTS -m "not build")
  export TRITON_INTERPRET=1   # the Triton baseline runs in its CPU interpreter
else
  FLAG=
  # at most ~595 s in all (budgets + 10 s each), inside one 600 s device call; a typical run is well under that
  # The first H200 run (2026-11-26) took 37 s to build, 23 s for the scan, 14 s for the mixer, and
  # its tests needed more than 100 s on one process: they now spread over pytest-xdist workers.
  B_ENV=15; B_BUILD=105; B_TESTS=100; B_SCAN=45; B_BASE=20; B_MIXER=35; B_TRAIN=35; B_GEN=50; B_SDXL=45
  B_PROFILE=40
  TEST_ARGS=(tests/test_ops.py tests/test_propagate.py tests/test_propagate_proj.py tests/test_nn.py
             tests/test_models.py tests/test_diffusion_models.py -m "not build")
  # shellcheck disable=SC2206  # word-split on purpose: files and options
  [ -n "${GPU_CHECK_TESTS:-}" ] && TEST_ARGS=($GPU_CHECK_TESTS -m "not build")
  if "$PYTHON" -c "import xdist" 2>/dev/null; then
    WORKERS=$(( $(nproc) / 2 )); [ "$WORKERS" -gt 8 ] && WORKERS=8; [ "$WORKERS" -lt 1 ] && WORKERS=1
    TEST_ARGS+=(-n "$WORKERS")
  fi
  # A kernel that hangs must cost one test, not the section (a later run's tests printed nothing
  # before their limit): pytest-timeout, where installed, fails a test after 30 s.
  if "$PYTHON" -c "import pytest_timeout" 2>/dev/null; then
    TEST_ARGS+=(--timeout 30 --timeout-method thread)
  fi
  # Build for the visible GPU only (fast), and let every later process (the tests) find the same
  # cached build: the architecture list is part of the build cache's key.
  if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    TORCH_CUDA_ARCH_LIST=$("$PYTHON" -c \
      "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))" 2>/dev/null) || TORCH_CUDA_ARCH_LIST=
    [ -n "$TORCH_CUDA_ARCH_LIST" ] && export TORCH_CUDA_ARCH_LIST || unset TORCH_CUDA_ARCH_LIST
  fi
fi
echo "== gspn GPU check: python=$PYTHON out=$RESULTS rehearsal=$REHEARSAL cache=${GSPN_EXTENSIONS_DIR:-default}"

# Section time limits in seconds: a Python section stops starting new cases when its budget is spent;
# the outer kill comes 10 s later (start-up, the last case, the final write).
run_section() {  # name budget command...
  local name="$1" budget="$2"; shift 2
  local limit t0 code
  limit=$(awk -v b="$budget" -v s="$SCALE" 'BEGIN { printf "%d", b * s + 10 }')
  echo "== [$name] (limit ${limit} s)"
  t0=$(date +%s.%N)
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$RESULTS/$name.log" | tail -n 40
  code=${PIPESTATUS[0]}
  printf '%s\t%s\t%s\n' "$name" "$code" "$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')" \
    >> "$RESULTS/sections.tsv"
  echo "== [$name] exit $code"
}

py_section() {  # name budget
  local budget
  wanted "$1" || return 0
  budget=$(awk -v b="$2" -v s="$SCALE" 'BEGIN { printf "%d", b * s }')
  run_section "$1" "$2" "$PYTHON" -m benchmarks.gpu_check "$1" --out "$RESULTS" --budget "$budget" $FLAG
}

py_section env "$B_ENV"
py_section build "$B_BUILD"
wanted tests && run_section tests "$B_TESTS" "$PYTHON" -m pytest -q -rfE -p no:cacheprovider --junitxml="$RESULTS/tests.xml" \
  "${TEST_ARGS[@]}"
py_section scan "$B_SCAN"
py_section baseline "$B_BASE"
py_section mixer "$B_MIXER"
py_section train "$B_TRAIN"
py_section gen "$B_GEN"
py_section sdxl "$B_SDXL"
py_section profile "$B_PROFILE"

echo "== report"
REPORT_TESTS=()
wanted tests && REPORT_TESTS=(--junit "$RESULTS/tests.xml" --test-log "$RESULTS/tests.log" --test-files "${TEST_ARGS[*]}")
"$PYTHON" -m benchmarks.gpu_check report --out "$RESULTS" --sections "$SECTIONS_WANTED" "${REPORT_TESTS[@]}" \
  > "$RESULTS/report.log" 2>&1
code=$?
cat "$RESULTS/report.log"
echo "results in $RESULTS"
# $OUT (the lent machine's return folder, which brings back at most 8 files), unless it is the results
# folder itself: gpu_check.tgz of the whole results folder, gpu_check.md and gpu_check.json.
if [ -n "${OUT:-}" ] && [ "$(cd "$OUT" 2> /dev/null && pwd)" != "$RESULTS" ]; then
  mkdir -p "$OUT"
  tar czf "$OUT/gpu_check.tgz" -C "$RESULTS" . && cp "$RESULTS/gpu_check.md" "$RESULTS/gpu_check.json" "$OUT/" \
    && echo "packed into $OUT: gpu_check.tgz gpu_check.md gpu_check.json"
fi
exit $code
