"""``gspn write-shards SRC OUT [--maxcount N] [--maxsize BYTES] [--prefix NAME] [--seed S | --no-shuffle]
[--overwrite]``: an ImageFolder tree into image + class webdataset shards and an ``index.json``.

The format, the key rules and the refusal to overwrite are
:func:`gspn_lightning.data.write_shards.write_shards`'s (see that module).
"""

from __future__ import annotations

import argparse
import sys

from gspn_lightning.data.write_shards import DEFAULT_MAXCOUNT, DEFAULT_MAXSIZE, write_shards

PROG = "gspn write-shards"


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Write an ImageFolder tree (SRC/<class>/<images>) into webdataset tar shards "
        "(<key>.<ext> image bytes + <key>.cls class index) with an index.json.",
    )
    parser.add_argument("src", help="ImageFolder root: SRC/<class_name>/<image files>")
    parser.add_argument("out", help="output folder for <prefix>-NNNNNN.tar and index.json")
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
    parser.add_argument("--no-shuffle", action="store_true", help="keep ImageFolder (class-sorted) order")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="delete existing *.tar and index.json in OUT instead of refusing",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = _build_parser().parse_args(argv)
    try:
        index = write_shards(
            args.src,
            args.out,
            maxcount=args.maxcount,
            maxsize=int(args.maxsize),
            overwrite=args.overwrite,
            prefix=args.prefix,
            shuffle_seed=None if args.no_shuffle else args.seed,
            progress=not args.quiet,
        )
    except (OSError, ValueError) as exc:
        print(f"write_shards: error: {exc}", file=sys.stderr)
        return 1
    print(
        f"wrote {index['total']} samples of {len(index['classes'])} classes into "
        f"{len(index['shards'])} shard(s) in {args.out}"
    )
    return 0
