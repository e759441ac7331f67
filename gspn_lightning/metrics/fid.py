"""FID and KID between two image sets, on torch-fidelity's Inception-v3 with local weights.

    from gspn_lightning.metrics import compute_fid, compute_metrics

    fid = compute_fid("data/reference_stats.npz", "samples/")          # -> float
    out = compute_metrics(real_images_uint8, "samples.npz")            # {"fid", "kid_mean", "kid_std", ...}

Each side is a folder of images, an ``.npz`` of uint8 images, a uint8 tensor/array, an iterable of
uint8 batches (see :mod:`gspn_lightning.metrics.inputs`), or precomputed :class:`Statistics` (an
``.npz`` holding ``mu`` and ``sigma``, as written by :meth:`Statistics.save` or by ADM's evaluation
suite). Features are the 2048-d pool features of the TF Inception-v3 (2015-12-05) as implemented by
torch-fidelity (TF1 bilinear resize to 299x299 of the uint8 images, then ``(x - 128) / 128``).

FID is ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))`` with ``np.cov`` covariances, in
float64. ``tr((S1 S2)^(1/2))`` is the sum of square roots of the eigenvalues of ``S1 S2``; those equal
the eigenvalues of the symmetric ``A S1 A^T / (n - 1)`` when ``S2 = A^T A / (n - 1)`` (``A`` the
centred features), so when one side holds its features and has at most 2048 images (the usual case
for periodic FID during training) the matrix root costs an ``n x n`` eigen-decomposition instead of a
2048 x 2048 one; otherwise ``S1^(1/2)`` is taken with ``eigh`` and the eigenvalues of
``S1^(1/2) S2 S1^(1/2)`` are used. Tiny negative eigenvalues from round-off are clipped to 0.

KID is torch-fidelity's own estimator (unbiased MMD^2 with the cubic polynomial kernel, averaged over
random subsets, seeded), called on our features, so it needs the features of both sides: statistics
saved without features serve FID only.
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .inception import FEATURE_DIM, load_inception, resolve_weights_path
from .inputs import image_batches

STATS_FORMAT = "gspn-lightning inception-v3-2015-12-05 pool3 2048"


@dataclass
class Statistics:
    """Mean and covariance of a set's Inception features (and, optionally, the features themselves)."""

    mu: np.ndarray  # (2048,) float64
    sigma: np.ndarray  # (2048, 2048) float64
    num_images: int
    features: np.ndarray | None = None  # (num_images, 2048) float32, needed for KID

    @classmethod
    def from_features(cls, features: np.ndarray, keep_features: bool = True) -> Statistics:
        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 2 or len(features) < 2:
            raise ValueError(f"need at least 2 feature vectors (N, D) for a covariance, got {features.shape}")
        return cls(
            mu=features.mean(axis=0, dtype=np.float64),
            sigma=np.cov(features, rowvar=False),
            num_images=len(features),
            features=features if keep_features else None,
        )

    def save(self, path: str | os.PathLike, keep_features: bool | None = None) -> Path:
        """Write an ``.npz`` (``mu``, ``sigma``, ``num_images``, ``format`` and optionally ``features``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"mu": self.mu, "sigma": self.sigma, "num_images": np.int64(self.num_images)}
        if (self.features is not None) if keep_features is None else keep_features:
            if self.features is None:
                raise ValueError("these statistics hold no features to save")
            arrays["features"] = self.features
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, format=np.str_(STATS_FORMAT), **arrays)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Statistics:
        with np.load(path) as data:
            if "mu" not in data.files or "sigma" not in data.files:
                raise ValueError(f"{path} holds {data.files}, not FID statistics ('mu' and 'sigma')")
            mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
            features = data["features"] if "features" in data.files else None
            n = int(data["num_images"]) if "num_images" in data.files else -1
        if mu.shape != (FEATURE_DIM,) or sigma.shape != (FEATURE_DIM, FEATURE_DIM):
            raise ValueError(
                f"{path}: expected mu ({FEATURE_DIM},) and sigma ({FEATURE_DIM}, {FEATURE_DIM}) of the 2048-d "
                f"Inception pool features, got {mu.shape} and {sigma.shape}"
            )
        return cls(mu=mu, sigma=sigma, num_images=n, features=features)


def as_statistics(source) -> Statistics | None:
    """``source`` as :class:`Statistics` when it is one (object, dict or ``.npz`` with mu/sigma), else None."""
    if isinstance(source, Statistics):
        return source
    if isinstance(source, dict) and "mu" in source and "sigma" in source:
        feats = source.get("features")
        return Statistics(
            mu=np.asarray(source["mu"], dtype=np.float64),
            sigma=np.asarray(source["sigma"], dtype=np.float64),
            num_images=int(source.get("num_images", -1)),
            features=None if feats is None else np.asarray(feats, dtype=np.float32),
        )
    if isinstance(source, (str, os.PathLike)) and str(source).endswith(".npz") and Path(source).is_file():
        with np.load(source) as data:
            is_stats = "mu" in data.files and "sigma" in data.files
        return Statistics.load(source) if is_stats else None
    return None


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@functools.lru_cache(maxsize=2)
def _cached_inception(path: str, mtime: float, device: str):
    return load_inception(path, device)


def inception_model(weights_path=None, device=None):
    """The feature extractor, loaded once per (weights file, device) and kept for later calls."""
    path = resolve_weights_path(weights_path)
    device = torch.device(device) if device is not None else _default_device()
    return _cached_inception(str(path.resolve()), path.stat().st_mtime, str(device))


@torch.no_grad()
def compute_features(
    images,
    *,
    batch_size: int = 50,
    device: str | torch.device | None = None,
    weights_path: str | os.PathLike | None = None,
    progress: bool = True,
    name: str = "images",
) -> np.ndarray:
    """The ``(N, 2048)`` float32 Inception pool features of an image source."""
    from tqdm.auto import tqdm

    model = inception_model(weights_path, device)
    device = next(model.parameters()).device
    batches, total = image_batches(images, batch_size, name)
    out = []
    with tqdm(total=total, unit="img", desc=f"Inception features ({name})", disable=not progress) as bar:
        for batch in batches:
            out.append(model(batch.to(device))[0].float().cpu())
            bar.update(len(batch))
    if not out:
        raise ValueError(f"{name}: no images")
    return torch.cat(out).numpy()


def compute_statistics(images, *, keep_features: bool = True, **kwargs) -> Statistics:
    """:class:`Statistics` of an image source (``kwargs`` as for :func:`compute_features`)."""
    return Statistics.from_features(compute_features(images, **kwargs), keep_features=keep_features)


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(matrix)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def trace_sqrt_product(a: Statistics, b: Statistics) -> float:
    """``tr((S_a S_b)^(1/2))``, through the smaller of the two routes described in the module docstring."""
    small = [s for s in (a, b) if s.features is not None and len(s.features) <= FEATURE_DIM]
    if small:
        low = min(small, key=lambda s: len(s.features))
        other = b if low is a else a
        centred = low.features.astype(np.float64) - low.mu
        gram = centred @ other.sigma @ centred.T / (len(centred) - 1)
        eig = np.linalg.eigvalsh((gram + gram.T) / 2)
    else:
        root = _sqrt_psd(a.sigma)
        eig = np.linalg.eigvalsh(root @ b.sigma @ root)
    return float(np.sqrt(np.clip(eig, 0, None)).sum())


def frechet_distance(a: Statistics, b: Statistics) -> float:
    """The Fréchet distance between two Gaussians fitted to Inception features (FID)."""
    if a.mu.shape != b.mu.shape or a.sigma.shape != b.sigma.shape:
        raise ValueError(f"statistics of different feature sizes: {a.mu.shape} and {b.mu.shape}")
    diff = a.mu - b.mu
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * trace_sqrt_product(a, b))


def kernel_distance(
    features_1: np.ndarray,
    features_2: np.ndarray,
    *,
    subsets: int = 100,
    subset_size: int | None = 1000,
    seed: int = 2020,
    progress: bool = False,
) -> tuple[float, float]:
    """KID ``(mean, std)`` over ``subsets`` random subsets, by torch-fidelity's estimator.

    ``subset_size`` larger than either set is lowered to the smaller set's size (torch-fidelity
    refuses instead); ``None`` means that size.
    """
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    size = min(len(features_1), len(features_2), subset_size or sys.maxsize)
    if size < 2:
        raise ValueError("KID needs at least 2 images on each side")
    out = kid_features_to_metric(
        torch.as_tensor(features_1),
        torch.as_tensor(features_2),
        kid_subsets=subsets,
        kid_subset_size=size,
        rng_seed=seed,
        verbose=progress,
    )
    return out[KEY_METRIC_KID_MEAN], out[KEY_METRIC_KID_STD]


def compute_metrics(
    real,
    fake,
    *,
    fid: bool = True,
    kid: bool = True,
    batch_size: int = 50,
    device: str | torch.device | None = None,
    weights_path: str | os.PathLike | None = None,
    kid_subsets: int = 100,
    kid_subset_size: int | None = 1000,
    seed: int = 2020,
    progress: bool = True,
) -> dict:
    """FID and/or KID between ``real`` and ``fake``.

    Returns a dict with ``fid``, ``kid_mean``, ``kid_std`` (those asked for), ``num_real``,
    ``num_fake`` and ``kid_subset_size`` (the size used, when KID was computed).
    """
    if not (fid or kid):
        raise ValueError("nothing to compute: fid and kid are both False")
    resolve_weights_path(weights_path)  # fail on missing weights before reading any images
    kwargs = dict(batch_size=batch_size, device=device, weights_path=weights_path, progress=progress)
    sides = {}
    for name, source in (("real", real), ("fake", fake)):
        stats = as_statistics(source)
        if stats is None:
            stats = compute_statistics(source, name=name, **kwargs)
        elif kid and stats.features is None:
            raise ValueError(
                f"{name}: KID needs features, and these statistics hold only mu/sigma; save them with "
                "features (`gspn stats --keep-features`) or compute FID only "
                "(kid=False, --no-kid)"
            )
        sides[name] = stats
    out: dict = {"num_real": sides["real"].num_images, "num_fake": sides["fake"].num_images}
    if fid:
        out["fid"] = frechet_distance(sides["real"], sides["fake"])
    if kid:
        f1, f2 = sides["real"].features, sides["fake"].features
        out["kid_subset_size"] = min(len(f1), len(f2), kid_subset_size or sys.maxsize)
        out["kid_mean"], out["kid_std"] = kernel_distance(
            f1, f2, subsets=kid_subsets, subset_size=kid_subset_size, seed=seed, progress=progress
        )
    return out


def compute_fid(real, fake, **kwargs) -> float:
    """FID between ``real`` and ``fake`` (keyword arguments as for :func:`compute_metrics`)."""
    return compute_metrics(real, fake, fid=True, kid=False, **kwargs)["fid"]


def compute_kid(real, fake, **kwargs) -> tuple[float, float]:
    """KID ``(mean, std)`` between ``real`` and ``fake`` (keyword arguments as for :func:`compute_metrics`)."""
    out = compute_metrics(real, fake, fid=False, kid=True, **kwargs)
    return out["kid_mean"], out["kid_std"]
