"""No run trains on nothing (issue 23, part 2): every broken input of the issue ends in an error within
seconds naming its cause, or is skipped and counted with a warning.

- one corrupt-row policy for every decoder (images, latents, captions): ``max_sample_failures``
  undecodable samples in a row is a ``CorruptDataError`` naming the first causes;
- an epoch (training, or an evaluation) with no usable row is an error, with the causes;
- the index's ``meta``/``classes`` and the config must agree, or start-up fails naming both values;
- a fit that trained zero optimizer steps never exports;
- a shard cut short (a read error mid-stream, or fewer samples than its index records) is warned about
  and counted like an unreadable one.

Small in-test shards, tiny models, in-process Trainers (seconds each)."""

from __future__ import annotations

import io
import json
import tarfile
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from gspn_lightning.data.captions import CaptionWebDataModule
from gspn_lightning.data.latents import LatentWebDataModule
from gspn_lightning.data.shards import CorruptDataError, ShardReadError

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _latent(channels=4, size=8, seed=0, views=2) -> np.ndarray:
    rng = np.random.default_rng(seed)
    moments = rng.standard_normal((views, 2 * channels, size, size)).astype(np.float16)
    moments[:, channels:] = np.abs(moments[:, channels:]) * 0.1  # std >= 0
    return moments


def write_raw(out: Path, samples: list[dict], maxcount: int = 8, **index_fields) -> Path:
    """Samples as they are (the shard writer would refuse the broken ones) into ``maxcount``-sample
    shards with an ``index.json`` (``index_fields``: ``meta``, ``classes``)."""
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for start in range(0, len(samples), maxcount):
        name = f"shard-{start // maxcount:06d}.tar"
        with wds.TarWriter(str(out / name)) as tar:
            for sample in samples[start : start + maxcount]:
                tar.write({k: str(v).encode() if isinstance(v, (int, str)) and k != "__key__" else v
                           for k, v in sample.items()})  # fmt: skip
        shards.append({"name": name, "count": len(samples[start : start + maxcount])})
    index = {
        "shards": shards,
        "total": len(samples),
        **{k: v for k, v in index_fields.items() if v is not None},
    }
    (out / "index.json").write_text(json.dumps(index))
    return out


def write_latents(
    out: Path, n: int = 16, *, meta=None, classes=("a", "b", "c"), broken=None, maxcount=8
) -> Path:
    """``n`` latent samples (4 x 8 x 8 latents, 3 classes); ``broken(i, sample)`` may spoil each one."""
    samples = []
    for i in range(n):
        sample = {"__key__": f"k{i:03d}", "npy": _npy(_latent(seed=i)), "cls": i % 3}
        if broken is not None:
            sample = broken(i, sample)
        samples.append(sample)
    meta = {"channels": 4, "size": 8} if meta is None else meta
    return write_raw(out, samples, maxcount, meta=meta or None, classes=list(classes))


def latent_dm(train=None, val=None, **kw) -> LatentWebDataModule:
    args = dict(batch_size=4, num_workers=0, epoch_samples=16, shuffle_buffer=4, max_sample_failures=8)
    args.update(kw)
    return LatentWebDataModule(
        None if train is None else str(train), None if val is None else str(val), **args
    )


def drain(loader):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [batch for batch in loader]


# ---------------------------------------------------------------------------- the index and the config


def test_latent_size_or_channels_other_than_the_index_fail_at_start_up(tmp_path):
    data = write_latents(tmp_path / "lat", meta={"channels": 4, "size": 16})
    with pytest.raises(
        ValueError, match=r"data.init_args.image_size is 8 but the shard index's meta.size is 16"
    ):
        _ = latent_dm(data, image_size=8).image_size
    with pytest.raises(
        ValueError, match=r"data.init_args.in_chans is 8 but the shard index's meta.channels is 4"
    ):
        _ = latent_dm(data, in_chans=8).in_chans
    with pytest.raises(
        ValueError, match=r"data.init_args.num_classes is 5 but the shard index's classes.* is 3"
    ):
        _ = latent_dm(data, num_classes=5).num_classes
    agreed = latent_dm(data, in_chans=4, image_size=16, num_classes=3)  # the same values: fine
    assert (agreed.in_chans, agreed.image_size, agreed.num_classes) == (4, 16, 3)


def test_the_tiny_dit_config_fails_at_start_up_on_latents_of_another_size(tmp_path, monkeypatch):
    """The issue's easiest way in: configs/dit/tiny.yaml on latents encoded at another size trained on
    nothing and exited 0. Now the command line stops before any work, naming both values."""
    from gspn_lightning.cli.lightning import main

    data = write_latents(tmp_path / "lat", meta={"channels": 4, "size": 16})
    monkeypatch.setattr("sys.argv", ["gspn"])
    config = REPO / "configs" / "dit" / "tiny.yaml"
    args = [
        "--config",
        str(config),
        f"--data.init_args.train_shards={data}",
        f"--data.init_args.val_shards={data}",
    ]
    with pytest.raises(
        Exception, match=r"data.init_args.image_size is 8 but the shard index's meta.size is 16"
    ):
        main(args=args, run=False)  # the config's image_size: 8
    cli = main(args=[*args, "--data.init_args.image_size=null"], run=False)  # null: the index's values
    assert (cli.model.hparams.image_size, cli.model.hparams.in_chans) == (16, 4)


# ----------------------------------------------------------------- undecodable samples in a row: an error

LATENT_BREAKS = {
    "latent size": (
        lambda i, s: {**s, "npy": _npy(_latent(size=16, seed=i))},
        r"latent shape \(4, 16, 16\) but the config expects \(4, 8, 8\).*image_size",
    ),
    "latent channels": (
        lambda i, s: {**s, "npy": _npy(_latent(channels=3, seed=i))},
        r"latent shape \(3, 8, 8\) but the config expects \(4, 8, 8\).*in_chans",
    ),
    "garbage npy": (
        lambda i, s: {**s, "npy": b"garbage, not an array"},
        r"\.npy member is not a numpy array",
    ),
    "missing cls": (lambda i, s: {k: v for k, v in s.items() if k != "cls"}, r"no \.cls member"),
    "labels out of range": (lambda i, s: {**s, "cls": 7}, r"label 7 out of range \[0, 3\)"),
    "nan latents": (
        lambda i, s: {**s, "npy": _npy(np.full((2, 8, 8, 8), np.nan, np.float16))},
        r"NaN or inf",
    ),
}


@pytest.mark.parametrize("name", LATENT_BREAKS)
def test_undecodable_latents_in_a_row_are_an_error_naming_the_cause(tmp_path, name):
    broken, cause = LATENT_BREAKS[name]
    data = write_latents(tmp_path / "lat", n=24, meta={}, broken=broken)  # no meta: the config's shape
    dm = latent_dm(data, val=data, in_chans=4, image_size=8, num_classes=3)
    start = time.monotonic()
    with pytest.raises(
        CorruptDataError, match=r"8 samples in a row could not be decoded.*max_sample_failures=8.*" + cause
    ):
        drain(dm.train_dataloader())
    with pytest.raises(CorruptDataError, match=cause):
        drain(dm.val_dataloader())
    assert time.monotonic() - start < 30


def test_a_few_corrupt_samples_are_skipped_counted_and_warned(tmp_path):
    data = write_latents(tmp_path / "lat", n=24, broken=lambda i, s: {**s, "cls": 7} if i % 3 == 0 else s)
    dm = latent_dm(data, val=data)
    with pytest.warns(UserWarning, match=r"skipping an undecodable sample .*label 7 out of range"):
        labels = torch.cat([y for _, y in dm.val_dataloader()])
    assert (labels == -1).sum() == 8 and (labels >= 0).sum() == 16
    labels = torch.cat([y for _, y in drain(dm.train_dataloader())])
    assert (labels == -1).any() and (labels >= 0).any()


def _png(h=20, w=24, seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_captions(out: Path, n: int = 16, broken=None, embeddings=(5, 6)) -> Path:
    samples = []
    for i in range(n):
        sample = {"__key__": f"c{i:03d}", "png": _png(seed=i), "txt": f"thing {i}",
                  "prompt_embeds.npy": _npy(np.ones(embeddings, np.float16)),
                  "pooled_prompt_embeds.npy": _npy(np.ones(4, np.float16))}  # fmt: skip
        samples.append(broken(i, sample) if broken is not None else sample)
    meta = {"captions": "txt", "embeddings": {"prompt_embeds": [5, 6], "pooled_prompt_embeds": [4]}}
    return write_raw(out, samples, meta=meta)


CAPTION_BREAKS = {
    "missing captions": (lambda i, s: {k: v for k, v in s.items() if k != "txt"}, r"has no caption"),
    "undecodable images": (
        lambda i, s: {**s, "png": b"\x89PNG not really"},
        r"\.png member is not a decodable image",
    ),
    "prompt embeddings of the wrong shape": (
        lambda i, s: {**s, "prompt_embeds.npy": _npy(np.ones((5, 7), np.float16))},
        r"prompt_embeds\.npy of shape \(5, 7\) but the shard index's meta.embeddings says \(5, 6\)",
    ),
}


@pytest.mark.parametrize("name", CAPTION_BREAKS)
def test_undecodable_captions_in_a_row_are_an_error_naming_the_cause(tmp_path, name):
    broken, cause = CAPTION_BREAKS[name]
    data = write_captions(tmp_path / "cap", n=24, broken=broken)
    dm = CaptionWebDataModule(str(data), str(data), resolution=16, batch_size=4, num_workers=0,
                              epoch_samples=16, shuffle_buffer=4, max_sample_failures=8)  # fmt: skip
    with pytest.raises(CorruptDataError, match=r"8 samples in a row could not be decoded.*" + cause):
        drain(dm.train_dataloader())
    with pytest.raises(CorruptDataError, match=cause):
        drain(dm.val_dataloader())


def test_the_image_decoder_follows_the_same_policy(tmp_path):
    from gspn_lightning.data import ImageWebDataModule

    samples = [{"__key__": f"i{i}", "png": b"not a png", "cls": 0} for i in range(12)]
    write_raw(tmp_path / "img", samples, classes=["a", "b"])
    dm = ImageWebDataModule(str(tmp_path / "img"), image_size=8, in_chans=3, batch_size=2, num_workers=0,
                            epoch_samples=8, shuffle_buffer=2, max_sample_failures=5)  # fmt: skip
    with pytest.raises(CorruptDataError, match=r"5 samples in a row.*not a decodable image"):
        drain(dm.train_dataloader())
    with pytest.warns(DeprecationWarning, match="max_sample_failures"):  # the former key still works
        old = ImageWebDataModule(str(tmp_path / "img"), image_size=8, max_transform_failures=3)
    assert old.max_sample_failures == 3


# -------------------------------------------------------------- an epoch with no usable row: an error


def tiny_dit(**kw):
    from gspn_lightning.tasks import DiffusionTask

    torch.manual_seed(0)
    args = dict(model="gspn_dit_s_2", model_kwargs={"hidden_size": 32, "depth": 2}, num_classes=3, in_chans=4,
                image_size=8, optim={"lr": 1e-3, "ema_decay": 0.9})  # fmt: skip
    return DiffusionTask(**{**args, **kw})


def tiny_trainer(root: Path, **kw) -> L.Trainer:
    args = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                enable_checkpointing=False, num_sanity_val_steps=0, max_steps=4, default_root_dir=root)  # fmt: skip
    return L.Trainer(**{**args, **kw})


def test_a_fit_on_wholly_corrupt_latents_stops_naming_the_cause(tmp_path):
    """Fewer samples per epoch than max_sample_failures, all undecodable: the epoch end stops the run
    (it used to train on nothing and exit 0), and the error names why the samples fail."""
    broken = LATENT_BREAKS["garbage npy"][0]
    data = write_latents(tmp_path / "lat", n=8, broken=broken)
    dm = latent_dm(data, epoch_samples=8, max_sample_failures=64)
    task = tiny_dit()
    start = time.monotonic()
    with pytest.raises(
        CorruptDataError,
        match=r"a training epoch: no usable row on any rank \(8 corrupt rows.*\.npy member is not a numpy array",
    ):
        tiny_trainer(tmp_path).fit(task, datamodule=dm)
    assert time.monotonic() - start < 60
    assert task.global_step == 2 and getattr(task, "trained_steps", 0) == 0


def test_an_evaluation_with_no_usable_row_is_an_error(tmp_path):
    good = write_latents(tmp_path / "good", n=8)
    bad = write_latents(tmp_path / "bad", n=4, broken=LATENT_BREAKS["nan latents"][0])
    dm = latent_dm(good, bad, epoch_samples=8)
    with pytest.raises(CorruptDataError, match=r"val: no usable row on any rank \(4 corrupt.*NaN or inf"):
        tiny_trainer(tmp_path).validate(tiny_dit(), datamodule=dm)
    # a mixed split evaluates its good rows and counts the others
    mixed = write_latents(tmp_path / "mixed", n=6, broken=lambda i, s: s if i % 2 else {**s, "cls": 9})
    t = tiny_trainer(tmp_path)
    with pytest.warns(UserWarning, match="label 9 out of range"):
        t.validate(tiny_dit(), datamodule=latent_dm(good, mixed))
    assert t.callback_metrics["val/samples"] == 3 and t.callback_metrics["val/corrupt"] == 3


# ------------------------------------------------------------------------- no export of untrained weights


@pytest.fixture(scope="module")
def good_captions(tmp_path_factory):
    root = tmp_path_factory.mktemp("captions")
    return write_captions(root / "train", n=4)


def test_distillation_on_corrupt_captions_stops_and_exports_nothing(tiny_sdxl_dir, tmp_path):
    from gspn_lightning.tasks import DistillationTask

    data = write_captions(tmp_path / "cap", n=4, broken=CAPTION_BREAKS["missing captions"][0])
    dm = CaptionWebDataModule(str(data), resolution=32, batch_size=2, num_workers=0, epoch_samples=4,
                              shuffle_buffer=2)  # fmt: skip
    torch.manual_seed(0)
    task = DistillationTask(str(tiny_sdxl_dir), mixer={"d_state": 4}, text_encoders=False,
                            export_dir=str(tmp_path / "export"))  # fmt: skip
    with pytest.raises(CorruptDataError, match=r"no usable row.*has no caption"):
        tiny_trainer(tmp_path, max_steps=2).fit(task, datamodule=dm)
    assert not (tmp_path / "export" / "gspn.safetensors").exists()


def test_a_fit_that_trained_zero_steps_refuses_to_export(tiny_sdxl_dir, good_captions, tmp_path, monkeypatch):
    """Every batch skipped (non-finite loss with nonfinite_loss: skip): the steps advance but nothing
    trained; the end-of-fit export used to write gspn.safetensors from the untrained student."""
    from gspn_lightning.tasks import DistillationTask

    dm = CaptionWebDataModule(str(good_captions), resolution=32, batch_size=2, num_workers=0, epoch_samples=4, embeddings=False,
                              shuffle_buffer=2)  # fmt: skip
    torch.manual_seed(0)
    task = DistillationTask(str(tiny_sdxl_dir), mixer={"d_state": 4}, nonfinite_loss="skip",
                            export_dir=str(tmp_path / "export"))  # fmt: skip
    real = task.losses

    def nan_losses(*args, **kwargs):
        out = real(*args, **kwargs)
        return {**out, "loss": out["loss"] * float("nan")}

    monkeypatch.setattr(task, "losses", nan_losses)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(
            RuntimeError, match=r"refusing to export the GSPN weights.*trained zero optimizer steps"
        ):
            tiny_trainer(tmp_path, max_steps=2).fit(task, datamodule=dm)
    assert task.global_step == 2
    assert not (tmp_path / "export" / "gspn.safetensors").exists()
    task.trained_steps = 1  # one real step is enough
    task.require_trained("an export")


# ------------------------------------------------------------------------------------ truncated shards


def write_tar(path: Path, n: int, cut: float | None = None, at_member: int | None = None) -> int:
    """A shard of ``n`` image samples; ``cut``: keep that fraction of its bytes; ``at_member``: keep
    the members before that one, cut cleanly at its header. Returns ``n``."""
    buf = io.BytesIO()
    offsets = []
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(n):
            img = io.BytesIO()
            Image.new("L", (8, 8), i).save(img, format="PNG")
            for ext, data in (("png", img.getvalue()), ("cls", b"1")):
                offsets.append(buf.tell())
                info = tarfile.TarInfo(f"s{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    if cut is not None:
        data = data[: int(len(data) * cut)]
    if at_member is not None:
        data = data[: offsets[at_member]]
    path.write_bytes(data)
    return n


def index(folder: Path, names_counts):
    shards = [{"name": n, "count": c} for n, c in names_counts]
    (folder / "index.json").write_text(json.dumps({"shards": shards, "total": sum(c for _, c in names_counts),
                                                   "classes": ["a", "b"]}))  # fmt: skip


def image_dm(spec, **kw):
    from gspn_lightning.data import ImageWebDataModule

    args = dict(image_size=8, in_chans=1, batch_size=2, num_workers=0, epoch_samples=8, mean=(0.5,), std=(0.5,),
                randaugment=None, random_erasing=0.0, crop_scale=(0.5, 1.0), shuffle_buffer=2)  # fmt: skip
    return ImageWebDataModule(str(spec), **{**args, **kw})


def test_a_truncated_shard_is_warned_about_and_counted(tmp_path):
    (tmp_path / "s").mkdir()
    write_tar(tmp_path / "s" / "good.tar", 10)
    write_tar(tmp_path / "s" / "cut.tar", 10, cut=0.32)  # a read error mid-stream (in a member's data)
    index(tmp_path / "s", [("good.tar", 10), ("cut.tar", 10)])
    dm = image_dm(tmp_path / "s", val_shards=str(tmp_path / "s"))
    with pytest.warns(UserWarning, match=r"truncated shard .*cut\.tar: a read error after \d samples"):
        images = torch.cat([x for x, _ in dm.val_dataloader()])
    assert 10 < len(images) < 20  # the samples before the cut are kept
    # every shard cut short: the limit of shards in a row applies, as to unreadable shards
    write_tar(tmp_path / "s" / "half.tar", 10, cut=0.5)  # cut at a header: no read error, no end blocks
    dm = image_dm(str(tmp_path / "s" / "half.tar"), val_shards=str(tmp_path / "s" / "half.tar"))
    with pytest.warns(
        UserWarning, match=r"truncated shard .*half\.tar: it ends after 8 samples without the tar end"
    ):
        assert len(torch.cat([x for x, _ in dm.val_dataloader()])) == 8
    dm = image_dm(str(tmp_path / "s" / "{cut,half}.tar"), max_shard_failures=3, epoch_samples=200)
    with pytest.raises(
        ShardReadError, match=r"3 training shards in a row were unreadable or truncated.*(cut|half)\.tar"
    ):
        drain(dm.train_dataloader())


def test_a_shard_with_fewer_samples_than_its_index_records_is_truncated(tmp_path):
    (tmp_path / "s").mkdir()
    write_tar(tmp_path / "s" / "short.tar", 10, at_member=8)  # cut at a member boundary: 4 whole samples
    index(tmp_path / "s", [("short.tar", 10)])
    dm = image_dm(tmp_path / "s", val_shards=str(tmp_path / "s"))
    with pytest.warns(UserWarning, match=r"truncated shard .*short\.tar: 4 samples but its index records 10"):
        images = torch.cat([x for x, _ in dm.val_dataloader()])
    assert len(images) == 4


# ------------------------------------------------------------------------------ end to end, two ranks


@pytest.mark.slow
def test_two_rank_fit_of_the_tiny_dit_config_on_garbage_latents_stops_naming_the_cause(tmp_path):
    """Through the command line with DDP (2 CPU ranks): every latent undecodable. The run used to
    train on nothing and exit 0; now every rank stops with the error (no rank left waiting)."""
    import os
    import subprocess
    import sys

    data = write_latents(tmp_path / "lat", n=8, broken=LATENT_BREAKS["garbage npy"][0])
    args = [
        sys.executable, "cli.py", "fit", "--config", "configs/dit/tiny.yaml",
        f"--trainer.default_root_dir={tmp_path / 'run'}", f"--data.init_args.train_shards={data}",
        f"--data.init_args.val_shards={data}", "--data.init_args.epoch_samples=16", "--trainer.strategy=ddp",
        "--trainer.devices=2",
    ]  # fmt: skip
    start = time.monotonic()
    r = subprocess.run(args, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                       text=True, timeout=300)  # fmt: skip
    out = r.stdout + r.stderr
    assert r.returncode != 0, out[-3000:]
    assert "no usable row on any rank" in out and ".npy member is not a numpy array" in out, out[-3000:]
    assert time.monotonic() - start < 300
