"""``gspn stats SOURCE OUT.npz [--keep-features] [--size N --center-crop --channels C]``: reference
Inception statistics of real images, computed once and saved for ``gspn fid``, ``gspn evaluate`` and
a diffusion task's ``fid_reference``.

SOURCE is one of

- a folder of images or an ``.npz`` of uint8 images: used as they are;
- image shards (a folder with ``index.json``, an ``index.json``, or a brace pattern): every image is
  read once (:func:`gspn_lightning.data.latents.real_images_from_shards`) and first brought to
  ``--size``, the size the samples will have (ADM's centre crop with ``--center-crop``, as the latent
  shards are made; else a plain resize), as ``--channels`` channels.

Saves ``mu`` and ``sigma`` of the pool features, ``mu_s`` and ``sigma_s`` of sFID's spatial features
(ADM's names), and with ``--keep-features`` the pool features, which KID and precision/recall need.
"""

from __future__ import annotations

import argparse
import sys

from ._common import add_fid_arguments, is_shards

PROG = "gspn stats"


def main(argv: list[str] | None = None) -> int:
    """Returns the exit status (1 with one line on stderr when the source is missing or unusable)."""
    p = argparse.ArgumentParser(
        prog=PROG, description="compute and save reference Inception statistics of a set of images"
    )
    p.add_argument("source", help="folder of images, .npz of uint8 images, or image shards")
    p.add_argument("out", help="output statistics .npz")
    p.add_argument("--keep-features", action="store_true", help="also store the pool features (KID and precision/recall need them)")
    p.add_argument(
        "--size", type=int, default=None, help="shards: the image size of the samples to compare with"
    )
    p.add_argument("--channels", type=int, default=3, choices=(1, 3), help="shards: channels (default 3)")
    p.add_argument(
        "--center-crop", action="store_true", help="shards: ADM centre crop instead of a plain resize"
    )
    add_fid_arguments(p)
    a = p.parse_args(argv)
    shards = is_shards(a.source)
    if shards and a.size is None:
        p.error("image shards need --size (the size of the samples they will be compared with)")
    if not shards and (a.size is not None or a.center_crop):
        p.error("--size and --center-crop apply to image shards; a folder or .npz is used as it is")

    from gspn_lightning.metrics import compute_statistics

    try:
        if shards:
            from gspn_lightning.data.latents import real_images_from_shards

            # uint8 (N, H, W, C), read channels-last by the metrics like any array of images
            source = real_images_from_shards(a.source, a.size, a.channels, center_crop=a.center_crop)
        else:
            source = a.source
        stats = compute_statistics(
            source, name="source", keep_features=a.keep_features, batch_size=a.batch_size, device=a.device,
            weights_path=a.weights, progress=not a.no_progress,
        )  # fmt: skip
    except (FileNotFoundError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    path = stats.save(a.out)
    print(f"wrote statistics of {stats.num_images} images to {path}")
    return 0


# python -m gspn_lightning.cli.stats: the same as gspn stats
if __name__ == "__main__":
    from gspn_lightning.cli import run_module

    sys.exit(run_module(__spec__.name))
