"""``ImageWebDataModule``: image + class batches streamed from webdataset shards (classification, and
pixel-space diffusion such as the digits demo).

Shards are what :mod:`gspn_lightning.data.write_shards` writes: samples ``<key>.<image ext>`` +
``<key>.cls``. Every batch is ``(images, labels)``:

- ``images``: ``float32 (B, in_chans, image_size, image_size)``, normalised with ``mean``/``std``;
- ``labels``: ``int64 (B,)``.

The streaming itself (resampled training with a fixed epoch length, exactly-once evaluation over ranks
and workers, unreadable shards) is the generic machinery of :mod:`gspn_lightning.data.shards`; this
module only decodes and augments images.

**Corrupt samples.** A sample whose image cannot be decoded, or whose ``cls`` is missing, not an
integer, negative or (when the index lists the classes) out of range, or that the transform fails on,
is not dropped in the worker (the task also counts labels ``>= num_classes`` of its model as corrupt):
it comes through as a row with label ``-1`` and an all-zero image. The task drops the ``label == -1``
rows and counts them, which happens in the main process whatever ``num_workers`` is, so the count is
exact. This is the data's one corrupt-row policy (:class:`~gspn_lightning.data.shards.RowDecoder`):
``max_sample_failures`` such samples in a row are an error naming the first causes (a broken
transform setting, labels past the classes), and an epoch with no usable row is an error of the task.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torchvision.transforms import InterpolationMode, v2

from .shards import (
    CORRUPT_LABEL,
    RowDecoder,
    SampleError,
    ShardDataModule,
    check_count,
    read_image,
    read_label,
)

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)


def parse_randaugment(spec: str) -> dict[str, float]:
    """Parse a timm-style RandAugment string such as ``"rand-m9-mstd0.5"`` or ``"rand-m9-n2-mstd0.5-inc1"``.

    Keys: ``m`` magnitude (0..mmax, default 9), ``n`` number of ops (default 2), ``mstd`` std of
    the per-image magnitude noise (default 0), ``mmax`` magnitude upper bound (default 10), ``inc``
    accepted and ignored (torchvision's posterize/solarize already grow stronger with magnitude, which
    is timm's ``inc1``).
    """
    parts = spec.strip().split("-")
    if parts[0] != "rand":
        raise ValueError(f"randaugment spec must start with 'rand', got {spec!r}")
    params = {"m": 9.0, "n": 2.0, "mstd": 0.0, "mmax": 10.0}
    for part in parts[1:]:
        match = re.fullmatch(r"(mstd|mmax|inc|m|n)([0-9.]+)", part)
        if match is None:
            raise ValueError(
                f"unknown RandAugment option {part!r} in {spec!r} (known: m, n, mstd, mmax, inc)"
            )
        if match.group(1) != "inc":
            params[match.group(1)] = float(match.group(2))
    if params["n"] != int(params["n"]) or params["n"] < 0:
        raise ValueError(f"RandAugment n must be a non-negative integer in {spec!r}")
    return params


class MagnitudeNoiseRandAugment(v2.RandAugment):
    """torchvision RandAugment on timm's magnitude scale, with timm's magnitude noise (``mstd``).

    The magnitude is a level in ``[0, magnitude_max]`` (timm: 10 is each op's maximum strength).
    With ``magnitude_std > 0`` a level is drawn per image from ``N(magnitude, magnitude_std)`` and
    clipped to ``[0, magnitude_max]`` (timm draws one per op; here all ops of an image share it).
    Levels are quantised to 0.1 (torchvision indexes ``num_magnitude_bins`` discrete strengths).
    """

    _BINS_PER_LEVEL = 10

    def __init__(
        self,
        num_ops: int = 2,
        magnitude: float = 9.0,
        magnitude_std: float = 0.0,
        magnitude_max: float = 10.0,
        interpolation: InterpolationMode = InterpolationMode.BILINEAR,
        fill: Any = None,
    ):
        if not 0 <= magnitude <= magnitude_max:
            raise ValueError(f"magnitude {magnitude} outside [0, {magnitude_max}]")
        bins = int(round(magnitude_max * self._BINS_PER_LEVEL)) + 1
        super().__init__(
            num_ops=num_ops,
            magnitude=self._bin(magnitude),
            num_magnitude_bins=bins,
            interpolation=interpolation,
            fill=fill,
        )
        self.level, self.magnitude_std, self.magnitude_max = (
            float(magnitude),
            float(magnitude_std),
            magnitude_max,
        )

    def _bin(self, level: float) -> int:
        return int(round(level * self._BINS_PER_LEVEL))

    def forward(self, *inputs: Any) -> Any:
        if self.magnitude_std > 0:
            level = self.level + self.magnitude_std * float(torch.randn(()))
            self.magnitude = self._bin(min(max(level, 0.0), self.magnitude_max))
        return super().forward(*inputs)


def build_train_transform(
    image_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    crop_scale: tuple[float, float] = (0.08, 1.0),
    hflip: float = 0.5,
    randaugment: str | None = "rand-m9-mstd0.5",
    color_jitter: float = 0.4,
    random_erasing: float = 0.25,
    interpolation: InterpolationMode = InterpolationMode.BICUBIC,
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> v2.Compose:
    """The DeiT/timm ImageNet training recipe with torchvision.transforms.v2 (PIL image in, tensor out).

    RandomResizedCrop -> horizontal flip -> RandAugment, or ColorJitter when RandAugment is off
    (timm likewise ignores colour jitter when RandAugment is on) -> float tensor -> Normalize ->
    RandomErasing (per-pixel normal noise, timm's ``mode='pixel'``).
    """
    steps: list[Callable] = [
        v2.RandomResizedCrop(
            image_size, scale=tuple(crop_scale), ratio=tuple(crop_ratio), interpolation=interpolation
        )
    ]
    if hflip > 0:
        steps.append(v2.RandomHorizontalFlip(hflip))
    if randaugment and randaugment.lower() != "none":
        p = parse_randaugment(randaugment)
        fill = [min(255, round(255 * m)) for m in mean]  # timm fills with the mean pixel
        steps.append(
            MagnitudeNoiseRandAugment(
                int(p["n"]), p["m"], p["mstd"], p["mmax"], interpolation=interpolation, fill=fill
            )
        )
    elif color_jitter > 0:
        steps.append(v2.ColorJitter(color_jitter, color_jitter, color_jitter))
    steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    if random_erasing > 0:
        steps.append(v2.RandomErasing(p=random_erasing, value="random"))
    return v2.Compose(steps)


def build_eval_transform(
    image_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    crop_pct: float = 0.875,
    interpolation: InterpolationMode = InterpolationMode.BICUBIC,
) -> v2.Compose:
    """Resize the short side to ``floor(image_size / crop_pct)``, center-crop ``image_size``, normalise."""
    return v2.Compose(
        [
            v2.Resize(math.floor(image_size / crop_pct), interpolation=interpolation),
            v2.CenterCrop(image_size),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )


class DecodeSample(RowDecoder):
    """Turn a raw webdataset sample into ``(image tensor, label)``; a corrupt one into ``(zeros, -1)``
    (the corrupt-row policy is :class:`~gspn_lightning.data.shards.RowDecoder`'s).

    Args:
        transform: PIL image -> float tensor ``(in_chans, image_size, image_size)``.
        in_chans: 3 decodes to RGB, 1 to grayscale (``L``).
        image_size: size of the zero image of a corrupt sample.
        num_classes: labels ``>= num_classes`` count as corrupt (``None``: no upper check).
        max_consecutive_failures: this many samples in a row that fail are an error.
    """

    def __init__(
        self,
        transform: Callable,
        in_chans: int,
        image_size: int,
        num_classes: int | None = None,
        max_consecutive_failures: int | None = 64,
    ):
        super().__init__(max_consecutive_failures)
        self.transform, self.in_chans, self.image_size, self.num_classes = (
            transform,
            in_chans,
            image_size,
            num_classes,
        )

    def decode(self, sample: dict[str, Any]) -> tuple[torch.Tensor, int]:
        label = read_label(sample, self.num_classes)
        img = read_image(sample, "RGB" if self.in_chans == 3 else "L")
        try:
            image = self.transform(img).as_subclass(torch.Tensor)
        except Exception as exc:  # decoded but not transformable
            raise SampleError(
                f"the transform failed on a decoded image ({exc!r}): check the datamodule's mean/std, crop "
                "and augmentation settings"
            ) from exc
        return image, label

    def corrupt_row(self) -> tuple[torch.Tensor, int]:
        return torch.zeros(self.in_chans, self.image_size, self.image_size), CORRUPT_LABEL


# --------------------------------------------------------------------------------------------------
# The DataModule
# --------------------------------------------------------------------------------------------------


def _check_datamodule_args(**a: Any) -> None:
    """Reject bad image arguments of ``ImageWebDataModule`` with the key in the message (the
    streaming arguments are checked by :func:`~gspn_lightning.data.shards.check_stream_args`)."""

    def fail(key: str, need: str) -> None:
        raise ValueError(f"data.init_args.{key} {need}, got {a[key]!r}")

    if a["in_chans"] not in (1, 3):
        fail("in_chans", "must be 1 (grayscale) or 3 (RGB)")
    for key in ("mean", "std"):
        if len(a[key]) != a["in_chans"]:
            fail(key, f"needs {a['in_chans']} values for in_chans={a['in_chans']}")
        if not all(math.isfinite(float(v)) for v in a[key]):
            fail(key, "must be finite")
    if not all(float(v) > 0 for v in a["std"]):
        fail("std", "must be > 0 in every channel (it divides the pixels)")
    check_count("image_size", a["image_size"])
    check_count("max_transform_failures", a["max_transform_failures"], optional=True)
    scale = tuple(a["crop_scale"])
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        fail("crop_scale", "must be (low, high) with 0 < low <= high <= 1")
    for key in ("hflip", "random_erasing"):
        if not 0 <= a[key] <= 1:
            fail(key, "is a probability and must be in [0, 1]")
    if a["color_jitter"] < 0:
        fail("color_jitter", "must be >= 0")
    if not 0 < a["eval_crop_pct"] <= 1:
        fail("eval_crop_pct", "must be in (0, 1]")


class ImageWebDataModule(ShardDataModule):
    """Image classification from webdataset shards (ImageNet, the MNIST demo, ...).

    See the module docstring for the batch format, corrupt-sample rows (label ``-1``: the task drops
    and counts them) and how training/evaluation split the shards. Nothing is read in ``__init__``:
    shard specifications are resolved when a loader (or ``num_*_samples``) is first needed.

    Args:
        train_shards: training shards: a folder with an ``index.json``, the path of an
            ``index.json``, or a brace pattern like ``/data/train-{000000..001281}.tar``.
        val_shards: validation shards, same forms; ``None``: no validation loader.
        test_shards: test shards, same forms (``None``: ``trainer.test`` has no data).
        predict_shards: shards for ``trainer.predict``, same forms; batches as in validation.
        image_size: side of the square images in a batch.
        in_chans: 3 decodes images to RGB, 1 to grayscale.
        batch_size: batch size per device (per rank).
        num_workers: DataLoader worker processes per rank (0: load in the main process).
        epoch_samples: training samples per epoch over all ranks; ``None``: the total of the
            training index. Each rank runs ``epoch_samples // world_size // batch_size`` batches.
        shuffle_buffer: size of the training sample shuffle buffer, per worker (raw encoded samples).
        mean: per-channel normalisation mean (``in_chans`` values, in [0, 1] pixel units).
        std: per-channel normalisation std (``in_chans`` values).
        randaugment: timm-style RandAugment spec, e.g. ``"rand-m9-mstd0.5"`` (m: magnitude 0..10,
            n: ops per image, mstd: std of the per-image magnitude noise); ``None`` disables it.
        color_jitter: brightness/contrast/saturation jitter strength; only used when
            ``randaugment`` is ``None`` (as in timm); 0 disables it.
        random_erasing: probability of random erasing (filled with normal noise) after normalisation.
        crop_scale: area range of RandomResizedCrop.
        crop_ratio: aspect-ratio range of RandomResizedCrop (``[1, 1]`` with ``crop_scale: [1, 1]``
            resizes the whole image, e.g. for pixel-space diffusion).
        hflip: probability of a horizontal flip (0 disables it, e.g. for digits).
        eval_crop_pct: evaluation resizes the short side to ``image_size / eval_crop_pct`` and takes
            the ``image_size`` center crop.
        interpolation: resize interpolation (``"bicubic"``, ``"bilinear"``, ...).
        pin_memory: pin batches in page-locked memory (only when CUDA is available).
        max_shard_failures: reading fails (naming the shards) after this many shards in a row were
            unreadable or truncated, instead of resampling unreadable shards for ever.
        max_sample_failures: this many samples in a row that cannot be decoded or transformed are an
            error naming the first causes (a broken transform setting, data that do not fit the config),
            not corrupt data.
        max_transform_failures: the former name of ``max_sample_failures`` (deprecated; when set it
            wins).
        seed: seed of the training stream (shard draws, shuffle, augmentation; see
            :class:`~gspn_lightning.data.shards.TrainShardStream`); ``None``: the run's
            ``seed_everything`` seed (``$PL_GLOBAL_SEED``), or a fresh random one when there is none.
        num_classes: number of classes when no shard index lists them (LightningCLI links the
            data's class count to the task's ``num_classes``).

    Every argument is checked here, so a bad config fails before any work, naming the key.
    """

    def __init__(
        self,
        train_shards: str | None = None,
        val_shards: str | None = None,
        test_shards: str | None = None,
        predict_shards: str | None = None,
        image_size: int = 224,
        in_chans: int = 3,
        batch_size: int = 128,
        num_workers: int = 8,
        epoch_samples: int | None = None,
        shuffle_buffer: int = 5000,
        mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN,
        std: tuple[float, ...] = IMAGENET_DEFAULT_STD,
        randaugment: str | None = "rand-m9-mstd0.5",
        color_jitter: float = 0.4,
        random_erasing: float = 0.25,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        eval_crop_pct: float = 0.875,
        interpolation: str = "bicubic",
        pin_memory: bool = True,
        max_shard_failures: int = 16,
        max_sample_failures: int = 64,
        max_transform_failures: int | None = None,
        seed: int | None = None,
        num_classes: int | None = None,
    ):
        if max_transform_failures is not None:
            warnings.warn(
                "data.init_args.max_transform_failures is now max_sample_failures (for every data module)",
                DeprecationWarning,
                stacklevel=2,
            )
        super().__init__(
            train_shards, val_shards, test_shards, predict_shards, batch_size=batch_size,
            num_workers=num_workers, epoch_samples=epoch_samples, shuffle_buffer=shuffle_buffer,
            num_classes=num_classes, pin_memory=pin_memory, max_shard_failures=max_shard_failures, seed=seed,
            max_sample_failures=max_transform_failures or max_sample_failures,
        )  # fmt: skip
        _check_datamodule_args(
            in_chans=in_chans,
            mean=mean,
            std=std,
            image_size=image_size,
            crop_scale=crop_scale,
            hflip=hflip,
            random_erasing=random_erasing,
            color_jitter=color_jitter,
            eval_crop_pct=eval_crop_pct,
            max_transform_failures=max_transform_failures,
        )
        if randaugment and randaugment.lower() != "none":
            try:
                parse_randaugment(randaugment)  # fail at construction, not in a worker
            except ValueError as exc:
                raise ValueError(f"data.init_args.randaugment: {exc}") from None
        try:
            InterpolationMode(interpolation.lower())
        except ValueError:
            names = [m.value for m in InterpolationMode]
            raise ValueError(f"interpolation must be one of {names}, got {interpolation!r}") from None
        self.image_size, self.in_chans = image_size, in_chans
        self.mean, self.std = tuple(mean), tuple(std)
        self.randaugment, self.color_jitter, self.random_erasing = randaugment, color_jitter, random_erasing
        self.crop_scale, self.hflip, self.eval_crop_pct = tuple(crop_scale), hflip, eval_crop_pct
        self.crop_ratio = tuple(crop_ratio)
        if len(self.crop_ratio) != 2 or not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError(
                f"data.init_args.crop_ratio must be (low, high) with 0 < low <= high, got {crop_ratio!r}"
            )
        self.interpolation = InterpolationMode(interpolation.lower())

    # -- decoding (the streaming is ShardDataModule's) ---------------------------------------------

    def _decoder(self, transform: Callable, split: str) -> DecodeSample:
        return DecodeSample(
            transform,
            self.in_chans,
            self.image_size,
            self.split_classes(split),  # labels are checked against the split's own index
            max_consecutive_failures=self.max_sample_failures,
        )

    def train_decoder(self) -> DecodeSample:
        transform = build_train_transform(
            self.image_size,
            self.mean,
            self.std,
            self.crop_scale,
            self.hflip,
            self.randaugment,
            self.color_jitter,
            self.random_erasing,
            self.interpolation,
            self.crop_ratio,
        )
        return self._decoder(transform, "train")

    def eval_decoder(self, split: str) -> DecodeSample:
        transform = build_eval_transform(
            self.image_size, self.mean, self.std, self.eval_crop_pct, self.interpolation
        )
        return self._decoder(transform, split)
