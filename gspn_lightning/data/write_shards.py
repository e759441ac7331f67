"""Write samples into webdataset tar shards plus a JSON index: image-classification folders here, and
the machinery (:func:`write_shards` over any iterable of samples) that the latent and caption writers use.

Command line (:mod:`gspn_lightning.cli.write_shards`)::

    gspn write-shards SRC OUT [--maxcount N] [--maxsize BYTES] [--prefix NAME] [--seed S | --no-shuffle]
                              [--overwrite]

``SRC`` is an ImageFolder tree (``SRC/<class_name>/.../<image>``); classes are the sorted sub-folder
names and their indices are what :class:`torchvision.datasets.ImageFolder` would give them (the file
scan is torchvision's own ``find_classes``/``make_dataset``). ``OUT`` receives
``<prefix>-000000.tar, <prefix>-000001.tar, ...`` and ``index.json``.

Every sample in a shard is two tar members:

- ``<key>.<ext>``: the original image bytes. ``jpg``/``jpeg``/``png``/``webp`` files are copied as they
  are; other formats torchvision's ImageFolder accepts (bmp, ppm, pgm, tif, tiff) are re-encoded
  losslessly to ``png``. A file that cannot be re-encoded is skipped with a warning.
- ``<key>.cls``: the class index as ASCII text.

Keys are the file stems with every character outside ``[A-Za-z0-9_-]`` replaced by ``_`` (webdataset
splits a member name at its first dot, so keys must not contain one), made unique with a ``_<n>``
suffix when two files map to the same key.

``index.json`` is ``{"shards": [{"name": "<prefix>-000000.tar", "count": n}, ...], "total": N,
"classes": [...]}``; the counts are those actually written. It is written last (atomically), so a
folder with shards but no index is an interrupted write.

Shard size is bounded both in samples (``maxcount``) and in payload bytes (``maxsize``): a new shard
starts once the current one holds ``maxcount`` samples or at least ``maxsize`` bytes of payload (this
is :class:`webdataset.ShardWriter`'s rule, so a shard may exceed ``maxsize`` by one sample plus tar
headers).

The file list of a folder source is shuffled with a fixed seed by default (``--seed``; ``--no-shuffle``
keeps ImageFolder order). ImageFolder order is sorted by class, and shards that each hold one or two
classes mix poorly through a training shuffle buffer.

The writer refuses to touch an ``OUT`` that already holds ``*.tar`` files or an ``index.json``
(nothing is written, exit status 1) unless ``--overwrite`` is given, which deletes those first.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import webdataset as wds

from tqdm import tqdm

INDEX_NAME = "index.json"
#: Image formats stored byte for byte; anything else is re-encoded to PNG.
KEPT_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
#: Every image extension a shard may hold (what the datamodule looks for in a sample).
IMAGE_EXTENSIONS = KEPT_EXTENSIONS + ("bmp", "ppm", "pgm", "pbm", "tif", "tiff", "gif")
#: array payloads (``numpy.save`` bytes), e.g. VAE latents of the diffusion task
ARRAY_EXTENSIONS = ("npy",)
PAYLOAD_EXTENSIONS = IMAGE_EXTENSIONS + ARRAY_EXTENSIONS

DEFAULT_MAXCOUNT = 1000
DEFAULT_MAXSIZE = 1_000_000_000

_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


class ShardsExistError(FileExistsError):
    """``out_dir`` already holds shards or an index and ``overwrite`` was not requested."""


def existing_outputs(out_dir: str | os.PathLike) -> list[Path]:
    """The files in ``out_dir`` that a write would replace: ``*.tar`` shards and ``index.json``."""
    out = Path(out_dir)
    if not out.is_dir():
        return []
    found = sorted(out.glob("*.tar"))
    if (out / INDEX_NAME).exists():
        found.append(out / INDEX_NAME)
    return found


def sanitize_key(name: str) -> str:
    """Turn a file stem into a webdataset key: no dots, only ``[A-Za-z0-9_-]``."""
    key = _KEY_UNSAFE.sub("_", name)
    return key or "sample"


def unique_key(stem: str, used: dict[str, int]) -> str:
    """:func:`sanitize_key` of ``stem``, made unique among the keys in ``used`` (updated) with ``_<n>``."""
    key = sanitize_key(stem)
    if key in used:
        used[key] += 1
        while f"{key}_{used[key]}" in used:
            used[key] += 1
        key = f"{key}_{used[key]}"
    used.setdefault(key, 0)
    return key


def scan_image_folder(root: str | os.PathLike) -> tuple[list[str], list[tuple[str, int]]]:
    """List an ImageFolder tree exactly as :class:`torchvision.datasets.ImageFolder` does.

    Returns:
        ``(classes, samples)``: the sorted class names and ``(path, class_index)`` pairs in
        torchvision's order (sorted by class, then by path).
    """
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"source folder {root!r} does not exist")
    classes, class_to_idx = find_classes(root)
    samples = make_dataset(root, class_to_idx, extensions=IMG_EXTENSIONS)
    return classes, samples


def _encode_file(path: str) -> tuple[str, bytes]:
    """Read an image file; return ``(extension, bytes)``, re-encoding non-kept formats to PNG."""
    ext = os.path.splitext(path)[1].lstrip(".").lower()
    with open(path, "rb") as f:
        data = f.read()
    if ext in KEPT_EXTENSIONS:
        return ext, data
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img.load()
        if img.mode not in ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"):
            img = img.convert("RGB")
        buffer = io.BytesIO()
        img.save(buffer, format="PNG")
    return "png", buffer.getvalue()


def folder_samples(samples: list[tuple[str, int]], shuffle_seed: int | None = 0) -> Iterator[dict[str, Any]]:
    """Turn ImageFolder ``(path, class_index)`` pairs into writer samples (see :func:`write_shards`).

    Args:
        samples: as returned by :func:`scan_image_folder`.
        shuffle_seed: shuffle the order with this seed; ``None`` keeps the given order.
    """
    order = list(samples)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    used: dict[str, int] = {}
    for path, label in order:
        key = unique_key(Path(path).stem, used)
        try:
            ext, data = _encode_file(path)
        except Exception as exc:  # unreadable source file: skip it, never abort a long write
            warnings.warn(f"skipping {path}: {exc!r}", stacklevel=2)
            continue
        yield {"__key__": key, ext: data, "cls": label}


#: text members a sample may carry beside its payload (captions: plain text, or JSON)
TEXT_EXTENSIONS = ("txt", "json")


def _is_extra_array(name: str) -> bool:
    """``<name>.npy``: a further named array of a sample (e.g. ``prompt_embeds.npy``)."""
    stem, dot, ext = name.rpartition(".")
    return dot == "." and ext == "npy" and bool(stem) and "/" not in stem


def _check_sample(
    sample: dict[str, Any], labelled: bool = True
) -> tuple[str, str, bytes, int | None, dict[str, bytes]]:
    """Validate one writer sample; return ``(key, ext, payload_bytes, label or None, extras)``.

    ``extras`` are the sample's text members (``txt``/``json``, ``str`` is encoded as UTF-8) and
    named arrays (``<name>.npy``), as bytes."""
    key = sample.get("__key__")
    if not isinstance(key, str) or not key or "." in key or "/" in key:
        raise ValueError(f"sample key must be a non-empty string without '.' or '/', got {key!r}")
    payloads = [k for k in sample if k in PAYLOAD_EXTENSIONS]
    if len(payloads) != 1:
        raise ValueError(
            f"sample {key!r} must hold exactly one payload entry (an image {IMAGE_EXTENSIONS} or an "
            f"array {ARRAY_EXTENSIONS}), got {payloads}"
        )
    data = sample[payloads[0]]
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"sample {key!r}: the payload must be encoded bytes, got {type(data).__name__}")
    label = sample.get("cls")
    if labelled:
        if isinstance(label, bool) or not isinstance(label, int) or label < 0:
            raise ValueError(f"sample {key!r}: 'cls' must be a non-negative int, got {label!r}")
    elif label is not None:
        raise ValueError(f"sample {key!r}: unlabelled shards (labelled=False) take no 'cls'")
    extras: dict[str, bytes] = {}
    for name, value in sample.items():
        if name.startswith("__") or name in payloads or name == "cls":
            continue
        if name in TEXT_EXTENSIONS and isinstance(value, str):
            value = value.encode("utf-8")
        if not (name in TEXT_EXTENSIONS or _is_extra_array(name)):
            raise ValueError(
                f"sample {key!r}: unknown member {name!r} (allowed beside the payload: 'cls', "
                f"{TEXT_EXTENSIONS} and named arrays '<name>.npy')"
            )
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise ValueError(f"sample {key!r}: member {name!r} must be bytes, got {type(value).__name__}")
        extras[name] = bytes(value)
    return key, payloads[0], bytes(data), label, extras


def write_shards(
    source: str | os.PathLike | Iterable[dict[str, Any]],
    out_dir: str | os.PathLike,
    maxcount: int = DEFAULT_MAXCOUNT,
    maxsize: int = DEFAULT_MAXSIZE,
    overwrite: bool = False,
    classes: list[str] | None = None,
    prefix: str = "shard",
    shuffle_seed: int | None = 0,
    total: int | None = None,
    progress: bool = True,
    meta: dict[str, Any] | None = None,
    labelled: bool = True,
) -> dict[str, Any]:
    """Write samples into ``out_dir/<prefix>-NNNNNN.tar`` shards and ``out_dir/index.json``.

    Args:
        source: an ImageFolder root folder, or an iterable of samples, each a dict
            ``{"__key__": str, "<ext>": bytes, "cls": int}`` with exactly one payload: an encoded
            image (``ext`` in :data:`IMAGE_EXTENSIONS`) or an array saved by ``numpy.save``
            (``"npy"``, e.g. a VAE latent), a key without ``.``/``/`` that is unique, and a
            non-negative class index (no ``cls`` when ``labelled=False``). A sample may also carry
            text members (``"txt"``, ``"json"``: bytes or ``str``) and further named arrays
            (``"<name>.npy"``: ``numpy.save`` bytes), written as they are.
        out_dir: output folder (created if missing).
        maxcount: at most this many samples per shard.
        maxsize: start a new shard once the current one holds this many payload bytes.
        overwrite: delete existing ``*.tar``/``index.json`` in ``out_dir`` first instead of refusing.
        classes: class names for the index. For a folder source they come from the folder (a value
            given here must match); for an iterable, ``None`` means ``["0", ..., str(max_label)]``.
        prefix: shard file name prefix.
        shuffle_seed: folder source only: shuffle the file order with this seed (``None``: keep
            ImageFolder order). Iterables are written in their own order.
        total: number of samples, for the progress bar (known for a folder source).
        progress: show a tqdm progress bar.
        meta: facts about the payload recorded in the index as ``"meta"`` (e.g. a latent's shape and
            the VAE that made it), read back by the data modules.
        labelled: samples carry a class index (``cls``) and the index lists ``classes``; ``False``
            for shards without classes (image + caption): no ``cls``, no ``classes`` in the index.

    Returns:
        The index dict that was written to ``out_dir/index.json``.

    Raises:
        ShardsExistError: ``out_dir`` holds shards or an index and ``overwrite`` is False (nothing
            is written).
        FileNotFoundError: the source folder does not exist or holds no images.
        ValueError: bad arguments or an invalid sample: bad or duplicate key, no image, a class
            index out of range of ``classes`` (the shards written so far are removed).
    """
    if maxcount < 1:
        raise ValueError(f"maxcount must be >= 1, got {maxcount}")
    if maxsize < 1:
        raise ValueError(f"maxsize must be >= 1 byte, got {maxsize}")
    if not prefix or "/" in prefix or os.sep in prefix:
        raise ValueError(f"prefix must be a plain file name prefix, got {prefix!r}")
    out = Path(out_dir)
    if not labelled and (classes is not None or isinstance(source, (str, os.PathLike))):
        raise ValueError("labelled=False takes an iterable of samples and no classes")

    # Everything that can be checked is checked before anything is written or deleted; the cheap
    # check of the output folder first (torch/torchvision/webdataset are imported only after it).
    old = existing_outputs(out)
    if old and not overwrite:
        raise ShardsExistError(
            f"{out} already holds {len(old)} shard/index file(s) (e.g. {old[0].name}); "
            "pass --overwrite (overwrite=True) to replace them"
        )
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a folder")
    if isinstance(source, (str, os.PathLike)):
        folder_classes, folder_list = scan_image_folder(source)
        if classes is not None and list(classes) != folder_classes:
            raise ValueError("classes given do not match the class folders of the source")
        classes = folder_classes
        total = len(folder_list)
        samples: Iterable[dict[str, Any]] = folder_samples(folder_list, shuffle_seed)
    else:
        samples = source
    import webdataset as wds

    for path in old:
        path.unlink()
    out.mkdir(parents=True, exist_ok=True)

    shards: list[dict[str, Any]] = []
    max_label = -1
    seen_keys: set[str] = set()
    writer: wds.ShardWriter | None = None

    def on_shard_closed(fname: str) -> None:
        # ShardWriter calls this when it closes a shard, before resetting its per-shard counter,
        # so writer.count is the number of samples that went into `fname`.
        shards.append({"name": os.path.basename(fname), "count": writer.count})

    bar = tqdm(total=total, unit="img", desc=f"writing {out}", disable=not progress, dynamic_ncols=True)
    try:
        for sample in samples:
            key, ext, data, label, extras = _check_sample(sample, labelled)
            if key in seen_keys:
                raise ValueError(f"duplicate sample key {key!r}")
            seen_keys.add(key)
            if labelled and classes is not None and label >= len(classes):
                raise ValueError(
                    f"sample {key!r}: class index {label} out of range for {len(classes)} classes"
                )
            if writer is None:  # ShardWriter opens its first file on creation: wait for a sample
                writer = wds.ShardWriter(
                    str(out / f"{prefix}-%06d.tar"),
                    maxcount=maxcount,
                    maxsize=maxsize,
                    post=on_shard_closed,
                    verbose=0,
                )
            record = {"__key__": key, ext: data, **extras}
            if labelled:
                record["cls"] = str(label).encode("ascii")
                max_label = max(max_label, label)
            writer.write(record)
            bar.update(1)
        if writer is not None:
            writer.close()
    except BaseException:
        if writer is not None:
            try:
                writer.close()
            except Exception:
                pass
        for path in out.glob(f"{prefix}-*.tar"):
            path.unlink()
        raise
    finally:
        bar.close()

    if writer is None:
        raise FileNotFoundError(f"no samples to write into {out}")
    index: dict[str, Any] = {"shards": shards, "total": sum(s["count"] for s in shards)}
    if labelled:
        index["classes"] = list(classes) if classes is not None else [str(i) for i in range(max_label + 1)]
    if meta:
        index["meta"] = dict(meta)
    write_index(out, index)
    return index


def write_index(out_dir: str | os.PathLike, index: dict[str, Any]) -> None:
    """Write ``out_dir/index.json`` atomically (a crash leaves the old index or none, never half of one)."""
    tmp = Path(out_dir) / (INDEX_NAME + ".tmp")
    tmp.write_text(json.dumps(index, indent=1) + "\n")
    os.replace(tmp, Path(out_dir) / INDEX_NAME)


def npy_bytes(array: np.ndarray) -> bytes:
    """``array`` as the bytes of a ``.npy`` file (a sample's array member)."""
    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def read_index(path: str | os.PathLike) -> dict[str, Any]:
    """Load an ``index.json`` (given as the file or its folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / INDEX_NAME
    with open(path) as f:
        return json.load(f)
