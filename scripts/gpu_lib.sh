# Sourced by scripts/gpu_check.sh and scripts/gpu_pending.sh (from the repository root): what both need
# to pick their interpreter, make their results folder and hand their results back.

# The interpreter: $PYTHON, else in a rehearsal (first argument 1) the project's .venv, else python3.
gpu_python() {
  if [ -n "${PYTHON:-}" ]; then
    echo "$PYTHON"
  elif [ "$1" = 1 ] && [ -x .venv/bin/python ]; then
    echo "$PWD/.venv/bin/python"
  else
    echo python3
  fi
}

# gpu_results OVERRIDE REHEARSAL DEFAULT NAME: the results folder, created, as an absolute path: OVERRIDE
# if set, else a new temporary folder in a rehearsal (a rehearsal never replaces real results), else
# DEFAULT.
gpu_results() {
  local dir
  if [ -n "$1" ]; then
    dir="$1"
  elif [ "$2" = 1 ]; then
    dir="$(mktemp -d -t "gspn_${4}_rehearsal.XXXXXX")"
  else
    dir="$3"
  fi
  mkdir -p "$dir" && (cd "$dir" && pwd)
}

# gpu_pack RESULTS NAME FILE...: where $OUT is set (the lent machine's return folder, which brings back
# at most 8 files) and is not RESULTS itself, NAME.tgz of the whole results folder and its FILEs.
gpu_pack() {
  local results="$1" name="$2"
  shift 2
  [ -n "${OUT:-}" ] || return 0
  [ "$(cd "$OUT" 2> /dev/null && pwd)" != "$results" ] || return 0
  mkdir -p "$OUT"
  tar czf "$OUT/$name.tgz" -C "$results" . && (cd "$results" && cp "$@" "$OUT/") \
    && echo "packed into $OUT: $name.tgz $*"
}
