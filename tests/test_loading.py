"""Loading runs no code, checkpoints by path, provenance (issue 23, parts 4, 5, 10 and 11).

- every checkpoint is loaded with ``weights_only=True``: a crafted pickle (a harmless payload that
  would create a file) placed beside a good ``last.ckpt`` is skipped with a warning naming it by the
  ``last`` selection (fit and validate go on with ``last.ckpt``), refused by ``gspn sample`` and by
  ``load_from_checkpoint``, and never executed;
- ``--ckpt_path FILE`` works for every task; other model arguments than the checkpoint's stop the run
  naming both values; a checkpoint of another task is refused naming the task that wrote it;
- ``gspn sample --out DIR`` refuses a folder drawn with other settings; a distillation checkpoint
  refuses another SD-XL folder; a resume removes the superseded top-k files.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gspn_lightning.tasks import ClassificationTask, DiffusionTask, ResumableCheckpoint
from gspn_lightning.tasks.checkpointing import (
    CheckpointMismatchError,
    UnsafeCheckpointError,
    load_checkpoint_file,
    resolve_last,
)
from tests.cli_helpers import ONE_THREAD
from tests.test_fault_tolerance import fake_ckpt, loader, tiny_task, trainer

REPO = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this runs ``pathlib.Path.touch(marker)``: proof that a load executed the file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def crafted_ckpt(path: Path, marker: Path, step: int = 10_000) -> Path:
    """A file that looks like a full Lightning checkpoint of a later step, with the payload inside."""
    state = {"state_dict": {}, "global_step": step, "optimizer_states": [{}], "lr_schedulers": [{}]}
    state["loops"] = {"x": Payload(marker)}
    torch.save(state, path)
    return path


# ------------------------------------------------------------------------------ weights-only loading


def test_no_unsafe_torch_load_is_left_in_the_tree():
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True)
    needle = "weights_only=" + "False"  # (spelled so that this file does not hold it)
    hits = []
    for name in files.stdout.split():
        path = REPO / name
        if path.suffix in {".py", ".sh", ".md", ".yaml", ".toml", ".cfg", ".txt"} and path.is_file():
            hits += [
                f"{name}:{i}" for i, line in enumerate(path.read_text().splitlines(), 1) if needle in line
            ]
    assert not hits, hits


def test_a_crafted_checkpoint_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "payload-ran"
    evil = crafted_ckpt(tmp_path / "evil.ckpt", marker)
    with pytest.raises(
        UnsafeCheckpointError, match=r"refusing to load .*evil\.ckpt.*nothing in it was executed"
    ):
        load_checkpoint_file(evil)
    with pytest.raises(UnsafeCheckpointError, match="evil.ckpt"):
        load_checkpoint_file(evil, mmap=True)
    with pytest.raises(UnsafeCheckpointError, match="evil.ckpt"):
        ClassificationTask.load_from_checkpoint(evil)
    assert not marker.exists()
    # the selection behind ckpt_path="last": skipped with a warning naming it, whatever its age
    folder = tmp_path / "ckpt"
    folder.mkdir()
    crafted_ckpt(folder / "epoch=009-step=10000.ckpt", marker)
    os.utime(folder / "epoch=009-step=10000.ckpt", (1, 1))  # older than last.ckpt
    fake_ckpt(folder / "last.ckpt", 4)
    with pytest.warns(UserWarning, match=r"skipping checkpoint .*step=10000\.ckpt.*could run code"):
        assert resolve_last(str(folder)) == str(folder / "last.ckpt")
    os.remove(folder / "last.ckpt")  # nothing else: a clear error naming the file, still nothing run
    with pytest.raises(
        RuntimeError, match=r"no checkpoint .* can be loaded.*step=10000\.ckpt.*UnsafeCheckpointError"
    ):
        resolve_last(str(folder))
    assert not marker.exists()


def test_trainer_fit_and_validate_with_last_skip_a_crafted_file(tmp_path):
    marker = tmp_path / "payload-ran"
    first = trainer(tmp_path, max_epochs=1, limit_train_batches=2)
    first.fit(tiny_task(), loader(), loader(n=8))
    crafted_ckpt(tmp_path / "ckpt" / "epoch=099-step=999.ckpt", marker)
    with pytest.warns(UserWarning, match=r"skipping checkpoint .*step=999\.ckpt"):
        again = trainer(tmp_path, max_epochs=2, limit_train_batches=2)
        again.fit(tiny_task(), loader(), loader(n=8), ckpt_path="last")
    assert again.global_step == 4 and Path(again.ckpt_path).name == "last.ckpt"
    with pytest.warns(UserWarning, match=r"skipping checkpoint .*step=999\.ckpt"):
        trainer(tmp_path).validate(tiny_task(), loader(n=8), ckpt_path="last")
    assert not marker.exists()


def test_sample_refuses_a_crafted_checkpoint(tmp_path):
    from gspn_lightning.cli.sample import main as sample_main

    marker = tmp_path / "payload-ran"
    evil = crafted_ckpt(tmp_path / "crafted.ckpt", marker)
    args = ["--ckpt", str(evil), "--out", str(tmp_path / "s"), "--num-samples", "2", "--device", "cpu"]
    with pytest.raises(UnsafeCheckpointError, match="crafted.ckpt"):
        sample_main(args)
    assert not marker.exists() and not (tmp_path / "s").exists()


# ------------------------------------------------------------------------------ checkpoints by path


def _saved_task_ckpt(tmp_path, task) -> Path:
    t = trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=0)
    if isinstance(task, ClassificationTask):
        t.fit(task, loader(n=4))
    else:
        t.strategy.connect(task)
        t.save_checkpoint(tmp_path / "x.ckpt")
        return tmp_path / "x.ckpt"
    return Path(t.checkpoint_callback.dirpath) / "last.ckpt"


def test_other_model_arguments_stop_naming_both_values(tmp_path):
    path = _saved_task_ckpt(tmp_path, tiny_task())
    wider = tiny_task(
        model_kwargs=dict(embed_dim=16, depths=[1, 1, 1, 1], mixer={"d_state": 2}, drop_path_rate=0.0)
    )
    with pytest.raises(CheckpointMismatchError, match=r"model_kwargs\.embed_dim: checkpoint 8, this run 16"):
        trainer(tmp_path).validate(wider, loader(n=8), ckpt_path=str(path))
    with pytest.raises(CheckpointMismatchError, match=r"num_classes: checkpoint 3, this run 5"):
        trainer(tmp_path).validate(tiny_task(num_classes=5), loader(n=8), ckpt_path=str(path))
    with pytest.raises(CheckpointMismatchError, match=r"model: checkpoint 'gspn_t', this run 'gspn_s'"):
        trainer(tmp_path).validate(tiny_task(model="gspn_s"), loader(n=8), ckpt_path=str(path))
    # the same arguments (and other non-model ones: the loss, the policy) load
    trainer(tmp_path).validate(tiny_task(label_smoothing=0.0), loader(n=8), ckpt_path=str(path))


def test_a_checkpoint_of_another_task_is_refused_naming_it(tmp_path):
    path = _saved_task_ckpt(tmp_path, tiny_task())
    assert torch.load(path, weights_only=True)["gspn_task"].endswith("ClassificationTask")
    with pytest.raises(CheckpointMismatchError, match=r"written by ClassificationTask.*not by DiffusionTask"):
        DiffusionTask.load_from_checkpoint(path)
    dit = DiffusionTask(
        model="gspn_dit_s_2", model_kwargs={"hidden_size": 16, "depth": 2, "mixer": {"backend": "reference"}},
        num_classes=3, in_chans=1, image_size=4,
    )  # fmt: skip
    with pytest.raises(CheckpointMismatchError, match=r"written by ClassificationTask"):
        trainer(tmp_path).validate(dit, loader(n=4), ckpt_path=str(path))


# ------------------------------------------------------------------------------ provenance


def test_sample_out_folder_refuses_other_settings(tmp_path, monkeypatch):
    from gspn_lightning.cli import sample as sample_cmd
    from tests.test_dit_task import _ExactX0

    image = torch.linspace(-1, 1, 16).view(1, 1, 4, 4)
    hp = {"image_size": 4, "num_classes": 2, "prediction": "x0", "clip_sample": None, "vae": None}
    step = {"n": 7}
    monkeypatch.setattr(sample_cmd, "load_sampler_model", lambda *a, **k: (_ExactX0(image), hp, step["n"]))
    out = tmp_path / "s"
    base = ["--out", str(out), "--sampler", "ddim", "--steps", "5", "--no-progress", "--device", "cpu"]
    assert sample_cmd.main(["--ckpt", "a.ckpt", "--num-samples", "3", *base]) == 0
    protocol = json.loads((out / "protocol.json").read_text())
    with pytest.raises(SystemExit, match=r"other settings \(steps: 5 there, 6 now\)"):
        sample_cmd.main(["--ckpt", "a.ckpt", "--num-samples", "3", *base, "--steps", "6"])
    with pytest.raises(SystemExit, match=r"checkpoint: '.*a\.ckpt' there, '.*b\.ckpt' now"):
        sample_cmd.main(["--ckpt", "b.ckpt", "--num-samples", "3", *base])
    step["n"] = 8  # the same file, trained further
    with pytest.raises(SystemExit, match=r"global_step: 7 there, 8 now"):
        sample_cmd.main(["--ckpt", "a.ckpt", "--num-samples", "3", *base])
    assert json.loads((out / "protocol.json").read_text()) == protocol  # nothing relabelled
    step["n"] = 7  # the same settings: more samples are drawn into the folder
    assert sample_cmd.main(["--ckpt", "a.ckpt", "--num-samples", "4", *base]) == 0
    assert np.load(out / "samples.npz")["arr_0"].shape[0] == 4
    # images without a record of what drew them are not packed under new settings either
    (out / "drawing.json").unlink()
    with pytest.raises(SystemExit, match="does not say what drew them"):
        sample_cmd.main(["--ckpt", "a.ckpt", "--num-samples", "4", *base])


def test_resume_removes_superseded_top_k_files(tmp_path):
    folder = tmp_path / "ckpt"

    def run(max_steps, ckpt_path=None):
        cb = ResumableCheckpoint(dirpath=folder, save_last=True, every_n_train_steps=2, save_top_k=-1)
        t = trainer(tmp_path, ckpt=cb, max_steps=max_steps, max_epochs=3)
        t.fit(tiny_task(), loader(), ckpt_path=ckpt_path)
        return t

    run(6)
    names = lambda: sorted(p.name for p in folder.glob("*.ckpt"))  # noqa: E731
    assert names() == ["epoch=000-step=2.ckpt", "epoch=000-step=4.ckpt", "epoch=000-step=6.ckpt", "last.ckpt"]
    run(4, ckpt_path=str(folder / "epoch=000-step=2.ckpt"))  # resumed from the step-2 file
    # step 6 and its last.ckpt belonged to the abandoned continuation; step 4 and last.ckpt are this
    # run's (not -v1 files beside the old ones, which a later ckpt_path=last would pass over)
    assert names() == ["epoch=000-step=2.ckpt", "epoch=000-step=4.ckpt", "last.ckpt"]
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 4


def test_distillation_refuses_another_sdxl_folder(tiny_sdxl_dir, tmp_path):
    from gspn_lightning.testing import make_tiny_sdxl
    from tests.test_distill import _task

    task = _task(tiny_sdxl_dir)
    ckpt = {"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}
    task.on_save_checkpoint(ckpt)
    moved = shutil.copytree(tiny_sdxl_dir, tmp_path / "moved")  # the same weights elsewhere: accepted
    _task(moved).on_load_checkpoint(ckpt)
    other = make_tiny_sdxl(tmp_path / "other", seed=1)  # the same shapes, other weights
    with pytest.raises(CheckpointMismatchError) as info:
        _task(other).on_load_checkpoint(ckpt)
    assert str(Path(tiny_sdxl_dir).resolve()) in str(info.value) and str(other) in str(info.value)


# ------------------------------------------------------------------------------ the command line

_CHAIN = """
import json, sys, traceback
sys.path.insert(0, sys.argv[1])
from gspn_lightning.cli import main
for args in json.loads(sys.argv[2]):
    print("=== gspn " + " ".join(args), flush=True)
    try:
        print("=== status", main(args), flush=True)
    except BaseException as exc:
        print("=== error", type(exc).__name__, exc, flush=True)
"""


def _chain(*commands, timeout=900):
    """Each command in turn in one process: its output, ending in ``=== status 0`` or ``=== error ...``."""
    commands = [[str(a) for a in c] for c in commands]
    r = subprocess.run(
        [sys.executable, "-c", _CHAIN, str(REPO), json.dumps(commands)], cwd=REPO,
        env=dict(os.environ, PYTHONUNBUFFERED="1", **ONE_THREAD), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, timeout=timeout,
    )  # fmt: skip
    outs = r.stdout.split("=== gspn ")[1:]
    assert len(outs) == len(commands), r.stdout[-8000:]
    return outs


@pytest.mark.slow
def test_cli_crafted_file_and_checkpoints_by_path_classification(mnist_shards, tmp_path):
    from tests.test_classification import DEBUG, data_args

    root = tmp_path / "run"
    common = ["--config", DEBUG, *data_args(mnist_shards), f"--trainer.default_root_dir={root}",
              "--data.init_args.num_workers=0", "--data.init_args.epoch_samples=64", "--trainer.max_epochs=10"]  # fmt: skip
    (fit,) = _chain(["fit", *common, "--trainer.max_steps=2"])
    assert "=== status 0" in fit, fit[-3000:]
    marker = tmp_path / "payload-ran"
    crafted_ckpt(root / "checkpoints" / "epoch=099-step=999.ckpt", marker)
    last = root / "checkpoints" / "last.ckpt"
    copy = shutil.copy(last, tmp_path / "copied.ckpt")
    wider = "--model.init_args.model_kwargs.embed_dim=32"
    outs = _chain(
        ["fit", *common, "--trainer.max_steps=4", "--ckpt_path=last"],
        ["validate", *common, "--ckpt_path=last"],
        ["validate", *common, f"--ckpt_path={copy}"],
        ["validate", *common, f"--ckpt_path={copy}", wider],
        ["validate", *common, f"--ckpt_path={root / 'checkpoints' / 'epoch=099-step=999.ckpt'}"],
    )
    for out in outs[:3]:
        assert "=== status 0" in out, out[-3000:]
    # (in one process Python shows a warning once: the fit's names the file, both resolve to last.ckpt)
    assert "skipping checkpoint" in outs[0] and "step=999.ckpt" in outs[0]
    for out in outs[:2]:
        assert re.search(r"resolved to \S*last\.ckpt", out), out[-3000:]
    assert torch.load(last, weights_only=True)["global_step"] == 4
    assert "CheckpointMismatchError" in outs[3] and "embed_dim: checkpoint 16, this run 32" in outs[3]
    assert "UnsafeCheckpointError" in outs[4] and "step=999.ckpt" in outs[4]
    assert not marker.exists()


@pytest.mark.slow
def test_cli_checkpoints_by_path_distillation(tiny_sdxl_dir, tmp_path):
    from gspn_lightning.data.write_shards import write_shards
    from gspn_lightning.testing import make_tiny_sdxl
    from tests.test_distill import _samples

    shards = tmp_path / "captions"
    write_shards(_samples(2), shards / "train", maxcount=2, progress=False, labelled=False)
    write_shards(_samples(2), shards / "val", maxcount=1, progress=False, labelled=False)
    root = tmp_path / "run"
    common = [
        "--config", "configs/sdxl/tiny.yaml", f"--data.init_args.train_shards={shards / 'train'}",
        f"--data.init_args.val_shards={shards / 'val'}", "--data.init_args.epoch_samples=4",
        f"--trainer.default_root_dir={root}", "--trainer.val_check_interval=2",
    ]  # fmt: skip
    pretrained = f"--model.init_args.pretrained={tiny_sdxl_dir}"
    other = make_tiny_sdxl(tmp_path / "other-sdxl", seed=1)
    (fit,) = _chain(["fit", *common, pretrained, "--trainer.max_steps=2"])
    assert "=== status 0" in fit, fit[-3000:]
    copy = shutil.copy(root / "checkpoints" / "last.ckpt", tmp_path / "copied.ckpt")
    outs = _chain(
        ["validate", *common, pretrained, f"--ckpt_path={copy}"],
        ["fit", *common, pretrained, "--trainer.max_steps=4", f"--ckpt_path={copy}"],
        ["validate", *common, pretrained, f"--ckpt_path={copy}", "--model.init_args.mixer.d_state=2"],
        [
            "fit",
            *common,
            f"--model.init_args.pretrained={other}",
            "--trainer.max_steps=4",
            "--ckpt_path=last",
        ],
        ["validate", "--config", "configs/classification/debug_mnist.yaml", f"--ckpt_path={copy}"],
    )
    assert "=== status 0" in outs[0] and "=== status 0" in outs[1], outs[0][-3000:] + outs[1][-3000:]
    assert torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    assert "CheckpointMismatchError" in outs[2] and "mixer.d_state: checkpoint 4, this run 2" in outs[2]
    assert "CheckpointMismatchError" in outs[3] and str(other) in outs[3] and "tiny-sdxl" in outs[3]
    assert "written by DistillationTask" in outs[4] and "not by ClassificationTask" in outs[4]


def _dit_task(**model_kwargs) -> DiffusionTask:
    kwargs = {"hidden_size": 16, "depth": 2, "mixer": {"backend": "reference"}, **model_kwargs}
    return DiffusionTask(model="gspn_dit_s_2", model_kwargs=kwargs, num_classes=3, in_chans=1, image_size=16)


def test_a_gspn_dit_checkpoint_from_before_the_block_option_loads_as_compact(tmp_path):
    """Checkpoints written before ``block`` existed record no block and hold the compact block's weights:
    ``load_from_checkpoint`` (gspn sample, export) builds that block, a run that names it resumes, and a
    run of the default block is refused naming the block, before any weight is read."""
    src = _dit_task(block="compact")
    path = _saved_task_ckpt(tmp_path, src)
    ckpt = torch.load(path, weights_only=True)
    del ckpt["hyper_parameters"]["model_kwargs"]["block"]  # as written before the option
    torch.save(ckpt, path)
    loaded = DiffusionTask.load_from_checkpoint(path)
    assert loaded.model.block == "compact"
    torch.testing.assert_close(loaded.model.state_dict(), src.model.state_dict())
    trainer(tmp_path).validate(_dit_task(block="compact"), loader(n=4), ckpt_path=str(path))
    with pytest.raises(CheckpointMismatchError, match=r"model_kwargs.block: checkpoint 'compact', this run '<unset>'"):
        trainer(tmp_path).validate(_dit_task(), loader(n=4), ckpt_path=str(path))
    # a release-block checkpoint without a recorded block (the default) resumes with or without one
    new = tmp_path / "new"
    new.mkdir()
    path = _saved_task_ckpt(new, _dit_task())
    trainer(new).validate(_dit_task(block="release"), loader(n=4), ckpt_path=str(path))
    trainer(new).validate(_dit_task(), loader(n=4), ckpt_path=str(path))
    assert DiffusionTask.load_from_checkpoint(path).model.block == "release"
    with pytest.raises(CheckpointMismatchError, match=r"model_kwargs.block: checkpoint 'release', this run 'compact'"):
        trainer(new).validate(_dit_task(block="compact"), loader(n=4), ckpt_path=str(path))
