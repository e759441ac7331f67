"""``ImageWebDataModule``: ImageNet-style classification batches streamed from webdataset shards.

Shards are what :mod:`gspn_lightning.data.write_shards` writes: samples ``<key>.<image ext>`` +
``<key>.cls``. Every batch is ``(images, labels)``:

- ``images``: ``float32 (B, in_chans, image_size, image_size)``, normalised with ``mean``/``std``;
- ``labels``: ``int64 (B,)``.

**Corrupt samples.** A sample whose image cannot be decoded, or whose ``cls`` is missing, not an
integer, negative or (when the index lists the classes) out of range, is not dropped in the worker and
never raises (the task also counts labels ``>= num_classes`` of its model as corrupt): it comes through as a row with label ``-1`` and an all-zero image. The task drops the
``label == -1`` rows and counts them, which happens in the main process whatever ``num_workers`` is,
so the count is exact. A shard that cannot be opened or read as a tar at all is skipped with a warning
(its samples cannot be counted here); comparing the evaluated rows with ``num_val_samples`` /
``num_test_samples`` catches that.

**A transform that fails on every sample is an error, not corrupt data**: when the transform
raises on ``max_consecutive_failures`` decoded samples in a row, the worker raises with the last
error and the sample and shard it happened on.

**Training** reads shards *with replacement* (no node or worker splitting is needed), shuffles raw
samples in a ``shuffle_buffer`` before decoding, decodes and augments in the workers and batches
there (:class:`TrainShardStream`). An epoch is exactly ``epoch_samples // world_size // batch_size``
batches on every rank (the train loader has that ``len``, so Lightning knows the number of steps),
which keeps DDP ranks in step. The stream is seeded from ``(seed, epoch, rank, worker)`` (``seed``
defaults to the run's ``seed_everything``) and the loader is resumable: a run resumed from a
mid-epoch checkpoint continues with exactly the batches an uninterrupted run would have trained on.
A shard that cannot be read is skipped with a warning; after ``max_shard_failures`` shards in a row
gave no sample (all shards unreadable: truncated tars, dead URLs) the worker raises an error naming
them, instead of resampling for ever.

**Evaluation** (val/test/predict) reads every sample exactly once over all ranks and workers, without
resampling or shuffling. The split is decided from the rank and world size seen when the dataloader is
built (``torch.distributed`` when initialised, as under Lightning DDP; otherwise the ``RANK`` /
``WORLD_SIZE`` environment variables that ``torchrun`` sets; otherwise a single process) and the
DataLoader worker id, see :func:`eval_split`: whole shards are dealt round-robin to ranks when there
are at least as many shards as ranks, and to the workers of a rank when the rank has at least as many
shards as workers; otherwise that level deals *samples* round-robin instead (every member reads the
same shards and keeps every k-th sample). Every rank therefore gets at least one sample whenever
there are at least as many samples as ranks (so every rank runs at least one validation step), but
ranks may run different numbers of batches: the task must not call collectives per validation step
(log with ``on_epoch=True`` / torchmetrics, which sync at epoch end).
"""

from __future__ import annotations

import io
import itertools
import math
import os
import random
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import braceexpand
import lightning as L
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset
from torchvision.transforms import InterpolationMode, v2

from .write_shards import IMAGE_EXTENSIONS, INDEX_NAME, read_index

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)

#: Label of a row whose sample could not be decoded (its image is all zeros).
CORRUPT_LABEL = -1


# --------------------------------------------------------------------------------------------------
# Shard specifications
# --------------------------------------------------------------------------------------------------


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def resolve_shards(spec: str) -> tuple[list[str], int | None, list[str] | None]:
    """Expand a shard specification into ``(urls, total_samples or None, classes or None)``.

    ``spec`` is one of:

    - a folder holding an ``index.json`` (as written by ``write_shards``); a folder without an index
      falls back to its sorted ``*.tar`` files, with an unknown total;
    - the path of an ``index.json``; shard names are relative to its folder;
    - a brace pattern such as ``/data/train-{000000..000099}.tar`` (or a single url). When the
      matched shards all sit in one folder whose ``index.json`` lists every one of them, the total
      is the sum of their counts; otherwise it is unknown.

    Raises:
        FileNotFoundError: no shard matches, or a local shard file is missing.
    """
    spec = os.fspath(spec)
    path = Path(spec)
    total: int | None = None
    classes: list[str] | None = None
    if _is_local(spec) and (path.is_dir() or path.suffix == ".json"):
        index_path = path / INDEX_NAME if path.is_dir() else path
        if index_path.is_file():
            index = read_index(index_path)
            urls = [str(index_path.parent / shard["name"]) for shard in index["shards"]]
            total, classes = int(index["total"]), index.get("classes")
        elif path.is_dir():
            urls = [str(p) for p in sorted(path.glob("*.tar"))]
        else:
            raise FileNotFoundError(f"shard index {spec!r} does not exist")
    else:
        urls = list(braceexpand.braceexpand(spec))
        folders = {os.path.dirname(u) for u in urls}
        if len(folders) == 1 and _is_local(urls[0]):
            index_path = Path(folders.pop() or ".") / INDEX_NAME
            if index_path.is_file():
                index = read_index(index_path)
                counts = {shard["name"]: int(shard["count"]) for shard in index["shards"]}
                names = [os.path.basename(u) for u in urls]
                if all(n in counts for n in names):
                    total, classes = sum(counts[n] for n in names), index.get("classes")
    if not urls:
        raise FileNotFoundError(f"no shards found for {spec!r}")
    missing = [u for u in urls if _is_local(u) and not os.path.isfile(u)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) of {spec!r} do not exist, e.g. {missing[0]!r}")
    return urls, total, classes


# --------------------------------------------------------------------------------------------------
# Distributed / worker splitting for evaluation
# --------------------------------------------------------------------------------------------------


def distributed_rank_world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process.

    ``torch.distributed`` when it is initialised (Lightning DDP initialises it before it asks for
    dataloaders), else the ``RANK``/``WORLD_SIZE`` environment variables (torchrun), else ``(0, 1)``.
    It is read in the main process when a loader is built and handed to the workers, because a
    DataLoader worker started with the ``spawn`` method has no process group of its own.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return 0, 1


def eval_split(
    num_shards: int, rank: int, world_size: int, worker: int, num_workers: int
) -> tuple[list[int], int, int]:
    """Which samples one DataLoader worker of one rank evaluates.

    Returns:
        ``(shard_indices, offset, stride)``: the worker reads those shards in order and keeps the
        samples at positions ``offset, offset + stride, ...`` of that stream. Over all
        ``rank < world_size`` and ``worker < num_workers`` every sample is kept exactly once.

    Level 1 (ranks): with ``num_shards >= world_size`` shards are dealt round-robin
    (``rank, rank + world_size, ...``); otherwise every rank reads all shards and keeps every
    ``world_size``-th sample starting at ``rank``. Level 2 (workers) does the same within the rank's
    stream: whole shards if the rank has at least ``num_workers`` shards and is not already splitting
    samples, else every ``num_workers``-th sample of the rank's stream.
    """
    if not (0 <= rank < world_size and 0 <= worker < num_workers):
        raise ValueError(f"bad split position rank={rank}/{world_size} worker={worker}/{num_workers}")
    shards = list(range(num_shards))
    offset, stride = 0, 1
    if num_shards >= world_size:
        shards = shards[rank::world_size]
    else:
        offset, stride = rank, world_size
    if stride == 1 and len(shards) >= num_workers:
        shards = shards[worker::num_workers]
    else:
        # keep positions worker, worker + num_workers, ... of the rank's own sub-stream
        offset, stride = offset + stride * worker, stride * num_workers
    return shards, offset, stride


class ShardReadError(RuntimeError):
    """Too many training shards in a row could not be read."""


def _record_error(errors: list[BaseException], exn: BaseException) -> bool:
    errors.append(exn)
    return True  # a webdataset handler: keep going with the next shard


def robust_tar_samples(sources, max_consecutive_failures: int = 16) -> Iterator[dict[str, Any]]:
    """Raw samples of the shards ``sources`` yields (``{"url": ...}`` dicts), skipping unreadable ones.

    A shard that yields no sample (it cannot be opened, is not a tar, is truncated before its first
    member) is skipped with a warning; ``max_consecutive_failures`` such shards in a row raise a
    :class:`ShardReadError` naming them and their errors. A shard that fails part-way keeps the
    samples read before the failure.
    """
    failed: dict[str, str] = {}  # the shards of the current run of failures, with their errors
    in_a_row = 0
    for source in sources:
        url = source["url"]
        errors: list[BaseException] = []
        n = 0
        for sample in wds.tarfile_samples([source], handler=partial(_record_error, errors)):
            n += 1
            yield sample
        if n:
            failed.clear()
            in_a_row = 0
            continue
        why = repr(errors[-1]) if errors else "no samples"
        failed[url] = why
        in_a_row += 1
        warnings.warn(f"skipping unreadable shard {url}: {why}", stacklevel=2)
        if in_a_row >= max_consecutive_failures:
            listed = "; ".join(f"{u} ({e})" for u, e in list(failed.items())[:8])
            raise ShardReadError(
                f"{in_a_row} training shards in a row gave no sample (max_consecutive_failures="
                f"{max_consecutive_failures}); unreadable: {listed}"
            )


class EvalShardSamples(IterableDataset):
    """Raw webdataset samples of this worker's share of an evaluation set (see :func:`eval_split`).

    Args:
        urls: all shards of the set, in a fixed order (the same on every rank).
        rank, world_size: this process's position, captured in the main process.
    """

    def __init__(self, urls: list[str], rank: int, world_size: int):
        super().__init__()
        self.urls, self.rank, self.world_size = list(urls), rank, world_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        shards, offset, stride = eval_split(len(self.urls), self.rank, self.world_size, worker, num_workers)
        sources = ({"url": self.urls[i]} for i in shards)
        samples = wds.tarfile_samples(sources, handler=wds.warn_and_continue)
        return itertools.islice(samples, offset, None, stride)


# --------------------------------------------------------------------------------------------------
# Decoding and transforms
# --------------------------------------------------------------------------------------------------


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
) -> v2.Compose:
    """The DeiT/timm ImageNet training recipe with torchvision.transforms.v2 (PIL image in, tensor out).

    RandomResizedCrop -> horizontal flip -> RandAugment, or ColorJitter when RandAugment is off
    (timm likewise ignores colour jitter when RandAugment is on) -> float tensor -> Normalize ->
    RandomErasing (per-pixel normal noise, timm's ``mode='pixel'``).
    """
    steps: list[Callable] = [
        v2.RandomResizedCrop(image_size, scale=tuple(crop_scale), interpolation=interpolation)
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


class DecodeSample:
    """Turn a raw webdataset sample into ``(image tensor, label)``; a corrupt one into ``(zeros, -1)``.

    Args:
        transform: PIL image -> float tensor ``(in_chans, image_size, image_size)``.
        in_chans: 3 decodes to RGB, 1 to grayscale (``L``).
        image_size: size of the zero image of a corrupt sample.
        num_classes: labels ``>= num_classes`` count as corrupt (``None``: no upper check).
    """

    def __init__(
        self,
        transform: Callable,
        in_chans: int,
        image_size: int,
        num_classes: int | None = None,
        max_consecutive_failures: int = 64,
    ):
        self.transform, self.in_chans, self.image_size, self.num_classes = (
            transform,
            in_chans,
            image_size,
            num_classes,
        )
        self.max_consecutive_failures = max_consecutive_failures
        self._failures_in_a_row = 0

    def _label(self, sample: dict[str, Any]) -> int:
        label = int(bytes(sample["cls"]).decode("ascii").strip())
        if label < 0 or (self.num_classes is not None and label >= self.num_classes):
            raise ValueError(f"label {label} out of range")
        return label

    def __call__(self, sample: dict[str, Any]) -> tuple[torch.Tensor, int]:
        from PIL import Image

        where = f"sample {sample.get('__key__')!r} of shard {sample.get('__url__')}"
        try:
            label = self._label(sample)
            ext = next(e for e in IMAGE_EXTENSIONS if e in sample)
            with Image.open(io.BytesIO(sample[ext])) as img:
                img = img.convert("RGB" if self.in_chans == 3 else "L")
        except Exception as exc:  # a broken sample: a counted row, never a crash
            if os.environ.get("GSPN_DATA_DEBUG"):
                print(f"corrupt {where}: {exc!r}", file=sys.stderr)
            return self._corrupt_row()
        try:
            image = self.transform(img).as_subclass(torch.Tensor)
        except Exception as exc:  # decoded but not transformable: a row, unless it happens to every sample
            if os.environ.get("GSPN_DATA_DEBUG"):
                print(f"transform failed on {where}: {exc!r}", file=sys.stderr)
            self._failures_in_a_row += 1
            if self._failures_in_a_row >= self.max_consecutive_failures:
                raise RuntimeError(
                    f"the transform failed on {self._failures_in_a_row} decoded samples in a row (the last: "
                    f"{where}: {exc!r}); this is a configuration error, not corrupt data (check the "
                    "datamodule's mean/std, crop and augmentation settings)"
                ) from exc
            return self._corrupt_row()
        self._failures_in_a_row = 0
        return image, label

    def _corrupt_row(self) -> tuple[torch.Tensor, int]:
        return torch.zeros(self.in_chans, self.image_size, self.image_size), CORRUPT_LABEL


def collate(samples: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``(image, label)`` pairs into ``(images (B, C, H, W), labels int64 (B,))``."""
    images, labels = zip(*samples)
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)


def _derive_seed(*parts: Any) -> int:
    """A 63-bit seed from ``parts`` (stable across processes and Python runs, unlike ``hash``)."""
    return random.Random("/".join(map(str, parts))).getrandbits(63)


def shuffle_buffer_samples(samples: Iterator, bufsize: int, initial: int, rng: random.Random) -> Iterator:
    """Shuffle a stream through a buffer that fills to ``initial`` before the first sample leaves and
    grows to ``bufsize`` (two in, one out) while the stream lasts; the order depends only on ``rng``."""
    buffer: list = []
    for sample in samples:
        buffer.append(sample)
        if len(buffer) < bufsize:
            buffer.append(next(samples, None))
            if buffer[-1] is None:
                buffer.pop()
        if len(buffer) < initial:
            continue
        k = rng.randrange(len(buffer))
        buffer[k], buffer[-1] = buffer[-1], buffer[k]
        yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


class TrainShardStream(IterableDataset):
    """The training stream of one rank: resampled shards, a shuffle buffer, decoded batches.

    Generic over the task: ``decoder`` turns a raw webdataset sample into a row and ``collate_fn``
    (default :func:`collate`, ``(image, label)`` pairs) turns ``batch_size`` rows into a batch.

    Everything random in it is derived from ``(seed, epoch, rank, DataLoader worker)``: which shards
    are drawn, the shuffle order, and each sample's augmentation (its transform runs under a torch
    seed derived from the sample's position in the worker's stream). With the same seed an epoch
    therefore yields the same batches, and ``skip_batches`` (set before ``iter``) fast-forwards the
    epoch to where a resumed run stopped: the skipped samples are read but not decoded, and the
    batches after them are bit-identical to those of an uninterrupted run. ``seed=None`` draws a
    fresh random seed at every ``iter`` (no reproducibility).
    """

    def __init__(
        self,
        urls: list[str],
        decoder: Callable,
        batch_size: int,
        shuffle_buffer: int,
        max_shard_failures: int,
        rank: int,
        seed: int | None,
        collate_fn: Callable[[list], Any] | None = None,
    ):
        super().__init__()
        self.urls, self.decoder, self.batch_size = list(urls), decoder, batch_size
        self.collate_fn = collate_fn or collate
        self.shuffle_buffer, self.max_shard_failures = shuffle_buffer, max_shard_failures
        self.rank, self.seed = rank, seed
        self.epoch, self.skip_batches = 0, 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # The DataLoader takes batches from its workers in turn, starting with worker 0: batch i of
        # the epoch is (logical) worker i % num_workers's. After skipping k batches the first batch
        # taken (from worker 0) must be batch k, so worker w plays the part of worker (w + k) % n.
        worker = (worker + self.skip_batches) % num_workers
        seed = self.seed if self.seed is not None else random.SystemRandom().getrandbits(63)
        base = (seed, self.epoch, self.rank, worker)
        rng = random.Random(_derive_seed(*base, "shards"))
        shards = ({"url": rng.choice(self.urls)} for _ in itertools.count())
        samples = robust_tar_samples(shards, self.max_shard_failures)
        samples = shuffle_buffer_samples(samples, self.shuffle_buffer, min(self.shuffle_buffer, 1000), rng)
        skip_samples = len(range(worker, self.skip_batches, num_workers)) * self.batch_size
        rows = []
        for index, sample in enumerate(samples):
            if index < skip_samples:
                continue
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_derive_seed(*base, index))
                rows.append(self.decoder(sample))
            if len(rows) == self.batch_size:
                yield self.collate_fn(rows)
                rows = []


class FixedLengthLoader:
    """Iterate ``loader`` (infinite) for exactly ``num_batches`` batches per epoch; ``len`` is that number.

    With a ``stream`` (:class:`TrainShardStream`) it is also resumable: it passes on the epoch
    Lightning announces through ``sampler.set_epoch``, and its ``state_dict`` (which Lightning saves
    in every checkpoint) records how many batches of that epoch were handed out; after
    ``load_state_dict`` the resumed epoch is fast-forwarded past them, so training continues on the
    batches an uninterrupted run would have seen next.
    """

    def __init__(self, loader: DataLoader, num_batches: int, stream: TrainShardStream | None = None):
        self.loader, self.num_batches, self.stream = loader, num_batches, stream
        self.epoch, self._taken = 0, 0
        self._resume: dict[str, int] | None = None

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_done": self._taken}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = {"epoch": int(state["epoch"]), "batches_done": int(state["batches_done"])}

    @property
    def sampler(self) -> FixedLengthLoader:
        """Lightning calls ``dataloader.sampler.set_epoch(epoch)`` before each training epoch."""
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator:
        # A generator, so that the DataLoader iterator (and its worker processes) is released as
        # soon as the epoch's last batch has been taken, not when the next epoch starts. Its body
        # runs at the first next(), after Lightning has set the epoch and restored the state.
        skip, resume, self._resume = 0, self._resume, None
        if resume is not None and self.stream is not None and resume["epoch"] == self.epoch:
            skip = resume["batches_done"] if 0 < resume["batches_done"] < self.num_batches else 0
        if self.stream is not None:
            self.stream.epoch, self.stream.skip_batches = self.epoch, skip
        self._taken = skip
        for batch in itertools.islice(iter(self.loader), self.num_batches - skip):
            self._taken += 1
            yield batch


# --------------------------------------------------------------------------------------------------
# The DataModule
# --------------------------------------------------------------------------------------------------


def _check_datamodule_args(**a: Any) -> None:
    """Reject bad ``ImageWebDataModule`` arguments with the key in the message."""

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
    for key in ("image_size", "batch_size", "shuffle_buffer", "max_shard_failures", "max_transform_failures"):
        if isinstance(a[key], bool) or int(a[key]) < 1:
            fail(key, "must be an integer >= 1")
    if a["num_workers"] < 0:
        fail("num_workers", "must be >= 0")
    if a["epoch_samples"] is not None and a["epoch_samples"] < 1:
        fail("epoch_samples", "must be >= 1 or null")
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


class ImageWebDataModule(L.LightningDataModule):
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
        hflip: probability of a horizontal flip (0 disables it, e.g. for digits).
        eval_crop_pct: evaluation resizes the short side to ``image_size / eval_crop_pct`` and takes
            the ``image_size`` center crop.
        interpolation: resize interpolation (``"bicubic"``, ``"bilinear"``, ...).
        pin_memory: pin batches in page-locked memory (only when CUDA is available).
        max_shard_failures: training fails (naming the shards) after this many shards in a row gave
            no sample, instead of resampling unreadable shards for ever.
        max_transform_failures: a transform raising on this many decoded samples in a row is an error
            (a broken transform setting), not corrupt data.
        seed: seed of the training stream (shard draws, shuffle, augmentation; see
            :class:`TrainShardStream`); ``None``: the run's ``seed_everything`` seed
            (``$PL_GLOBAL_SEED``), or a fresh random one when there is none.

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
        hflip: float = 0.5,
        eval_crop_pct: float = 0.875,
        interpolation: str = "bicubic",
        pin_memory: bool = True,
        max_shard_failures: int = 16,
        max_transform_failures: int = 64,
        seed: int | None = None,
    ):
        super().__init__()
        _check_datamodule_args(
            in_chans=in_chans,
            mean=mean,
            std=std,
            image_size=image_size,
            batch_size=batch_size,
            num_workers=num_workers,
            epoch_samples=epoch_samples,
            shuffle_buffer=shuffle_buffer,
            crop_scale=crop_scale,
            hflip=hflip,
            random_erasing=random_erasing,
            color_jitter=color_jitter,
            eval_crop_pct=eval_crop_pct,
            max_shard_failures=max_shard_failures,
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
        # No save_hyperparameters(): LightningCLI saves the whole config anyway, and Lightning refuses to
        # log hparams when a key (e.g. batch_size) is in both the module's and the datamodule's.
        self.train_shards, self.val_shards = train_shards, val_shards
        self.test_shards, self.predict_shards = test_shards, predict_shards
        self.image_size, self.in_chans = image_size, in_chans
        self.batch_size, self.num_workers = batch_size, num_workers
        self.epoch_samples, self.shuffle_buffer = epoch_samples, shuffle_buffer
        self.mean, self.std = tuple(mean), tuple(std)
        self.randaugment, self.color_jitter, self.random_erasing = randaugment, color_jitter, random_erasing
        self.crop_scale, self.hflip, self.eval_crop_pct = tuple(crop_scale), hflip, eval_crop_pct
        self.interpolation = InterpolationMode(interpolation.lower())
        self.pin_memory = pin_memory
        self.max_shard_failures, self.max_transform_failures = max_shard_failures, max_transform_failures
        self.seed = seed
        self._resolved: dict[str, tuple[list[str], int | None, list[str] | None]] = {}

    # -- shard bookkeeping -------------------------------------------------------------------------

    def _resolve(self, split: str) -> tuple[list[str], int | None, list[str] | None] | None:
        spec = getattr(self, f"{split}_shards")
        if spec is None:
            return None
        if split not in self._resolved:
            self._resolved[split] = resolve_shards(spec)
        return self._resolved[split]

    def _total(self, split: str) -> int | None:
        resolved = self._resolve(split)
        return None if resolved is None else resolved[1]

    @property
    def num_train_samples(self) -> int | None:
        """Samples in the training index (``None`` if unknown)."""
        return self._total("train")

    @property
    def num_val_samples(self) -> int | None:
        """Samples in the validation set according to its index (``None`` if unknown or no set)."""
        return self._total("val")

    @property
    def num_test_samples(self) -> int | None:
        """Samples in the test set according to its index (``None`` if unknown or no set)."""
        return self._total("test")

    @property
    def num_predict_samples(self) -> int | None:
        """Samples in the predict set according to its index (``None`` if unknown or no set)."""
        return self._total("predict")

    @property
    def classes(self) -> list[str] | None:
        """Class names from the first readable index that lists them (train, val, test, predict)."""
        for split in ("train", "val", "test", "predict"):
            try:
                resolved = self._resolve(split)
            except FileNotFoundError:  # e.g. `validate` on a machine without the training shards
                continue
            if resolved is not None and resolved[2]:
                return list(resolved[2])
        return None

    @property
    def num_classes(self) -> int | None:
        """Number of classes from the indexes (``None`` if no index lists them)."""
        classes = self.classes
        return None if classes is None else len(classes)

    # -- loaders -----------------------------------------------------------------------------------

    def _loader_kwargs(self) -> dict[str, Any]:
        return dict(
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
        )

    def _decoder(self, transform: Callable, split: str) -> DecodeSample:
        classes = self._resolve(split)[2]  # labels are checked against the split's own index
        return DecodeSample(
            transform,
            self.in_chans,
            self.image_size,
            len(classes) if classes else None,
            max_consecutive_failures=self.max_transform_failures,
        )

    def train_batches_per_epoch(self, world_size: int | None = None) -> int:
        """``epoch_samples // world_size // batch_size`` (at least 1)."""
        world_size = distributed_rank_world()[1] if world_size is None else world_size
        epoch_samples = self.epoch_samples if self.epoch_samples is not None else self.num_train_samples
        if epoch_samples is None:
            raise ValueError("the training shards have no index.json total: set epoch_samples")
        return max(1, epoch_samples // world_size // self.batch_size)

    def train_dataloader(self) -> FixedLengthLoader:
        """Infinite resampled stream cut into epochs of ``train_batches_per_epoch()`` batches."""
        resolved = self._resolve("train")
        if resolved is None:
            raise ValueError("ImageWebDataModule: train_shards is not set")
        urls = resolved[0]
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
        )
        stream = TrainShardStream(
            urls,
            self._decoder(transform, "train"),
            self.batch_size,
            self.shuffle_buffer,
            self.max_shard_failures,
            rank=distributed_rank_world()[0],
            seed=self._train_seed(),
        )
        loader = DataLoader(stream, **self._loader_kwargs())
        return FixedLengthLoader(loader, self.train_batches_per_epoch(), stream)

    def _train_seed(self) -> int | None:
        if self.seed is not None:
            return self.seed
        env = os.environ.get("PL_GLOBAL_SEED")  # set by seed_everything (the config's seed_everything)
        return int(env) if env not in (None, "") else None

    def _eval_dataloader(self, split: str) -> DataLoader | list:
        resolved = self._resolve(split)
        if resolved is None:
            return []
        urls = resolved[0]
        rank, world_size = distributed_rank_world()
        transform = build_eval_transform(
            self.image_size, self.mean, self.std, self.eval_crop_pct, self.interpolation
        )
        pipeline = wds.DataPipeline(
            EvalShardSamples(urls, rank, world_size),
            wds.map(self._decoder(transform, split)),
            wds.batched(self.batch_size, collation_fn=collate, partial=True),
        )
        total = self._total(split)
        if total is not None and total < world_size:
            warnings.warn(
                f"{split} set has {total} samples for {world_size} ranks: some ranks get none", stacklevel=2
            )
        return DataLoader(pipeline, **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader | list:
        """Every validation sample exactly once over all ranks and workers (``[]`` if no val_shards)."""
        return self._eval_dataloader("val")

    def test_dataloader(self) -> DataLoader | list:
        """Every test sample exactly once over all ranks and workers (``[]`` if no test_shards)."""
        return self._eval_dataloader("test")

    def predict_dataloader(self) -> DataLoader | list:
        """Every predict sample exactly once, batches as in validation (``[]`` if no predict_shards)."""
        return self._eval_dataloader("predict")
