"""The classification path end to end: every config parses and instantiates, and cli.py fits,
resumes, validates and runs two-process DDP on the MNIST demo shards (subprocesses, CPU, gloo)."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.cli_helpers import ONE_THREAD, last_scalars, run_cli_chain

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs" / "classification").glob("*.yaml"))
DEBUG = REPO / "configs" / "classification" / "debug_mnist.yaml"
# Parameter counts of the paper's reference configuration, in units of 10^6.
REFERENCE_PARAMS = {"gspn_t": 31.5, "gspn_s": 50.8, "gspn_b": 93.1}


def run_cli(*args, cwd, timeout=900, env_extra=None):
    env = dict(os.environ, PYTHONUNBUFFERED="1", **ONE_THREAD, **(env_extra or {}))
    r = subprocess.run(
        [sys.executable, str(REPO / "cli.py"), *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert r.returncode == 0, (
        f"cli.py {' '.join(map(str, args))} failed:\n{r.stdout[-4000:]}\n{r.stderr[-8000:]}"
    )
    return r.stdout + r.stderr


def data_args(shards):
    return [
        f"--data.init_args.train_shards={shards / 'train'}",
        f"--data.init_args.val_shards={shards / 'val'}",
        f"--data.init_args.test_shards={shards / 'val'}",
    ]


def last_metrics(root: Path, version: int | None = None) -> dict:
    """The last value of every scalar the newest run under ``root`` (or run ``version``) logged to
    TensorBoard, the default logger."""
    return last_scalars(root, version)


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_config_parses_and_instantiates(config, monkeypatch):
    from gspn_lightning.cli.lightning import main

    monkeypatch.setattr(sys, "argv", ["cli.py"])
    with torch.device("meta"):  # full-size models cost nothing here
        cli = main(args=["--config", str(config)], run=False)
    task, dm = cli.model, cli.datamodule
    assert type(task).__name__ == "ClassificationTask" and type(dm).__name__ == "ImageWebDataModule"
    n = sum(p.numel() for p in task.model.parameters()) / 1e6
    name = task.hparams.model
    if name in REFERENCE_PARAMS and not task.hparams.model_kwargs.get("embed_dim"):
        assert abs(n - REFERENCE_PARAMS[name]) / REFERENCE_PARAMS[name] < 0.03, (name, n)
    if task.ema is not None:
        assert sum(p.numel() for p in task.ema.parameters()) == sum(
            p.numel() for p in task.model.parameters()
        )
    cb = {type(c).__name__: c for c in cli.trainer.callbacks}
    ckpt = cb["ResumableCheckpoint"]
    assert ckpt.save_last and ckpt.dirpath.endswith("checkpoints") and ckpt.save_on_exception
    assert "OnExceptionCheckpoint" not in cb  # it would outrank last.ckpt on resume (issue 7)


@pytest.mark.slow
def test_fit_resume_validate(mnist_shards, tmp_path):
    root = tmp_path / "run"
    common = ["--config", DEBUG, *data_args(mnist_shards), f"--trainer.default_root_dir={root}"]
    common += ["--trainer.max_epochs=100"]  # max_steps decides where each run stops
    run_cli("fit", *common, "--trainer.max_steps=3", cwd=tmp_path)
    last = root / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 3
    assert any(k.startswith("ema.module.") for k in ckpt["state_dict"])
    assert (root / "lightning_logs" / "version_0" / "config.yaml").exists()  # resolved config saved

    # the resumed fit in a new process, then validate, test and predict after it in that same process
    out, val_out, _, _ = run_cli_chain(
        ["fit", *common, "--trainer.max_steps=6", "--ckpt_path=last"],
        ["validate", *common, "--ckpt_path=last"],
        ["test", *common, "--ckpt_path=last"],
        ["predict", *common, f"--data.init_args.predict_shards={mnist_shards / 'val'}", "--ckpt_path=last"],
        cwd=tmp_path,
    )
    assert "Restoring states from the checkpoint" in out or "Restored all states" in out
    ckpt2 = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt2["global_step"] == 6  # continued from step 3, not restarted
    assert ckpt2["lr_schedulers"][0]["last_epoch"] == 6
    state = ckpt2["optimizer_states"][0]["state"]
    assert all(int(s["step"]) == 6 for s in state.values())
    ema = {k[len("ema.module.") :]: v for k, v in ckpt2["state_dict"].items() if k.startswith("ema.module.")}
    model = {k[len("model.") :]: v for k, v in ckpt2["state_dict"].items() if k.startswith("model.")}
    assert ema.keys() == model.keys()
    assert any(not torch.equal(ema[k], model[k]) for k in model)  # the EMA is its own average

    top1 = re.search(r"val/top1\s*│?\s*([0-9.]+)", val_out)
    assert top1 and 0.0 <= float(top1.group(1)) <= 1.0, val_out[-3000:]
    metrics = last_metrics(root, version=2)  # runs 0 and 1 were the two fits
    assert metrics["val/samples"] == 1000  # every validation sample exactly once
    assert "val_ema/top1" in metrics and "val/top5" in metrics

    metrics = last_metrics(root, version=3)
    assert metrics["test/samples"] == 1000 and 0.0 <= metrics["test/top1"] <= 1.0
    pred = torch.load(root / "predictions" / "predictions-rank0.pt")
    assert pred["pred"].shape == (1000,) and pred["topk"].shape == (1000, 5)
    # predict uses the EMA weights: its accuracy is the test's EMA top-1 on the same samples
    acc = (pred["pred"] == pred["label"]).float().mean().item()
    assert abs(acc - metrics["test_ema/top1"]) < 1e-6


@pytest.mark.slow
def test_ddp_two_processes(mnist_shards, tmp_path):
    root = tmp_path / "ddp"
    run_cli(
        "fit",
        "--config",
        DEBUG,
        *data_args(mnist_shards),
        f"--trainer.default_root_dir={root}",
        "--trainer.strategy=ddp",
        "--trainer.devices=2",
        "--trainer.max_epochs=1",
        "--data.init_args.num_workers=2",
        cwd=tmp_path,
    )
    metrics = last_metrics(root)
    # 2 ranks x 2 workers over 2 val shards: still every sample exactly once
    assert metrics["val/samples"] == 1000
    assert math.isfinite(metrics["train/loss_epoch"])
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 256 // (32 * 2)  # epoch_samples over the global batch
