#!/usr/bin/env bash
# The GPU check: on a bare GPU machine, in one command of about seven minutes with the build, issue 24's
# check of the channels-last propagation kernel: build the CUDA extension for the visible GPU only, then
# (the default sections, in this order) `correct` (gspn_propagate_proj, the new op backend="kernel" and
# the old path backend="planes", against the float64 CPU reference, fp32 and bf16, forward and every
# gradient), `profile` (the top 15 kernels of a GSPN mixer's fwd+bwd at 128² and 256², old and new),
# `mixer` (the mixer old / new against flash SDPA at 32²-256², time and peak memory) and `directions`
# (the op per scan direction at 256², old and new); then the report, gpu_check.md, which opens with
# issue 24's acceptance table (each row measured pass / FAIL, or not measured).  The older sections
# (tests: the op/layer/model tests with their CUDA cases; scan: the scan against the copy roofline;
# baseline: a per-line Triton kernel; train, gen: training steps; sdxl: an SD-XL UNet step, needs
# diffusers; train_profile: the top kernels of two training steps; tile: the local tile kernels of
# chunked layers against the lane kernels, forward) run when named in
# GPU_CHECK_SECTIONS.  Each section runs in its own process under its own time limit, so a slow or
# failing section cannot eat the others; a failure never stops the later sections, except a failed
# build (each later section would rebuild in its own time), after which only the report runs.  Every
# section rewrites its JSON after each case, and after each section the results so far are packed into
# $OUT, so a run killed at any point keeps what it measured.  The sections are
# benchmarks/gpu_check/<section>.py, run as `python -m benchmarks.gpu_check SECTION` from the
# repository root (no install needed); the tests section is pytest.
#
#   bash scripts/gpu_check.sh                    # on a GPU machine (its own python3 is used)
#   bash scripts/gpu_check.sh --cpu-rehearsal    # the same script on the CPU, tiny sizes (a test runs it)
#
# Environment: PYTHON (interpreter; default .venv/bin/python in a rehearsal, else python3),
# GPU_CHECK_OUT (results folder; default benchmarks/results/gpu_check, a temporary one in a rehearsal),
# OUT (if set, as on the lent GPU machine, which brings back at most 8 files: gets gpu_check.tgz of the
# whole results folder after every section, and gpu_check.md and gpu_check.json at the end; the report
# of a killed run: `python -m benchmarks.gpu_check report --out DIR` on the unpacked folder),
# GSPN_EXTENSIONS_DIR (build cache; default ./.gspn_cache on the GPU machine), GPU_CHECK_SCALE
# (multiplies every time limit; default 1), GPU_CHECK_SECTIONS (the sections to run, space-separated;
# default: env build correct profile mixer directions; the others: tests scan baseline train gen sdxl
# train_profile tile), GPU_CHECK_TESTS (the tests section's files and selection, word-split, in place of the
# default list).  To compare two trees, run the check in each into its own GPU_CHECK_OUT, then
# `python -m benchmarks.gpu_check compare --out DIR --trees a=DIR_A b=DIR_B`.
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
DEFAULT_SECTIONS="env build correct profile mixer directions"
ALL_SECTIONS="$DEFAULT_SECTIONS tests scan baseline train gen sdxl train_profile tile"
SECTIONS_WANTED="${GPU_CHECK_SECTIONS:-$DEFAULT_SECTIONS}"
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
  B_ENV=20; B_BUILD=240; B_CORRECT=40; B_PROFILE=40; B_MIXER=40; B_DIRS=40
  B_TESTS=120; B_SCAN=40; B_BASE=60; B_TRAIN=40; B_GEN=40; B_SDXL=60; B_TPROF=60; B_TILE=40
  TEST_ARGS=(tests/test_nn.py -k "mixer_shapes")
  # shellcheck disable=SC2206  # the build section builds; tests marked `build` would build again
  [ -n "${GPU_CHECK_TESTS:-}" ] && TEST_ARGS=($GPU_CHECK_TESTS -m "not build")
  export TRITON_INTERPRET=1   # the Triton baseline runs in its CPU interpreter
else
  FLAG=
  # The default run: budgets 10 + 120 + 75 + 45 + 60 + 45 = 355 s, + 10 s each for start-up and the
  # last case = 415 s at most, inside one 600 s device call with room for the machine's start; a
  # typical run is well under that (the first H200 run, 2026-11-26, built both extensions in 37 s and
  # timed its mixer in 14 s).  The older sections, when named, add their own budgets.
  B_ENV=10; B_BUILD=120; B_CORRECT=75; B_PROFILE=45; B_MIXER=60; B_DIRS=45
  B_TESTS=100; B_SCAN=45; B_BASE=20; B_TRAIN=35; B_GEN=50; B_SDXL=90; B_TPROF=40  # sdxl: 4 UNets x 5 sizes
  B_TILE=45
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
  # Build for the visible GPU only (fast), and let every later process find the same cached build:
  # the architecture list is part of the build cache's key.
  if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    TORCH_CUDA_ARCH_LIST=$("$PYTHON" -c \
      "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))" 2>/dev/null) || TORCH_CUDA_ARCH_LIST=
    [ -n "$TORCH_CUDA_ARCH_LIST" ] && export TORCH_CUDA_ARCH_LIST || unset TORCH_CUDA_ARCH_LIST
  fi
fi
echo "== gspn GPU check: python=$PYTHON out=$RESULTS rehearsal=$REHEARSAL cache=${GSPN_EXTENSIONS_DIR:-default}"
echo "== sections: $SECTIONS_WANTED"

# $OUT (the lent machine's return folder, which brings back at most 8 files), unless it is the results
# folder itself: gpu_check.tgz of the whole results folder, replaced after every section.
to_out() { [ -n "${OUT:-}" ] && [ "$(cd "$OUT" 2> /dev/null && pwd)" != "$RESULTS" ]; }
pack() {
  to_out || return 0
  mkdir -p "$OUT" || return 0
  local out_abs exclude=()
  out_abs="$(cd "$OUT" && pwd)"
  # OUT inside the results folder (the rehearsal's test puts it there) is left out of its own archive:
  # tar would otherwise read the half-written archive, fail ("file changed as we read it") and leave it
  case "$out_abs/" in "$RESULTS"/*) exclude=("--exclude=./${out_abs#"$RESULTS"/}") ;; esac
  if tar czf "$OUT/.gpu_check.tgz.tmp" "${exclude[@]}" -C "$RESULTS" .; then
    mv "$OUT/.gpu_check.tgz.tmp" "$OUT/gpu_check.tgz"
  else
    rm -f "$OUT/.gpu_check.tgz.tmp"
  fi
}

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
  LAST_CODE=$code
  pack
}

BUILD_FAILED=0
LAST_CODE=0
py_section() {  # name budget
  local budget
  wanted "$1" || return 0
  if [ "$BUILD_FAILED" = 1 ]; then  # each would rebuild (and fail) in its own time: keep the device time
    echo "== [$1] not run: the build failed (see build.log)"
    return 0
  fi
  budget=$(awk -v b="$2" -v s="$SCALE" 'BEGIN { printf "%d", b * s }')
  run_section "$1" "$2" "$PYTHON" -m benchmarks.gpu_check "$1" --out "$RESULTS" --budget "$budget" $FLAG
}

py_section env "$B_ENV"
py_section build "$B_BUILD"
wanted build && [ "$LAST_CODE" != 0 ] && BUILD_FAILED=1
py_section correct "$B_CORRECT"
py_section profile "$B_PROFILE"
py_section mixer "$B_MIXER"
py_section directions "$B_DIRS"
wanted tests && [ "$BUILD_FAILED" = 0 ] && run_section tests "$B_TESTS" "$PYTHON" -m pytest -q -rfE -p no:cacheprovider --junitxml="$RESULTS/tests.xml" \
  "${TEST_ARGS[@]}"
py_section scan "$B_SCAN"
py_section baseline "$B_BASE"
py_section train "$B_TRAIN"
py_section gen "$B_GEN"
py_section sdxl "$B_SDXL"
py_section train_profile "$B_TPROF"
py_section tile "$B_TILE"

echo "== report"
REPORT_TESTS=()
wanted tests && REPORT_TESTS=(--junit "$RESULTS/tests.xml" --test-log "$RESULTS/tests.log" --test-files "${TEST_ARGS[*]}")
"$PYTHON" -m benchmarks.gpu_check report --out "$RESULTS" --sections "$SECTIONS_WANTED" "${REPORT_TESTS[@]}" \
  > "$RESULTS/report.log" 2>&1
code=$?
cat "$RESULTS/report.log"
echo "results in $RESULTS"
pack
if to_out; then
  cp "$RESULTS/gpu_check.md" "$RESULTS/gpu_check.json" "$OUT/" \
    && echo "packed into $OUT: gpu_check.tgz gpu_check.md gpu_check.json"
fi
exit $code
