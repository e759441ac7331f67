"""Exact resume for every task: a run stopped mid-epoch and resumed from its checkpoint ends with the
same weights, EMA, optimiser state and lr schedule, bit for bit, as the uninterrupted run (CPU).

Each task draws the randomness of a training step from (seed, global step, micro-batch, rank)
(:meth:`gspn_lightning.tasks.base.TrainingTask.step_generator` and the per-step seeding of the global
RNG), never from how many steps its process has run: ``seed_everything`` resets the global RNG at
every start, so a draw from it that was not re-derived would replay the draws of steps 0, 1, ... after
a resume. The tests switch on every source of randomness a task has (mixup/cutmix and drop path;
diffusion noise, timesteps, label dropout and drop path; the distillation's noise, timesteps, VAE
sample and caption dropout) and gradient accumulation where it is cheap."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from gspn_lightning.tasks import ResumableCheckpoint
from tests.conftest import torch_threads
from tests.test_distill import caption_shards  # noqa: F401 (a fixture)
from tests.test_dit_task import latent_data  # noqa: F401 (a fixture)
from tests.test_fault_tolerance import StopAt, small_dm, tiny_task, write_tar


def fit(make_task, make_dm, root: Path, *, max_steps: int, every: int, stop_at=None, ckpt_path=None, **kw):
    """One fit (in this process) from a fresh task and datamodule; the ``last.ckpt`` it leaves."""
    L.seed_everything(0)
    ckpt = ResumableCheckpoint(dirpath=root, save_last=True, every_n_train_steps=every)
    t = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, max_steps=max_steps, max_epochs=-1,
        callbacks=[ckpt, *([StopAt(stop_at)] if stop_at else [])], default_root_dir=root, **kw,
    )  # fmt: skip
    with torch_threads(1):
        t.fit(make_task(), datamodule=make_dm(), ckpt_path=ckpt_path)
    return torch.load(root / "last.ckpt", map_location="cpu", weights_only=True)


def assert_identical(a, b, where="checkpoint"):
    """``a`` and ``b`` (checkpoint contents) equal, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_identical(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def check_resume(make_task, make_dm, tmp_path, *, max_steps, stop_at, every, ema_prefix, **kw):
    straight = fit(make_task, make_dm, tmp_path / "a", max_steps=max_steps, every=every, **kw)
    first = fit(make_task, make_dm, tmp_path / "b", max_steps=max_steps, every=every, stop_at=stop_at, **kw)
    assert first["global_step"] == stop_at
    assert first["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["completed"] > 0  # mid-epoch
    resumed = fit(make_task, make_dm, tmp_path / "b", max_steps=max_steps, every=every, ckpt_path="last",
                  **kw)  # fmt: skip
    assert straight["global_step"] == resumed["global_step"] == max_steps
    assert any(k.startswith(ema_prefix) for k in straight["state_dict"])  # the EMA is compared too
    # weights and EMA, optimiser moments and steps, the lr schedule
    for key in ("state_dict", "optimizer_states", "lr_schedulers"):
        assert_identical(straight[key], resumed[key], key)
    # the steps after the resume trained (the comparison is not of two copies of the stop checkpoint)
    assert any(not torch.equal(v, resumed["state_dict"][k]) for k, v in first["state_dict"].items())


def test_classification_resume_is_bit_identical_with_mixup_and_drop_path(tmp_path):
    """Mixup/cutmix (and the choice between them) and drop path draw from the global RNG inside the
    step: seeded per step, they repeat after a resume."""
    for i in range(3):
        write_tar(tmp_path / f"train-{i}.tar", 24)

    def make_task():
        return tiny_task(
            mixup_alpha=0.8, cutmix_alpha=1.0,
            model_kwargs=dict(embed_dim=8, depths=[1, 1, 1, 1], mixer={"d_state": 2}, drop_path_rate=0.3),
        )  # fmt: skip

    def make_dm():
        return small_dm(
            str(tmp_path / "train-{0..2}.tar"), image_size=16, epoch_samples=16, batch_size=4, num_workers=0,
            shuffle_buffer=10, hflip=0.5, random_erasing=0.5, seed=5,
        )  # fmt: skip

    check_resume(make_task, make_dm, tmp_path, max_steps=7, stop_at=3, every=3, ema_prefix="ema.")


def test_dit_resume_is_bit_identical(latent_data, tmp_path):  # noqa: F811
    """Noise, timesteps, label dropout and drop path of a DiT step, with gradient accumulation (the
    micro-batch is part of the derivation): the resumed run ends where the uninterrupted one does."""
    from gspn_lightning.data.latents import LatentWebDataModule
    from gspn_lightning.tasks import DiffusionTask

    def make_task():
        return DiffusionTask(
            model="gspn_dit_s_2", model_kwargs=dict(hidden_size=32, depth=2, drop_path_rate=0.2), num_classes=3,
            in_chans=4, image_size=8, class_dropout=0.5, optim=dict(lr=1e-3, ema_decay=0.9),
        )  # fmt: skip

    def make_dm():
        return LatentWebDataModule(
            train_shards=str(latent_data / "lat/train"), batch_size=2, num_workers=0, epoch_samples=12,
            shuffle_buffer=8, num_classes=3,
        )  # fmt: skip

    # 6 batches = 3 steps an epoch; stopped after step 2 (batch 4 of epoch 1), resumed to step 5
    check_resume(
        make_task, make_dm, tmp_path, max_steps=5, stop_at=2, every=2, ema_prefix="ema.module.",
        accumulate_grad_batches=2,
    )  # fmt: skip


def test_distillation_resume_is_bit_identical(tiny_sdxl_dir, caption_shards, tmp_path):  # noqa: F811
    """The distillation's noise, timesteps, VAE posterior sample and caption dropout: resumed mid-epoch,
    the GSPN weights, their EMA and the optimiser state end bit-identical."""
    from gspn_lightning.data import CaptionWebDataModule
    from gspn_lightning.tasks import DistillationTask

    def make_task():
        return DistillationTask(
            str(tiny_sdxl_dir), mixer={"d_state": 4}, caption_dropout=0.5, uncond="zeros",
            optim=dict(lr=1e-3, ema_decay=0.9),
        )  # fmt: skip

    def make_dm():
        return CaptionWebDataModule(
            train_shards=str(caption_shards / "train"), resolution=64, random_crop=True, batch_size=1,
            num_workers=0, epoch_samples=4, shuffle_buffer=2,
        )  # fmt: skip

    check_resume(make_task, make_dm, tmp_path, max_steps=5, stop_at=2, every=2, ema_prefix="ema.module.")


def test_step_draws_are_keyed_by_seed_step_micro_batch_rank_and_purpose(monkeypatch):
    """The same key draws the same numbers in any process; each part of the key changes them."""
    from types import SimpleNamespace

    task = tiny_task()
    monkeypatch.setenv("PL_GLOBAL_SEED", "3")

    def draws(purpose="noise", *, step=5, batch_idx=3, rank=0, accumulate=2, training=True):
        task._trainer = SimpleNamespace(
            training=training, global_step=step, global_rank=rank, accumulate_grad_batches=accumulate
        )
        try:
            return torch.rand(4, generator=task.step_generator(batch_idx, purpose))
        finally:
            task._trainer = None

    same = draws()
    assert torch.equal(same, draws())
    assert torch.equal(same, draws(batch_idx=5))  # micro-batch 5 % 2 == 3 % 2
    for other in (draws(step=6), draws(batch_idx=4), draws(rank=1), draws("labels"), draws(training=False)):
        assert not torch.equal(same, other)
    monkeypatch.setenv("PL_GLOBAL_SEED", "4")
    assert not torch.equal(same, draws())
    # evaluation: keyed by the batch index, not the step
    assert torch.equal(draws(training=False, step=1), draws(training=False, step=9))
    assert not torch.equal(draws(training=False, batch_idx=1), draws(training=False, batch_idx=2))
