"""Image sources for FID/KID: whatever the user has, as batches of uint8 ``(n, 3, H, W)`` tensors.

A source is one of

- a folder of images (``.png``, ``.jpg``, ``.jpeg``, ``.bmp``, ``.webp``), searched recursively (an
  ImageFolder tree of class subfolders is one set of images), sorted by path, each opened with PIL and
  converted to RGB, as torch-fidelity does;
- an ``.npz`` file of uint8 images: the array ``images``, else ``arr_0``, else its only array (the
  ``.npz`` the sampling command writes, and ADM's/OpenAI's sample batches, use ``arr_0``);
- a uint8 ``torch.Tensor`` or ``numpy.ndarray`` of images;
- any other iterable of such arrays (batches), e.g. a generator decoding webdataset shards.

Arrays may be ``(N, 3, H, W)`` or ``(N, H, W, 3)`` (channels-last, as numpy images usually are),
``(N, 1, H, W)``/``(N, H, W, 1)``/``(N, H, W)`` grayscale, which is repeated to 3 channels. When both
axis 1 and the last axis could be channels, a tensor is read channels-first and an ndarray
channels-last. Images within one source may differ in size (the Inception network resizes every image
to 299x299 itself). Float images are refused rather than guessed at: convert them with
``(x * 255).round().clamp(0, 255).to(torch.uint8)`` for images in [0, 1].

Statistics (``.npz`` files holding ``mu`` and ``sigma``) are recognised by
:func:`gspn_lightning.metrics.fid.as_statistics`, not here.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def to_uint8_nchw(images, name: str = "images") -> torch.Tensor:
    """One array of images -> uint8 ``(N, 3, H, W)`` tensor (grayscale repeated to 3 channels)."""
    channels_first = isinstance(images, torch.Tensor)
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name}: expected a uint8 tensor or array of images, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise TypeError(
            f"{name}: images must be uint8 in [0, 255], got {images.dtype}; for floats in [0, 1] use "
            "(x * 255).round().clamp(0, 255).to(torch.uint8)"
        )
    if images.dim() == 3:
        images = images.unsqueeze(1)
    elif images.dim() == 4:
        first, last = images.shape[1] in (1, 3), images.shape[-1] in (1, 3)
        if last and not (first and channels_first):
            images = images.permute(0, 3, 1, 2)
        elif not first:
            raise ValueError(f"{name}: expected 1 or 3 channels, got shape {tuple(images.shape)}")
    else:
        raise ValueError(
            f"{name}: expected images of shape (N, 3, H, W), (N, H, W, 3) or (N, H, W), got {tuple(images.shape)}"
        )
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return images.contiguous()


def list_images(folder: str | os.PathLike) -> list[Path]:
    """The image files in ``folder`` and all its subfolders (an ImageFolder tree: class folders),
    sorted by their path below ``folder``; hidden files and folders are left out."""
    root = Path(folder)
    files = sorted(
        (p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
         and not any(part.startswith(".") for part in p.relative_to(root).parts)),
        key=lambda p: p.relative_to(root).parts,
    )  # fmt: skip
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {folder} or its subfolders")
    return files


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """One image file -> uint8 ``(3, H, W)``."""
    from PIL import Image

    with Image.open(path) as img:
        return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).contiguous()


def load_npz_images(path: str | os.PathLike, name: str = "images") -> np.ndarray:
    """The image array of an ``.npz`` file (``images``, else ``arr_0``, else its only array)."""
    with np.load(path) as data:
        keys = list(data.files)
        for key in ("images", "arr_0"):
            if key in keys:
                return data[key]
        if len(keys) == 1:
            return data[keys[0]]
    raise ValueError(f"{name}: {path} holds arrays {keys}; expected 'images', 'arr_0' or a single array")


def _folder_batches(files: list[Path], batch_size: int) -> Iterator[torch.Tensor]:
    batch: list[torch.Tensor] = []
    for path in files:
        image = read_image(path)
        if batch and (len(batch) == batch_size or image.shape != batch[0].shape):
            yield torch.stack(batch)
            batch = []
        batch.append(image)
    if batch:
        yield torch.stack(batch)


def _split(images: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for start in range(0, len(images), batch_size):
        yield images[start : start + batch_size]


def image_batches(
    source, batch_size: int = 50, name: str = "images"
) -> tuple[Iterator[torch.Tensor], int | None]:
    """``(iterator over uint8 (n, 3, H, W) batches of at most batch_size, total count or None)``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if path.is_dir():
            files = list_images(path)
            return _folder_batches(files, batch_size), len(files)
        if path.is_file() and path.suffix == ".npz":
            source = load_npz_images(path, name)
        elif not path.exists():
            raise FileNotFoundError(f"{name}: {path} does not exist")
        else:
            raise ValueError(f"{name}: {path} is neither a folder of images nor an .npz file")
    if isinstance(source, (torch.Tensor, np.ndarray)):
        images = to_uint8_nchw(source, name)
        if len(images) == 0:
            raise ValueError(f"{name}: no images (shape {tuple(images.shape)})")
        return _split(images, batch_size), len(images)
    if isinstance(source, Iterable) and not isinstance(source, (dict, bytes)):
        total = sum(len(b) for b in source) if isinstance(source, (list, tuple)) else None

        def batches() -> Iterator[torch.Tensor]:
            for i, batch in enumerate(source):
                yield from _split(to_uint8_nchw(batch, f"{name} batch {i}"), batch_size)

        return batches(), total
    raise TypeError(
        f"{name}: expected a folder, an .npz file, a uint8 tensor/array or an iterable of them, "
        f"got {type(source).__name__}"
    )
