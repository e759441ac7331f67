"""``gspn write-captions SRC OUT [--captions FILE] [--embed-with SDXL_FOLDER] ...``: a folder of captioned
images into image + caption webdataset shards for the SD-XL task
(:func:`gspn_lightning.data.captions.write_caption_shards`; the format is in that module's docs).

With ``--embed-with`` the prompt embeddings of every caption, made by that local SD-XL folder's two
text encoders (:func:`gspn_lightning.models.sdxl_pipeline.sdxl_text_embed`), are stored too, so
training needs no text encoders (``text_encoders: false``). The models are imported only then.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gspn_lightning.data.captions import write_caption_shards
from gspn_lightning.data.write_shards import ShardsExistError, existing_outputs

from ._common import add_shard_writer_arguments, shard_writer_kwargs

PROG = "gspn write-captions"


def make_embed(sdxl_folder: str, device: str):
    """The ``embed`` of the SD-XL folder's text encoders (imported here: the data package knows no models)."""
    from gspn_lightning.models.sdxl_pipeline import sdxl_text_embed

    return sdxl_text_embed(sdxl_folder, device)


def main(argv: list[str] | None = None) -> int:
    """The writing command; returns the exit status."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Write a folder of images with captions into image+caption webdataset shards "
        "(see gspn_lightning/data/captions.py).",
    )
    p.add_argument(
        "src", help="folder of images (searched recursively), captions in sidecar <stem>.txt files"
    )
    p.add_argument("out", help="output folder for <prefix>-NNNNNN.tar and index.json")
    p.add_argument(
        "--captions", help="a CSV (file,caption columns) or JSONL file of captions instead of sidecars"
    )
    p.add_argument(
        "--embed-with",
        metavar="SDXL_FOLDER",
        help="also store the prompt embeddings made by this local SD-XL folder's text encoders",
    )
    p.add_argument("--device", default="cpu", help="device of the text encoders (--embed-with)")
    p.add_argument("--batch-size", type=int, default=16, help="captions encoded at a time (--embed-with)")
    p.add_argument("--allow-empty", action="store_true", help="keep images without a caption (empty caption)")
    add_shard_writer_arguments(p, "sorted path order")
    a = p.parse_args(argv)  # fmt: skip
    folder = a.embed_with
    try:
        if folder is not None and existing_outputs(a.out) and not a.overwrite:
            raise ShardsExistError(f"{a.out} already holds shards; pass --overwrite to replace them")
        embed = make_embed(folder, a.device) if folder is not None else None
        index = write_caption_shards(
            a.src, a.out, captions=a.captions, embed=embed,
            embed_source=str(Path(folder).resolve()) if folder is not None else None,
            allow_empty=a.allow_empty, batch_size=a.batch_size, **shard_writer_kwargs(a),
        )  # fmt: skip
    except (OSError, ValueError) as exc:
        print(f"captions: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {index['total']} captioned images into {len(index['shards'])} shard(s) in {a.out}")
    return 0


# python -m gspn_lightning.cli.write_captions: the same as gspn write-captions
if __name__ == "__main__":
    from gspn_lightning.cli import run_module

    sys.exit(run_module(__spec__.name))
