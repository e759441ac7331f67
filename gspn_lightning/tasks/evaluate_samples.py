"""Score a set of generated samples: FID/KID against real images, how often a trained classifier
recognises each sample as the class it was conditioned on, and a grid to look at.

    python -m gspn_lightning.tasks.evaluate_samples --samples runs/x/samples/samples.npz \\
        --real data/demo_mnist/val [--classifier runs/demo_mnist/checkpoints/last.ckpt] \\
        [--grid runs/x/grid.png --rows 10 --per-row 10] [--out runs/x/report.json]

``--samples`` is what ``python -m gspn_lightning.tasks.sample`` writes (``arr_0`` uint8 (N, H, W, C)
and ``labels``). ``--real`` is image shards (every sample read once), a folder of images or an
``.npz``; shard images are resized to the samples' size first, so both sides go through the same
pipeline before Inception. ``--classifier`` is a ClassificationTask checkpoint (EMA weights when it
has them); samples are resized to its training image size and normalised with the data's mean/std
recorded in its run's ``config.yaml`` when there is one (``--mean``/``--std`` otherwise).
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["class_accuracy", "main", "real_images_from_shards", "sample_grid"]


def real_images_from_shards(
    spec: str, size: int, channels: int, center_crop: bool = False, with_labels: bool = False
):
    """Every image of the shards ``spec``, once, as uint8 ``(N, size, size, channels)``: resized, or
    ADM-centre-cropped (``center_crop``, as the latent shards are made); with ``with_labels`` also
    their classes ``(N,)``."""
    from PIL import Image

    from gspn_lightning.data.latents import adm_center_crop
    from gspn_lightning.data.shards import EvalShardSamples, resolve_shards
    from gspn_lightning.data.write_shards import IMAGE_EXTENSIONS

    urls, _, _ = resolve_shards(spec)
    out, labels = [], []
    for raw in EvalShardSamples(urls, 0, 1):
        ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
        if ext is None:
            continue
        labels.append(int(bytes(raw["cls"]).decode("ascii").strip()) if "cls" in raw else -1)
        with Image.open(io.BytesIO(raw[ext])) as img:
            img = img.convert("L" if channels == 1 else "RGB")
            img = adm_center_crop(img, size) if center_crop else img.resize((size, size), Image.BILINEAR)
            a = np.asarray(img)
        out.append(a[..., None] if a.ndim == 2 else a)
    if not out:
        raise FileNotFoundError(f"no images in the shards {spec!r}")
    return (np.stack(out), np.array(labels)) if with_labels else np.stack(out)


def sample_grid(images: np.ndarray, labels: np.ndarray, rows: int, per_row: int) -> np.ndarray:
    """uint8 grid: row ``k`` holds the first ``per_row`` samples of class ``k`` (2-pixel white gaps)."""
    N, H, W, C = images.shape
    grid = np.full((rows * (H + 2) + 2, per_row * (W + 2) + 2, C), 255, dtype=np.uint8)
    for k in range(rows):
        idx = np.flatnonzero(labels == k)[:per_row]
        for j, i in enumerate(idx):
            y, x = 2 + k * (H + 2), 2 + j * (W + 2)
            grid[y : y + H, x : x + W] = images[i]
    return grid


def _classifier(ckpt: str):
    from .classification import ClassificationTask

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


@torch.no_grad()
def class_accuracy(
    images: np.ndarray, labels: np.ndarray, net, size: int, mean, std, batch_size: int = 200
) -> tuple[float, np.ndarray]:
    """Fraction of samples the classifier assigns to their conditioning class, and the predictions."""
    preds = []
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(images[start : start + batch_size]).permute(0, 3, 1, 2).float() / 255
        if x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        preds.append(net((x - m) / s).argmax(-1))
    pred = torch.cat(preds).numpy()
    return float((pred == labels).mean()), pred


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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

    from gspn_lightning.metrics import compute_metrics

    data = np.load(a.samples)
    images, labels = data["arr_0"], data["labels"]
    N, H, W, C = images.shape
    real, real_arrays = a.real, None
    real_path = Path(a.real)
    if real_path.is_dir() and any(real_path.glob("*.tar")) or real_path.name == "index.json" or "{" in a.real:
        real_arrays = real_images_from_shards(a.real, H, C, with_labels=True)
        real = torch.from_numpy(real_arrays[0]).permute(0, 3, 1, 2).contiguous()
    fake = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    report = {"samples": str(Path(a.samples).resolve()), "num_samples": int(N), "real": a.real}
    protocol = Path(a.samples).with_name("protocol.json")
    if protocol.exists():
        report["protocol"] = json.loads(protocol.read_text())
    report.update(
        compute_metrics(
            real,
            fake,
            kid=not a.no_kid,
            batch_size=a.batch_size,
            progress=not a.no_progress,
            kid_subset_size=min(1000, N),
        )  # fmt: skip
    )
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


if __name__ == "__main__":
    raise SystemExit(main())
