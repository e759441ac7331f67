"""``gspn distill-export CKPT OUT_DIR [--pretrained SDXL_FOLDER]``: the GSPN weights of an SD-XL
distillation checkpoint, ``gspn.safetensors`` (raw) and ``gspn_ema.safetensors`` (EMA, if any), as
:meth:`gspn_lightning.tasks.distill.DistillationTask.export_gspn` writes them at the end of fit.
"""

from __future__ import annotations

import argparse
import os
import sys

PROG = "gspn distill-export"


def main(argv: list[str] | None = None) -> int:
    """Returns the exit status."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="write gspn.safetensors and gspn_ema.safetensors from a checkpoint"
    )
    parser.add_argument("ckpt", help="a DistillationTask checkpoint (.ckpt)")
    parser.add_argument("out", help="output folder")
    parser.add_argument("--pretrained", help="the SD-XL folder, if not where the checkpoint's run had it")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.ckpt):
        print(f"distill export: no such checkpoint: {args.ckpt}", file=sys.stderr)
        return 1
    overrides = {"pretrained": args.pretrained} if args.pretrained else {}
    from gspn_lightning.tasks.distill import DistillationTask

    task = DistillationTask.load_from_checkpoint(args.ckpt, map_location="cpu", **overrides)
    try:
        task.require_trained(f"to export {args.ckpt}")
    except RuntimeError as exc:
        print(f"distill export: {exc}", file=sys.stderr)
        return 1
    for path in task.export_gspn(args.out):
        print(f"wrote {path}")
    return 0


# python -m gspn_lightning.cli.distill_export: the same as gspn distill-export
if __name__ == "__main__":
    from gspn_lightning.cli import run_module

    sys.exit(run_module(__spec__.name))
