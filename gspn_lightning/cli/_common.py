"""What several subcommands share: the FID options, and telling shards from other image sources."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_fid_arguments(parser: argparse.ArgumentParser) -> None:
    """``--batch-size``, ``--device``, ``--weights``, ``--no-progress`` of the Inception feature passes."""
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--device", default=None, help="e.g. cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--weights", default=None, help="converted Inception weights (torch-fidelity layout)")
    parser.add_argument("--no-progress", action="store_true")


def is_shards(spec: str) -> bool:
    """Whether an image source names webdataset shards (a folder holding ``*.tar``, an ``index.json``,
    or a brace pattern) rather than a folder of images or an ``.npz``."""
    path = Path(spec)
    return path.is_dir() and any(path.glob("*.tar")) or path.name == "index.json" or "{" in spec
