"""Latent diffusion data: VAE latents + class, streamed from webdataset shards, and the command that
makes such shards from image shards.

**Shards.** Each sample is ``<key>.npy`` + ``<key>.cls``. The array is float16 ``(views, 2C, h, w)``:
for each stored view (the ADM centre crop, and its horizontal flip unless ``--no-flip``) the mean and
the standard deviation of the VAE's posterior, both already multiplied by the VAE's
``scaling_factor``. ``index.json`` records under ``"meta"`` the latent channels ``C`` and size ``h``,
the image size, the scaling factor and the VAE's folder, which the data module reads back and
LightningCLI links into the task (``in_chans``, ``image_size``).

**Batches** are ``(latents float32 (B, C, h, w), labels int64 (B,))``. Training draws a view at
random and a fresh posterior sample ``mean + std * N(0, 1)`` every time (what DiT does by encoding
on the fly, at none of its cost); evaluation uses view 0's posterior mean. A sample that cannot be
read (a latent of another shape than the config's, NaN values, no or a bad label) is a corrupt row
(zeros, label -1) under the data's one corrupt-row policy
(:class:`~gspn_lightning.data.shards.RowDecoder`: ``max_sample_failures`` in a row are an error naming
the causes); the streaming is :class:`~gspn_lightning.data.shards.ShardDataModule`'s. The latent
shape and the classes of the config (``in_chans``, ``image_size``, ``num_classes``) must agree with
the index's ``meta`` and ``classes`` when both are given: start-up fails naming both otherwise.

**Encoding** (``gspn encode-latents SRC OUT --vae PATH``, :func:`encode_shards`): reads every sample of the
image shards ``SRC`` exactly once, split over all devices that Lightning Fabric sees (``--devices``),
centre-crops it as ADM does (halve with a box filter while the short side is at least twice the
target, then bicubic to the target, then the centre square), encodes it (and its flip) with the VAE and
writes ``OUT/rank-NNN/`` shards per rank; rank 0 then writes ``OUT/index.json`` over all of them.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .shards import (
    CORRUPT_LABEL,
    EvalShardSamples,
    RowDecoder,
    SampleError,
    ShardDataModule,
    check_count,
    collate,
    parse_cls,
    read_image,
    read_label,
    read_npy,
    resolve_shards,
    signed_pixels,
)
from .write_shards import (
    IMAGE_EXTENSIONS,
    INDEX_NAME,
    existing_outputs,
    npy_bytes,
    read_index,
    write_index,
    write_shards,
)

__all__ = [
    "DecodeLatent",
    "LatentWebDataModule",
    "adm_center_crop",
    "encode_shards",
    "real_images_from_shards",
]


# --------------------------------------------------------------------------------------------------
# Reading latent shards
# --------------------------------------------------------------------------------------------------


class DecodeLatent(RowDecoder):
    """Raw sample -> ``(latent (C, h, w), label)``; a broken one -> ``(zeros, -1)`` (the corrupt-row
    policy is :class:`~gspn_lightning.data.shards.RowDecoder`'s).

    Args:
        channels, size: the latent shape (from the index).
        sample: draw a random view and a posterior sample (training); else view 0's mean.
        num_classes: labels ``>= num_classes`` count as corrupt (``None``: no upper check).
        max_failures: this many samples in a row that fail are an error (``None``: no limit).
    """

    def __init__(
        self, channels: int, size: int, sample: bool, num_classes: int | None = None, max_failures: int | None = 64
    ):  # fmt: skip
        super().__init__(max_failures)
        self.channels, self.size, self.sample, self.num_classes = channels, size, sample, num_classes

    def corrupt_row(self) -> tuple[torch.Tensor, int]:
        return torch.zeros(self.channels, self.size, self.size), CORRUPT_LABEL

    def decode(self, raw: dict[str, Any]) -> tuple[torch.Tensor, int]:
        label = read_label(raw, self.num_classes)
        arr = read_npy(raw, "npy")  # (views, 2C, h, w)
        want = (self.channels, self.size, self.size)
        if arr.ndim != 4 or arr.shape[1:] != (2 * self.channels, self.size, self.size):
            paired = arr.ndim == 4 and arr.shape[1] % 2 == 0  # mean and std of C channels
            got = (arr.shape[1] // 2, *arr.shape[2:]) if paired else f"of an array {arr.shape}"
            raise SampleError(
                f"latent shape {got} but the config expects {want} (stored as (views, 2C, h, w) = "
                f"{arr.shape}): set data.init_args.in_chans / image_size to the latents' or re-encode them"
            )
        if not np.isfinite(arr).all():
            raise SampleError("the latent holds NaN or inf values: re-encode it")
        moments = torch.from_numpy(arr.astype(np.float32))  # (views, 2C, h, w)
        if not self.sample:
            return moments[0, : self.channels].clone(), label
        # the stream seeds torch per sample, so this draw is reproducible (and resumable)
        view = moments[int(torch.randint(len(moments), ()))]
        mean, std = view[: self.channels], view[self.channels :]
        return mean + std * torch.randn_like(std), label


class LatentWebDataModule(ShardDataModule):
    """Latent + class batches for latent diffusion (see the module docstring).

    Takes :class:`~gspn_lightning.data.shards.ShardDataModule`'s arguments; ``in_chans`` and
    ``image_size`` (the latent's channels and size) come from the shard index's ``meta``; given here
    too, they must agree with it (a start-up error names both values), and they are what a folder
    without ``meta`` needs. LightningCLI links them into the task.
    """

    def __init__(
        self,
        train_shards: str | None = None,
        val_shards: str | None = None,
        test_shards: str | None = None,
        predict_shards: str | None = None,
        batch_size: int = 32,
        num_workers: int = 4,
        epoch_samples: int | None = None,
        shuffle_buffer: int = 5000,
        num_classes: int | None = None,
        in_chans: int | None = None,
        image_size: int | None = None,
        pin_memory: bool = True,
        max_shard_failures: int = 16,
        seed: int | None = None,
        max_sample_failures: int = 64,
    ):
        super().__init__(
            train_shards, val_shards, test_shards, predict_shards, batch_size=batch_size,
            num_workers=num_workers, epoch_samples=epoch_samples, shuffle_buffer=shuffle_buffer,
            num_classes=num_classes, pin_memory=pin_memory, max_shard_failures=max_shard_failures, seed=seed,
            max_sample_failures=max_sample_failures,
        )  # fmt: skip
        check_count("in_chans", in_chans, optional=True)
        check_count("image_size", image_size, optional=True)
        self._in_chans, self._image_size = in_chans, image_size

    @property
    def in_chans(self) -> int | None:
        """Latent channels: the index's ``meta.channels``, else the argument (both: they must agree)."""
        return self.agreed("in_chans", self._in_chans, self.index_meta("channels"), "meta.channels")

    @property
    def image_size(self) -> int | None:
        """Latent size: the index's ``meta.size``, else the argument (both: they must agree)."""
        return self.agreed("image_size", self._image_size, self.index_meta("size"), "meta.size")

    @property
    def vae(self) -> str | None:
        """The VAE folder the latents were made with (from the index), for decoding samples."""
        return self.index_meta("vae")

    def _decoder(self, split: str, sample: bool) -> DecodeLatent:
        if self.in_chans is None or self.image_size is None:
            raise ValueError(
                "the latent shape is unknown: the shard index has no meta.channels/meta.size; set "
                "data.init_args.in_chans and data.init_args.image_size"
            )
        return DecodeLatent(
            self.in_chans, self.image_size, sample, self.split_classes(split), self.max_sample_failures
        )

    def train_decoder(self) -> DecodeLatent:
        return self._decoder("train", sample=True)

    def eval_decoder(self, split: str) -> DecodeLatent:
        return self._decoder(split, sample=False)


# --------------------------------------------------------------------------------------------------
# Writing latent shards
# --------------------------------------------------------------------------------------------------


def adm_center_crop(image, size: int):
    """ADM's centre crop of a PIL image to ``size x size``: box-filter halvings while the short side is
    at least ``2 size``, bicubic resize of the short side to ``size``, then the centre square."""
    from PIL import Image

    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


class _DecodeImage:
    """Raw image sample -> ``(image in [-1, 1] (3, S, S), label, key)``; unreadable ones -> label -1."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, raw: dict[str, Any]):
        key = raw.get("__key__", "?")
        try:
            label = parse_cls(raw)
            img = adm_center_crop(read_image(raw, "RGB"), self.size)
            return signed_pixels(img), label, key
        except Exception:  # skipped and counted by the encoder
            return torch.zeros(3, self.size, self.size), CORRUPT_LABEL, key


def _collate_keyed(rows):
    x, labels = collate([(r[0], r[1]) for r in rows])
    return x, labels, [r[2] for r in rows]


def encode_shards(
    src: str,
    out: str | Path,
    vae_path: str,
    image_size: int = 256,
    flip: bool = True,
    batch_size: int = 32,
    num_workers: int = 2,
    devices: str | int = "auto",
    accelerator: str = "auto",
    precision: str = "32-true",
    overwrite: bool = False,
    maxcount: int = 10000,
    progress: bool = True,
) -> dict[str, Any] | None:
    """Encode the image shards ``src`` into latent shards under ``out``; returns the index on rank 0."""
    import lightning as L
    from tqdm.auto import tqdm

    from gspn_lightning.diffusion.vae import load_vae

    out = Path(out)
    if (existing_outputs(out) or list(out.glob("rank-*/*.tar"))) and not overwrite:
        raise FileExistsError(f"{out} already holds latent shards; pass --overwrite to replace them")
    urls, _, classes = resolve_shards(src)
    fabric = L.Fabric(accelerator=accelerator, devices=devices, precision=precision)
    fabric.launch()
    vae = load_vae(vae_path, fabric.device)
    rank, world = fabric.global_rank, fabric.world_size
    loader = torch.utils.data.DataLoader(
        _Mapped(EvalShardSamples(urls, rank, world), _DecodeImage(image_size)),
        batch_size=batch_size, num_workers=num_workers, collate_fn=_collate_keyed,
    )  # fmt: skip
    scale = float(vae.config.scaling_factor)
    skipped = 0

    def samples():
        nonlocal skipped
        bar = tqdm(desc=f"encoding (rank {rank})", unit="img", disable=not progress, position=rank)
        for x, labels, keys in loader:
            ok = labels >= 0
            skipped += int((~ok).sum())
            if not ok.any():
                continue
            x, labels = x[ok].to(fabric.device), labels[ok]
            keys = [k for k, good in zip(keys, ok.tolist()) if good]
            views = [x, x.flip(-1)] if flip else [x]
            moments = []
            with torch.no_grad():
                for v in views:
                    dist = vae.encode(v.to(vae.dtype)).latent_dist
                    moments.append(torch.cat([dist.mean, dist.std], dim=1).float() * scale)  # (B, 2C, h, w)
            stacked = torch.stack(moments, dim=1).half().cpu().numpy()  # (B, views, 2C, h, w)
            for key, label, arr in zip(keys, labels.tolist(), stacked):
                yield {"__key__": key, "npy": npy_bytes(arr), "cls": int(label)}
            bar.update(len(keys))
        bar.close()

    latent_channels = int(vae.config.latent_channels)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    meta = {
        "channels": latent_channels, "size": image_size // factor, "image_size": image_size,
        "scaling_factor": scale, "vae": str(Path(vae_path).resolve()), "views": 2 if flip else 1,
        "stored": "posterior mean and std, times scaling_factor, float16 (views, 2C, h, w)",
    }  # fmt: skip
    rank_dir = out / f"rank-{rank:03d}"
    write_shards(
        samples(), rank_dir, maxcount=maxcount, overwrite=True, classes=classes, progress=False, meta=meta
    )
    fabric.barrier()
    if rank != 0:
        return None
    shards, total = [], 0
    for r in range(world):
        index = read_index(out / f"rank-{r:03d}" / INDEX_NAME)
        shards += [{"name": f"rank-{r:03d}/{s['name']}", "count": s["count"]} for s in index["shards"]]
        total += index["total"]
    merged = {"shards": shards, "total": total, "classes": classes or index["classes"], "meta": meta}
    write_index(out, merged)
    if skipped:
        print(f"skipped {skipped} unreadable image(s) on rank 0", file=sys.stderr)
    return merged


class _Mapped(torch.utils.data.IterableDataset):
    def __init__(self, dataset, fn):
        super().__init__()
        self.dataset, self.fn = dataset, fn

    def __iter__(self):
        return map(self.fn, iter(self.dataset))


def real_images_from_shards(
    spec: str, size: int, channels: int, center_crop: bool = False, with_labels: bool = False
):
    """Every image of the shards ``spec``, once, as uint8 ``(N, size, size, channels)``: resized, or
    ADM-centre-cropped (``center_crop``, as the latent shards are made); with ``with_labels`` also
    their classes ``(N,)`` (-1 for a sample without one). What reference statistics and sample
    evaluation compare generated images with."""
    from PIL import Image

    urls, _, _ = resolve_shards(spec)
    out, labels = [], []
    for raw in EvalShardSamples(urls, 0, 1):
        if not any(e in raw for e in IMAGE_EXTENSIONS):
            continue
        labels.append(parse_cls(raw) if "cls" in raw else -1)
        img = read_image(raw, "L" if channels == 1 else "RGB")
        img = adm_center_crop(img, size) if center_crop else img.resize((size, size), Image.BILINEAR)
        a = np.asarray(img)
        out.append(a[..., None] if a.ndim == 2 else a)
    if not out:
        raise FileNotFoundError(f"no images in the shards {spec!r}")
    return (np.stack(out), np.array(labels)) if with_labels else np.stack(out)
