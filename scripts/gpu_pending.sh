#!/usr/bin/env bash
# The pending CUDA patches (docs/pending/cuda-*.patch, or the ones named) against main on a lent GPU, in
# one call.  Each patch is applied to its own copy of the working tree; main and every copy are built at
# once (one process each, into one build cache: its key is a hash of the sources, so the builds cannot
# collide); then, one tree at a time, the copies run the CUDA tests of the test files their patch
# touches (30 s per test), and every tree runs the same sections of scripts/gpu_check.sh (default: scan
# and mixer) under the same budgets.  `benchmarks/gpu_check.py compare` puts the trees side by side in
# compare.md (main's time over the patch's: above 1, the patch is faster).
#
#   bash scripts/gpu_pending.sh [PATCH ...]                   # on the GPU machine, after gpu_check.sh
#   bash scripts/gpu_pending.sh --cpu-rehearsal [PATCH ...]   # the same flow on the CPU, tiny sizes
#
# Environment: PYTHON, GSPN_EXTENSIONS_DIR and OUT as for gpu_check.sh (OUT gets gpu_pending.tgz of all
# results and compare.md); GPU_PENDING_OUT (results; default benchmarks/results/gpu_pending, a
# temporary folder in a rehearsal); GPU_PENDING_SECTIONS (default "scan mixer"); GPU_PENDING_SCALE
# (gpu_check.sh's time budgets times this; default 0.5: about 50 s of tests, 22 s of scan and 17 s of
# mixer per tree); GPU_PENDING_BUILD_SCALE (the same for the env and build sections; default 2);
# GPU_PENDING_K (the tests' -k selection, one word; default cuda; tests marked `build` never run);
# GPU_PENDING_APPLY (git, patch or python: how patches are applied; default the first one installed).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

REHEARSAL=0
PATCHES=()
for arg in "$@"; do
  case "$arg" in
    --cpu-rehearsal) REHEARSAL=1 ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    -*) echo "gpu_pending.sh: unknown option '$arg' (only --cpu-rehearsal)" >&2; exit 2 ;;
    *) PATCHES+=("$(cd "$(dirname "$arg")" && pwd)/$(basename "$arg")") ;;
  esac
done
if [ ${#PATCHES[@]} -eq 0 ]; then
  for p in "$ROOT"/docs/pending/cuda-*.patch; do [ -e "$p" ] && PATCHES+=("$p"); done
fi
if [ ${#PATCHES[@]} -eq 0 ]; then echo "gpu_pending.sh: no patches to try" >&2; exit 2; fi
for p in "${PATCHES[@]}"; do
  [ -f "$p" ] || { echo "gpu_pending.sh: no such patch: $p" >&2; exit 2; }
done

# shellcheck source=scripts/gpu_lib.sh
. scripts/gpu_lib.sh
PYTHON="$(gpu_python "$REHEARSAL")"
export PYTHON  # the trees' copies have no .venv
RESULTS="$(gpu_results "${GPU_PENDING_OUT:-}" "$REHEARSAL" benchmarks/results/gpu_pending gpu_pending)" || exit 1
# One cache for every tree (on the GPU machine, main's from gpu_check.sh; elsewhere the usual one).
[ "$REHEARSAL" = 0 ] && export GSPN_EXTENSIONS_DIR="${GSPN_EXTENSIONS_DIR:-$ROOT/.gspn_cache}"
SECTIONS="${GPU_PENDING_SECTIONS:-scan mixer}"
export GPU_CHECK_SCALE="${GPU_PENDING_SCALE:-0.5}"
REH_FLAG=()
[ "$REHEARSAL" = 1 ] && REH_FLAG=(--cpu-rehearsal)
WORK="$(mktemp -d -t gspn_gpu_pending.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
echo "== gspn pending patches: ${#PATCHES[@]} against main; python=$PYTHON out=$RESULTS rehearsal=$REHEARSAL"

# git apply, else patch, else scripts/apply_patch.py (exact hunks, offsets allowed, no fuzz: the GPU
# image may lack both tools); GPU_PENDING_APPLY=git|patch|python picks one.
APPLY="${GPU_PENDING_APPLY:-}"
if [ -z "$APPLY" ]; then
  if command -v git > /dev/null; then APPLY=git; elif command -v patch > /dev/null; then APPLY=patch; else APPLY=python; fi
fi
apply_patch() {  # dir patch
  case "$APPLY" in
    git) (cd "$1" && git apply --whitespace=nowarn "$2") ;;
    patch) patch -s -p1 --forward -d "$1" < "$2" ;;
    python) "$PYTHON" "$ROOT/scripts/apply_patch.py" "$1" "$2" ;;
    *) echo "GPU_PENDING_APPLY must be git, patch or python, not '$APPLY'" >&2; return 1 ;;
  esac
}

# The trees: main (the working tree itself) and a copy per patch that applies.
NAMES=(main)
DIRS=("$ROOT")
TESTS=("")
: > "$RESULTS/trees.tsv"
for p in "${PATCHES[@]}"; do
  name="$(basename "$p" .patch)"
  dst="$WORK/$name"
  mkdir -p "$dst"
  tar -C "$ROOT" --exclude=./.git --exclude=./.venv --exclude=./.gspn_cache --exclude=./benchmarks/results \
    -cf - . | tar -C "$dst" -xf -
  if ! apply_patch "$dst" "$p" > "$RESULTS/$name.apply.log" 2>&1; then
    echo "== [$name] does not apply to this tree: skipped (see $name.apply.log)"
    printf '%s\tdoes not apply\n' "$name" >> "$RESULTS/trees.tsv"
    continue
  fi
  # the patch's own test files, else the kernel test files
  files="$(sed -n 's|^+++ b/\(tests/[^ ]*\.py\)$|\1|p' "$p" | sort -u | tr '\n' ' ')"
  files="${files% }"
  [ -n "$files" ] || files="tests/test_ops.py tests/test_propagate.py tests/test_propagate_proj.py"
  NAMES+=("$name")
  DIRS+=("$dst")
  TESTS+=("$files")
  printf '%s\tapplied\t%s\n' "$name" "$files" >> "$RESULTS/trees.tsv"
done

run_check() {  # index sections [scale]
  local i="$1" sections="$2" scale="${3:-$GPU_CHECK_SCALE}"
  (
    unset OUT
    cd "${DIRS[$i]}" || exit 1
    GPU_CHECK_OUT="$RESULTS/${NAMES[$i]}" GPU_CHECK_SECTIONS="$sections" GPU_CHECK_SCALE="$scale" \
      GPU_CHECK_TESTS="${TESTS[$i]} -k ${GPU_PENDING_K:-cuda}" bash scripts/gpu_check.sh "${REH_FLAG[@]}"
  )
}

echo "== building ${#NAMES[@]} trees at once"
t0=$(date +%s)
pids=()
for i in "${!NAMES[@]}"; do
  what=build
  [ "$i" = 0 ] && what="env build"  # the device, once
  # the limits are kills, not budgets, here: a patched CUDA build took 111 s on the CPU host
  run_check "$i" "$what" "${GPU_PENDING_BUILD_SCALE:-2}" > "$RESULTS/${NAMES[$i]}.build.log" 2>&1 &
  pids+=($!)
done
for i in "${!pids[@]}"; do
  wait "${pids[$i]}"
  echo "== [${NAMES[$i]}] build exit $?"
done
echo "== builds took $(( $(date +%s) - t0 )) s"

for i in "${!NAMES[@]}"; do
  sections="$SECTIONS"
  [ "$i" -gt 0 ] && sections="tests $SECTIONS"
  echo "== [${NAMES[$i]}] $sections"
  # keep the build section's record: each run of gpu_check.sh rewrites only its own sections' files
  run_check "$i" "$sections" > "$RESULTS/${NAMES[$i]}.log" 2>&1
  echo "== [${NAMES[$i]}] exit $?"
done

trees=()
for i in "${!NAMES[@]}"; do trees+=("${NAMES[$i]}=$RESULTS/${NAMES[$i]}"); done
"$PYTHON" benchmarks/gpu_check.py compare --out "$RESULTS" --trees "${trees[@]}" > "$RESULTS/compare.log" 2>&1
code=$?
cat "$RESULTS/compare.log"
echo "results in $RESULTS"
gpu_pack "$RESULTS" gpu_pending compare.md
exit $code
