"""ADM's metric table (FID, sFID, Inception Score, precision, recall) and KID between two image sets,
on torch-fidelity's Inception-v3 with local weights.

    from gspn_lightning.metrics import compute_fid, compute_metrics

    fid = compute_fid("data/reference_stats.npz", "samples/")          # -> float
    out = compute_metrics(real_images_uint8, "samples.npz")            # {"fid", "sfid", "precision", ...}

Each side is a folder of images, an ``.npz`` of uint8 images, a uint8 tensor/array, an iterable of
uint8 batches (see :mod:`gspn_lightning.metrics.inputs`), or precomputed :class:`Statistics` (an
``.npz`` holding ``mu`` and ``sigma``, as written by :meth:`Statistics.save` or by ADM's evaluation
suite, whose reference batches hold ``arr_0`` images, ``mu``, ``sigma``, ``mu_s`` and ``sigma_s``).
Features are the 2048-d pool features of the TF Inception-v3 (2015-12-05) as implemented by
torch-fidelity (TF1 bilinear resize to 299x299 of the uint8 images, then ``(x - 128) / 128``), and for
sFID the 2023-d spatial features of the same pass (:data:`~gspn_lightning.metrics.inception.SPATIAL_LAYER`).

FID is ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))`` with ``np.cov`` covariances, in
float64. ``tr((S1 S2)^(1/2))`` is the sum of square roots of the eigenvalues of ``S1 S2``; those equal
the eigenvalues of the symmetric ``A S1 A^T / (n - 1)`` when ``S2 = A^T A / (n - 1)`` (``A`` the
centred features), so when one side holds its features and has at most as many images as feature
dimensions (the usual case for periodic FID during training) the matrix root costs an ``n x n``
eigen-decomposition instead of a 2048 x 2048 one; otherwise ``S1^(1/2)`` is taken with ``eigh`` and the
eigenvalues of ``S1^(1/2) S2 S1^(1/2)`` are used. Tiny negative eigenvalues from round-off are clipped
to 0. sFID is the same distance between the Gaussians of the spatial features.

Precision/recall and the Inception Score: :mod:`gspn_lightning.metrics.scores`. KID is
torch-fidelity's own estimator (unbiased MMD^2 with the cubic polynomial kernel, averaged over random
subsets, seeded), called on our features. KID and precision/recall need the pool features of both
sides, sFID needs spatial statistics: :func:`compute_metrics` computes what the inputs allow and lists
the rest under ``skipped`` with the reason. An ADM reference batch (statistics *and* ``arr_0``
images) is read as ADM's evaluator reads it: FID/sFID from its stored statistics, precision, recall
and KID from the features of its images.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .inception import (
    FEATURE_DIM,
    SPATIAL_DIM,
    InceptionFeatures,
    InceptionScoreUnavailable,
    classifier_head,
    load_inception,
    resolve_weights_path,
)
from .inputs import image_batches, load_npz_images

STATS_FORMAT = "gspn-lightning inception-v3-2015-12-05 pool3 2048 + mixed_6/conv[:7] 2023"

#: every metric :func:`compute_metrics` knows, in the order of ADM's table (then KID)
METRICS = ("is", "fid", "sfid", "precision", "recall", "kid")
#: how :func:`format_table` names them
METRIC_LABELS = {
    "is": "Inception Score", "fid": "FID", "sfid": "sFID", "precision": "Precision", "recall": "Recall",
    "kid": "KID",
}  # fmt: skip


@dataclass
class Statistics:
    """Mean and covariance of a set's Inception features (and, optionally, the features themselves).

    ``spatial`` holds the same for sFID's spatial features (``mu_s``/``sigma_s`` in a saved file);
    ``images`` names the ``.npz`` whose ``arr_0`` images the statistics describe (ADM's reference
    batches), from which the features are computed when a metric needs them.
    """

    mu: np.ndarray  # (D,) float64
    sigma: np.ndarray  # (D, D) float64
    num_images: int
    features: np.ndarray | None = None  # (num_images, D) float32, needed for KID and precision/recall
    spatial: Statistics | None = None  # the spatial features' statistics (sFID)
    images: Path | None = None

    @classmethod
    def from_features(
        cls, features: np.ndarray, keep_features: bool = True, spatial_features: np.ndarray | None = None
    ) -> Statistics:
        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 2 or len(features) < 2:
            raise ValueError(f"need at least 2 feature vectors (N, D) for a covariance, got {features.shape}")
        spatial = None
        if spatial_features is not None:
            if len(spatial_features) != len(features):
                raise ValueError(
                    f"{len(spatial_features)} spatial feature vectors for {len(features)} images"
                )
            spatial = cls.from_features(spatial_features, keep_features=False)
        return cls(
            mu=features.mean(axis=0, dtype=np.float64),
            sigma=np.cov(features, rowvar=False),
            num_images=len(features),
            features=features if keep_features else None,
            spatial=spatial,
        )

    def save(self, path: str | os.PathLike, keep_features: bool | None = None) -> Path:
        """Write an ``.npz``: ``mu``, ``sigma``, ``num_images``, ``format``, ``mu_s``/``sigma_s`` (ADM's
        names for the spatial statistics) when known, and the pool ``features`` when kept."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"mu": self.mu, "sigma": self.sigma, "num_images": np.int64(self.num_images)}
        if self.spatial is not None:
            arrays.update(mu_s=self.spatial.mu, sigma_s=self.spatial.sigma)
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
            spatial = None
            if "mu_s" in data.files and "sigma_s" in data.files:
                mu_s, sigma_s = data["mu_s"].astype(np.float64), data["sigma_s"].astype(np.float64)
                if mu_s.shape != (SPATIAL_DIM,) or sigma_s.shape != (SPATIAL_DIM, SPATIAL_DIM):
                    raise ValueError(
                        f"{path}: expected mu_s ({SPATIAL_DIM},) and sigma_s ({SPATIAL_DIM}, {SPATIAL_DIM}) of "
                        f"the spatial features, got {mu_s.shape} and {sigma_s.shape}"
                    )
                spatial = cls(mu=mu_s, sigma=sigma_s, num_images=n)
            has_images = "arr_0" in data.files
        if mu.shape != (FEATURE_DIM,) or sigma.shape != (FEATURE_DIM, FEATURE_DIM):
            raise ValueError(
                f"{path}: expected mu ({FEATURE_DIM},) and sigma ({FEATURE_DIM}, {FEATURE_DIM}) of the 2048-d "
                f"Inception pool features, got {mu.shape} and {sigma.shape}"
            )
        images = Path(path) if has_images else None
        return cls(mu=mu, sigma=sigma, num_images=n, features=features, spatial=spatial, images=images)


def as_statistics(source) -> Statistics | None:
    """``source`` as :class:`Statistics` when it is one (object, dict or ``.npz`` with mu/sigma), else None."""
    if isinstance(source, Statistics):
        return source
    if isinstance(source, dict) and "mu" in source and "sigma" in source:
        feats = source.get("features")
        spatial = None
        if source.get("mu_s") is not None and source.get("sigma_s") is not None:
            spatial = Statistics(
                mu=np.asarray(source["mu_s"], dtype=np.float64),
                sigma=np.asarray(source["sigma_s"], dtype=np.float64),
                num_images=int(source.get("num_images", -1)),
            )
        return Statistics(
            mu=np.asarray(source["mu"], dtype=np.float64),
            sigma=np.asarray(source["sigma"], dtype=np.float64),
            num_images=int(source.get("num_images", -1)),
            features=None if feats is None else np.asarray(feats, dtype=np.float32),
            spatial=spatial,
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
    return InceptionFeatures(load_inception(path, device)).eval()


def inception_model(weights_path=None, device=None) -> InceptionFeatures:
    """The feature extractor (pool and spatial features), loaded once per (weights file, device)."""
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
    spatial: bool = False,
):
    """The ``(N, 2048)`` float32 Inception pool features of an image source; with ``spatial``, the pair
    ``(pool (N, 2048), spatial (N, 2023))`` of one pass."""
    from tqdm.auto import tqdm

    model = inception_model(weights_path, device)
    device = next(model.parameters()).device
    batches, total = image_batches(images, batch_size, name)
    pools, spatials = [], []
    with tqdm(total=total, unit="img", desc=f"Inception features ({name})", disable=not progress) as bar:
        for batch in batches:
            pool, spat = model(batch.to(device))
            pools.append(pool.cpu())
            spatials.append(spat.cpu())
            bar.update(len(batch))
    if not pools:
        raise ValueError(f"{name}: no images")
    pool = torch.cat(pools).numpy()
    return (pool, torch.cat(spatials).numpy()) if spatial else pool


def compute_statistics(images, *, keep_features: bool = True, **kwargs) -> Statistics:
    """:class:`Statistics` of an image source, with the spatial statistics (``kwargs`` as for
    :func:`compute_features`)."""
    pool, spatial = compute_features(images, spatial=True, **kwargs)
    return Statistics.from_features(pool, keep_features=keep_features, spatial_features=spatial)


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(matrix)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def trace_sqrt_product(a: Statistics, b: Statistics) -> float:
    """``tr((S_a S_b)^(1/2))``, through the smaller of the two routes described in the module docstring."""
    dim = len(a.mu)
    small = [s for s in (a, b) if s.features is not None and len(s.features) <= dim]
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
    """The Fréchet distance between two Gaussians fitted to Inception features (FID, or sFID on spatial ones)."""
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


def _requested(metrics, fid: bool, kid: bool) -> list[str]:
    if metrics is None:
        wanted = [m for m, on in (("fid", fid), ("kid", kid)) if on]
    else:
        wanted = [metrics] if isinstance(metrics, str) else list(metrics)
        wanted = [str(m).strip().lower() for m in wanted]
        wanted = ["is" if m in ("isc", "inception_score") else m for m in wanted]
        if "all" in wanted:
            wanted = list(METRICS)
        unknown = sorted(set(wanted) - set(METRICS))
        if unknown:
            raise ValueError(f"unknown metrics {unknown}; choose from {list(METRICS)} (or 'all')")
    if not wanted:
        raise ValueError("nothing to compute: no metric asked for")
    return [m for m in METRICS if m in wanted]


def compute_metrics(
    real,
    fake,
    *,
    metrics: Sequence[str] | str | None = None,
    fid: bool = True,
    kid: bool = True,
    batch_size: int = 50,
    device: str | torch.device | None = None,
    weights_path: str | os.PathLike | None = None,
    kid_subsets: int = 100,
    kid_subset_size: int | None = 1000,
    seed: int = 2020,
    is_splits: int = 10,
    pr_neighbourhood: int = 3,
    progress: bool = True,
) -> dict:
    """ADM's metrics (and KID) between ``real`` (the reference) and ``fake`` (the samples).

    ``metrics``: names from :data:`METRICS` (``"all"`` for every one); without it, ``fid`` and ``kid``
    choose between FID and KID as before. A metric the inputs cannot give (KID and precision/recall
    from statistics without features, sFID from statistics without ``mu_s``/``sigma_s``, the Inception
    Score without a classifier head in the weights) is not computed: it is listed under ``skipped``
    with the reason. When none of the asked metrics can be computed, ``ValueError`` says why.

    Returns a dict with the metrics computed (``inception_score`` and ``inception_score_std``,
    ``fid``, ``sfid``, ``precision``, ``recall``, ``kid_mean``, ``kid_std``), ``num_real``,
    ``num_fake``, ``kid_subset_size`` (when KID was computed), ``skipped`` (name -> reason; empty
    when nothing was skipped) and ``metrics`` (the names computed, in table order).
    """
    wanted = _requested(metrics, fid, kid)
    weights = resolve_weights_path(weights_path)  # fail on missing weights before reading any images
    kwargs = dict(batch_size=batch_size, device=device, weights_path=weights_path, progress=progress)
    skipped: dict[str, str] = {}
    head = None
    if "is" in wanted:
        try:
            head = classifier_head(weights)
        except InceptionScoreUnavailable as e:
            skipped["is"] = str(e)
    needs_features = {"precision", "recall", "kid"} & set(wanted)
    sides: dict[str, Statistics] = {}
    feats: dict[str, np.ndarray | None] = {}  # the pool features of each side's images
    for name, source in (("real", real), ("fake", fake)):
        stats = as_statistics(source)
        if stats is None:
            stats = compute_statistics(source, name=name, **kwargs)
        feats[name] = stats.features
        if stats.features is None and stats.images is not None and needs_features:
            # ADM's reference batch: its stored statistics for FID/sFID (kept apart from these features,
            # which they need not have been computed from), its images' features for the rest
            feats[name] = compute_features(load_npz_images(stats.images, name), name=name, **kwargs)
        sides[name] = stats
    for metric in sorted(needs_features, key=METRICS.index):
        for name in sides:
            if feats[name] is None:
                what = "KID" if metric == "kid" else "precision/recall"
                skipped[metric] = (
                    f"{name}: {what} needs features, and these statistics hold only mu/sigma; save them with "
                    "features (`gspn stats --keep-features`) or leave it out (--metrics fid,sfid; --no-kid "
                    "for KID, kid=False)"
                )
                break
    for name, f in feats.items():  # too few images for a metric: skipped, not an error deep inside
        if f is None:
            continue
        if len(f) <= pr_neighbourhood:
            for metric in {"precision", "recall"} & set(wanted) - set(skipped):
                skipped[metric] = (
                    f"{name}: the {pr_neighbourhood}-NN manifold needs more than {pr_neighbourhood} images, got {len(f)}"
                )
        if len(f) < 2 and "kid" in wanted and "kid" not in skipped:
            skipped["kid"] = f"{name}: KID needs at least 2 images, got {len(f)}"
    if "sfid" in wanted:
        for name, stats in sides.items():
            if stats.spatial is None:
                skipped["sfid"] = (
                    f"{name}: sFID needs the spatial statistics (mu_s/sigma_s), which these statistics do not "
                    "hold; compute them again with `gspn stats`, which saves them"
                )
                break
    if "is" in wanted and "is" not in skipped and feats["fake"] is None:
        skipped["is"] = "fake: the Inception Score needs the samples' features, not statistics"
    elif "is" in wanted and "is" not in skipped and len(feats["fake"]) < is_splits:
        skipped["is"] = (
            f"fake: the Inception Score over {is_splits} splits needs at least {is_splits} samples"
        )
    done = [m for m in wanted if m not in skipped]
    if not done:
        raise ValueError("; ".join(f"{m}: {skipped[m]}" for m in wanted))
    real_s, fake_s = sides["real"], sides["fake"]
    out: dict = {"num_real": real_s.num_images, "num_fake": fake_s.num_images}
    if "is" in done:
        logits = torch.from_numpy(feats["fake"]).double() @ head.double().T
        from .scores import inception_score

        out["inception_score"], out["inception_score_std"] = inception_score(logits, is_splits)
    if "fid" in done:
        out["fid"] = frechet_distance(real_s, fake_s)
    if "sfid" in done:
        out["sfid"] = frechet_distance(real_s.spatial, fake_s.spatial)
    if "precision" in done or "recall" in done:
        from .scores import precision_recall

        precision, recall = precision_recall(feats["real"], feats["fake"], k=pr_neighbourhood, device=device)
        out.update({k: v for k, v in (("precision", precision), ("recall", recall)) if k in done})
    if "kid" in done:
        f1, f2 = feats["real"], feats["fake"]
        out["kid_subset_size"] = min(len(f1), len(f2), kid_subset_size or sys.maxsize)
        out["kid_mean"], out["kid_std"] = kernel_distance(
            f1, f2, subsets=kid_subsets, subset_size=kid_subset_size, seed=seed, progress=progress
        )
    out["metrics"] = done
    out["skipped"] = {m: skipped[m] for m in wanted if m in skipped}
    return out


def format_table(result: dict) -> str:
    """ADM's table (then KID) of a :func:`compute_metrics` result, one ``name: value`` line per metric,
    then one line per skipped metric with the reason."""
    lines = []
    for metric in METRICS:
        label = METRIC_LABELS[metric]
        if metric == "is" and "inception_score" in result:
            lines.append(
                f"{label}: {result['inception_score']:.4f} (std {result['inception_score_std']:.4f})"
            )
        elif metric == "kid" and "kid_mean" in result:
            lines.append(f"{label}: {result['kid_mean']:.6f} (std {result['kid_std']:.6f})")
        elif metric in result:
            lines.append(f"{label}: {result[metric]:.4f}")
    for metric, reason in result.get("skipped", {}).items():
        lines.append(f"{METRIC_LABELS[metric]}: skipped ({reason})")
    return "\n".join(lines)


def compute_fid(real, fake, **kwargs) -> float:
    """FID between ``real`` and ``fake`` (keyword arguments as for :func:`compute_metrics`)."""
    return compute_metrics(real, fake, metrics=["fid"], **kwargs)["fid"]


def compute_kid(real, fake, **kwargs) -> tuple[float, float]:
    """KID ``(mean, std)`` between ``real`` and ``fake`` (keyword arguments as for :func:`compute_metrics`)."""
    out = compute_metrics(real, fake, metrics=["kid"], **kwargs)
    return out["kid_mean"], out["kid_std"]
