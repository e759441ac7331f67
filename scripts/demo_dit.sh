#!/usr/bin/env bash
# The generation demo (run through `bash scripts/demo.sh dit`, which sets up and writes the shards).
# GSPN-DiT and the DiT baseline run side by side, one thread and one core each, so both get the same
# wall-clock budget under the same machine load (on a shared machine, two runs one after the other
# would not). Each trains for 12 minutes on the CPU, keeping a checkpoint every 250 steps; that is
# done for every seed of DEMO_SEEDS (default "0 1"), one seed after the other.
# Each model is then scored twice per seed:
#   - equal time: its last checkpoint (whatever number of steps its 12 minutes gave);
#   - equal steps: its checkpoint at the largest multiple of 250 steps that both models reached.
# Scoring: 1,000 samples (100 per class, DDIM 25 steps, guidance 4, predicted x_0 clipped to the pixel
# range), ADM's table and KID against the 1,000 held-out digits, sample class accuracy under the
# classification demo's trained GSPN (trained first if missing), and a 10x10 grid.
# Output: runs/digits/seed<S>/<model>/{train.log,checkpoints/,time/,steps/}, and the summary over the
# seeds (median [min-max], per-step time, parameters) in runs/digits_summary.{md,json}.
# A quick smoke run:
#   DEMO_SEEDS=0 DEMO_SAMPLES=20 DEMO_EVERY=2 bash scripts/demo_dit.sh --trainer.max_steps 5
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/digits_lib.sh
SEEDS=${DEMO_SEEDS:-0 1}
EVERY=${DEMO_EVERY:-250}
need_classifier
export OMP_NUM_THREADS=1

EXTRA=("$@")  # more fit arguments, for both models

train() {  # train model NAME of $seed into its run folder
  local name=$1 root=runs/digits/seed$seed/$1
  local cfg=(--config configs/dit/digits.yaml)
  [ "$name" = dit ] && cfg+=(--config configs/dit/overlays/digits_dit.yaml)
  rm -rf "$root"; mkdir -p "$root"
  local start; start=$(date +%s)
  "$PY" -m gspn_lightning.cli fit "${cfg[@]}" --seed_everything "$seed" \
    --trainer.default_root_dir "$root" --checkpoint.every_n_train_steps "$EVERY" \
    --checkpoint.save_top_k -1 ${EXTRA[@]+"${EXTRA[@]}"} > "$root/train.log" 2>&1
  echo "$(( $(date +%s) - start ))" > "$root/train_wall_s.txt"
}

score_time() {  # NAME at equal time: its last checkpoint
  score "runs/digits/seed$seed/$1/checkpoints/last.ckpt" "runs/digits/seed$seed/$1/time"
}

score_steps() {  # NAME at equal steps: its checkpoint at step $equal
  local ck
  ck=$(ls "runs/digits/seed$seed/$1/checkpoints/"*"-step=$equal.ckpt" 2>/dev/null | head -1)
  [ -n "$ck" ] || { echo "no checkpoint at step $equal in runs/digits/seed$seed/$1" >&2; return 1; }
  score "$ck" "runs/digits/seed$seed/$1/steps"
}

run_pair() {  # FUNC gspn_dit and FUNC dit at once, one core each; fails if either fails
  local pids=() status=0
  "$1" gspn_dit & pids+=($!)
  "$1" dit & pids+=($!)
  for pid in "${pids[@]}"; do wait "$pid" || status=1; done
  return $status
}

for seed in $SEEDS; do
  echo "== seed $seed: training GSPN-DiT and DiT side by side, one core each (12 minutes)"
  echo "   follow with: tail -f runs/digits/seed$seed/*/train.log"
  run_pair train || { echo "a run failed: see runs/digits/seed$seed/*/train.log" >&2; exit 1; }
  g=$(step_of "runs/digits/seed$seed/gspn_dit/checkpoints/last.ckpt")
  d=$(step_of "runs/digits/seed$seed/dit/checkpoints/last.ckpt")
  equal=$(( (g < d ? g : d) / EVERY * EVERY ))
  echo "== seed $seed: scoring (steps in the time: GSPN-DiT $g, DiT $d; equal steps: $equal)"
  run_pair score_time || { echo "scoring failed: see runs/digits/seed$seed/*/time/eval.log" >&2; exit 1; }
  if [ "$equal" -gt 0 ]; then
    run_pair score_steps || { echo "scoring failed: see runs/digits/seed$seed/*/steps/eval.log" >&2; exit 1; }
  fi
done
"$PY" scripts/digits_summary.py runs/digits --out runs/digits_summary
