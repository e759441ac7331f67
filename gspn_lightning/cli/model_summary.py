"""``gspn models [names...] [--img-size 224] [--task diffusion --latent-size 32]``: a markdown table of
the registered models' parameters and MACs (:mod:`gspn_lightning.models.summary`; models are built on
the meta device, nothing is allocated).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gspn_lightning.models import list_models, model_entry
from gspn_lightning.models.summary import generation_table, summary_table

PROG = "gspn models"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=PROG, description="Parameter and MAC table of registered models.")
    parser.add_argument("names", nargs="*", help="registered model names (default: all of --task)")
    parser.add_argument(
        "--task", choices=["classification", "diffusion"], default="classification",
        help="which family to list when no names are given (default classification)",
    )  # fmt: skip
    parser.add_argument("--img-size", type=int, default=224, help="square input size for MACs (default 224)")
    parser.add_argument(
        "--latent-size", type=int, default=32, help="latent size of diffusion models (default 32)"
    )
    args = parser.parse_args(argv)
    names = args.names or list_models(args.task)
    classification = [n for n in names if model_entry(n).task != "diffusion"]
    diffusion = [n for n in names if model_entry(n).task == "diffusion"]
    if classification:
        print(summary_table(classification, args.img_size))
    if diffusion:
        print(generation_table(diffusion, args.latent_size))


# python -m gspn_lightning.cli.model_summary: the same as gspn models
if __name__ == "__main__":
    from gspn_lightning.cli import run_module

    sys.exit(run_module(__spec__.name))
