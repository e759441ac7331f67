"""Precision/recall (the k-NN manifold estimate) and the Inception Score, as ADM's evaluator computes them.

**Precision and recall** (Kynkäänniemi et al. 2019, "Improved precision and recall metric for
assessing generative models"): each set's manifold is the union of balls around its feature vectors,
the radius of a ball being the distance from its centre to its ``k``-th nearest neighbour in the same
set (``k = 3``, the point itself not counted). *Precision* is the fraction of generated samples inside
the real manifold, *recall* the fraction of real images inside the generated one; a point on a ball's
boundary counts as inside. Distances are Euclidean on the 2048-d pool features, computed in float32
as ``|a|^2 - 2 a.b + |b|^2`` (clamped at 0) in blocks of ``chunk`` x ``chunk``: memory stays
``O(chunk^2 + N k)`` for any N (the radii keep a running k+1 smallest per row), never ``N x N``.

**Inception Score**: ``exp(E_x KL(p(y|x) || p(y)))`` over the softmax of the 1008 logits, computed
on each of ``splits`` consecutive parts of the samples (10, ADM's 5,000 of 50,000 each); the mean
over the parts is the score, their standard deviation is reported beside it. The logits need a real
classifier head (:func:`gspn_lightning.metrics.inception.classifier_head`).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["inception_score", "manifold_radii", "precision_recall"]

NEIGHBOURHOOD = 3
CHUNK = 10_000


def _as_tensor(x, device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, dtype=np.float32) if not torch.is_tensor(x) else x).to(
        device=device, dtype=torch.float32
    )


def _squared_distances(a: torch.Tensor, b: torch.Tensor, a_norm: torch.Tensor, b_norm: torch.Tensor):
    return (a_norm[:, None] - 2 * a @ b.T + b_norm[None, :]).clamp_min_(0)


def manifold_radii(features, k: int = NEIGHBOURHOOD, chunk: int = CHUNK, device=None) -> torch.Tensor:
    """The squared distance of each feature vector to its ``k``-th nearest other vector, ``(N,)``."""
    x = _as_tensor(features, device)
    n = len(x)
    if n <= k:
        raise ValueError(f"the k-NN manifold with k={k} needs more than {k} feature vectors, got {n}")
    norms = (x * x).sum(1)
    radii = torch.empty(n, dtype=torch.float32, device=x.device)
    for r in range(0, n, chunk):
        rows = x[r : r + chunk]
        best = None  # running k+1 smallest (the point itself is one of them, at distance ~0)
        for c in range(0, n, chunk):
            d = _squared_distances(rows, x[c : c + chunk], norms[r : r + chunk], norms[c : c + chunk])
            if r < c + d.shape[1] and c < r + len(rows):  # this block holds part of the diagonal
                idx = torch.arange(len(rows), device=x.device)
                ok = (idx + r - c >= 0) & (idx + r - c < d.shape[1])
                d[idx[ok], idx[ok] + r - c] = 0.0  # exactly 0 to itself, whatever the round-off
            cand = d if best is None else torch.cat([best, d], 1)
            best = cand.topk(min(k + 1, cand.shape[1]), dim=1, largest=False).values
        radii[r : r + len(rows)] = best[:, k]
    return radii


def _inside(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int) -> torch.Tensor:
    """Whether each of ``points`` lies within (<=) the ball of at least one of ``centres``."""
    p_norm, c_norm = (points * points).sum(1), (centres * centres).sum(1)
    inside = torch.zeros(len(points), dtype=torch.bool, device=points.device)
    for r in range(0, len(points), chunk):
        for c in range(0, len(centres), chunk):
            d = _squared_distances(
                points[r : r + chunk], centres[c : c + chunk], p_norm[r : r + chunk], c_norm[c : c + chunk]
            )
            inside[r : r + chunk] |= (d <= radii[None, c : c + chunk]).any(1)
    return inside


@torch.no_grad()
def precision_recall(
    real_features, fake_features, k: int = NEIGHBOURHOOD, chunk: int = CHUNK, device=None
) -> tuple[float, float]:
    """``(precision, recall)`` of ``fake_features`` against ``real_features`` (``(N, D)`` arrays or tensors)."""
    real, fake = _as_tensor(real_features, device), _as_tensor(fake_features, device)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature arrays of different shapes: {tuple(real.shape)} and {tuple(fake.shape)}")
    real_radii = manifold_radii(real, k, chunk)
    fake_radii = manifold_radii(fake, k, chunk)
    precision = _inside(fake, real, real_radii, chunk).double().mean().item()
    recall = _inside(real, fake, fake_radii, chunk).double().mean().item()
    return precision, recall


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
    """``(mean, std)`` over ``splits`` consecutive parts of the Inception Score of ``(N, 1008)`` logits."""
    logits = torch.as_tensor(np.asarray(logits) if not torch.is_tensor(logits) else logits).double()
    n = len(logits)
    if splits < 1 or n < splits:
        raise ValueError(f"the Inception Score over {splits} splits needs at least {splits} samples, got {n}")
    log_p = logits.log_softmax(1)
    scores = []
    for i in range(splits):
        part = log_p[i * n // splits : (i + 1) * n // splits]
        log_marginal = part.exp().mean(0).log()
        kl = (part.exp() * (part - log_marginal)).sum(1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores)), float(np.std(scores))
