"""``gspn fid REAL FAKE [--no-kid] [--json OUT]``: FID (and KID) between two image sets.

REAL and FAKE are folders of images or ``.npz`` files of uint8 images; REAL may also be a statistics
``.npz`` written by ``gspn stats``. Prints one JSON object holding the metrics and how they were
computed (:func:`gspn_lightning.metrics.compute_metrics`). Options: ``--batch-size``, ``--device``
(default cuda when available), ``--weights`` (default ``$GSPN_INCEPTION_WEIGHTS`` or the converted
file in the cache folder).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ._common import add_fid_arguments

PROG = "gspn fid"


def main(argv: list[str] | None = None) -> int:
    """Returns the exit status (1 with one line on stderr when an input is missing or unusable)."""
    fid = argparse.ArgumentParser(prog=PROG, description="FID (and KID) between two sets")
    fid.add_argument("real", help="folder, .npz of uint8 images, or statistics .npz")
    fid.add_argument("fake", help="folder or .npz of uint8 images")
    fid.add_argument("--no-kid", action="store_true")
    fid.add_argument("--kid-subsets", type=int, default=100)
    fid.add_argument("--kid-subset-size", type=int, default=1000)
    fid.add_argument("--seed", type=int, default=2020)
    fid.add_argument("--json", default=None, help="also write the result to this file")
    add_fid_arguments(fid)
    args = fid.parse_args(argv)

    from gspn_lightning.metrics import compute_metrics
    from gspn_lightning.metrics.inception import resolve_weights_path

    try:
        result = compute_metrics(
            args.real,
            args.fake,
            kid=not args.no_kid,
            kid_subsets=args.kid_subsets,
            kid_subset_size=args.kid_subset_size,
            seed=args.seed,
            batch_size=args.batch_size,
            device=args.device,
            weights_path=args.weights,
            progress=not args.no_progress,
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


# python -m gspn_lightning.cli.fid: the same as gspn fid
if __name__ == "__main__":
    from gspn_lightning.cli import run_module

    sys.exit(run_module(__spec__.name))
