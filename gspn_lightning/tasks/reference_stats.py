"""Reference Inception statistics of real images read from shards, computed once and saved.

    python -m gspn_lightning.tasks.reference_stats data/shards/imagenet/val ref/imagenet_val_256.npz \\
        --size 256 [--channels 3] [--keep-features] [--center-crop]

Reads every image of the shards once (:mod:`gspn_lightning.data.shards`), brings it to the size the
samples will have (ADM's centre crop with ``--center-crop``, as the latent shards are made; else a
plain resize), and saves FID statistics (``mu``, ``sigma``; the features too with ``--keep-features``,
which KID needs) for ``python -m gspn_lightning.metrics fid`` and the task's ``fid_reference``.
Lives in ``tasks`` because it joins the data side and the metrics side, which never import each other.
"""

from __future__ import annotations

import argparse

import torch

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    from gspn_lightning.metrics import compute_statistics

    from .evaluate_samples import real_images_from_shards

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("shards", help="image shards: a folder with index.json, an index.json or a brace pattern")
    p.add_argument("out", help="output statistics .npz")
    p.add_argument("--size", type=int, required=True, help="image size of the samples to compare with")
    p.add_argument("--channels", type=int, default=3, choices=(1, 3))
    p.add_argument("--center-crop", action="store_true", help="ADM centre crop instead of a plain resize")
    p.add_argument("--keep-features", action="store_true", help="also store the features (for KID)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    images = real_images_from_shards(a.shards, a.size, a.channels, center_crop=a.center_crop)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    stats = compute_statistics(
        x, keep_features=a.keep_features, batch_size=a.batch_size, device=a.device, progress=not a.no_progress
    )
    stats.save(a.out)
    print(f"saved statistics of {stats.num_images} images to {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
