"""The diffusion task end to end: latent shards from image shards with a (tiny, random) VAE, the latent
data module, DiffusionTask through cli.py (fit, resume), the sampling command over two ranks, and every
config under configs/dit instantiated (full-size ones on the meta device)."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gspn_lightning.data.latents import LatentWebDataModule, adm_center_crop, encode_shards
from gspn_lightning.data.write_shards import write_shards
from gspn_lightning.diffusion.vae import load_vae
from gspn_lightning.testing import tiny_vae
from tests.cli_helpers import ONE_THREAD, last_scalars
from tests.conftest import torch_threads

ROOT = Path(__file__).resolve().parents[1]
DIT_CONFIGS = sorted((ROOT / "configs" / "dit").glob("*.yaml"))
OVERLAYS = sorted((ROOT / "configs" / "dit" / "overlays").glob("*.yaml"))


def _image_samples(n: int, offset: int, rng):
    for i in range(n):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(buffer, format="PNG")
        yield {"__key__": f"k{offset + i}", "png": buffer.getvalue(), "cls": i % 3}


@pytest.fixture(scope="module")
def latent_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit")
    rng = np.random.default_rng(0)
    classes = ["a", "b", "c"]
    write_shards(_image_samples(12, 0, rng), root / "img/train", maxcount=5, progress=False, classes=classes)
    write_shards(_image_samples(6, 100, rng), root / "img/val", maxcount=4, progress=False, classes=classes)
    tiny_vae().save_pretrained(root / "vae")
    for split in ("train", "val"):
        encode_shards(
            str(root / "img" / split), root / "lat" / split, str(root / "vae"), image_size=16, batch_size=4,
            num_workers=0, devices=1, accelerator="cpu", progress=False,
        )  # fmt: skip
    return root


def test_latent_shards_and_datamodule(latent_data):
    index = json.loads((latent_data / "lat/train/index.json").read_text())
    assert index["total"] == 12 and index["classes"] == ["a", "b", "c"]
    assert index["meta"]["channels"] == 4 and index["meta"]["size"] == 8 and index["meta"]["views"] == 2
    dm = LatentWebDataModule(
        str(latent_data / "lat/train"),
        str(latent_data / "lat/val"),
        batch_size=4,
        num_workers=0,
        epoch_samples=8,
    )
    assert (dm.in_chans, dm.image_size, dm.num_classes) == (4, 8, 3)
    assert dm.vae == str((latent_data / "vae").resolve())
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 4, 8, 8) and x.dtype == torch.float32 and set(y.tolist()) <= {0, 1, 2}
    val = list(dm.val_dataloader())
    assert sum(len(b[1]) for b in val) == 6  # every validation sample once
    # evaluation decodes the posterior mean of the unflipped view: deterministic
    again = list(dm.val_dataloader())
    assert all(torch.equal(a[0], b[0]) for a, b in zip(val, again))
    # the stored mean decodes (through the VAE) to the image it came from, roughly: a real encoding
    vae = load_vae(latent_data / "vae")
    assert vae.decode(val[0][0][:1] / vae.config.scaling_factor).sample.shape == (1, 3, 16, 16)


def test_corrupt_latent_is_a_counted_row(tmp_path):
    good = io.BytesIO()
    np.save(good, np.zeros((1, 8, 2, 2), dtype=np.float16))
    bad = io.BytesIO()
    np.save(bad, np.zeros((1, 6, 2, 2), dtype=np.float16))  # wrong channel count
    samples = [
        {"__key__": "a", "npy": good.getvalue(), "cls": 0},
        {"__key__": "b", "npy": bad.getvalue(), "cls": 1},
        {"__key__": "c", "npy": b"not an array", "cls": 1},
    ]
    write_shards(samples, tmp_path / "lat", progress=False, meta={"channels": 4, "size": 2})
    dm = LatentWebDataModule(val_shards=str(tmp_path / "lat"), batch_size=8, num_workers=0)
    ((x, y),) = list(dm.val_dataloader())
    assert y.tolist() == [0, -1, -1] and x.shape == (3, 4, 2, 2)


def test_adm_center_crop():
    img = Image.new("RGB", (300, 700))
    assert adm_center_crop(img, 64).size == (64, 64)
    assert adm_center_crop(Image.new("RGB", (20, 10)), 16).size == (16, 16)


def test_missing_vae_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no VAE at .*config.json.*nothing is downloaded"):
        load_vae(tmp_path / "nowhere")


def overlay_base(overlay: Path) -> Path:
    """The config an overlay applies to, named on its first line ("Overlay on configs/dit/X.yaml")."""
    first = overlay.read_text().splitlines()[0]
    (name,) = [w.rstrip(":,.") for w in first.split() if w.startswith("configs/")]
    return ROOT / name


@pytest.mark.parametrize(
    "configs",
    [[c] for c in DIT_CONFIGS] + [[overlay_base(o), o] for o in OVERLAYS],
    ids=[c.stem for c in DIT_CONFIGS] + [f"{overlay_base(o).stem}+{o.stem}" for o in OVERLAYS],
)
def test_dit_configs_instantiate(configs, monkeypatch):
    from gspn_lightning.cli.lightning import main

    monkeypatch.setattr(sys, "argv", ["cli.py"])
    args = [a for c in configs for a in ("--config", str(c))]
    with torch.device("meta"):  # full-size models cost nothing here
        cli = main(args=args + ["--trainer.accelerator=cpu", "--trainer.devices=1"], run=False)
    task = cli.model
    assert type(task).__name__ == "DiffusionTask"
    assert (
        task.hparams.in_chans == cli.datamodule.in_chans
        and task.hparams.num_classes == cli.datamodule.num_classes
    )
    if configs[-1].stem in ("dit_xl_2",):
        assert sum(p.numel() for p in task.model.parameters()) / 1e6 == pytest.approx(674.83, abs=0.01)
    if type(task.model).__name__ == "GSPNDiT":  # the block each config names (the release's by default)
        assert task.model.block == ("compact" if configs[-1].stem == "digits_block_compact" else "release")
        compact_propagation = configs[0].stem == "digits" and configs[-1].stem not in (
            "digits_full_width", "digits_block_compact", "digits_additive"
        )
        assert task.model.mixer_options.d_prop == (32 if compact_propagation else None)
    if configs[-1].stem == "imagenet":  # GSPN-DiT-XL/2 with the release block (docs/model_sizes.md)
        assert sum(p.numel() for p in task.model.parameters()) / 1e6 == pytest.approx(726.08, abs=0.01)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args, env=None, timeout=600):
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env={**os.environ, **ONE_THREAD, **(env or {})}, capture_output=True,
        text=True,
        timeout=timeout,
    )  # fmt: skip


@pytest.mark.slow
def test_fit_resume_and_sample_over_two_ranks(latent_data, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    common = [
        "cli.py", "fit", "--config", "configs/dit/tiny.yaml", f"--trainer.default_root_dir={run}",
        f"--data.init_args.train_shards={latent_data / 'lat/train'}",
        f"--data.init_args.val_shards={latent_data / 'lat/val'}",
    ]  # fmt: skip
    reference = tmp_path / "real.npz"
    np.savez(reference, images=np.random.default_rng(1).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8))
    # the FID callback appended to the config's grid callback, sampling as the grid does
    fid = ["--trainer.callbacks+=gspn_lightning.tasks.InTrainingFID", "--trainer.callbacks.every_n_steps=4",
           "--trainer.callbacks.num_samples=4", f"--trainer.callbacks.reference={reference}",
           "--trainer.callbacks.sampler=ddim", "--trainer.callbacks.steps=3"]  # fmt: skip
    r = _run([*common, *fid])
    assert r.returncode == 0, r.stderr[-3000:]
    assert (run / "checkpoints/last.ckpt").exists() and (run / "samples/step-0000004.png").exists()
    # FID during training, logged, with its protocol printed beside it
    assert "FID " in r.stdout + r.stderr and "protocol" in r.stdout + r.stderr
    assert "fid" in last_scalars(run)  # logged to TensorBoard, the default logger
    r = _run([*common, "--trainer.max_steps=6", "--ckpt_path=last"])
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 6
    assert any(k.startswith("ema.module.") for k in ckpt["state_dict"])
    assert not any("vae" in k for k in ckpt["state_dict"])  # the decoder the FID/grid used is not saved

    sample = ["-m", "gspn_lightning.cli", "sample", "--ckpt", str(run / "checkpoints/last.ckpt"),
              "--num-samples", "6", "--sampler", "ddpm", "--steps", "3", "--batch-size", "2", "--no-progress"]  # fmt: skip
    # the one-process draw and its restart run in this process (two fewer ~12 s interpreter start-ups)
    from gspn_lightning.cli.sample import main as sample_main

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    one = tmp_path / "one"
    with torch_threads(1):
        assert sample_main([*sample[3:], "--out", str(one)]) == 0
    two = tmp_path / "two"
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, *sample, "--out", str(two), "--batch-size", "3"],
            cwd=ROOT,
            env={
                **os.environ,
                **ONE_THREAD,
                "RANK": str(rank),
                "WORLD_SIZE": "2",
                "LOCAL_RANK": "0",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    a, b = np.load(one / "samples.npz"), np.load(two / "samples.npz")
    assert a["arr_0"].shape == (6, 16, 16, 3) and a["arr_0"].dtype == np.uint8  # decoded by the VAE
    assert a["labels"].tolist() == [0, 1, 2, 0, 1, 2]
    # each image depends only on its index's seed, not on ranks or batch size (up to float rounding)
    assert np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int)).max() <= 1
    protocol = json.loads((one / "protocol.json").read_text())
    assert protocol["sampler"] == "ddpm" and protocol["steps"] == 3 and protocol["weights"] == "ema"
    # a restart draws nothing already there
    capsys.readouterr()
    assert sample_main([*sample[3:], "--out", str(one)]) == 0
    assert "drew 0" in capsys.readouterr().out


def test_reference_statistics_from_shards(latent_data, tmp_path):
    from gspn_lightning.cli.stats import main as reference_stats
    from gspn_lightning.data.latents import real_images_from_shards
    from gspn_lightning.metrics import compute_fid

    out = tmp_path / "ref.npz"
    assert reference_stats([str(latent_data / "img/val"), str(out), "--size", "16", "--center-crop",
                            "--keep-features", "--no-progress"]) == 0  # fmt: skip
    images = real_images_from_shards(str(latent_data / "img/val"), 16, 3, center_crop=True)
    assert images.shape == (6, 16, 16, 3) and images.dtype == np.uint8
    same = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    assert abs(compute_fid(str(out), same, progress=False)) < 1e-3  # the same images: FID ~ 0


def test_evaluate_samples_report_and_grid(latent_data, tmp_path):
    from gspn_lightning.cli.evaluate import main
    from gspn_lightning.diffusion.samples import sample_grid
    from gspn_lightning.metrics.accuracy import class_accuracy

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    labels = np.arange(6) % 3
    np.savez(tmp_path / "samples.npz", arr_0=images, labels=labels)
    grid = sample_grid(images, labels, rows=3, per_row=2)
    assert grid.shape == (3 * 18 + 2, 2 * 18 + 2, 3)
    assert np.array_equal(grid[2:18, 2:18], images[0]) and np.array_equal(grid[20:36, 20:36], images[4])
    out = tmp_path / "report.json"
    assert main(["--samples", str(tmp_path / "samples.npz"), "--real", str(latent_data / "img/val"),
                 "--grid", str(tmp_path / "grid.png"), "--rows", "3", "--per-row", "2", "--out", str(out),
                 "--no-kid", "--no-progress"]) == 0  # fmt: skip
    report = json.loads(out.read_text())
    assert report["num_real"] == 6 and report["num_fake"] == 6 and report["fid"] > 0
    assert Image.open(tmp_path / "grid.png").size == (2 * 18 + 2, 3 * 18 + 2)

    class ByMean(torch.nn.Module):  # "class" = which third of the intensity range the mean falls in
        def forward(self, x):
            m = x.mean(dim=(1, 2, 3))
            return torch.stack([-((m + 1) ** 2), -((m - 0) ** 2), -((m - 1) ** 2)], dim=1)

    dark, mid, bright = (np.full((1, 8, 8, 3), v, dtype=np.uint8) for v in (0, 128, 255))
    acc, pred = class_accuracy(np.concatenate([dark, mid, bright]), np.array([0, 1, 1]), ByMean(), 8,
                               [0.5] * 3, [0.5] * 3)  # fmt: skip
    assert pred.tolist() == [0, 1, 2] and acc == pytest.approx(2 / 3)


class _ExactX0(torch.nn.Module):
    """An x0-predicting model of a one-image distribution (every class the same image)."""

    in_channels, learn_sigma, num_classes = 1, False, 2

    def __init__(self, image: torch.Tensor):
        super().__init__()
        self.image = image
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, t, y):
        return self.image.expand(x.shape[0], -1, -1, -1)


def test_sampling_command_uses_the_checkpoints_prediction(tmp_path, monkeypatch):
    """A checkpoint trained to predict x0 is sampled as x0: the exact model's image comes back."""
    from gspn_lightning.cli import sample as sample_cmd

    image = torch.linspace(-1, 1, 16).view(1, 1, 4, 4)
    hp = {"image_size": 4, "num_classes": 2, "prediction": "x0", "clip_sample": None, "vae": None}
    monkeypatch.setattr(sample_cmd, "load_sampler_model", lambda *a, **k: (_ExactX0(image), hp, 7))
    out = tmp_path / "s"
    assert sample_cmd.main(["--ckpt", "x.ckpt", "--out", str(out), "--num-samples", "3", "--sampler", "ddim",
                            "--steps", "5", "--no-progress", "--device", "cpu"]) == 0  # fmt: skip
    got = np.load(out / "samples.npz")["arr_0"]
    expect = ((image[0, 0] + 1) * 127.5).round().numpy()
    assert got.shape == (3, 4, 4, 1) and np.abs(got[..., 0].astype(float) - expect).max() <= 1
