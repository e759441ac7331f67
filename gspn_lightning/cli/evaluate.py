"""Score a set of generated samples: ADM's table (FID, sFID, precision, recall; the Inception Score
where the weights allow) and KID against real images, how often a trained classifier
recognises each sample as the class it was conditioned on, and a grid to look at.

    gspn evaluate --samples runs/x/samples/samples.npz \\
        --real data/demo_mnist/val [--classifier runs/demo_mnist/checkpoints/last.ckpt] \\
        [--grid runs/x/grid.png --rows 10 --per-row 10] [--out runs/x/report.json]

``--samples`` is what ``gspn sample`` writes (``arr_0`` uint8 (N, H, W, C) and ``labels``). ``--real``
is image shards (every sample read once), a folder of images or an ``.npz``; shard images are resized
to the samples' size first, so both sides go through the same pipeline before Inception.
``--classifier`` is a ClassificationTask checkpoint (EMA weights when it has them); samples are resized
to its training image size and normalised with the data's mean/std recorded in its run's
``config.yaml`` when there is one (``--mean``/``--std`` otherwise).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from gspn_lightning.data.latents import real_images_from_shards
from gspn_lightning.diffusion.samples import sample_grid
from gspn_lightning.metrics.accuracy import class_accuracy

from ._common import is_shards

PROG = "gspn evaluate"


def _classifier(ckpt: str):
    from gspn_lightning.tasks.classification import ClassificationTask

    task = ClassificationTask.load_from_checkpoint(ckpt, map_location="cpu")
    net = task.ema.module if task.ema is not None else task.model
    return net.eval(), dict(task.hparams)


def _normalisation(ckpt: str) -> tuple[list[float], list[float]] | None:
    """mean/std of the data module in the run's saved config (``<root>/lightning_logs/*/config.yaml``)."""
    import yaml

    root = Path(ckpt).resolve().parent.parent
    for cfg in sorted(
        root.glob("lightning_logs/*/config.yaml"), key=lambda p: p.stat().st_mtime, reverse=True
    ):
        data = (yaml.safe_load(cfg.read_text()) or {}).get("data", {}).get("init_args", {})
        if "mean" in data and "std" in data:
            return list(data["mean"]), list(data["std"])
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", required=True, help="samples.npz from the sampling command")
    p.add_argument("--real", required=True, help="real images: shards, a folder, or an .npz")
    p.add_argument("--classifier", default=None, help="a ClassificationTask checkpoint")
    p.add_argument("--mean", type=float, nargs="+", default=None)
    p.add_argument("--std", type=float, nargs="+", default=None)
    p.add_argument("--grid", default=None, help="write a PNG grid here")
    p.add_argument("--rows", type=int, default=10)
    p.add_argument("--per-row", type=int, default=10)
    p.add_argument("--out", default=None, help="write the report as JSON here")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--no-kid", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)

    from gspn_lightning.metrics import METRICS, compute_metrics, format_table

    data = np.load(a.samples)
    images, labels = data["arr_0"], data["labels"]
    N, H, W, C = images.shape
    real, real_arrays = a.real, None
    if is_shards(a.real):
        real_arrays = real_images_from_shards(a.real, H, C, with_labels=True)
        real = real_arrays[0]  # uint8 (N, H, W, C), read channels-last by the metrics like the samples
    report = {"samples": str(Path(a.samples).resolve()), "num_samples": int(N), "real": a.real}
    protocol = Path(a.samples).with_name("protocol.json")
    if protocol.exists():
        report["protocol"] = json.loads(protocol.read_text())
    metrics = [m for m in METRICS if not (a.no_kid and m == "kid")]
    report.update(
        compute_metrics(
            real,
            images,
            metrics=metrics,
            batch_size=a.batch_size,
            progress=not a.no_progress,
            kid_subset_size=min(1000, N),
        )  # fmt: skip
    )
    print(format_table(report), file=sys.stderr)
    if a.classifier:
        net, hp = _classifier(a.classifier)
        norm = (a.mean, a.std) if a.mean and a.std else _normalisation(a.classifier)
        if norm is None:
            raise SystemExit("cannot tell the classifier's input normalisation: pass --mean and --std")
        size = hp.get("image_size") or H
        acc, pred = class_accuracy(images, labels, net, int(size), *norm)
        report["class_accuracy"] = acc
        report["per_class_accuracy"] = {
            int(k): float((pred[labels == k] == k).mean()) for k in np.unique(labels)
        }
        if real_arrays is not None and (real_arrays[1] >= 0).all():
            # how good the judge is: its accuracy on the real images, prepared the same way
            report["classifier_accuracy_on_real"] = class_accuracy(
                real_arrays[0], real_arrays[1], net, int(size), *norm
            )[0]
    if a.grid:
        from PIL import Image

        grid = sample_grid(images, labels, a.rows, a.per_row)
        Image.fromarray(grid[..., 0] if C == 1 else grid).save(a.grid)
        report["grid"] = str(Path(a.grid).resolve())
    text = json.dumps(report, indent=1)
    if a.out:
        Path(a.out).write_text(text + "\n")
    print(text)
    return 0


# python -m gspn_lightning.cli.evaluate: the same as gspn evaluate
if __name__ == "__main__":
    from gspn_lightning.cli import run_module

    sys.exit(run_module(__spec__.name))
