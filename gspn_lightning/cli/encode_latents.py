"""``gspn encode-latents SRC OUT --vae PATH [--image-size 256] [--devices N] ...``: image shards into VAE
latent shards for latent diffusion, split over every device Lightning Fabric sees
(:func:`gspn_lightning.data.latents.encode_shards`; the format is in that module's docs).
"""

from __future__ import annotations

import argparse
import sys

from gspn_lightning.data.latents import encode_shards

PROG = "gspn encode-latents"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Encode image shards into VAE latent shards (see gspn_lightning/data/latents.py).",
    )
    p.add_argument("src", help="image shards: a folder with index.json, an index.json, or a brace pattern")
    p.add_argument("out", help="output folder for the latent shards")
    p.add_argument("--vae", required=True, help="local diffusers AutoencoderKL folder (e.g. sd-vae-ft-ema)")
    p.add_argument("--image-size", type=int, default=256, help="ADM centre crop size (default 256)")
    p.add_argument("--no-flip", action="store_true", help="do not store the flipped view")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--devices", default="auto", help="Lightning Fabric devices (default: all)")
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--precision", default="32-true")
    p.add_argument("--maxcount", type=int, default=10000, help="samples per shard")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    devices = int(a.devices) if str(a.devices).isdigit() else a.devices
    index = encode_shards(
        a.src, a.out, a.vae, a.image_size, flip=not a.no_flip, batch_size=a.batch_size,
        num_workers=a.num_workers, devices=devices, accelerator=a.accelerator, precision=a.precision,
        overwrite=a.overwrite, maxcount=a.maxcount, progress=not a.no_progress,
    )  # fmt: skip
    if index is not None:
        print(f"wrote {index['total']} latents in {len(index['shards'])} shards to {a.out}")
    return 0


# python -m gspn_lightning.cli.encode_latents: the same as gspn encode-latents
if __name__ == "__main__":
    from gspn_lightning.cli import run_module

    sys.exit(run_module(__spec__.name))
