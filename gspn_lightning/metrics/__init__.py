"""ADM's metric table (FID, sFID, Inception Score, precision, recall) and KID on torch-fidelity with
offline Inception-v3 weights.

Used by tasks and the command line only (never by ops/nn/models). Importing this package imports
torch and numpy but not torch-fidelity, which is imported when features or KID are computed.

- :func:`compute_metrics`, :func:`compute_fid`, :func:`compute_kid`: metrics between two image sources
  (what a statistics-only reference cannot give is listed as skipped, with the reason);
- :func:`compute_statistics`, :class:`Statistics`: reference statistics, computed once and saved;
- :mod:`.scores`: precision/recall (k-NN manifolds) and the Inception Score;
- :mod:`.clip_score`: CLIP score of images against their captions, with a CLIP model from a local folder;
- :mod:`.convert_inception`: the one-time, offline weight conversion (``gspn convert-inception``);
- ``gspn stats``, ``gspn fid``: the same from the command line (:mod:`gspn_lightning.cli`).
"""

from .fid import (
    METRICS,
    Statistics,
    compute_features,
    compute_fid,
    compute_kid,
    compute_metrics,
    compute_statistics,
    format_table,
    frechet_distance,
    kernel_distance,
)
from .inception import InceptionScoreUnavailable, default_weights_path
from .inputs import image_batches
from .scores import inception_score, precision_recall

__all__ = [
    "METRICS",
    "InceptionScoreUnavailable",
    "Statistics",
    "compute_features",
    "compute_fid",
    "compute_kid",
    "compute_metrics",
    "compute_statistics",
    "default_weights_path",
    "format_table",
    "frechet_distance",
    "image_batches",
    "inception_score",
    "kernel_distance",
    "precision_recall",
]
