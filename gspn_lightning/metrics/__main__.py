"""Command line for FID/KID.

::

    python -m gspn_lightning.metrics stats SOURCE OUT.npz [--keep-features]   # reference statistics, once
    python -m gspn_lightning.metrics fid REAL FAKE [--no-kid] [--json OUT]    # FID (and KID)
    python -m gspn_lightning.metrics convert [...]                           # = convert_inception

SOURCE, REAL and FAKE are folders of images or ``.npz`` files of uint8 images; REAL may also be a
statistics ``.npz`` written by ``stats``. Common options: ``--batch-size``, ``--device`` (default cuda
when available), ``--weights`` (default ``$GSPN_INCEPTION_WEIGHTS`` or the converted file in the
cache folder). ``fid`` prints one JSON object holding the metrics and how they were computed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import convert_inception
from .fid import compute_metrics, compute_statistics
from .inception import resolve_weights_path


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--device", default=None, help="e.g. cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--weights", default=None, help="converted Inception weights (torch-fidelity layout)")
    parser.add_argument("--no-progress", action="store_true")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["convert"]:
        return convert_inception.main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m gspn_lightning.metrics", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("convert", help="convert the Inception weights (see convert_inception --help)")
    stats = sub.add_parser("stats", help="compute and save reference statistics of a set of images")
    stats.add_argument("source", help="folder of images or .npz of uint8 images")
    stats.add_argument("out", help="output .npz")
    stats.add_argument(
        "--keep-features", action="store_true", help="also store the features (needed for KID)"
    )
    _common(stats)
    fid = sub.add_parser("fid", help="FID (and KID) between two sets")
    fid.add_argument("real", help="folder, .npz of uint8 images, or statistics .npz")
    fid.add_argument("fake", help="folder or .npz of uint8 images")
    fid.add_argument("--no-kid", action="store_true")
    fid.add_argument("--kid-subsets", type=int, default=100)
    fid.add_argument("--kid-subset-size", type=int, default=1000)
    fid.add_argument("--seed", type=int, default=2020)
    fid.add_argument("--json", default=None, help="also write the result to this file")
    _common(fid)
    args = parser.parse_args(argv)
    common = dict(
        batch_size=args.batch_size,
        device=args.device,
        weights_path=args.weights,
        progress=not args.no_progress,
    )
    try:
        if args.command == "stats":
            result = compute_statistics(
                args.source, name="source", keep_features=args.keep_features, **common
            )
            path = result.save(args.out)
            print(f"wrote statistics of {result.num_images} images to {path}")
            return 0
        result = compute_metrics(
            args.real,
            args.fake,
            kid=not args.no_kid,
            kid_subsets=args.kid_subsets,
            kid_subset_size=args.kid_subset_size,
            seed=args.seed,
            **common,
        )
    except (FileNotFoundError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    result["protocol"] = {
        "real": args.real,
        "fake": args.fake,
        "feature_extractor": "torch-fidelity inception-v3-compat, TF 2015-12-05 weights, pool3 (2048)",
        "weights": str(resolve_weights_path(args.weights)),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
