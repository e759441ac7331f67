"""Numbered samples of a class-conditional diffusion model, each from its own seed, as PNG files, packed
into one ``.npz``; and a grid of them by class.  What ``gspn sample`` and ``gspn evaluate`` run.

Sample ``i`` (0 <= i < N) has class ``i % num_classes`` (class-balanced) and is drawn entirely from
its own seed :func:`sample_seed` ``(seed, i)``: the starting noise and every stochastic step.  Rank
``r`` of ``w`` draws the indices ``i % w == r`` (:func:`sample_indices`) and :func:`draw` writes
``<out>/images/<i>.png`` atomically; a sample whose PNG exists is not drawn again, so a restarted job
neither duplicates nor skips, and the images do not depend on the number of ranks or the batch size
(up to floating-point reordering).  :func:`pack` puts all N into ``<out>/samples.npz`` (``arr_0``:
uint8 ``(N, H, W, C)`` as ADM's evaluation suite reads, ``labels``: ``(N,)``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

__all__ = ["draw", "pack", "png_path", "sample_grid", "sample_indices", "sample_seed"]


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample ``index``: distinct for every (seed, index) pair."""
    return (int(seed) << 32) + int(index)


def sample_indices(num_samples: int, rank: int, world_size: int) -> list[int]:
    """The indices rank ``rank`` of ``world_size`` draws."""
    return list(range(rank, num_samples, world_size))


def png_path(out: Path, i: int) -> Path:
    """Where sample ``i`` is written under ``out``."""
    return out / "images" / f"{i:06d}.png"


def _save_png(array: np.ndarray, path: Path) -> None:
    from PIL import Image

    tmp = path.with_suffix(".png.tmp")
    image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def draw(
    net,
    out: Path,
    indices: list[int],
    num_classes: int,
    shape: tuple[int, int, int],
    seed: int,
    batch_size: int,
    vae=None,
    progress: bool = True,
    **sample_kwargs,
) -> int:
    """Draw the samples of ``indices`` that have no PNG yet; returns how many were drawn."""
    from tqdm.auto import tqdm

    from gspn_lightning.diffusion import sample
    from gspn_lightning.diffusion.sampling import initial_noise
    from gspn_lightning.diffusion.vae import decode, to_uint8

    device = next(net.parameters()).device
    todo = [i for i in indices if not png_path(out, i).exists()]
    (out / "images").mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(todo), unit="img", desc="sampling", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        seeds = [sample_seed(seed, i) for i in chunk]
        labels = torch.tensor([i % num_classes for i in chunk], device=device)
        noise = initial_noise(shape, seeds, device)
        x = sample(net, labels, noise, seeds=seeds, learn_sigma=net.learn_sigma, **sample_kwargs)
        images = decode(vae, x) if vae is not None else x
        arrays = to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, C)
        for i, array in zip(chunk, arrays):
            _save_png(array, png_path(out, i))
        bar.update(len(chunk))
    bar.close()
    return len(todo)


def pack(out: Path, num_samples: int, num_classes: int) -> Path:
    """All ``num_samples`` PNGs into ``<out>/samples.npz`` (uint8 (N, H, W, C) and labels)."""
    from PIL import Image

    missing = [i for i in range(num_samples) if not png_path(out, i).exists()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {num_samples} samples are missing (e.g. {missing[:5]})")
    arrays = []
    for i in range(num_samples):
        a = np.asarray(Image.open(png_path(out, i)))
        arrays.append(a[..., None] if a.ndim == 2 else a)
    labels = np.arange(num_samples) % num_classes
    path = out / "samples.npz"
    np.savez(path.with_suffix(".tmp.npz"), arr_0=np.stack(arrays), labels=labels)
    os.replace(path.with_suffix(".tmp.npz"), path)
    return path


def sample_grid(images: np.ndarray, labels: np.ndarray, rows: int, per_row: int) -> np.ndarray:
    """uint8 grid: row ``k`` holds the first ``per_row`` samples of class ``k`` (2-pixel white gaps)."""
    N, H, W, C = images.shape
    grid = np.full((rows * (H + 2) + 2, per_row * (W + 2) + 2, C), 255, dtype=np.uint8)
    for k in range(rows):
        idx = np.flatnonzero(labels == k)[:per_row]
        for j, i in enumerate(idx):
            y, x = 2 + k * (H + 2), 2 + j * (W + 2)
            grid[y : y + H, x : x + W] = images[i]
    return grid
