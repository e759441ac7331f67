# Shared by scripts/demo_dit.sh and scripts/digits_variants.sh (sourced, not run): scoring a digits
# generation checkpoint the demo's way.
PY=${PYTHON:-.venv/bin/python}

score() {  # sample checkpoint CKPT and score the samples into folder OUT
  local ckpt=$1 out=$2
  mkdir -p "$out"
  { "$PY" -m gspn_lightning.cli sample --ckpt "$ckpt" --out "$out/samples" \
      --num-samples "${DEMO_SAMPLES:-1000}" --sampler ddim --steps 25 --guidance-scale 4.0 --batch-size 100 --no-progress
    "$PY" -m gspn_lightning.cli evaluate --samples "$out/samples/samples.npz" \
      --real data/demo_mnist/val --classifier runs/demo_mnist/checkpoints/last.ckpt \
      --grid "$out/grid.png" --out "$out/report.json" --no-progress
  } > "$out/eval.log" 2>&1
}

step_of() {  # the global step of a checkpoint
  "$PY" -c "import sys, torch; print(torch.load(sys.argv[1], map_location='cpu', weights_only=True)['global_step'])" "$1"
}

need_classifier() {  # the classification demo's GSPN scores the samples: train it once
  if [ ! -f runs/demo_mnist/checkpoints/last.ckpt ]; then
    echo "== training the classification demo (its GSPN scores the samples)"
    "$PY" -m gspn_lightning.cli fit --config configs/classification/demo_mnist.yaml
  fi
}
