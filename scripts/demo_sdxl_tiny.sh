#!/usr/bin/env bash
# The tiny SD-XL distillation smoke run, from nothing, on the CPU in about a minute: writes the tiny
# SD-XL folder (random weights, SD-XL's structure), 24 random captioned images with sidecar .txt
# files, caption shards from them (train 16 / val 8), then runs configs/sdxl/tiny.yaml as written.
# Everything lands under data/demo_sdxl/ (ignored) and runs/sdxl_tiny/. Extra arguments go to `gspn fit`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
root=data/demo_sdxl
if [ ! -f "$root/tiny-sdxl/unet/config.json" ]; then
  "$PY" -c "from gspn_lightning.testing import make_tiny_sdxl; make_tiny_sdxl('$root/tiny-sdxl')"
fi
"$PY" - "$root" <<'PYEOF'
import sys
from pathlib import Path

import numpy as np
from PIL import Image

root = Path(sys.argv[1])
rng = np.random.default_rng(0)
colours = ["red", "green", "blue"]
for split, n in (("train", 16), ("val", 8)):
    folder = root / "images" / split
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        h, w = (96, 64) if i % 2 else (64, 112)  # portrait and landscape: the crop is recorded
        c = i % 3
        img = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
        img[..., c] += 150
        Image.fromarray(img).save(folder / f"{split}_{i:03d}.png")
        (folder / f"{split}_{i:03d}.txt").write_text(f"a noisy {colours[c]} picture\n")
PYEOF
for split in train val; do
  "$PY" -m gspn_lightning.cli write-captions "$root/images/$split" "$root/$split" --overwrite --quiet
done
"$PY" -m gspn_lightning.cli fit --config configs/sdxl/tiny.yaml "$@"
