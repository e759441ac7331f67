"""Faults of issue 7, one test (or a few) per numbered fault: resume picks the right checkpoint,
writes are atomic, the final/first-epoch steps are saved, the EMA matches its step, SIGTERM exits
non-zero, non-finite losses and weights are caught, bad data and bad configs fail clearly.

Most run an in-process Trainer on a tiny GSPN and random 16x16 images (a few seconds each)."""

from __future__ import annotations

import io
import os
import sys
import tarfile
import time
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from gspn_lightning.tasks import ClassificationTask, ResumableCheckpoint
from gspn_lightning.tasks.checkpointing import (
    NonFiniteError,
    probe_checkpoint,
    remove_stale_temp_files,
    resolve_last,
    temp_path,
)
from tests.test_classification import DEBUG, data_args, last_metrics, run_cli

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- helpers


def tiny_task(**overrides) -> ClassificationTask:
    kwargs = dict(
        model="gspn_t",
        model_kwargs=dict(embed_dim=8, depths=[1, 1, 1, 1], mixer={"d_state": 2}, drop_path_rate=0.0),
        num_classes=3,
        in_chans=1,
        batch_size=4,
        mixup_alpha=0.0,
        cutmix_alpha=0.0,
        optim=dict(lr=1e-3, base_batch_size=4, warmup_epochs=0.0, ema_decay=0.9),
    )
    if "ema_decay" in overrides:  # a test's one setting of the optim group
        kwargs["optim"] = {**kwargs["optim"], "ema_decay": overrides.pop("ema_decay")}
    kwargs.update(overrides)
    return ClassificationTask(**kwargs)


def loader(n=32, bad_batches=(), labels=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 16, 16, generator=g)
    y = torch.randint(0, 3, (n,), generator=g) if labels is None else labels
    for b in bad_batches:
        x[4 * b : 4 * b + 4] = float("inf")
    return DataLoader(TensorDataset(x, y), batch_size=4)


def trainer(tmp_path, callbacks=(), ckpt=None, **kwargs) -> L.Trainer:
    ckpt = ckpt or ResumableCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=2)
    kwargs.setdefault("max_epochs", 3)
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[ckpt, *callbacks],
        default_root_dir=tmp_path,
        **kwargs,
    )


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def fake_ckpt(path, step, full=True):
    state = {"state_dict": {"w": torch.ones(2) * step}, "global_step": step}
    if full:
        state.update(optimizer_states=[{}], lr_schedulers=[{}], loops={})
    torch.save(state, path)


# ---------------------------------------------------------------- 1 and 6: choosing the resume checkpoint


def test_resolve_last_prefers_highest_step_not_newest_file(tmp_path):
    fake_ckpt(tmp_path / "last.ckpt", 39)
    time.sleep(0.01)
    fake_ckpt(tmp_path / "on_exception.ckpt", 0)  # newer file, older progress (the hijack of fault 1)
    assert resolve_last(str(tmp_path)) == str(tmp_path / "last.ckpt")
    fake_ckpt(tmp_path / "on_exception.ckpt", 39)  # equal step: last.ckpt wins
    assert resolve_last(str(tmp_path)) == str(tmp_path / "last.ckpt")
    fake_ckpt(tmp_path / "on_exception.ckpt", 41)  # real progress beyond last.ckpt: used
    assert resolve_last(str(tmp_path)) == str(tmp_path / "on_exception.ckpt")
    fake_ckpt(tmp_path / "on_exception.ckpt", 50, full=False)  # weights only: cannot resume a fit
    assert resolve_last(str(tmp_path)) == str(tmp_path / "last.ckpt")
    assert resolve_last(str(tmp_path), full_state=False) == str(tmp_path / "on_exception.ckpt")
    assert resolve_last(str(tmp_path / "nothing-here")) is None


def test_resolve_last_falls_back_past_a_truncated_checkpoint(tmp_path):
    fake_ckpt(tmp_path / "epoch=000-step=8.ckpt", 8)
    fake_ckpt(tmp_path / "last.ckpt", 12)
    data = (tmp_path / "last.ckpt").read_bytes()
    (tmp_path / "last.ckpt").write_bytes(data[: len(data) // 2])  # a kill half-way through a write
    with pytest.warns(UserWarning, match=r"last\.ckpt cannot be loaded.*epoch=000-step=8\.ckpt"):
        assert resolve_last(str(tmp_path)) == str(tmp_path / "epoch=000-step=8.ckpt")
    (tmp_path / "epoch=000-step=8.ckpt").write_bytes(b"")
    with pytest.raises(RuntimeError, match=r"no checkpoint .* can be loaded") as info:
        resolve_last(str(tmp_path))
    assert "last.ckpt" in str(info.value) and "step=8.ckpt" in str(info.value)


def test_trainer_resume_last_skips_truncated_and_exception_checkpoints(tmp_path):
    t = trainer(tmp_path, max_steps=4)
    t.fit(tiny_task(), loader(), loader(8))
    folder = tmp_path / "ckpt"
    assert load(folder / "last.ckpt")["global_step"] == 4
    # an exception checkpoint from a crashed start (step 0) and a truncated newest last.ckpt
    fake_ckpt(folder / "on_exception.ckpt", 0)
    good = folder / "epoch=000-step=4.ckpt"
    assert load(good)["global_step"] == 4
    (folder / "last.ckpt").write_bytes((folder / "last.ckpt").read_bytes()[:1000])
    t2 = trainer(tmp_path, max_steps=6)
    with pytest.warns(UserWarning, match="last.ckpt cannot be loaded"):
        t2.fit(tiny_task(), loader(), loader(8), ckpt_path="last")
    assert Path(t2.ckpt_path) == good
    assert load(folder / "last.ckpt")["global_step"] == 6  # continued from 4, rewritten whole


def test_checkpoint_names_are_not_doubled_and_writes_go_through_a_temp_file(tmp_path, monkeypatch):
    seen = []
    orig = L.Trainer.save_checkpoint

    def spy(self, filepath, *args, **kwargs):
        seen.append(str(filepath))
        return orig(self, filepath, *args, **kwargs)

    monkeypatch.setattr(L.Trainer, "save_checkpoint", spy)
    trainer(tmp_path, max_steps=2).fit(tiny_task(), loader(), loader(8))
    names = sorted(os.listdir(tmp_path / "ckpt"))
    assert names == ["epoch=000-step=2.ckpt", "last.ckpt"], names
    # every write went to a hidden temp file in the checkpoint's own folder, then was renamed
    assert seen and all(Path(p).parent == tmp_path / "ckpt" and Path(p).name.startswith(".") for p in seen)
    assert temp_path(str(tmp_path / "ckpt" / "last.ckpt")).startswith(str(tmp_path / "ckpt" / ".last.ckpt"))
    stale = tmp_path / "ckpt" / ".last.ckpt.tmp-123"
    stale.write_bytes(b"half")
    assert remove_stale_temp_files(str(tmp_path / "ckpt")) == [str(stale)] and not stale.exists()


def test_a_write_interrupted_before_its_rename_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    from gspn_lightning.tasks import checkpointing

    trainer(tmp_path, max_steps=2).fit(tiny_task(), loader(), loader(8))
    before = (tmp_path / "ckpt" / "last.ckpt").read_bytes()

    class Killed(BaseException):
        pass

    def killed(tmp, filepath):  # the process dies after writing the temp file, before the rename
        raise Killed

    monkeypatch.setattr(checkpointing, "commit_file", killed)
    with pytest.raises(Killed):
        trainer(tmp_path, max_steps=4).fit(tiny_task(), loader(), loader(8), ckpt_path="last")
    assert (tmp_path / "ckpt" / "last.ckpt").read_bytes() == before
    assert any(n.startswith(".") for n in os.listdir(tmp_path / "ckpt"))  # the unfinished temp file
    monkeypatch.undo()
    t = trainer(tmp_path, max_steps=4)
    t.fit(tiny_task(), loader(), loader(8), ckpt_path="last")
    assert load(tmp_path / "ckpt" / "last.ckpt")["global_step"] == 4
    assert not any(n.startswith(".") for n in os.listdir(tmp_path / "ckpt"))  # cleaned up at start


# --------------------------------------------------------------------------- 1: the exception checkpoint


class RaiseAt(L.Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == self.step:
            raise RuntimeError("boom")


def test_exception_checkpoint_only_after_training_progress(tmp_path):
    folder = tmp_path / "ckpt"
    # evaluating "last" with no checkpoint at all is an error, not a score of untrained weights
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        trainer(tmp_path).validate(tiny_task(), loader(8), ckpt_path="last")
    # a crash before the first step writes nothing
    with pytest.raises(RuntimeError, match="boom"):
        trainer(tmp_path, callbacks=[RaiseAt(0)], max_steps=6).fit(tiny_task(), loader(), loader(8))
    assert not (folder / "on_exception.ckpt").exists()
    # a crash at step 3 (last regular save: step 2) saves the full state of step 3
    with pytest.raises(RuntimeError, match="boom"):
        trainer(tmp_path, callbacks=[RaiseAt(3)], max_steps=6).fit(tiny_task(), loader(), loader(8))
    exc = load(folder / "on_exception.ckpt")
    assert exc["global_step"] == 3 and exc["optimizer_states"] and exc["loops"]
    assert any(k.startswith("ema.") for k in exc["state_dict"])
    assert resolve_last(str(folder)) == str(folder / "on_exception.ckpt")
    # a crashed validate writes nothing and cannot outrank last.ckpt
    before = (folder / "on_exception.ckpt").stat().st_mtime_ns
    with pytest.raises(RuntimeError, match="boom"):
        t = trainer(tmp_path, callbacks=[RaiseInValidation()])
        t.validate(tiny_task(), loader(8), ckpt_path="last")
    assert (folder / "on_exception.ckpt").stat().st_mtime_ns == before
    # resuming finishes the run and removes the exception checkpoint
    t = trainer(tmp_path, max_steps=6)
    t.fit(tiny_task(), loader(), loader(8), ckpt_path="last")
    assert Path(t.ckpt_path).name == "on_exception.ckpt"
    assert load(folder / "last.ckpt")["global_step"] == 6
    assert not (folder / "on_exception.ckpt").exists()


class RaiseInValidation(L.Callback):
    def on_validation_batch_start(self, *args):
        raise RuntimeError("boom")


class SigtermAt(L.Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            trainer._signal_connector.received_sigterm = True  # what the SIGTERM handler sets


def test_sigterm_saves_and_exits_nonzero(tmp_path):
    with pytest.raises(SystemExit) as info:
        trainer(tmp_path, callbacks=[SigtermAt(3)], max_steps=8).fit(tiny_task(), loader(), loader(8))
    assert info.value.code == 143
    assert load(tmp_path / "ckpt" / "on_exception.ckpt")["global_step"] == 3


# ---------------------------------------------------------------- 7: when checkpoints are written, EMA


class LastStepAt(L.Callback):
    """Records the step stored in last.ckpt when a batch ends (before the checkpoint callback, which
    Lightning always runs last)."""

    def __init__(self, folder):
        self.folder, self.seen = folder, {}

    def on_train_batch_end(self, trainer, *args):
        path = self.folder / "last.ckpt"
        self.seen[trainer.global_step] = load(path)["global_step"] if path.exists() else None


def test_first_epoch_step_checkpoints_with_a_monitor_and_the_final_step(tmp_path):
    folder = tmp_path / "ckpt"
    ckpt = ResumableCheckpoint(
        dirpath=folder, save_last=True, every_n_train_steps=2, monitor="val/top1", mode="max"
    )
    spy = LastStepAt(folder)
    # 8 batches per epoch, validation only at its end: steps 2, 4 (first epoch) must be saved
    trainer(tmp_path, callbacks=[spy], ckpt=ckpt, max_steps=5).fit(tiny_task(), loader(), loader(8))
    assert spy.seen[3] == 2 and spy.seen[5] == 4
    assert load(folder / "last.ckpt")["global_step"] == 5  # the final step, not a multiple of 2


def test_final_step_saved_without_monitor(tmp_path):
    trainer(tmp_path, max_steps=5).fit(tiny_task(), loader(), loader(8))
    assert load(tmp_path / "ckpt" / "last.ckpt")["global_step"] == 5


def test_ema_in_a_checkpoint_matches_its_step(tmp_path):
    ckpt = ResumableCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1)
    trainer(tmp_path, ckpt=ckpt, max_steps=3).fit(tiny_task(ema_decay=0.5), loader(), loader(8))
    states = [load(tmp_path / "ckpt" / f"epoch=000-step={s}.ckpt")["state_dict"] for s in (1, 2, 3)]
    for prev, cur in zip(states, states[1:]):
        for key, value in cur.items():
            if key.startswith("ema.module.") and value.is_floating_point() and "running" not in key:
                model_w = cur["model." + key[len("ema.module.") :]]
                expect = torch.lerp(prev[key], model_w, 0.5)
                torch.testing.assert_close(value, expect, rtol=0, atol=1e-6, msg=key)


# ---------------------------------------------------------------------------- 4: non-finite loss/weights


def test_nonfinite_loss_stops_the_run_naming_the_step(tmp_path):
    with pytest.raises(NonFiniteError, match=r"non-finite training loss .* global step 3"):
        trainer(tmp_path, max_steps=6).fit(tiny_task(), loader(bad_batches=(3,)), loader(8))
    for name in os.listdir(tmp_path / "ckpt"):
        sd = load(tmp_path / "ckpt" / name)["state_dict"]
        assert all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point()), name


def test_nonfinite_loss_skip_policy_and_its_limit(tmp_path):
    task = tiny_task(nonfinite_loss="skip", max_consecutive_skips=2)
    with pytest.warns(UserWarning, match="skipping a batch"):
        trainer(tmp_path, max_steps=6).fit(task, loader(bad_batches=(1, 2)), loader(8))
    last = load(tmp_path / "ckpt" / "last.ckpt")
    assert last["global_step"] == 6
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())
    with pytest.raises(NonFiniteError, match="3 consecutive batches"):
        task = tiny_task(nonfinite_loss="skip", max_consecutive_skips=2)
        trainer(tmp_path / "b", max_steps=6).fit(task, loader(bad_batches=(1, 2, 3)), loader(8))
    with pytest.raises(ValueError, match="nonfinite_loss"):
        tiny_task(nonfinite_loss="ignore")


class PoisonWeights(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, *args):
        if trainer.global_step == 3:
            with torch.no_grad():  # the EMA copy: the loss stays finite, only the save can catch it
                next(pl_module.ema.parameters()).fill_(float("nan"))


def test_checkpoint_with_nonfinite_weights_is_refused(tmp_path):
    # weights poisoned after step 3: the save of step 4 must refuse, naming the tensor
    with pytest.raises(NonFiniteError, match=r"refusing to save.*global step 4: non-finite values in ema\."):
        trainer(tmp_path, callbacks=[PoisonWeights()], max_steps=6).fit(tiny_task(), loader(), loader(8))
    assert load(tmp_path / "ckpt" / "last.ckpt")["global_step"] == 2
    assert not (tmp_path / "ckpt" / "on_exception.ckpt").exists()


# -------------------------------------------------------------------------------- 9: labels out of range


def test_out_of_range_labels_are_counted_corrupt_rows(tmp_path):
    labels = torch.tensor([0, 1, 2, 7] * 8)  # 7 >= num_classes=3
    task = tiny_task()
    t = trainer(tmp_path, max_steps=2)
    t.fit(task, loader(labels=labels), loader(8, labels=labels[:8]))
    assert probe_checkpoint(str(tmp_path / "ckpt" / "last.ckpt")) == 2
    t.validate(task, loader(8, labels=labels[:8]))
    assert t.callback_metrics["val/corrupt"] == 2 and t.callback_metrics["val/samples"] == 6


# ---------------------------------------------------------------------------------------- 3, 5: bad data


def write_tar(path: Path, n: int, truncate: bool = False):
    from PIL import Image

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(n):
            img = io.BytesIO()
            Image.new("L", (8, 8), i).save(img, format="PNG")
            for ext, data in (("png", img.getvalue()), ("cls", b"1")):
                info = tarfile.TarInfo(f"s{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    path.write_bytes(data[:100] if truncate else data)


def small_dm(spec, **kw):
    from gspn_lightning.data import ImageWebDataModule

    args = dict(
        train_shards=spec,
        image_size=8,
        in_chans=1,
        batch_size=2,
        num_workers=0,
        epoch_samples=8,
        mean=(0.5,),
        std=(0.5,),
        randaugment=None,
        random_erasing=0.0,
        crop_scale=(0.5, 1.0),
        shuffle_buffer=4,
    )
    args.update(kw)
    return ImageWebDataModule(**args)


def test_unreadable_training_shards_fail_fast_naming_them(tmp_path):
    from gspn_lightning.data.datamodule import ShardReadError

    for i in range(3):
        write_tar(tmp_path / f"train-{i}.tar", 4, truncate=True)
    dm = small_dm(str(tmp_path / "train-{0..2}.tar"), max_shard_failures=8)
    start = time.monotonic()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ShardReadError, match=r"8 training shards in a row.*train-\d\.tar"):
            next(iter(dm.train_dataloader()))
    assert time.monotonic() - start < 30
    # one good shard among bad ones: training reads it
    write_tar(tmp_path / "train-1.tar", 4)
    dm = small_dm(str(tmp_path / "train-{0..2}.tar"), max_shard_failures=100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (2, 1, 8, 8) and (labels == 1).all()


def test_transform_failing_on_every_sample_is_an_error(tmp_path, monkeypatch):
    from gspn_lightning.data import images as dmod

    write_tar(tmp_path / "train-0.tar", 40)
    dm = small_dm(str(tmp_path / "train-0.tar"), max_sample_failures=5)
    real = dmod.build_train_transform

    def broken(*args, **kwargs):
        transform = real(*args, **kwargs)

        def apply(img):
            transform(img)
            raise ValueError("std evaluated to zero")

        return apply

    monkeypatch.setattr(dmod, "build_train_transform", broken)
    with pytest.raises(
        RuntimeError,
        match=r"5 samples in a row could not be decoded.*transform failed.*std evaluated to zero",
    ):
        for _ in dm.train_dataloader():  # 4 batches of 2: the 5th failure is in the third
            pass


# ------------------------------------------------------------------------------------- 9: bad configs


@pytest.mark.parametrize(
    "override, key",
    [
        ({"crop_scale": (1.0, 0.08)}, "crop_scale"),
        ({"std": (0.0,)}, "std"),
        ({"hflip": 1.5}, "hflip"),
        ({"batch_size": 0}, "batch_size"),
        ({"interpolation": "bicubik"}, "interpolation"),
        ({"randaugment": "rand-m9-x3"}, "randaugment"),
    ],
)
def test_bad_datamodule_args_name_the_key(override, key):
    with pytest.raises(ValueError, match=key):
        small_dm("unused-{0..1}.tar", **override)


def test_bad_task_args_name_the_key():
    with pytest.raises(ValueError, match=r"optim\.ema_decay"):
        tiny_task(ema_decay=1.5)
    with pytest.raises(TypeError, match="unknown optim setting.*'base_lr'"):
        tiny_task(optim={"base_lr": 1e-3})
    with pytest.raises(TypeError, match="model_kwargs.*embed_dimm"):
        tiny_task(model_kwargs={"embed_dimm": 8})
    with pytest.raises(ValueError, match=r"model\.init_args\.model: unknown model 'gspn_x'"):
        tiny_task(model="gspn_x")
    with pytest.raises(ValueError, match="max_consecutive_skips"):
        tiny_task(max_consecutive_skips=0)


def test_cli_rejects_unknown_trainer_key_before_any_work(monkeypatch, capsys):
    from gspn_lightning.cli.lightning import main

    monkeypatch.setattr(sys, "argv", ["cli.py"])
    config = REPO / "configs" / "classification" / "debug_mnist.yaml"
    with pytest.raises(SystemExit) as info:
        main(args=["--config", str(config), "--trainer.max_stepz=3"], run=False)
    assert info.value.code != 0
    assert "max_stepz" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"data\.init_args\.crop_scale must be \(low, high\)"):
        main(args=["--config", str(config), "--data.init_args.crop_scale=[0.9, 0.1]"], run=False)


# ---------------------------------------------------- 2 and 7: end to end through cli.py (subprocesses)


def one_sample_val_set(out: Path) -> Path:
    from PIL import Image

    from gspn_lightning.data.write_shards import write_shards

    buf = io.BytesIO()
    Image.new("L", (28, 28), 128).save(buf, format="PNG")
    write_shards([{"__key__": "only", "png": buf.getvalue(), "cls": 3}], out, progress=False)
    return out


@pytest.mark.slow
def test_ddp_rank_without_validation_samples_does_not_deadlock(mnist_shards, tmp_path):
    """2 ranks, 1 validation sample: rank 1 has no batch at all (this hung for 13+ minutes)."""
    val = one_sample_val_set(tmp_path / "val1")
    root = tmp_path / "ddp"
    run_cli(
        "fit",
        "--config",
        DEBUG,
        f"--data.init_args.train_shards={mnist_shards / 'train'}",
        f"--data.init_args.val_shards={val}",
        f"--trainer.default_root_dir={root}",
        "--trainer.strategy=ddp",
        "--trainer.devices=2",
        "--trainer.max_steps=2",
        "--data.init_args.epoch_samples=128",
        "--data.init_args.num_workers=1",
        cwd=tmp_path,
        timeout=300,
    )
    metrics = last_metrics(root)
    assert metrics["val/samples"] == 1 and 0.0 <= metrics["val/top1"] <= 1.0
    assert load(root / "checkpoints" / "last.ckpt")["global_step"] == 2


@pytest.mark.slow
def test_sigterm_through_cli_saves_and_exits_143(mnist_shards, tmp_path):
    import signal
    import subprocess

    root = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "cli.py"), "fit", "--config", str(DEBUG), *data_args(mnist_shards)]
    cmd += [f"--trainer.default_root_dir={root}", "--trainer.max_epochs=100", "--trainer.max_steps=400"]
    cmd += ["--checkpoint.every_n_train_steps=3", "--data.init_args.num_workers=0"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last = root / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 240
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # a few more steps
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out[-3000:]
    best = resolve_last(str(root / "checkpoints"))
    assert load(best)["global_step"] >= 3


# ------------------------------------------------------------- resume is bit-identical to no interruption


class StopAt(L.Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            trainer.should_stop = True


def test_resume_mid_epoch_is_bit_identical(tmp_path, num_workers=2):
    """Kill-free version of the trial suite: 3 steps + resume to 7 equals 7 steps straight (the data
    stream is seeded per epoch/rank/worker and fast-forwarded past the batches already trained on)."""
    for i in range(3):
        write_tar(tmp_path / f"train-{i}.tar", 24)

    def run(root, stop_at=None, ckpt_path=None):
        L.seed_everything(0)
        dm = small_dm(
            str(tmp_path / "train-{0..2}.tar"),
            image_size=16,
            epoch_samples=16,
            batch_size=4,
            num_workers=num_workers,
            shuffle_buffer=10,
            hflip=0.5,
            random_erasing=0.5,
            seed=5,
        )
        ckpt = ResumableCheckpoint(dirpath=root, save_last=True, every_n_train_steps=3)
        stop = [StopAt(stop_at)] if stop_at else []
        t = trainer(root, ckpt=ckpt, callbacks=stop, max_steps=7, max_epochs=10, limit_val_batches=0)
        t.fit(tiny_task(), datamodule=dm, ckpt_path=ckpt_path)
        return load(root / "last.ckpt")

    straight = run(tmp_path / "a")
    assert run(tmp_path / "b", stop_at=3)["global_step"] == 3  # 4 batches per epoch: mid-epoch
    resumed = run(tmp_path / "b", ckpt_path="last")
    assert straight["global_step"] == resumed["global_step"] == 7
    assert straight["lr_schedulers"] == resumed["lr_schedulers"]
    for key, value in straight["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
