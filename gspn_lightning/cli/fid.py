"""``gspn fid REF SAMPLES [--metrics all] [--no-kid] [--json OUT]``: ADM's metric table (Inception Score,
FID, sFID, precision, recall) and KID between a reference and a set of samples.

REF is a folder of images, an ``.npz`` of uint8 images, a statistics ``.npz`` written by ``gspn stats``,
or an ADM reference batch (``arr_0`` images with ``mu``, ``sigma``, ``mu_s``, ``sigma_s``); SAMPLES is a
folder or an ``.npz`` of uint8 images (``gspn sample``'s ``samples.npz``). Every metric the inputs allow
is computed (:func:`gspn_lightning.metrics.compute_metrics`); those they do not (KID and
precision/recall against statistics saved without features, sFID against statistics without spatial
ones, the Inception Score without a classifier head in the weights) are listed under ``skipped`` with
the reason, and the command still exits 0 when anything was computed. The table is printed on stderr,
one JSON object (the metrics, what was skipped and how they were computed) on stdout. Options:
``--batch-size``, ``--device`` (default cuda when available), ``--weights`` (default
``$GSPN_INCEPTION_WEIGHTS`` or the converted file in the cache folder).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ._common import add_fid_arguments

PROG = "gspn fid"


def metric_list(text: str) -> list[str]:
    """``--metrics fid,sfid`` -> ``["fid", "sfid"]`` (``all``: every one)."""
    return [m.strip() for m in text.split(",") if m.strip()]


def main(argv: list[str] | None = None) -> int:
    """Returns the exit status (1 with one line on stderr when an input is missing or unusable, or when
    none of the metrics asked for can be computed)."""
    fid = argparse.ArgumentParser(
        prog=PROG, description="ADM's metric table (IS, FID, sFID, precision, recall) and KID"
    )
    fid.add_argument("real", help="reference: folder, .npz of uint8 images, statistics .npz or ADM ref batch")
    fid.add_argument("fake", help="samples: folder or .npz of uint8 images")
    fid.add_argument(
        "--metrics", type=metric_list, default=["all"],
        help="comma-separated, from is,fid,sfid,precision,recall,kid (default: all)",
    )  # fmt: skip
    fid.add_argument("--no-kid", action="store_true", help="leave KID out")
    fid.add_argument("--kid-subsets", type=int, default=100)
    fid.add_argument("--kid-subset-size", type=int, default=1000)
    fid.add_argument("--is-splits", type=int, default=10, help="Inception Score splits (default 10)")
    fid.add_argument("--seed", type=int, default=2020)
    fid.add_argument("--json", default=None, help="also write the result to this file")
    add_fid_arguments(fid)
    args = fid.parse_args(argv)

    from gspn_lightning.metrics import METRICS, compute_metrics, format_table
    from gspn_lightning.metrics.inception import SPATIAL_LAYER, SPATIAL_TF_NAME, resolve_weights_path

    metrics = list(METRICS) if "all" in args.metrics else args.metrics
    if args.no_kid:
        metrics = [m for m in metrics if m != "kid"]
    try:
        result = compute_metrics(
            args.real,
            args.fake,
            metrics=metrics,
            kid_subsets=args.kid_subsets,
            kid_subset_size=args.kid_subset_size,
            is_splits=args.is_splits,
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
        "spatial_features": f"{SPATIAL_TF_NAME} ({SPATIAL_LAYER}), first 7 channels, 7x17x17 = 2023",
        "precision_recall": "k-NN manifolds, k=3, on the pool features",
        "weights": str(resolve_weights_path(args.weights)),
    }
    print(format_table(result), file=sys.stderr)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


# python -m gspn_lightning.cli.fid: the same as gspn fid
if __name__ == "__main__":
    from gspn_lightning.cli import run_module

    sys.exit(run_module(__spec__.name))
