"""``gspn write-shards SRC OUT [--maxcount N] [--maxsize BYTES] [--prefix NAME] [--seed S | --no-shuffle]
[--overwrite]``: an ImageFolder tree into image + class webdataset shards and an ``index.json``.

The format, the key rules and the refusal to overwrite are
:func:`gspn_lightning.data.write_shards.write_shards`'s (see that module).
"""

from __future__ import annotations

import argparse
import sys

from gspn_lightning.data.write_shards import write_shards

from ._common import add_shard_writer_arguments, shard_writer_kwargs

PROG = "gspn write-shards"


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Write an ImageFolder tree (SRC/<class>/<images>) into webdataset tar shards "
        "(<key>.<ext> image bytes + <key>.cls class index) with an index.json.",
    )
    parser.add_argument("src", help="ImageFolder root: SRC/<class_name>/<image files>")
    parser.add_argument("out", help="output folder for <prefix>-NNNNNN.tar and index.json")
    add_shard_writer_arguments(parser, "ImageFolder (class-sorted) order")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = _build_parser().parse_args(argv)
    try:
        index = write_shards(args.src, args.out, **shard_writer_kwargs(args))
    except (OSError, ValueError) as exc:
        print(f"write_shards: error: {exc}", file=sys.stderr)
        return 1
    print(
        f"wrote {index['total']} samples of {len(index['classes'])} classes into "
        f"{len(index['shards'])} shard(s) in {args.out}"
    )
    return 0


# python -m gspn_lightning.cli.write_shards: the same as gspn write-shards
if __name__ == "__main__":
    from gspn_lightning.cli import run_module

    sys.exit(run_module(__spec__.name))
