"""The sharp edges a first week of use hits, each fixed: predict without predict shards, the raw/EMA
switch of validate/test/predict, ``gspn stats`` on an ImageFolder tree, every tiny config under 2 ranks,
and no runpy warning from ``python -m`` of the tools."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml

from gspn_lightning.tasks import ClassificationTask, DiffusionTask
from tests.cli_helpers import ONE_THREAD
from tests.test_metrics import weights  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("torch_one_thread")


# -- predict without predict_shards -------------------------------------------------------------------


def test_predict_without_predict_shards_is_an_error_at_start(tmp_path, monkeypatch):
    """Lightning would predict over nothing and exit 0; the CLI stops before building anything."""
    from gspn_lightning.cli.lightning import main

    monkeypatch.setattr(sys, "argv", ["gspn"])
    args = ["predict", "--config", str(ROOT / "configs/classification/debug_mnist.yaml"),
            f"--trainer.default_root_dir={tmp_path}", "--data.init_args.predict_shards=null"]  # fmt: skip
    with pytest.raises(ValueError, match=r"data\.init_args\.predict_shards"):
        main(args=args)
    assert not (tmp_path / "predictions").exists()


@pytest.mark.parametrize("config", ["demo_mnist.yaml", "debug_mnist.yaml"])
def test_demo_configs_ship_predict_shards(config):
    """The demo's configs predict the held-out digits that ``gspn write-demo-mnist`` writes (and the
    demo script runs predict)."""
    data = yaml.safe_load((ROOT / "configs/classification" / config).read_text())["data"]["init_args"]
    assert data["predict_shards"] == data["val_shards"] == "data/demo_mnist/val"
    assert "gspn_lightning.cli predict --config configs/classification/demo_mnist.yaml" in (
        ROOT / "scripts/demo.sh"
    ).read_text()


# -- eval_weights: raw | ema --------------------------------------------------------------------------


def _classifier(**kw) -> ClassificationTask:
    return ClassificationTask(
        model="gspn_t", model_kwargs={"embed_dim": 8, "depths": [1, 1, 1, 1], "mixer": {"d_state": 2}},
        num_classes=3, in_chans=1, batch_size=4, mixup_alpha=0.0, cutmix_alpha=0.0,
        optim={"lr": 1e-3, "base_batch_size": None, "schedule": "constant", "warmup_epochs": 0.0, "ema_decay": 0.9},
        **kw,
    )  # fmt: skip


def _dit(**kw) -> DiffusionTask:
    return DiffusionTask(
        model="gspn_dit_s_2", model_kwargs={"hidden_size": 16, "depth": 2, "mixer": {"backend": "reference"}},
        num_classes=3, in_chans=1, image_size=4, optim={"lr": 1e-3, "ema_decay": 0.5}, **kw,
    )  # fmt: skip


def _loader(shape, n=8, classes=3, batch=4):
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(shape, generator=g), int(i % classes)) for i in range(n)]
    return torch.utils.data.DataLoader(data, batch_size=batch)


def _trainer(root) -> L.Trainer:
    return L.Trainer(default_root_dir=root, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False)  # fmt: skip


def _make_ema_differ(task) -> None:
    with torch.no_grad():
        for p in task.ema.module.parameters():
            p.mul_(0.5).add_(0.01)


EXPECTED = {  # eval_weights -> (prefixes validated, weights that predict / sample)
    None: ({"val", "val_ema"}, "ema"),
    "raw": ({"val"}, "raw"),
    "ema": ({"val_ema"}, "ema"),
}


@pytest.mark.parametrize("eval_weights", [None, "raw", "ema"])
def test_classification_eval_weights_switch(eval_weights, tmp_path):
    task = _classifier(eval_weights=eval_weights)
    _make_ema_differ(task)
    trainer = _trainer(tmp_path)
    (results,) = trainer.validate(task, _loader((1, 16, 16)))
    prefixes, predicting = EXPECTED[eval_weights]
    assert {k.split("/")[0] for k in results if k.endswith("/top1")} == prefixes
    assert {k.split("/")[0] for k in results if k.endswith("/loss")} == {min(prefixes, key=len)}
    images = torch.randn(4, 1, 16, 16)
    net = task.ema.module if predicting == "ema" else task.model
    (batches,) = [trainer.predict(task, torch.utils.data.DataLoader([(x, 0) for x in images], batch_size=4))]
    expected = net.eval()(images).float().softmax(-1).topk(3, dim=-1)
    torch.testing.assert_close(batches[0]["topk_prob"], expected.values)
    other = task.model if predicting == "ema" else task.ema.module
    assert not torch.allclose(other(images).float().softmax(-1).topk(3, dim=-1).values, expected.values)


@pytest.mark.parametrize("eval_weights", [None, "raw", "ema"])
def test_dit_eval_weights_switch(eval_weights, tmp_path):
    task = _dit(eval_weights=eval_weights)
    _make_ema_differ(task)
    (results,) = _trainer(tmp_path).validate(task, _loader((1, 4, 4)))
    prefixes, sampling = EXPECTED[eval_weights]
    assert {k.split("/")[0] for k in results if k.endswith("/loss")} == prefixes
    assert task.sampling_net() is (task.ema.module if sampling == "ema" else task.model)
    assert task.sampling_protocol()["weights"] == sampling


def test_eval_weights_are_checked_and_reach_the_cli(monkeypatch):
    from gspn_lightning.cli.lightning import main

    with pytest.raises(ValueError, match="eval_weights must be one of"):
        _classifier(eval_weights="best")
    with pytest.raises(ValueError, match="keeps no EMA"):
        DiffusionTask(model="gspn_dit_s_2", model_kwargs={"hidden_size": 16, "depth": 2}, num_classes=3,
                      in_chans=1, image_size=4, optim={"ema_decay": None}, eval_weights="ema")  # fmt: skip
    monkeypatch.setattr(sys, "argv", ["gspn"])
    with torch.device("meta"):
        cli = main(args=["--config", str(ROOT / "configs/dit/tiny.yaml"), "--model.init_args.eval_weights=raw"],
                   run=False)  # fmt: skip
    assert cli.model.eval_weights == "raw" and cli.model.sampling_net() is cli.model.model


# -- gspn stats on an ImageFolder tree ------------------------------------------------------------------


def _image_tree(root: Path) -> int:
    """An ImageFolder tree (class subfolders, one nested deeper, a hidden folder left out): the count."""
    from PIL import Image

    rng = np.random.default_rng(0)
    n = 0
    for sub, k in (("cat", 3), ("dog", 2), ("dog/puppies", 1), (".thumbnails", 2)):
        (root / sub).mkdir(parents=True)
        for i in range(k):
            Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(root / sub / f"{i}.png")
            n += not sub.startswith(".")
    (root / "cat" / "notes.txt").write_text("not an image")
    return n


def test_image_folders_are_read_recursively(tmp_path):
    from gspn_lightning.metrics.inputs import image_batches, list_images

    n = _image_tree(tmp_path / "tree")
    files = list_images(tmp_path / "tree")
    assert [f.relative_to(tmp_path / "tree").as_posix() for f in files] == [
        "cat/0.png", "cat/1.png", "cat/2.png", "dog/0.png", "dog/1.png", "dog/puppies/0.png",
    ]  # fmt: skip
    batches, total = image_batches(tmp_path / "tree", batch_size=4)
    assert total == n == sum(len(b) for b in batches)
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images"):
        list_images(tmp_path / "empty")


@pytest.mark.slow
def test_stats_command_on_an_image_folder_tree(weights, tmp_path, capsys):  # noqa: F811
    from gspn_lightning.cli.stats import main as stats_main
    from gspn_lightning.metrics import Statistics

    n = _image_tree(tmp_path / "tree")
    out = tmp_path / "ref.npz"
    assert stats_main([str(tmp_path / "tree"), str(out), "--weights", str(weights), "--device", "cpu",
                       "--no-progress", "--keep-features"]) == 0  # fmt: skip
    assert f"wrote statistics of {n} images" in capsys.readouterr().out
    assert Statistics.load(out).num_images == n


# -- python -m of the tools: runs them, once, without runpy's warning --------------------------------------


def test_cli_package_imports_none_of_its_tool_modules():
    """runpy warns ("found in sys.modules after import of package") when ``python -m pkg.mod`` runs a
    module its package already imported; the cli package imports none of its tool modules."""
    code = (
        "import sys, gspn_lightning.cli as c; "
        "print(sorted(m for m in sys.modules if m.startswith('gspn_lightning.cli.')))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def test_every_tool_module_runs_its_subcommand(tmp_path, capsys, monkeypatch):
    """``python -m gspn_lightning.cli.<module> ARGS`` is ``gspn SUB ARGS`` (it used to run nothing and
    exit 0): each module's ``__main__`` block hands its arguments to :func:`run_module`."""
    from gspn_lightning.cli import COMMANDS, LIGHTNING_COMMANDS, run_module

    monkeypatch.setattr(sys, "argv", ["gspn"])  # (LightningCLI reads it too)
    modules = sorted({module for module, _ in COMMANDS.values()})
    for module in modules:
        source = (ROOT / "gspn_lightning/cli" / f"{module}.py").read_text()
        assert 'if __name__ == "__main__":' in source and "run_module(__spec__.name)" in source, module
        subs = [n for n, (m, _) in COMMANDS.items() if m == module]
        with pytest.raises(SystemExit) as exit_:
            run_module(f"gspn_lightning.cli.{module}", ["--help"] if len(subs) == 1 else [subs[0], "--help"])
        assert exit_.value.code == 0, module
        assert "usage" in capsys.readouterr().out.lower(), module
    assert run_module("gspn_lightning.cli.lightning", ["sample"]) == 2  # not one of fit/validate/test/predict
    assert set(LIGHTNING_COMMANDS) == {n for n, (m, _) in COMMANDS.items() if m == "lightning"}
    _image_tree(tmp_path / "tree")
    assert run_module("gspn_lightning.cli.write_shards", [str(tmp_path / "tree"), str(tmp_path / "out"), "--quiet"]) == 0
    assert "wrote " in capsys.readouterr().out and (tmp_path / "out" / "index.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "module", ["write_shards", "write_captions", "write_demo_mnist", "encode_latents", "distill_export"]
)
def test_python_m_of_the_writers_and_export_warns_nothing(module, tmp_path):
    """The writer and export commands as ``python -m`` of their module, runpy's warnings as errors."""
    r = subprocess.run(
        [sys.executable, "-W", "error::RuntimeWarning", "-m", f"gspn_lightning.cli.{module}", "--help"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
        env=dict(os.environ, PYTHONPATH=str(ROOT), **ONE_THREAD),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "RuntimeWarning" not in r.stderr and r.stdout.startswith("usage: gspn "), r.stdout + r.stderr
    if module == "write_shards":
        _image_tree(tmp_path / "tree")
        r = subprocess.run(
            [sys.executable, "-W", "error::RuntimeWarning", "-m", "gspn_lightning.cli.write_shards",
             str(tmp_path / "tree"), str(tmp_path / "out"), "--quiet"],
            capture_output=True, text=True, cwd=tmp_path, timeout=300,
            env=dict(os.environ, PYTHONPATH=str(ROOT), **ONE_THREAD),
        )  # fmt: skip
        assert r.returncode == 0 and (tmp_path / "out" / "index.json").exists(), r.stdout + r.stderr


# -- every tiny config under 2 ranks ----------------------------------------------------------------------

#: the configs a user runs first: every tiny one and the digits demos
SMALL_CONFIGS = sorted({*ROOT.glob("configs/**/tiny*.yaml"), ROOT / "configs/dit/digits.yaml",
                        ROOT / "configs/classification/demo_mnist.yaml",
                        ROOT / "configs/classification/debug_mnist.yaml"})  # fmt: skip


def schedule_problems(cli, world_size: int) -> list[str]:
    """What stops (or empties) a run of ``cli``'s config under ``world_size`` ranks, from the numbers
    alone: the datamodule's batches per rank against the trainer's validation interval, gradient
    accumulation and checkpoint period."""
    dm, trainer = cli.datamodule, cli.trainer
    problems = []
    if dm.epoch_samples is not None and dm.epoch_samples < world_size * dm.batch_size:
        problems.append(f"epoch_samples {dm.epoch_samples} < one batch of {dm.batch_size} per rank")
    batches = dm.train_batches_per_epoch(world_size)
    interval = trainer.val_check_interval
    if isinstance(interval, int) and trainer.check_val_every_n_epoch is not None and interval > batches:
        # Lightning refuses this at start: the interval counts batches within one epoch
        problems.append(f"val_check_interval {interval} > {batches} training batches per rank and epoch")
    if trainer.accumulate_grad_batches > batches:
        problems.append(f"accumulate_grad_batches {trainer.accumulate_grad_batches} > {batches} batches per epoch")
    every = cli.config["checkpoint"].get("every_n_train_steps") or 0
    if trainer.max_steps > 0 and every > trainer.max_steps:
        problems.append(f"checkpoint.every_n_train_steps {every} > max_steps {trainer.max_steps}")
    return problems


@pytest.mark.parametrize("config", SMALL_CONFIGS, ids=[f"{c.parent.name}/{c.stem}" for c in SMALL_CONFIGS])
def test_small_configs_run_under_one_and_two_ranks(config, tiny_sdxl_dir, monkeypatch):
    from gspn_lightning.cli.lightning import main

    monkeypatch.setattr(sys, "argv", ["gspn"])
    args, device = ["--config", str(config)], torch.device("meta")  # full-size models cost nothing
    if config.parent.name == "sdxl":  # (loads the tiny folder's weights: not on meta)
        args, device = args + [f"--model.init_args.pretrained={tiny_sdxl_dir}"], contextlib.nullcontext()
    with device:
        cli = main(args=args, run=False)
    for world_size in (1, 2):
        assert schedule_problems(cli, world_size) == [], (config.name, world_size)


def test_schedule_problems_sees_the_old_dit_tiny_config(monkeypatch):
    """The check itself: configs/dit/tiny.yaml as it was (validation every 2 batches within an epoch of 8
    samples in batches of 4) fails under 2 ranks, one batch each."""
    from gspn_lightning.cli.lightning import main

    monkeypatch.setattr(sys, "argv", ["gspn"])
    with torch.device("meta"):
        cli = main(args=["--config", str(ROOT / "configs/dit/tiny.yaml"), "--trainer.check_val_every_n_epoch=1"],
                   run=False)  # fmt: skip
    assert schedule_problems(cli, 1) == []
    assert schedule_problems(cli, 2) == ["val_check_interval 2 > 1 training batches per rank and epoch"]
