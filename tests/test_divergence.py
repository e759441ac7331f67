"""A divergence is recoverable: non-finite weights stop the run at the optimizer step that made them,
the exception checkpoint of a diverged run is never the one ``--ckpt_path last`` resumes, and an
optimiser setting given to a resume (a lower lr, as the NonFiniteError advises) is applied to the
restored optimiser and schedule."""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch

from gspn_lightning.tasks.base import RECOVERY
from gspn_lightning.tasks.checkpointing import DIVERGED_KEY, NonFiniteError, resolve_last
from tests.test_fault_tolerance import fake_ckpt, load, loader, tiny_task, trainer


class DivergeWithLargeLr(L.Callback):
    """Stands for a learning rate too large for the model: at global step ``step``, if the lr is above
    ``threshold``, the loss (``"loss"``: the batch made infinite) or the update (``"weights"``: an
    infinite gradient) goes non-finite. With a lower lr nothing happens."""

    def __init__(self, how: str, step: int = 3, threshold: float = 0.1):
        self.how, self.step, self.threshold = how, step, threshold

    def _fires(self, trainer) -> bool:
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        return trainer.global_step == self.step and lr > self.threshold

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.how == "loss" and self._fires(trainer):
            batch[0].fill_(float("inf"))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.how == "weights" and self._fires(trainer):
            next(p for p in pl_module.model.parameters() if p.grad is not None).grad.fill_(float("inf"))


def _optim(lr):
    return dict(lr=lr, base_batch_size=4, warmup_epochs=0.0, ema_decay=0.9)


def test_nonfinite_weights_stop_the_run_at_the_step_that_made_them(tmp_path):
    """Before: a finite loss with a non-finite update trained on until the next checkpoint save."""
    with pytest.raises(
        NonFiniteError,
        match=r"non-finite weights after the optimizer step from global step 3 to 4 \(epoch 0\) in stem\.",
    ) as info:
        trainer(tmp_path, callbacks=[DivergeWithLargeLr("weights")], max_steps=6).fit(
            tiny_task(optim=_optim(1.0)), loader(), loader(8)
        )
    assert RECOVERY in str(info.value)
    assert load(tmp_path / "ckpt" / "last.ckpt")["global_step"] == 2
    assert not (tmp_path / "ckpt" / "on_exception.ckpt").exists()  # non-finite weights are never saved


def test_resolve_last_never_picks_a_diverged_exception_checkpoint(tmp_path):
    fake_ckpt(tmp_path / "last.ckpt", 2)
    time.sleep(0.01)
    fake_ckpt(tmp_path / "on_exception.ckpt", 3)
    assert resolve_last(str(tmp_path)) == str(tmp_path / "on_exception.ckpt")  # real progress: used
    state = load(tmp_path / "on_exception.ckpt")
    torch.save(
        {**state, DIVERGED_KEY: "NonFiniteError: non-finite training loss"}, tmp_path / "on_exception.ckpt"
    )
    with pytest.warns(UserWarning, match=r"not resuming from .*on_exception\.ckpt.*diverged run"):
        assert resolve_last(str(tmp_path)) == str(tmp_path / "last.ckpt")
    os.remove(tmp_path / "last.ckpt")
    with pytest.raises(RuntimeError, match=r"only checkpoint .* diverged run.*pass it by path"):
        resolve_last(str(tmp_path))


@pytest.mark.parametrize("how", ["loss", "weights"])
def test_diverge_then_resume_with_a_lower_lr_from_last(tmp_path, how):
    """The NonFiniteError's advice works: `--ckpt_path last` with a lower lr resumes the last good
    checkpoint (not the diverged run's exception checkpoint), the new lr is the one used, and the run
    completes. (Before: the exception checkpoint of step 3 was resumed and the restored optimiser's lr
    won, so the same step diverged again.)"""
    folder = tmp_path / "ckpt"
    with pytest.raises(NonFiniteError) as info:
        trainer(tmp_path, callbacks=[DivergeWithLargeLr(how)], max_steps=6).fit(
            tiny_task(optim=_optim(1.0)), loader(), loader(8)
        )
    assert "--ckpt_path last --model.init_args.optim.lr" in str(info.value)
    if how == "loss":  # the weights were finite: the state of step 3 is kept, marked
        exc = load(folder / "on_exception.ckpt")
        assert exc["global_step"] == 3 and "non-finite training loss" in exc[DIVERGED_KEY]
    lrs = []

    class RecordLr(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            lrs.append(optimizer.param_groups[0]["lr"])

    t = trainer(tmp_path, callbacks=[DivergeWithLargeLr(how), RecordLr()], max_steps=6)
    with pytest.warns(UserWarning, match=r"optim\.lr 1\.0 -> 0\.001; applied to the restored optimiser"):
        t.fit(tiny_task(optim=_optim(1e-3)), loader(), loader(8), ckpt_path="last")
    assert Path(t.ckpt_path).name == "last.ckpt"
    last = load(folder / "last.ckpt")
    assert last["global_step"] == 6 and last["hyper_parameters"]["optim"]["lr"] == 1e-3
    assert last["lr_schedulers"][0]["base_lrs"] == [1e-3, 1e-3]
    assert all(g["initial_lr"] == 1e-3 for g in last["optimizer_states"][0]["param_groups"])
    assert len(lrs) == 4 and all(0 < lr <= 1e-3 for lr in lrs), lrs
    assert not (folder / "on_exception.ckpt").exists()  # the completed run removes it


def test_other_optimiser_settings_on_resume_are_applied_unchanged_ones_leave_the_state(tmp_path):
    trainer(tmp_path, max_steps=2).fit(tiny_task(optim=_optim(1e-3)), loader(), loader(8))
    before = load(tmp_path / "ckpt" / "last.ckpt")
    # the same settings: the restored optimiser state is used exactly as saved
    t = trainer(tmp_path / "same", max_steps=3)
    task = tiny_task(optim=_optim(1e-3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(task, loader(), loader(8), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert not [w for w in caught if "optimiser settings" in str(w.message)]
    assert task.apply_resumed_optim() == {}
    # weight decay and betas
    task = tiny_task(optim={**_optim(1e-3), "weight_decay": 0.3, "betas": (0.8, 0.95)})
    seen = {}

    class Look(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, *args):
            seen.setdefault("groups", [dict(g, params=None) for g in trainer.optimizers[0].param_groups])

    t = trainer(tmp_path / "other", callbacks=[Look()], max_steps=3)
    with pytest.warns(
        UserWarning,
        match=r"optim\.weight_decay 0\.05 -> 0\.3, optim\.betas \(0\.9, 0\.999\) -> \(0\.8, 0\.95\)",
    ):
        t.fit(task, loader(), loader(8), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    decay, no_decay = seen["groups"]
    assert decay["weight_decay"] == 0.3 and no_decay["weight_decay"] == 0.0
    assert decay["betas"] == no_decay["betas"] == (0.8, 0.95)
    assert (
        decay["initial_lr"] == before["optimizer_states"][0]["param_groups"][0]["initial_lr"]
    )  # lr unchanged
