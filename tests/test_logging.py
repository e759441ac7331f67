"""Looking at training: TensorBoard is every CLI run's default logger (scalars and the sample grids as
images, the grids still PNG files), the SD-XL distillation's teacher | student grid at each validation,
and the learning rate on the progress bar in scientific notation."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import tomllib
import torch

from gspn_lightning.tasks import ClassificationTask
from tests.cli_helpers import last_scalars, logged, run_dirs
from tests.test_distill import caption_shards  # noqa: F401 (fixture)
from tests.test_dit_task import latent_data  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("torch_one_thread")


def test_tensorboard_is_a_dependency():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.split(">")[0].split("=")[0].strip() == "tensorboard" for d in deps), deps


def test_default_logger_is_tensorboard_in_lightning_logs(tmp_path, monkeypatch):
    """Not Lightning's pick (its CSV logger wherever it thinks tensorboard is missing): TensorBoard,
    in the folder Lightning's default loggers use, under SLURM versioned by the job id; a config's
    own logger (CSV) and ``false`` are kept."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
    from lightning.pytorch.trainer.connectors.logger_connector import logger_connector

    from gspn_lightning.cli.lightning import main

    monkeypatch.setattr(logger_connector, "_TENSORBOARD_AVAILABLE", False)  # Lightning would pick CSV
    monkeypatch.setattr(sys, "argv", ["gspn"])
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    base = ["--config", str(ROOT / "configs/dit/tiny.yaml"), f"--trainer.default_root_dir={tmp_path}"]
    with torch.device("meta"):
        cli = main(args=base, run=False)
    assert type(cli.trainer.logger) is TensorBoardLogger
    assert Path(cli.trainer.logger.log_dir) == tmp_path / "lightning_logs" / "version_0"
    csv = ["--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={tmp_path}"]
    with torch.device("meta"):
        assert type(main(args=base + csv, run=False).trainer.logger) is CSVLogger
        assert main(args=base + ["--trainer.logger=false"], run=False).trainer.logger is None
        monkeypatch.setenv("SLURM_JOB_ID", "4242")
        monkeypatch.setenv("SLURM_JOB_NAME", "train")
        assert main(args=base, run=False).trainer.logger.version == 4242


@pytest.mark.slow
def test_tiny_fit_writes_scalars_and_the_sample_grid_to_tensorboard(latent_data, tmp_path, monkeypatch):  # noqa: F811
    """A tiny DiT fit through the command line with no logger set: one event file holding the training
    and validation scalars and the sample grid as an image, which is also a PNG (TensorBoard whatever
    Lightning would pick)."""
    from lightning.pytorch.trainer.connectors.logger_connector import logger_connector

    from gspn_lightning.cli.lightning import main

    monkeypatch.setattr(logger_connector, "_TENSORBOARD_AVAILABLE", False)
    monkeypatch.setattr(sys, "argv", ["gspn"])
    run = tmp_path / "run"
    main(args=[
        "fit", "--config", str(ROOT / "configs/dit/tiny.yaml"), f"--trainer.default_root_dir={run}",
        f"--data.init_args.train_shards={latent_data / 'lat/train'}",
        f"--data.init_args.val_shards={latent_data / 'lat/val'}", "--trainer.enable_progress_bar=false",
    ])  # fmt: skip
    (log_dir,) = run_dirs(run)
    assert list(log_dir.glob("events.out.tfevents.*")), list(log_dir.iterdir())
    assert (log_dir / "config.yaml").exists()  # the resolved config beside the logs, as before
    scalars = last_scalars(run)
    for tag in ("train/loss_step", "lr", "val/loss", "val_ema/loss", "val/samples"):
        assert tag in scalars, sorted(scalars)
    assert scalars["lr"] == pytest.approx(1e-4)
    events = logged(log_dir)
    assert "samples" in events.Tags()["images"]
    (image,) = events.Images("samples")
    assert image.step == 4 and image.width > 0 and image.height > 0
    assert (run / "samples" / "step-0000004.png").exists()


def _tiny_classifier(lr: float) -> ClassificationTask:
    return ClassificationTask(
        model="gspn_t", model_kwargs={"embed_dim": 8, "depths": [1, 1, 1, 1], "mixer": {"d_state": 2}},
        num_classes=3, in_chans=1, batch_size=4, mixup_alpha=0.0, cutmix_alpha=0.0,
        optim={"lr": lr, "base_batch_size": None, "schedule": "constant", "warmup_epochs": 0.0, "ema_decay": 0.9},
    )  # fmt: skip


def _loader(shape, n=8, classes=3, batch=4):
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(shape, generator=g), int(i % classes)) for i in range(n)]
    return torch.utils.data.DataLoader(data, batch_size=batch)


@pytest.mark.parametrize("bar", ["rich", "tqdm"])
def test_progress_bar_shows_a_small_lr_in_scientific_notation(bar, tmp_path):
    """Lightning's rich bar (its default where rich is installed) printed ``lr: 0.000`` for 3e-5."""
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
    from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

    from gspn_lightning.tasks.base import format_lr, show_lr_scientific

    callback = RichProgressBar() if bar == "rich" else TQDMProgressBar()
    task = _tiny_classifier(lr=3e-5)
    trainer = L.Trainer(
        default_root_dir=tmp_path, accelerator="cpu", devices=1, max_steps=2, logger=False,
        enable_checkpointing=False, enable_model_summary=False, callbacks=[callback], limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(task, _loader((1, 16, 16)))
    shown = callback.get_metrics(trainer, task)["lr"]
    assert shown == "3.0e-05"
    assert trainer.callback_metrics["lr"].item() == pytest.approx(3e-5)  # the loggers get the number
    if bar == "rich":
        from lightning.pytorch.callbacks.progress.rich_progress import MetricsTextColumn

        column = MetricsTextColumn(trainer, "white", " ", ".3f")
        column.update({"lr": shown})
        assert list(column._generate_metrics_texts()) == ["lr: 3.0e-05"]
    else:
        assert Tqdm.format_num(shown) == "3.0e-05"
    assert format_lr(2.5e-7) == "2.5e-07" and format_lr(1e-3) == "1.0e-03"
    show_lr_scientific(None)  # no bar: nothing to do


@pytest.mark.slow
def test_distillation_logs_teacher_student_grid_at_each_validation(tiny_sdxl_dir, caption_shards, tmp_path, monkeypatch):  # noqa: F811
    """The tiny SD-XL config: after each validation a grid of its fixed prompts, teacher | student,
    as an image on TensorBoard and a PNG; the teacher's column is the original UNet's drawing."""
    from PIL import Image

    from gspn_lightning.cli.lightning import main

    monkeypatch.setattr(sys, "argv", ["gspn"])
    run = tmp_path / "run"
    cli = main(args=[
        "fit", "--config", str(ROOT / "configs/sdxl/tiny.yaml"), f"--model.init_args.pretrained={tiny_sdxl_dir}",
        f"--data.init_args.train_shards={caption_shards / 'train'}",
        f"--data.init_args.val_shards={caption_shards / 'val'}", f"--trainer.default_root_dir={run}",
        "--trainer.enable_progress_bar=false",
    ])  # fmt: skip
    (callback,) = [c for c in cli.trainer.callbacks if type(c).__name__ == "TeacherStudentGrid"]
    prompts = len(callback.prompts)
    pngs = sorted((run / "samples").glob("teacher_student-step-*.png"))
    assert [p.name for p in pngs] == ["teacher_student-step-0000002.png", "teacher_student-step-0000004.png"]
    grid = np.asarray(Image.open(pngs[-1]))
    side = 64  # the data's resolution
    assert grid.shape == (prompts * side + (prompts + 1) * 2, 2 * side + 3 * 2, 3)
    events = logged(run_dirs(run)[-1])
    images = events.Images("teacher_student")
    assert [i.step for i in images] == [2, 4]
    # the left column is the teacher: the same prompts and noise through the original UNet
    task = cli.model
    teacher, student = task.teacher_student_images(callback.prompts, steps=callback.steps,
                                                   guidance_scale=callback.guidance_scale, seed=callback.seed)  # fmt: skip
    first = grid[2 : 2 + side, 2 : 2 + side].transpose(2, 0, 1)
    assert np.array_equal(first, teacher[0].numpy())
    assert not torch.equal(teacher, student)  # the swapped UNet draws something else
