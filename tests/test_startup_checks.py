"""Every argument is checked at start-up, before any data is read or any step taken, with the config
key in the message: an ``image_size`` that is not a whole number of patches, the generative callbacks'
sampler settings and FID reference, the VAE folder that decodes their samples, and the SD-XL caption
data's ``resolution`` against the UNet and VAE."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from gspn_lightning.tasks import DiffusionTask, InTrainingFID, SampleGrid

ROOT = Path(__file__).resolve().parents[1]


class _Untouchable(torch.utils.data.Dataset):
    """A dataset that fails the test if anything reads it."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        raise AssertionError("the data was read before the arguments were checked")


def _trainer(root, **kw) -> L.Trainer:
    kw = {"max_steps": 2, "max_epochs": 1, "logger": False, "enable_checkpointing": False,
          "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0, **kw}  # fmt: skip
    return L.Trainer(default_root_dir=root, accelerator="cpu", devices=1, **kw)


def _tiny_dit(**kw) -> DiffusionTask:
    args = {"model": "gspn_dit_s_2", "model_kwargs": {"hidden_size": 32, "depth": 2}, "num_classes": 3,
            "in_chans": 4, "image_size": 8, "optim": {"ema_decay": None}, **kw}  # fmt: skip
    return DiffusionTask(**args)


@pytest.mark.parametrize("model", ["gspn_dit_s_2", "dit_s_2"])
def test_image_size_must_be_a_whole_number_of_patches(model):
    kwargs = {"hidden_size": 32, "depth": 2, **({"num_heads": 2} if model == "dit_s_2" else {})}
    with pytest.raises(
        ValueError,
        match=r"image_size 9 is not a multiple of the model's patch size 2.*data\.init_args\.image_size",
    ):
        _tiny_dit(model=model, model_kwargs=kwargs, image_size=9)
    _tiny_dit(model=model, model_kwargs=kwargs, image_size=10)  # 5 x 5 patches


def test_image_size_is_checked_when_the_command_line_builds_the_task(tmp_path, monkeypatch):
    from gspn_lightning.cli.lightning import main

    monkeypatch.setattr(sys, "argv", ["gspn"])
    args = ["--config", str(ROOT / "configs/dit/tiny.yaml"), "--data.init_args.image_size=7",
            f"--data.init_args.train_shards={tmp_path / 'none'}", f"--data.init_args.val_shards={tmp_path / 'none'}",
            "--trainer.accelerator=cpu", "--trainer.devices=1"]  # fmt: skip
    with pytest.raises(ValueError, match="image_size 7 is not a multiple"):
        main(args=args, run=False)


@pytest.mark.parametrize(
    "make, match",
    [
        (
            lambda: SampleGrid(sampler="euler"),
            r"SampleGrid: sampler must be one of \('ddpm', 'ddim', 'dpm\+\+'\), got 'euler'",
        ),
        (lambda: SampleGrid(steps=0), "SampleGrid: steps must be"),
        (lambda: SampleGrid(guidance_scale=0.5), "SampleGrid: guidance_scale must be >= 1"),
        (
            lambda: InTrainingFID("x.npz", every_n_steps=2, sampler="dpm"),
            "InTrainingFID: sampler must be one of",
        ),
        (
            lambda: InTrainingFID("x.npz", every_n_steps=2, guidance_channels=0),
            "InTrainingFID: guidance_channels",
        ),
    ],
)
def test_generative_callback_settings_are_checked_when_built(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_fid_reference_must_exist_when_built(tmp_path):
    with pytest.raises(FileNotFoundError, match="InTrainingFID: reference .*missing.npz does not exist"):
        InTrainingFID(str(tmp_path / "missing.npz"), every_n_steps=2)


@pytest.mark.parametrize(
    "task_kw, callback, match",
    [
        (
            {"clip_sample": 1.0},
            lambda: SampleGrid(sampler="dpm++", steps=2),
            "SampleGrid: clip_sample is supported",
        ),
        ({"vae": "/no/such/vae"}, lambda: SampleGrid(steps=2), "SampleGrid: the VAE folder /no/such/vae"),
    ],
)
def test_sampling_settings_that_depend_on_the_task_fail_before_the_first_step(
    tmp_path, task_kw, callback, match
):
    """Before: a grid drawn only at the end of fit found these after the whole run."""
    task = _tiny_dit(**task_kw)
    loader = torch.utils.data.DataLoader(_Untouchable(), batch_size=2)
    trainer = _trainer(tmp_path, callbacks=[callback()])
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        trainer.fit(task, loader)
    assert trainer.global_step == 0


def test_caption_resolution_multiple(tiny_sdxl_dir):
    from gspn_lightning.data.captions import CaptionWebDataModule
    from gspn_lightning.models.sdxl import latent_multiple
    from gspn_lightning.models.sdxl_pipeline import load_sdxl

    parts = load_sdxl(tiny_sdxl_dir, parts=("unet", "vae"))
    assert latent_multiple(parts.unet, parts.vae) == 32  # as SD-XL's: VAE 8 x UNet 4
    with pytest.raises(
        ValueError, match=r"data\.init_args\.resolution \[48, 64\] must be a multiple of 32 \(test\)"
    ):
        CaptionWebDataModule(resolution=[48, 64]).check_resolution(32, "test")
    CaptionWebDataModule(resolution=[32, 64]).check_resolution(32, "test")


@pytest.mark.slow
def test_caption_resolution_checked_against_the_unet_and_vae(tiny_sdxl_dir, tmp_path, monkeypatch):
    """The distillation task refuses, at set-up, a caption resolution its UNet and VAE do not take
    exactly (tiny SD-XL, as SD-XL: 8 x 4 = 32 pixels), naming the key, before any step; 64 trains."""
    from gspn_lightning.cli.lightning import main
    from gspn_lightning.data.write_shards import write_shards

    def samples():
        for i in range(2):
            yield {"__key__": f"s{i}", "png": _png(), "txt": f"thing {i}".encode()}

    write_shards(samples(), tmp_path / "train", maxcount=2, progress=False, labelled=False)

    from gspn_lightning.tasks.distill import DistillationTask

    monkeypatch.setattr(sys, "argv", ["gspn"])
    seen = []
    original = DistillationTask.training_step
    monkeypatch.setattr(
        DistillationTask, "training_step", lambda self, b, i: seen.append(i) or original(self, b, i)
    )
    for resolution, ok in ((40, False), (64, True)):
        args = ["--config", str(ROOT / "configs/sdxl/tiny.yaml"), f"--model.init_args.pretrained={tiny_sdxl_dir}",
                f"--data.init_args.train_shards={tmp_path / 'train'}", f"--data.init_args.resolution={resolution}",
                "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto",
                f"--trainer.default_root_dir={tmp_path / str(resolution)}", "--trainer.max_steps=1",
                "--trainer.limit_val_batches=0", "--trainer.logger=false"]  # fmt: skip
        cli = main(args=args, run=False)
        task = cli.model
        seen.clear()
        if ok:
            cli.trainer.fit(task, datamodule=cli.datamodule)
            assert seen == [0]
        else:
            with pytest.raises(
                ValueError, match=r"data\.init_args\.resolution \[40, 40\] must be a multiple of 32"
            ):
                cli.trainer.fit(task, datamodule=cli.datamodule)
            assert seen == []


def _png() -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()
