"""No DDP deadlock when a rank gets no validation sample, for every task: 2 CPU ranks (gloo), a
1-sample validation split, so rank 1 has no validation batch at all. Evaluation runs no collective
that such a rank skips (TrainingTask.on_validation_start switches off DDP's pending buffer broadcast;
the SD-XL task's text encoders hold buffers and deadlocked here before). Each run is in its own
process group with a timeout, so a deadlock fails the test instead of hanging it.
(Classification: tests/test_fault_tolerance.py::test_ddp_rank_without_validation_samples_does_not_deadlock.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gspn_lightning.data.write_shards import write_shards
from tests.cli_helpers import ONE_THREAD, last_scalars

ROOT = Path(__file__).resolve().parents[1]


def run_two_ranks(args: list[str], timeout: int = 420) -> str:
    """``cli.py fit ARGS --trainer.strategy=ddp --trainer.devices=2``; the whole process group (both
    ranks) is killed when it outlives ``timeout``, which fails the test."""
    cmd = [sys.executable, str(ROOT / "cli.py"), "fit", *map(str, args), "--trainer.strategy=ddp",
           "--trainer.devices=2", "--trainer.accelerator=cpu"]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env={**os.environ, **ONE_THREAD, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"2-rank fit still running after {timeout} s (deadlock?):\n{out[-4000:]}")
    assert proc.returncode == 0, out[-6000:]
    return out


def metrics(root: Path) -> dict:
    """The last value of every scalar logged (TensorBoard) by the runs under ``root``."""
    return last_scalars(root, merge_runs=True)


@pytest.mark.slow
def test_distillation_two_ranks_one_validation_sample(tiny_sdxl_dir, tmp_path):
    from tests.test_distill import _samples

    write_shards(_samples(4), tmp_path / "train", maxcount=2, progress=False, labelled=False)
    write_shards(_samples(1, seed=1), tmp_path / "val", maxcount=1, progress=False, labelled=False)
    run = tmp_path / "run"
    run_two_ranks([
        "--config", "configs/sdxl/tiny.yaml", f"--model.init_args.pretrained={tiny_sdxl_dir}",
        f"--data.init_args.train_shards={tmp_path / 'train'}", f"--data.init_args.val_shards={tmp_path / 'val'}",
        f"--trainer.default_root_dir={run}", "--trainer.max_steps=2", "--trainer.val_check_interval=1",
        "--trainer.num_sanity_val_steps=1", "--data.init_args.batch_size=1", "--data.init_args.epoch_samples=4",
        "--model.init_args.text_encoders=true",
    ])  # fmt: skip
    m = metrics(run)
    assert m["val/samples"] == 1 and np.isfinite(m["val/loss"])
    ckpt = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2


@pytest.mark.slow
def test_dit_two_ranks_one_validation_sample(tmp_path):
    import io

    from PIL import Image

    from gspn_lightning.data.latents import encode_shards
    from gspn_lightning.testing import tiny_vae

    rng = np.random.default_rng(0)

    def images(n, offset):
        for i in range(n):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buffer, format="PNG")
            yield {"__key__": f"k{offset + i}", "png": buffer.getvalue(), "cls": i % 3}

    tiny_vae().save_pretrained(tmp_path / "vae")
    for split, n in (("train", 8), ("val", 1)):
        write_shards(
            images(n, 100 * n), tmp_path / "img" / split, maxcount=4, progress=False, classes=["a", "b", "c"]
        )
        encode_shards(
            str(tmp_path / "img" / split), tmp_path / "lat" / split, str(tmp_path / "vae"), image_size=16,
            batch_size=4, num_workers=0, devices=1, accelerator="cpu", progress=False,
        )  # fmt: skip
    run = tmp_path / "run"
    run_two_ranks([
        "--config", "configs/dit/tiny.yaml", f"--data.init_args.train_shards={tmp_path / 'lat/train'}",
        f"--data.init_args.val_shards={tmp_path / 'lat/val'}", f"--trainer.default_root_dir={run}",
        "--trainer.max_steps=2", "--trainer.val_check_interval=1", "--trainer.num_sanity_val_steps=1",
        "--data.init_args.batch_size=2", "--trainer.callbacks=[]",
    ])  # fmt: skip
    m = metrics(run)
    assert m["val/samples"] == 1 and np.isfinite(m["val/loss"])
    ckpt = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2
