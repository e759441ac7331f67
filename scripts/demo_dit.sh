#!/usr/bin/env bash
# The generation demo (run through `bash scripts/demo.sh dit`, which sets up and writes the shards).
# GSPN-DiT and the DiT baseline run side by side, one thread and one core each, so both get the same
# wall-clock budget under the same machine load (on a shared machine, two runs one after the other
# would not). Each trains for 12 minutes on the CPU, draws 1,000 samples (100 per class, DDIM 25
# steps, guidance 4, predicted x_0 clipped to the pixel range), then scores them: ADM's table and KID against the
# 1,000 held-out digits, sample class accuracy under the classification demo's trained GSPN (trained
# first if missing), and a 10x10 grid. Reports: runs/digits_{gspn_dit,dit}/report.json, logs beside
# them (train.log, eval.log), and a summary table at the end (runs/digits_summary.md). A quick smoke run:
#   DEMO_SAMPLES=20 bash scripts/demo_dit.sh --trainer.max_steps 3
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
if [ ! -f runs/demo_mnist/checkpoints/last.ckpt ]; then
  echo "== training the classification demo (its GSPN scores the samples)"
  "$PY" -m gspn_lightning.cli fit --config configs/classification/demo_mnist.yaml
fi

one() {  # one model: train, sample, score; all output in its run folder
  local name=$1; shift
  local root=runs/digits_$name
  local cfg=(--config configs/dit/digits.yaml)
  [ "$name" = dit ] && cfg+=(--config configs/dit/overlays/digits_dit.yaml)
  rm -rf "$root"; mkdir -p "$root"
  local start; start=$(date +%s)
  "$PY" -m gspn_lightning.cli fit "${cfg[@]}" "$@" > "$root/train.log" 2>&1
  echo "$(( $(date +%s) - start ))" > "$root/train_wall_s.txt"
  { "$PY" -m gspn_lightning.cli sample --ckpt "$root/checkpoints/last.ckpt" --out "$root/samples" \
      --num-samples "${DEMO_SAMPLES:-1000}" --sampler ddim --steps 25 --guidance-scale 4.0 --batch-size 100 --no-progress
    "$PY" -m gspn_lightning.cli evaluate --samples "$root/samples/samples.npz" \
      --real data/demo_mnist/val --classifier runs/demo_mnist/checkpoints/last.ckpt \
      --grid "$root/grid.png" --out "$root/report.json" --no-progress
  } > "$root/eval.log" 2>&1
}

echo "== training GSPN-DiT and DiT side by side, one core each (12 minutes), then sampling and scoring"
echo "   follow with: tail -f runs/digits_gspn_dit/train.log runs/digits_dit/train.log"
export OMP_NUM_THREADS=1
pids=()
for name in gspn_dit dit; do
  one "$name" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
[ $status = 0 ] || { echo "a run failed: see runs/digits_*/train.log and eval.log" >&2; exit 1; }
"$PY" - <<'PY'
import json
from pathlib import Path

import torch

rows = ["| model | params | steps | s/step | FID | sFID | precision | recall | KID | sample class accuracy |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
for name, label in (("gspn_dit", "GSPN-DiT"), ("dit", "DiT")):
    root = Path("runs") / f"digits_{name}"
    report = json.loads((root / "report.json").read_text())
    wall = int((root / "train_wall_s.txt").read_text())
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    steps = ckpt["global_step"]
    params = sum(v.numel() for k, v in ckpt["state_dict"].items() if k.startswith("model."))
    acc = report.get("class_accuracy")
    rows.append(
        f"| {label} | {params / 1e6:.2f}M | {steps} | {wall / max(steps, 1):.2f} | {report['fid']:.1f} | "
        f"{report.get('sfid', float('nan')):.1f} | {report.get('precision', float('nan')):.3f} | "
        f"{report.get('recall', float('nan')):.3f} | {report.get('kid_mean', float('nan')):.4f} | "
        f"{'-' if acc is None else f'{100 * acc:.1f} %'} |"
    )
text = "\n".join(rows)
Path("runs/digits_summary.md").write_text(text + "\n")
print(text)
PY
