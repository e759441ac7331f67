"""Settings with one shape: the ``optim`` group every task takes (command line, configs, checkpoints),
the datamodule protocol the tasks read, the generative callbacks (sample grids, in-training FID), every
shipped config instantiated by some test, and the config that uses ``${...}`` interpolation."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from gspn_lightning.data.protocol import (
    ClassData,
    LatentData,
    TaskData,
    missing_attributes,
    provides,
    task_data,
)
from gspn_lightning.tasks import ClassificationTask, DiffusionTask, InTrainingFID, SampleGrid
from gspn_lightning.tasks.base import (
    CLASSIFICATION_OPTIM,
    DIFFUSION_OPTIM,
    DISTILLATION_OPTIM,
    OptimSettings,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread")

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "configs" / "classification" / "debug_mnist.yaml"
DIGITS = ROOT / "configs" / "dit" / "digits.yaml"


def _cli(args, monkeypatch):
    from gspn_lightning.cli.lightning import main

    monkeypatch.setattr(sys, "argv", ["gspn"])
    with torch.device("meta"):
        return main(args=[*map(str, args), "--trainer.accelerator=cpu", "--trainer.devices=1"], run=False)


# ------------------------------------------------------------------------------------- the optim group


def test_optim_group_from_config_command_line_and_defaults(monkeypatch, capsys):
    cli = _cli(["--config", DEBUG, "--model.init_args.optim.lr=0.01"], monkeypatch)
    o = cli.model.optim
    # the command line's lr over the config's fields over the task's own defaults
    assert o.lr == 0.01 and o.base_batch_size == 32 and o.warmup_epochs == 0.5 and o.ema_decay == 0.99
    assert o.schedule == "cosine" and o.betas == (0.9, 0.999)
    assert cli.model.hparams.optim == o.as_dict() and cli.model.ema.decay == 0.99
    # the group in a task's help (`--model.help DiffusionTask` names its arguments without init_args)
    from gspn_lightning.cli.lightning import main

    with pytest.raises(SystemExit):
        main(args=["--model.help", "gspn_lightning.tasks.DiffusionTask"], run=False)
    shown = capsys.readouterr().out
    assert "--model.optim.lr" in shown and "--model.optim.ema_decay" in shown and "--model.lr " not in shown


def test_per_task_defaults_and_validation():
    assert CLASSIFICATION_OPTIM.schedule == "cosine" and CLASSIFICATION_OPTIM.base_batch_size == 512
    assert (CLASSIFICATION_OPTIM.lr, CLASSIFICATION_OPTIM.weight_decay, CLASSIFICATION_OPTIM.min_lr) == (
        5e-4, 0.05, 5e-6,
    )  # fmt: skip
    assert DIFFUSION_OPTIM.schedule == "constant" and DIFFUSION_OPTIM.base_batch_size is None
    assert DISTILLATION_OPTIM.ema_scope == "trainable" and DIFFUSION_OPTIM.ema_scope == "all"
    # a dict (a checkpoint's, a caller's few fields) is read over the task's default
    got = OptimSettings.build({"lr": 1e-3, "betas": [0.9, 0.95]}, CLASSIFICATION_OPTIM)
    assert got.lr == 1e-3 and got.betas == (0.9, 0.95) and got.schedule == "cosine" and got.warmup_epochs == 20
    assert OptimSettings.build(None, DIFFUSION_OPTIM) is DIFFUSION_OPTIM
    assert OptimSettings.build(got.as_dict(), DIFFUSION_OPTIM) == got
    with pytest.raises(ValueError, match="optim.ema_scope"):
        OptimSettings(ema_scope="some")
    with pytest.raises(TypeError, match="unknown optim setting"):
        OptimSettings.build({"base_lr": 1.0}, DIFFUSION_OPTIM)


def _tiny_classifier(**optim) -> ClassificationTask:
    return ClassificationTask(
        model="gspn_t", model_kwargs={"embed_dim": 8, "depths": [1, 1, 1, 1], "mixer": {"d_state": 2}},
        num_classes=3, in_chans=1, batch_size=4, mixup_alpha=0.0, cutmix_alpha=0.0,
        optim={"lr": 1e-3, "base_batch_size": 4, "warmup_epochs": 0.0, "ema_decay": 0.9, **optim},
    )  # fmt: skip


def _tiny_diffusion(**kw) -> DiffusionTask:
    return DiffusionTask(
        model="gspn_dit_s_2", model_kwargs={"hidden_size": 16, "depth": 2, "mixer": {"backend": "reference"}},
        num_classes=3, in_chans=1, image_size=4, optim={"lr": 1e-3, "ema_decay": 0.5, "warmup_steps": 2}, **kw,
    )  # fmt: skip


def _trainer(root, **kw) -> L.Trainer:
    kw = {"max_steps": 2, "max_epochs": 1, "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
          "enable_model_summary": False, **kw}  # fmt: skip
    return L.Trainer(default_root_dir=root, accelerator="cpu", devices=1, **kw)


def _loader(shape, n=8, classes=3, batch=4):
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(shape, generator=g), int(i % classes)) for i in range(n)]
    return torch.utils.data.DataLoader(data, batch_size=batch)


@pytest.mark.parametrize("kind", ["classification", "diffusion"])
def test_checkpoint_of_the_new_shape_loads_with_its_optim(kind, tmp_path):
    """The optim group is saved as a plain dict in the checkpoint's hyper-parameters (no pickled class),
    and ``load_from_checkpoint`` rebuilds the same settings, model and EMA."""
    if kind == "classification":
        task, shape, cls = _tiny_classifier(lr=2e-3, warmup_lr=1e-5), (1, 16, 16), ClassificationTask
    else:
        task, shape, cls = _tiny_diffusion(), (1, 4, 4), DiffusionTask
    trainer = _trainer(tmp_path)
    trainer.fit(task, _loader(shape))
    path = tmp_path / "x.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, map_location="cpu", weights_only=True)["hyper_parameters"]["optim"]
    assert type(saved) is dict and saved == task.optim.as_dict()
    back = cls.load_from_checkpoint(path, map_location="cpu")
    assert back.optim == task.optim and back.ema is not None and back.ema.decay == task.optim.ema_decay
    for a, b in zip(back.ema.module.state_dict().values(), task.ema.module.state_dict().values()):
        assert torch.equal(a, b)


def test_checkpoint_of_the_previous_shape_still_loads(tmp_path):
    """A checkpoint written before the optim/mixer groups (flat lr, ema_decay, ... and flat mixer
    options in model_kwargs, grid arguments now callbacks) loads into the same settings and model."""
    task = _tiny_diffusion()
    trainer = _trainer(tmp_path)
    trainer.fit(task, _loader((1, 4, 4)))
    trainer.save_checkpoint(tmp_path / "new.ckpt")
    state = torch.load(tmp_path / "new.ckpt", map_location="cpu", weights_only=True)
    hp = state["hyper_parameters"]
    hp.update(hp.pop("optim"))  # lr, ema_decay, warmup_steps, ... as flat arguments
    hp["model_kwargs"] = {"hidden_size": 16, "depth": 2, "backend": "reference", "local_chunk_size": 2}
    hp.update(sample_every_n_steps=0, sample_classes=2, sampler="ddim", fid_every_n_steps=0)
    torch.save(state, tmp_path / "old.ckpt")
    back = DiffusionTask.load_from_checkpoint(tmp_path / "old.ckpt", map_location="cpu")
    assert back.optim == task.optim and back.hparams.model_kwargs["mixer"] == {"backend": "reference", "chunk_size": 2}
    assert {m.backend for m in back.model.modules() if hasattr(m, "fuse_gates")} == {"reference"}
    for a, b in zip(back.state_dict().values(), task.state_dict().values()):
        assert torch.equal(a, b)
    assert DiffusionTask.load_from_checkpoint(tmp_path / "old.ckpt", optim={"lr": 0.5}).optim.lr == 0.5


# -------------------------------------------------------------------------------- the data protocol


class _Bare(L.LightningDataModule):
    batch_size = 4


class _Lazy:
    """Properties that must not be evaluated by the check (they would read a shard index)."""

    batch_size, epoch_samples = 4, None

    @property
    def num_train_samples(self):
        raise AssertionError("evaluated")

    num_val_samples = num_test_samples = num_train_samples


def test_datamodule_protocol_names_what_is_missing():
    from gspn_lightning.data import ImageWebDataModule, LatentWebDataModule
    from gspn_lightning.data.captions import CaptionWebDataModule

    assert provides(_Lazy(), TaskData) and not provides(_Lazy(), ClassData)
    assert missing_attributes(_Lazy(), LatentData) == ["num_classes", "in_chans", "image_size", "vae"]
    assert task_data(None, TaskData) is None  # bare dataloaders: nothing to read
    with pytest.raises(TypeError, match=r"DiffusionTask reads TaskData .* _Bare has no epoch_samples, num_train"):
        task_data(_Bare(), TaskData, "DiffusionTask")
    # the package's data modules follow what their tasks read (no shards: the check reads nothing)
    images, latents, captions = (cls(num_workers=0) for cls in (ImageWebDataModule, LatentWebDataModule,
                                                                 CaptionWebDataModule))  # fmt: skip
    assert not missing_attributes(images, ClassData) and not missing_attributes(latents, LatentData)
    assert not missing_attributes(captions, TaskData)
    assert missing_attributes(images, LatentData) == ["vae"]  # pixels: no VAE


def test_task_with_a_datamodule_lacking_the_protocol_is_one_clear_error(tmp_path):
    class NoEpoch(_Bare):
        def train_dataloader(self):
            return _loader((1, 16, 16))

    with pytest.raises(TypeError, match="ClassificationTask reads ClassData .* NoEpoch has no epoch_samples"):
        _trainer(tmp_path, max_steps=1).fit(_tiny_classifier(), datamodule=NoEpoch())


# --------------------------------------------------------------------------- the generative callbacks


class _Painter(L.LightningModule):
    """The smallest generative task of the callbacks' contract: image ``i`` is the gray level of its
    seed, so a test can read back which seeds and labels were drawn."""

    num_classes = 3

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.calls: list[tuple[list[int], list[int], dict]] = []

    def training_step(self, batch, batch_idx):
        return (self.w - 1.0).pow(2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def sample_images(self, labels, seeds, *, sampler, steps, guidance_scale, guidance_channels):
        self.calls.append((labels.tolist(), list(seeds), dict(sampler=sampler, steps=steps)))
        gray = torch.tensor([s % 256 for s in seeds], dtype=torch.uint8)
        return gray.view(-1, 1, 1, 1).expand(-1, 1, 4, 4).clone()

    def sampling_protocol(self):
        return {"weights": "raw"}


def test_sample_grid_callback_writes_when_and_what_the_task_did(tmp_path):
    from torchvision.io import read_image

    painter = _Painter()
    grid = SampleGrid(every_n_steps=2, classes=5, per_class=2, sampler="ddpm", steps=3)
    _trainer(tmp_path, max_steps=5, callbacks=[grid]).fit(painter, _loader((1,), n=20, batch=2))
    names = sorted(p.name for p in (tmp_path / "samples").iterdir())
    assert names == ["step-0000002.png", "step-0000004.png", "step-0000005.png"]  # every 2 and at the end
    labels, seeds, sampling = painter.calls[0]
    assert labels == [0, 0, 1, 1, 2, 2] and seeds == list(range(6))  # min(classes, num_classes) rows
    assert sampling == {"sampler": "ddpm", "steps": 3}
    image = read_image(str(tmp_path / "samples/step-0000004.png"))
    assert image.shape == (3, 3 * 6 + 2, 2 * 6 + 2)  # 3 rows, 2 columns of 4x4 images, 2-pixel gaps
    assert int(image[0, 2 + 6, 2 + 6]) == 3  # row 1, column 1: seed 3


def test_fid_callback_logs_on_its_steps_with_its_protocol(tmp_path, monkeypatch, caplog):
    import logging

    import gspn_lightning.metrics as metrics

    caplog.set_level(logging.INFO)
    seen = []

    def fake_metrics(real, fake, **kw):
        seen.append((real, fake.shape))
        return {"fid": 12.5}

    monkeypatch.setattr(metrics, "compute_metrics", fake_metrics)
    painter = _Painter()
    (tmp_path / "ref.npz").touch()  # (the reference must exist when the callback is built)
    fid = InTrainingFID(str(tmp_path / "ref.npz"), every_n_steps=2, num_samples=5, batch_size=2, steps=4)
    logger = L.pytorch.loggers.CSVLogger(tmp_path)
    _trainer(tmp_path, max_steps=4, callbacks=[fid], logger=logger, log_every_n_steps=1).fit(
        painter, _loader((1,), n=20, batch=2)
    )
    assert seen == [(str(tmp_path / "ref.npz"), (5, 1, 4, 4))] * 2  # steps 2 and 4
    labels = [lab for call in painter.calls[:3] for lab in call[0]]
    seeds = [s for call in painter.calls[:3] for s in call[1]]
    assert labels == [0, 1, 2, 0, 1] and seeds == [1_000_000 + i for i in range(5)]  # balanced, by index
    assert "FID 12.500 at step 2; protocol: {'samples': 5, 'class_balanced': True, 'weights': 'raw', " in caplog.text
    assert "'sampler': 'ddim', 'steps': 4," in caplog.text and "FID 12.500 at step 4" in caplog.text
    import csv

    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("fid")]
    assert rows and float(rows[0]["fid"]) == 12.5 and int(rows[0]["step"]) == 1  # logged at the 2nd step
    with pytest.raises(ValueError, match="every_n_steps"):
        InTrainingFID("ref.npz", every_n_steps=0)


def test_fid_callback_logs_every_metric_asked_for(tmp_path, monkeypatch, caplog):
    """``metrics: [fid, sfid, precision, recall]`` logs each under its name; what a statistics-only
    reference cannot give is refused when the callback is built, not at its first evaluation."""
    import csv
    import logging

    import numpy as np

    import gspn_lightning.metrics as metrics
    from gspn_lightning.metrics import Statistics

    caplog.set_level(logging.INFO)
    asked = []

    def fake_metrics(real, fake, metrics=None, **kw):
        asked.append(metrics)
        return {"fid": 12.5, "sfid": 30.25, "precision": 0.75, "recall": 0.5, "skipped": {}}

    monkeypatch.setattr(metrics, "compute_metrics", fake_metrics)
    rng = np.random.default_rng(0)
    stats = Statistics.from_features(rng.standard_normal((4, 2048)), spatial_features=rng.standard_normal((4, 2023)))
    with_features = stats.save(tmp_path / "with.npz")
    fid = InTrainingFID(str(with_features), every_n_steps=2, num_samples=5, batch_size=5, steps=2,
                        metrics=["recall", "fid", "precision", "sfid"])  # fmt: skip
    logger = L.pytorch.loggers.CSVLogger(tmp_path)
    _trainer(tmp_path, max_steps=2, callbacks=[fid], logger=logger, log_every_n_steps=1).fit(
        _Painter(), _loader((1,), n=20, batch=2)
    )
    assert asked == [["fid", "sfid", "precision", "recall"]]  # ADM's table order
    assert "FID 12.500, sFID 30.250, precision 0.750, recall 0.500 at step 2; protocol: {" in caplog.text
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("fid")]
    assert [(float(rows[0][k])) for k in ("fid", "sfid", "precision", "recall")] == [12.5, 30.25, 0.75, 0.5]
    stats_only = stats.save(tmp_path / "stats_only.npz", keep_features=False)
    with pytest.raises(ValueError, match=r"\['precision'\] need the reference's features.*--keep-features"):
        InTrainingFID(str(stats_only), every_n_steps=2, metrics=["fid", "precision"])
    InTrainingFID(str(stats_only), every_n_steps=2, metrics=["fid", "sfid"])  # what it holds: fine
    np.savez(tmp_path / "old.npz", mu=stats.mu, sigma=stats.sigma)  # no spatial statistics
    with pytest.raises(ValueError, match="sfid needs spatial statistics"):
        InTrainingFID(str(tmp_path / "old.npz"), every_n_steps=2, metrics=["sfid"])
    with pytest.raises(ValueError, match="metrics must be a non-empty list"):
        InTrainingFID(str(stats_only), every_n_steps=2, metrics=["fid", "ssim"])


class _Plainly(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        return self.w.sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_generative_callbacks_refuse_a_task_without_the_contract(tmp_path):
    with pytest.raises(TypeError, match="_Plainly cannot be sampled .* no num_classes, sample_images"):
        _trainer(tmp_path, max_steps=1, callbacks=[SampleGrid()]).fit(_Plainly(), _loader((1,)))


# ---------------------------------------------------------------------------- ${...} interpolation


def test_interpolated_num_classes_reaches_the_data_the_model_and_the_grid(tmp_path, monkeypatch):
    """configs/dit/digits.yaml types the number of classes once (the data's); the grid's rows read it
    with ``${data.init_args.num_classes}``, and the task reads it through the data -> model link.
    A copy of the config with another value shows all three follow it (not three equal literals)."""
    nowhere = [f"--data.init_args.train_shards={tmp_path / 'none/train'}",
               f"--data.init_args.val_shards={tmp_path / 'none/val'}"]  # fmt: skip
    text = DIGITS.read_text()
    assert "classes: ${data.init_args.num_classes}" in text
    seven = tmp_path / "digits7.yaml"
    seven.write_text(text.replace("num_classes: 10  #", "num_classes: 7  #"))
    for config, n in ((DIGITS, 10), (seven, 7)):
        cli = _cli(["--config", config, *nowhere], monkeypatch)
        (grid,) = [c for c in cli.trainer.callbacks if isinstance(c, SampleGrid)]
        assert cli.datamodule.num_classes == cli.model.hparams.num_classes == grid.classes == n
        assert cli.model.model.y_embed.table.num_embeddings == n + 1  # + the null class
