"""Image + caption data (SD-XL distillation): webdataset shards of images with captions, optionally with
the prompt embeddings precomputed, and the command that writes such shards from a folder.

**Shards.** Each sample is ``<key>.<image ext>`` (jpg/png/webp... bytes) + ``<key>.txt`` (the caption,
UTF-8) or ``<key>.json`` (an object whose ``caption``, ``text`` or ``prompt`` field is the caption), and
optionally the SD-XL prompt embeddings the two text encoders give for that caption:
``<key>.prompt_embeds.npy`` (float16 ``(L, D)``, ``L = 77``, ``D = 2048`` for SD-XL) and
``<key>.pooled_prompt_embeds.npy`` (float16 ``(P,)``, ``P = 1280``). ``index.json`` has no classes; its
``meta.embeddings`` gives the two shapes and the SD-XL folder that made them when they are stored.

**Rows and batches.** An image is resized (``interpolation``) so that it covers the training size
(for a square ``resolution`` its shorter side becomes ``resolution``), then cropped to it: the centre
crop, or a random one in training with ``random_crop``. What SD-XL's micro-conditioning needs is
recorded: ``original_size`` (the image's ``(height, width)`` before resizing) and ``crop_top_left``
(``(top, left)`` of the crop in the resized image, as diffusers' SD-XL training records it); the
target size is the batch's own ``(H, W)``. A batch is a dict:

- ``pixels``: float32 ``(B, 3, H, W)`` in ``[-1, 1]`` (what the SD-XL VAE encodes);
- ``original_size``, ``crop_top_left``: int64 ``(B, 2)``, ``(height, width)`` and ``(top, left)``;
- ``caption``: a list of ``B`` strings;
- ``label``: int64 ``(B,)``, 0 for a good row and ``-1`` for a sample that could not be decoded (zero
  image, empty caption, zero embeddings: the task drops and counts it, as every task does);
- ``prompt_embeds`` float32 ``(B, L, D)`` and ``pooled_prompt_embeds`` float32 ``(B, P)`` when the
  shards hold them and ``embeddings`` is not ``False``.

Streaming (resampled training, exactly-once evaluation, unreadable shards) is
:class:`~gspn_lightning.data.shards.ShardDataModule`'s.

**Writing** (:func:`write_caption_shards`; ``gspn write-captions SRC OUT``): every image under the folder ``SRC``
(recursively) with its caption from a sidecar ``<image stem>.txt`` beside it, or from ``--captions
FILE`` (CSV with ``file`` and ``caption`` columns, or JSONL with those fields; ``file`` relative to
``SRC``). An image without a caption is skipped with a warning (``--allow-empty`` keeps it with an
empty caption). ``gspn write-captions SRC OUT --embed-with SDXL_FOLDER`` also stores the prompt
embeddings of every caption, made by that local SD-XL folder's two text encoders (which the command
passes in as ``embed``: this package does not import the models). The writing (shard sizes, progress bar, ``index.json``,
refusing to overwrite without ``--overwrite``) is :func:`~gspn_lightning.data.write_shards.write_shards`.
"""

from __future__ import annotations

import csv
import json
import os
import random
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .shards import (
    CORRUPT_LABEL,
    RowDecoder,
    SampleError,
    ShardDataModule,
    read_array,
    read_image,
    signed_pixels,
)
from .write_shards import (
    DEFAULT_MAXCOUNT,
    DEFAULT_MAXSIZE,
    IMAGE_EXTENSIONS,
    KEPT_EXTENSIONS,
    ShardsExistError,
    _encode_file,
    existing_outputs,
    npy_bytes,
    unique_key,
    write_shards,
)

__all__ = [
    "EMBEDDING_NAMES",
    "CaptionWebDataModule",
    "DecodeCaption",
    "caption_folder_samples",
    "collate_captions",
    "crop_box",
    "read_caption",
    "write_caption_shards",
]

#: the stored prompt embeddings, in the order ``encode_prompt`` returns them
EMBEDDING_NAMES = ("prompt_embeds", "pooled_prompt_embeds")
#: fields of a ``.json`` member that hold the caption, first match wins
CAPTION_JSON_KEYS = ("caption", "text", "prompt")


def _size_pair(resolution: int | tuple[int, int] | list[int], key: str = "resolution") -> tuple[int, int]:
    """``(height, width)`` from an int (square) or a pair; a clear error naming ``key`` otherwise."""
    pair = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in pair):
        raise ValueError(f"data.init_args.{key} must be an int >= 1 or [height, width], got {resolution!r}")
    return int(pair[0]), int(pair[1])


def crop_box(
    height: int, width: int, target: tuple[int, int], random_crop: bool = False
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Where an ``height x width`` image is resized and cropped to ``target = (th, tw)``.

    Returns ``((resized_h, resized_w), (top, left))``: the image is scaled by
    ``max(th / height, tw / width)`` (it covers the target; for a square target its shorter side
    becomes the target), then the ``th x tw`` window at ``(top, left)`` is kept: the centre (floor of
    half the excess), or uniform at random (``torch.randint``, so the stream's per-sample seed
    decides it) with ``random_crop``.
    """
    th, tw = target
    scale = max(th / height, tw / width)
    rh, rw = max(th, round(height * scale)), max(tw, round(width * scale))
    if random_crop:
        top = int(torch.randint(rh - th + 1, ()))
        left = int(torch.randint(rw - tw + 1, ()))
    else:
        top, left = (rh - th) // 2, (rw - tw) // 2
    return (rh, rw), (top, left)


def read_caption(sample: dict[str, Any]) -> str:
    """The caption of a raw sample: its ``txt`` member, else the first of ``caption``/``text``/``prompt``
    in its ``json`` member. Raises a :class:`~gspn_lightning.data.shards.SampleError` when there is none."""
    if "txt" in sample:
        try:
            return bytes(sample["txt"]).decode("utf-8").strip()
        except UnicodeDecodeError as exc:
            raise SampleError(f"the .txt caption is not UTF-8 ({exc})") from None
    if "json" in sample:
        try:
            record = json.loads(bytes(sample["json"]).decode("utf-8"))
        except ValueError as exc:
            raise SampleError(f"the .json member is not JSON ({exc})") from None
        if isinstance(record, dict):
            for key in CAPTION_JSON_KEYS:
                if isinstance(record.get(key), str):
                    return record[key].strip()
        raise SampleError(f"the json member has no string field among {CAPTION_JSON_KEYS}")
    raise SampleError("the sample has no caption (neither a .txt nor a .json member)")


class DecodeCaption(RowDecoder):
    """Raw sample -> a row dict (see the module docstring); a broken sample -> a row with ``label = -1``
    (the corrupt-row policy is :class:`~gspn_lightning.data.shards.RowDecoder`'s).

    Args:
        resolution: ``(height, width)`` of the training images.
        random_crop: crop at a random position (else the centre).
        embeddings: ``{name: shape}`` of the stored prompt embeddings to decode (``None``: none).
        interpolation: PIL resampling filter name for the resize (``"bicubic"``, ``"bilinear"``, ...).
        max_failures: this many samples in a row that fail are an error (``None``: no limit).
    """

    def __init__(
        self,
        resolution: tuple[int, int],
        random_crop: bool = False,
        embeddings: dict[str, tuple[int, ...]] | None = None,
        interpolation: str = "bicubic",
        max_failures: int | None = 64,
    ):
        from PIL import Image

        super().__init__(max_failures)
        self.resolution, self.random_crop = tuple(resolution), random_crop
        self.embeddings = {k: tuple(v) for k, v in (embeddings or {}).items()}
        self.resample = Image.Resampling[interpolation.upper()]

    def decode(self, raw: dict[str, Any]) -> dict[str, Any]:
        th, tw = self.resolution
        caption = read_caption(raw)
        arrays = {
            name: torch.from_numpy(
                read_array(
                    raw, f"{name}.npy", shape, "the shard index's meta.embeddings says",
                    "write the shards' embeddings again (gspn write-captions --embed-with)",
                ).astype(np.float32)
            )
            for name, shape in self.embeddings.items()
        }  # fmt: skip
        img = read_image(raw, "RGB")
        (rh, rw), (top, left) = crop_box(img.height, img.width, (th, tw), self.random_crop)
        original = (img.height, img.width)
        img = img.resize((rw, rh), resample=self.resample).crop((left, top, left + tw, top + th))
        row = {
            "pixels": signed_pixels(img),
            "original_size": torch.tensor(original, dtype=torch.long),
            "crop_top_left": torch.tensor((top, left), dtype=torch.long),
            "caption": caption,
            "label": 0,
        }
        row.update(arrays)
        return row

    def corrupt_row(self) -> dict[str, Any]:
        th, tw = self.resolution
        row = {
            "pixels": torch.zeros(3, th, tw),
            "original_size": torch.tensor((th, tw), dtype=torch.long),
            "crop_top_left": torch.zeros(2, dtype=torch.long),
            "caption": "",
            "label": CORRUPT_LABEL,
        }
        row.update({name: torch.zeros(shape) for name, shape in self.embeddings.items()})
        return row


def collate_captions(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Row dicts -> a batch dict: tensors stacked, ``caption`` a list, ``label`` int64."""
    batch: dict[str, Any] = {}
    for key in rows[0]:
        if key.startswith("__"):  # webdataset's bookkeeping (__key__, __url__) that map() may carry over
            continue
        values = [r[key] for r in rows]
        if key == "caption":
            batch[key] = values
        elif key == "label":
            batch[key] = torch.tensor(values, dtype=torch.long)
        else:
            batch[key] = torch.stack(values)
    return batch


class CaptionWebDataModule(ShardDataModule):
    """Image + caption batches for SD-XL distillation (see the module docstring for the batch dict).

    Args:
        train_shards / val_shards / test_shards / predict_shards, batch_size, num_workers,
            epoch_samples, shuffle_buffer, pin_memory, max_shard_failures, max_sample_failures, seed: the
            shard streaming and the corrupt-row policy of :class:`~gspn_lightning.data.shards.ShardDataModule`.
        resolution: training image size, an int (square) or ``[height, width]``; the distillation
            task requires multiples of what its UNet and VAE take exactly (32 for SD-XL), checked
            at set-up.
        random_crop: training crops at a random position (evaluation always takes the centre).
        embeddings: decode the prompt embeddings stored in the shards: ``None`` when the index's
            ``meta.embeddings`` lists them, ``True`` (they must be there), ``False`` (ignore them; the
            task then encodes the captions with the text encoders).
        interpolation: resize filter (PIL name: ``bicubic``, ``bilinear``, ``lanczos``, ...).
    """

    #: no classes, channels or image size to link into the task (see ``cli.data_fact``)
    linked_facts: tuple[str, ...] = ()

    def __init__(
        self,
        train_shards: str | None = None,
        val_shards: str | None = None,
        test_shards: str | None = None,
        predict_shards: str | None = None,
        resolution: int | tuple[int, int] = 1024,
        random_crop: bool = False,
        embeddings: bool | None = None,
        interpolation: str = "bicubic",
        batch_size: int = 4,
        num_workers: int = 4,
        epoch_samples: int | None = None,
        shuffle_buffer: int = 1000,
        pin_memory: bool = True,
        max_shard_failures: int = 16,
        seed: int | None = None,
        max_sample_failures: int = 64,
    ):
        super().__init__(
            train_shards, val_shards, test_shards, predict_shards, batch_size=batch_size,
            num_workers=num_workers, epoch_samples=epoch_samples, shuffle_buffer=shuffle_buffer,
            num_classes=None, pin_memory=pin_memory, max_shard_failures=max_shard_failures, seed=seed,
            max_sample_failures=max_sample_failures,
        )  # fmt: skip
        self.resolution = _size_pair(resolution)
        from PIL import Image

        if interpolation.upper() not in Image.Resampling.__members__:
            names = [m.lower() for m in Image.Resampling.__members__]
            raise ValueError(f"data.init_args.interpolation must be one of {names}, got {interpolation!r}")
        self.random_crop, self.embeddings, self.interpolation = bool(random_crop), embeddings, interpolation

    def check_resolution(self, multiple: int, why: str) -> None:
        """Refuse (naming ``data.init_args.resolution``) a resolution that is not a multiple of
        ``multiple`` in both sides: the task that trains on these images calls this at set-up,
        before any data is read, with what it needs (``why``)."""
        bad = [side for side in self.resolution if side % multiple]
        if bad:
            near = sorted({max(multiple, side // multiple * multiple) for side in self.resolution})
            raise ValueError(
                f"data.init_args.resolution {list(self.resolution)} must be a multiple of {multiple} "
                f"({why}); e.g. {near[0] if len(near) == 1 else near}"
            )

    def embedding_shapes(self) -> dict[str, tuple[int, ...]] | None:
        """``{name: shape}`` of the prompt embeddings the batches carry (``None``: the batches have none)."""
        if self.embeddings is False:
            return None
        meta = self.index_meta("embeddings")
        if not meta:
            if self.embeddings:
                raise ValueError(
                    "data.init_args.embeddings is true but the shard index has no meta.embeddings: write the "
                    "shards with `gspn write-captions ... --embed-with SDXL_FOLDER`, or set embeddings: null / false"
                )
            return None
        return {name: tuple(meta[name]) for name in EMBEDDING_NAMES}

    @property
    def embedded_with(self) -> str | None:
        """The SD-XL folder whose text encoders made the stored embeddings (from the index), if any."""
        return (self.index_meta("embeddings") or {}).get("sdxl")

    def _decoder(self, random_crop: bool) -> DecodeCaption:
        return DecodeCaption(
            self.resolution,
            random_crop,
            self.embedding_shapes(),
            self.interpolation,
            self.max_sample_failures,
        )

    def train_decoder(self) -> DecodeCaption:
        return self._decoder(self.random_crop)

    def eval_decoder(self, split: str) -> DecodeCaption:
        return self._decoder(False)

    def collate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        return collate_captions(rows)


# --------------------------------------------------------------------------------------------------
# Writing caption shards from a folder
# --------------------------------------------------------------------------------------------------


def _read_caption_file(path: Path) -> dict[str, str]:
    """``{relative file: caption}`` from a CSV (``file``, ``caption`` columns) or JSONL file."""
    if not path.is_file():
        raise FileNotFoundError(f"--captions: no such file: {path}")
    rows: list[dict[str, Any]]
    if path.suffix.lower() in (".jsonl", ".json"):
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    else:
        raise ValueError(f"--captions: {path} must be a .csv or .jsonl file")
    out = {}
    for n, row in enumerate(rows, 1):
        if (
            not isinstance(row, dict)
            or not isinstance(row.get("file"), str)
            or not isinstance(row.get("caption"), str)
        ):
            raise ValueError(
                f"--captions {path}: record {n} needs string fields 'file' and 'caption', got {row!r}"
            )
        out[os.path.normpath(row["file"])] = row["caption"]
    return out


def caption_folder_samples(
    src: str | os.PathLike,
    captions: str | os.PathLike | None = None,
    allow_empty: bool = False,
    shuffle_seed: int | None = 0,
) -> tuple[list[tuple[Path, str]], int]:
    """The ``(image path, caption)`` pairs of a folder (see the module docstring) and how many images
    were skipped for want of a caption. Sorted by path, then shuffled with ``shuffle_seed``."""
    root = Path(src)
    if not root.is_dir():
        raise FileNotFoundError(f"source folder {root} does not exist")
    images = sorted(
        p for p in root.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS
    )
    if not images:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    table = _read_caption_file(Path(captions)) if captions is not None else None
    pairs, skipped = [], 0
    for path in images:
        if table is not None:
            caption = table.get(os.path.normpath(path.relative_to(root)))
        else:
            sidecar = path.with_suffix(".txt")
            caption = sidecar.read_text(encoding="utf-8").strip() if sidecar.is_file() else None
        if caption is None:
            if not allow_empty:
                warnings.warn(f"skipping {path}: no caption", stacklevel=2)
                skipped += 1
                continue
            caption = ""
        pairs.append((path, caption))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(pairs)
    return pairs, skipped


def _samples(pairs, root: Path, embed, batch_size: int) -> Iterator[dict[str, Any]]:
    used: dict[str, int] = {}
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        arrays = embed([c for _, c in chunk]) if embed is not None else None
        for i, (path, caption) in enumerate(chunk):
            ext = path.suffix.lower().lstrip(".")
            data = path.read_bytes()
            if ext not in KEPT_EXTENSIONS:  # re-encode other formats losslessly, as write_shards does
                ext, data = _encode_file(str(path))
            key = unique_key(str(path.relative_to(root).with_suffix("")).replace(os.sep, "_"), used)
            sample = {"__key__": key, ext: data, "txt": caption}
            if arrays is not None:
                for name, values in zip(EMBEDDING_NAMES, arrays):
                    sample[f"{name}.npy"] = npy_bytes(values[i])
            yield sample


#: ``embed(captions) -> (prompt_embeds (B, L, D), pooled (B, P))`` as float16 numpy arrays
Embed = Callable[[list[str]], tuple[np.ndarray, np.ndarray]]


def write_caption_shards(
    src: str | os.PathLike,
    out: str | os.PathLike,
    captions: str | os.PathLike | None = None,
    embed: Embed | None = None,
    embed_source: str | None = None,
    allow_empty: bool = False,
    maxcount: int = DEFAULT_MAXCOUNT,
    maxsize: int = DEFAULT_MAXSIZE,
    prefix: str = "shard",
    shuffle_seed: int | None = 0,
    overwrite: bool = False,
    batch_size: int = 16,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the images of ``src`` with their captions into caption shards under ``out``; returns the index.

    With ``embed`` (e.g. an SD-XL folder's two text encoders, see ``gspn write-captions
    --embed-with``) the prompt embeddings of every caption are stored too, ``batch_size`` captions at a
    time; ``embed_source`` (the folder) is recorded in the index's ``meta.embeddings``."""
    old = existing_outputs(out)
    if old and not overwrite:  # before any slow loading
        raise ShardsExistError(
            f"{out} already holds {len(old)} shard/index file(s) (e.g. {old[0].name}); "
            "pass --overwrite (overwrite=True) to replace them"
        )
    pairs, skipped = caption_folder_samples(src, captions, allow_empty, shuffle_seed)
    meta: dict[str, Any] = {"captions": "txt"}
    if embed is not None:
        shapes = [a.shape[1:] for a in embed([""])]
        meta["embeddings"] = {
            **{name: list(shape) for name, shape in zip(EMBEDDING_NAMES, shapes)},
            "dtype": "float16", "sdxl": embed_source,
        }  # fmt: skip
    index = write_shards(
        _samples(pairs, Path(src), embed, batch_size), out, maxcount=maxcount, maxsize=maxsize,
        overwrite=overwrite, prefix=prefix, total=len(pairs), progress=progress, meta=meta, labelled=False,
    )  # fmt: skip
    if skipped:
        print(f"skipped {skipped} image(s) without a caption", file=sys.stderr)
    return index
