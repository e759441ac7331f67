"""FID/KID on torch-fidelity with offline Inception-v3 weights.

Used by tasks and the command line only (never by ops/nn/models). Importing this package imports
torch and numpy but not torch-fidelity, which is imported when features or KID are computed.

- :func:`compute_fid`, :func:`compute_kid`, :func:`compute_metrics`: metrics between two image sources;
- :func:`compute_statistics`, :class:`Statistics`: reference statistics, computed once and saved;
- :mod:`.convert_inception`: the one-time, offline weight conversion (``gspn convert-inception``);
- ``gspn stats``, ``gspn fid``: the same from the command line (:mod:`gspn_lightning.cli`).
"""

from .fid import (
    Statistics,
    compute_features,
    compute_fid,
    compute_kid,
    compute_metrics,
    compute_statistics,
    frechet_distance,
    kernel_distance,
)
from .inception import default_weights_path
from .inputs import image_batches

__all__ = [
    "Statistics",
    "compute_features",
    "compute_fid",
    "compute_kid",
    "compute_metrics",
    "compute_statistics",
    "default_weights_path",
    "frechet_distance",
    "image_batches",
    "kernel_distance",
]
