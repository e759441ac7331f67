"""What several subcommands share: the FID options, the shard writers' options, and telling shards
from other image sources."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from gspn_lightning.data.write_shards import DEFAULT_MAXCOUNT, DEFAULT_MAXSIZE


def add_fid_arguments(parser: argparse.ArgumentParser) -> None:
    """``--batch-size``, ``--device``, ``--weights``, ``--no-progress`` of the Inception feature passes."""
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--device", default=None, help="e.g. cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--weights", default=None, help="converted Inception weights (torch-fidelity layout)")
    parser.add_argument("--no-progress", action="store_true")


def add_shard_writer_arguments(parser: argparse.ArgumentParser, unshuffled_order: str) -> None:
    """``--maxcount``, ``--maxsize``, ``--prefix``, ``--seed``/``--no-shuffle``, ``--overwrite``, ``--quiet``
    of a command that writes shards through :func:`~gspn_lightning.data.write_shards.write_shards`
    (``unshuffled_order``: the order ``--no-shuffle`` keeps); :func:`shard_writer_kwargs` reads them."""
    parser.add_argument(
        "--maxcount",
        type=int,
        default=DEFAULT_MAXCOUNT,
        help=f"max samples per shard (default {DEFAULT_MAXCOUNT})",
    )
    parser.add_argument(
        "--maxsize",
        type=float,
        default=DEFAULT_MAXSIZE,
        help=f"max payload bytes per shard, e.g. 1e9 (default {DEFAULT_MAXSIZE:.0e})",
    )
    parser.add_argument("--prefix", default="shard", help="shard file name prefix (default 'shard')")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample-order shuffle (default 0)")
    parser.add_argument("--no-shuffle", action="store_true", help=f"keep {unshuffled_order}")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="delete existing *.tar and index.json in OUT instead of refusing",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def shard_writer_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of ``write_shards`` that :func:`add_shard_writer_arguments`'s options give."""
    return dict(
        maxcount=args.maxcount,
        maxsize=int(args.maxsize),
        prefix=args.prefix,
        shuffle_seed=None if args.no_shuffle else args.seed,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )


def is_shards(spec: str) -> bool:
    """Whether an image source names webdataset shards (a folder holding ``*.tar``, an ``index.json``,
    or a brace pattern) rather than a folder of images or an ``.npz``."""
    path = Path(spec)
    return path.is_dir() and any(path.glob("*.tar")) or path.name == "index.json" or "{" in spec


def rank_and_world() -> tuple[int, int, int]:
    """``(rank, world size, local rank)`` of this process under torchrun (or SLURM via torchrun's
    variables); ``(0, 1, 0)`` when started alone. Used by the commands that split work by index over
    ranks (``gspn sample``, ``gspn t2i-eval``)."""
    import os

    return (
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
        int(os.environ.get("LOCAL_RANK", 0)),
    )


def wait_for_all_ranks(world: int) -> None:
    """A barrier over every rank (a gloo process group, started here when none is), so that rank 0
    packs or scores only once every rank has written its share; nothing when ``world == 1``."""
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
        dist.barrier()
