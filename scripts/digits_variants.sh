#!/usr/bin/env bash
# GSPN-DiT's options on the digits at equal steps (issue 27: the demo's GSPN-DiT (the release block with
# GSPN-2's compact propagation) against every channel propagated, the earlier compact block and the
# paper's additive conditioning). Each variant is
# configs/dit/digits.yaml plus its overlay configs/dit/overlays/digits_<variant>.yaml ("release": no
# overlay, the demo's GSPN-DiT), trained VARIANT_STEPS steps (default 500) with seed VARIANT_SEED
# (default 0), one thread each, VARIANT_JOBS at a time (default 2), then scored as the demo scores
# (scripts/digits_lib.sh). A variant whose checkpoint at that step already exists in the demo's runs
# (runs/digits/seed<S>/gspn_dit, "release" only) is scored from there instead of trained again.
# Output: runs/digits_variants/seed<S>/<variant>/, the table in runs/digits_variants_summary.md.
#   bash scripts/digits_variants.sh                       (after scripts/demo.sh dit, or on its own)
#   VARIANTS="release d_prop" VARIANT_STEPS=300 bash scripts/digits_variants.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/digits_lib.sh
VARIANTS=${VARIANTS:-release full_width block_compact additive}
STEPS=${VARIANT_STEPS:-500}
SEED=${VARIANT_SEED:-0}
JOBS=${VARIANT_JOBS:-2}
need_classifier
export OMP_NUM_THREADS=1

variant() {  # train (or find) and score one variant
  local v=$1 root=runs/digits_variants/seed$SEED/$1
  local ck
  ck=$(ls "runs/digits/seed$SEED/gspn_dit/checkpoints/"*"-step=$STEPS.ckpt" 2>/dev/null | head -1 || true)
  rm -rf "$root"; mkdir -p "$root"
  if [ "$v" != release ] || [ -z "$ck" ]; then
    local cfg=(--config configs/dit/digits.yaml)
    [ "$v" = release ] || cfg+=(--config "configs/dit/overlays/digits_$v.yaml")
    local start; start=$(date +%s)
    "$PY" -m gspn_lightning.cli fit "${cfg[@]}" --seed_everything "$SEED" --trainer.default_root_dir "$root" \
      --trainer.max_steps "$STEPS" --trainer.max_time null > "$root/train.log" 2>&1
    echo "$(( $(date +%s) - start ))" > "$root/train_wall_s.txt"
    ck=$root/checkpoints/last.ckpt
  fi
  score "$ck" "$root/steps"
}

pids=()
status=0
for v in $VARIANTS; do
  [ "$v" = release ] || [ -f "configs/dit/overlays/digits_$v.yaml" ] || { echo "no overlay for $v" >&2; exit 1; }
  variant "$v" & pids+=($!)
  if [ ${#pids[@]} -ge "$JOBS" ]; then wait "${pids[0]}" || status=1; pids=("${pids[@]:1}"); fi
done
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
[ $status = 0 ] || { echo "a variant failed: see runs/digits_variants/seed$SEED/*/{train.log,steps/eval.log}" >&2; exit 1; }
"$PY" scripts/digits_summary.py runs/digits_variants --out runs/digits_variants_summary
