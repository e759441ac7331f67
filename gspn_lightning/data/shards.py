"""Generic webdataset shard machinery shared by every task's data: shard specifications and indexes,
exactly-once evaluation split over ranks and workers, resampled and resumable training streams with a
fixed epoch length, robust reading (unreadable shards skipped, then a clear error), and
:class:`ShardDataModule`, the LightningDataModule that wires them up around a per-task *decoder*.

A task's data module (images + class in :mod:`.images`, latents + class in :mod:`.latents`, images +
captions in :mod:`.captions`) only says how one raw sample (a dict of the tar members' bytes) becomes a
row: a :class:`RowDecoder`, returning ``(x, label)`` (or a row dict) for a good sample and its
corrupt row (label ``CORRUPT_LABEL``) for a broken one, so a corrupt sample is a counted row that never
desynchronises DDP ranks. That is the data's one corrupt-row policy: ``max_sample_failures`` broken
samples in a row are a :class:`CorruptDataError` naming the first causes (the data do not fit the
config), and the task makes an epoch without a usable row an error.

**Training** reads shards *with replacement* (no node or worker splitting is needed), shuffles raw
samples in a ``shuffle_buffer`` before decoding, decodes and augments in the workers and batches
there (:class:`TrainShardStream`). An epoch is exactly ``epoch_samples // world_size // batch_size``
batches on every rank (the train loader has that ``len``, so Lightning knows the number of steps),
which keeps DDP ranks in step. The stream is seeded from ``(seed, epoch, rank, worker)`` (``seed``
defaults to the run's ``seed_everything``) and the loader is resumable: a run resumed from a
mid-epoch checkpoint continues with exactly the batches an uninterrupted run would have trained on.
A shard that cannot be read, or is cut short (truncated: a read error after some samples, fewer samples
than its index records, no tar end-of-archive blocks), is warned about (the samples before the cut are
kept); after ``max_shard_failures`` such shards in a row (all shards unreadable: truncated tars, dead
URLs) the worker raises an error naming them, instead of resampling for ever. Evaluation reads shards
the same way.

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
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

from .protocol import CorruptDataError  # noqa: F401 (defined with the tasks' view of the data; raised here)
from .write_shards import IMAGE_EXTENSIONS, INDEX_NAME, read_index

#: Label of a row whose sample could not be decoded (its tensor is all zeros).
CORRUPT_LABEL = -1

# --------------------------------------------------------------------------------------------------
# Reading the members of one raw sample (what every task's decoder is made of)
# --------------------------------------------------------------------------------------------------


def parse_cls(raw: dict[str, Any]) -> int:
    """The integer in a raw sample's ``cls`` member (``KeyError`` without one, ``ValueError`` if not an int)."""
    return int(bytes(raw["cls"]).decode("ascii").strip())


class SampleError(ValueError):
    """A sample that cannot be decoded, with a message that says why (and, where it helps, what to set)."""


def read_label(raw: dict[str, Any], num_classes: int | None = None) -> int:
    """:func:`parse_cls`, with a :class:`SampleError` saying what is wrong: no ``cls`` member, not an
    integer, a label below 0 or ``>= num_classes`` (when given)."""
    if "cls" not in raw:
        raise SampleError("no .cls member (the class label)")
    try:
        label = parse_cls(raw)
    except ValueError:
        raise SampleError(f".cls {bytes(raw['cls'])[:20]!r} is not an integer") from None
    if label < 0 or (num_classes is not None and label >= num_classes):
        bound = f"[0, {num_classes})" if num_classes is not None else ">= 0"
        raise SampleError(
            f"label {label} out of range {bound}: the shard index or data.init_args.num_classes gives "
            f"{num_classes} classes"
        )
    return label


def read_image(raw: dict[str, Any], mode: str = "RGB"):
    """The sample's first image member (in :data:`IMAGE_EXTENSIONS` order) as a PIL image in ``mode``
    (a :class:`SampleError` when it has none or it cannot be decoded)."""
    from PIL import Image

    ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
    if ext is None:
        raise SampleError(f"no image member ({', '.join(IMAGE_EXTENSIONS)})")
    try:
        with Image.open(io.BytesIO(raw[ext])) as img:
            return img.convert(mode)
    except Exception as exc:
        why = re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", str(exc))  # one cause, whatever the buffer
        raise SampleError(
            f"the .{ext} member is not a decodable image ({type(exc).__name__}: {why})"
        ) from exc


def signed_pixels(image) -> torch.Tensor:
    """An RGB PIL image as float32 ``(3, H, W)`` in ``[-1, 1]`` (what the diffusion VAEs encode)."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1


def read_npy(raw: dict[str, Any], member: str) -> np.ndarray:
    """The ``.npy`` member ``member`` (no pickles); a :class:`SampleError` when it is missing or not an
    array."""
    if member not in raw:
        raise SampleError(f"no .{member} member")
    try:
        return np.load(io.BytesIO(raw[member]), allow_pickle=False)
    except Exception as exc:
        raise SampleError(f"the .{member} member is not a numpy array ({type(exc).__name__}: {exc})") from exc


def read_array(
    raw: dict[str, Any], member: str, shape: tuple[int | None, ...], expected_by: str = "expected",
    fix: str = "",
) -> np.ndarray:  # fmt: skip
    """The ``.npy`` member ``member`` (no pickles); a :class:`SampleError` unless it is finite and of
    ``shape`` (``None``: any size along that axis), saying who expects the shape (``expected_by``) and
    what to do (``fix``)."""
    arr = read_npy(raw, member)
    if arr.ndim != len(shape) or any(want is not None and got != want for got, want in zip(arr.shape, shape)):
        expected = tuple("n" if want is None else want for want in shape)
        raise SampleError(
            f"{member} of shape {arr.shape} but {expected_by} {expected}" + (f": {fix}" if fix else "")
        )
    if not np.isfinite(arr).all():
        raise SampleError(f"{member} holds NaN or inf values")
    return arr


def report_corrupt(raw: dict[str, Any], exc: BaseException, what: str = "corrupt") -> None:
    """Say on stderr why a sample became a corrupt row, when ``$GSPN_DATA_DEBUG`` is set (it is counted
    either way)."""
    if os.environ.get("GSPN_DATA_DEBUG"):
        print(f"{what} sample {raw.get('__key__')!r} of shard {raw.get('__url__')}: {exc!r}", file=sys.stderr)


# --------------------------------------------------------------------------------------------------
# The corrupt-row policy (every decoder: images, latents, captions)
# --------------------------------------------------------------------------------------------------


def describe_failure(exc: BaseException) -> str:
    """Why a sample failed, in words: a :class:`SampleError`'s message, else the exception's type and text."""
    if isinstance(exc, SampleError):
        return str(exc)
    if isinstance(exc, KeyError) and exc.args:
        return f"missing {exc.args[0]}"
    return f"{type(exc).__name__}: {exc}"


class RowDecoder:
    """Base of every task's decoder, and the one corrupt-row policy of the data.

    A subclass implements :meth:`decode` (a raw sample -> a row; it raises for a sample it cannot
    decode, a :class:`SampleError` saying why where it can) and :meth:`corrupt_row` (the placeholder
    row, label ``-1``, that stands for such a sample). Calling the decoder applies the policy:

    - a sample that fails becomes the corrupt row, is counted by the task (``*/corrupt``) and never
      desynchronises DDP ranks; the first one is warned about with its cause (``$GSPN_DATA_DEBUG``
      prints every one);
    - ``max_failures`` samples **in a row** that fail raise a :class:`CorruptDataError` naming the
      first causes: that is data that do not fit the config (latents of another size, labels past
      the classes, a broken transform), not a few corrupt samples. ``None``: no limit.
    """

    #: how many distinct causes an error names
    CAUSES_NAMED = 3

    def __init__(self, max_failures: int | None = 64):
        self.max_failures = max_failures
        self.failures_in_a_row = 0
        self._causes: dict[str, list] = {}  # cause -> [count, first sample] of the current run of failures
        self._warned = False

    def decode(self, raw: dict[str, Any]) -> Any:
        raise NotImplementedError

    def corrupt_row(self) -> Any:
        raise NotImplementedError

    def __call__(self, raw: dict[str, Any]) -> Any:
        try:
            row = self.decode(raw)
        except Exception as exc:  # a broken sample: a counted row, unless it happens to every sample
            self.failed(raw, exc)
            return self.corrupt_row()
        self.failures_in_a_row = 0
        self._causes.clear()
        return row

    def failed(self, raw: dict[str, Any], exc: BaseException) -> None:
        """Count one sample that could not be decoded; raise when the policy says so."""
        report_corrupt(raw, exc)
        cause = describe_failure(exc)
        where = f"sample {raw.get('__key__')!r} of shard {raw.get('__url__')}"
        self.failures_in_a_row += 1
        entry = (
            self._causes.setdefault(cause, [0, where]) if len(self._causes) < 16 else self._causes.get(cause)
        )
        if entry is not None:
            entry[0] += 1
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"skipping an undecodable {where}: {cause} (such rows are skipped and counted, "
                "*/corrupt; GSPN_DATA_DEBUG=1 prints every one)",
                stacklevel=2,
            )
        if self.max_failures is not None and self.failures_in_a_row >= self.max_failures:
            raise CorruptDataError(
                f"{self.failures_in_a_row} samples in a row could not be decoded "
                f"(data.init_args.max_sample_failures={self.max_failures}): the data do not fit the config, "
                f"this is not a few corrupt samples. {self.causes()}"
            ) from exc

    def causes(self) -> str:
        """The first distinct causes of the current run of failures, with a sample of each."""
        items = list(self._causes.items())
        named = "; ".join(f"{cause} ({n}x, e.g. {where})" for cause, (n, where) in items[: self.CAUSES_NAMED])
        more = (
            f"; and {len(items) - self.CAUSES_NAMED} other cause(s)" if len(items) > self.CAUSES_NAMED else ""
        )
        return f"Causes: {named}{more}" if items else "No sample failed to decode"


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
    urls, counts, classes = resolve_shard_counts(spec)
    total = sum(counts.values()) if counts is not None else None
    return urls, total, classes


def resolve_shard_counts(spec: str) -> tuple[list[str], dict[str, int] | None, list[str] | None]:
    """:func:`resolve_shards` with the sample count the index records for each shard
    (``{url: count}``, ``None`` when unknown) instead of their total."""
    spec = os.fspath(spec)
    path = Path(spec)
    counts: dict[str, int] | None = None
    classes: list[str] | None = None
    if _is_local(spec) and (path.is_dir() or path.suffix == ".json"):
        index_path = path / INDEX_NAME if path.is_dir() else path
        if index_path.is_file():
            index = read_index(index_path)
            urls = [str(index_path.parent / shard["name"]) for shard in index["shards"]]
            counts = {u: int(shard["count"]) for u, shard in zip(urls, index["shards"])}
            classes = index.get("classes")
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
                by_name = {shard["name"]: int(shard["count"]) for shard in index["shards"]}
                names = [os.path.basename(u) for u in urls]
                if all(n in by_name for n in names):
                    counts, classes = {u: by_name[n] for u, n in zip(urls, names)}, index.get("classes")
    if not urls:
        raise FileNotFoundError(f"no shards found for {spec!r}")
    missing = [u for u in urls if _is_local(u) and not os.path.isfile(u)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) of {spec!r} do not exist, e.g. {missing[0]!r}")
    return urls, counts, classes


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
    """Too many shards in a row could not be read (or were cut short)."""


def tar_ends_complete(url: str) -> bool | None:
    """Whether the local tar ``url`` ends with the end-of-archive blocks (1024 zero bytes) every tar
    writer puts there (Python's tarfile, webdataset, GNU tar, Go's archive/tar): a file cut short lacks
    them, while the tar reader takes a cut at a header for the end and reports nothing. ``None`` for
    a remote url (not checked)."""
    if not _is_local(url):
        return None
    try:
        with open(url, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            if size < 1024:
                return False
            f.seek(size - 1024)
            return not any(f.read(1024))
    except OSError:
        return False


def _record_error(errors: list[BaseException], exn: BaseException) -> bool:
    errors.append(exn)
    return True  # a webdataset handler: keep going with the next shard


def robust_tar_samples(
    sources, max_consecutive_failures: int | None = 16, counts: dict[str, int] | None = None,
    what: str = "training",
) -> Iterator[dict[str, Any]]:  # fmt: skip
    """Raw samples of the shards ``sources`` yields (``{"url": ...}`` dicts), skipping unreadable ones.

    A shard that yields no sample (it cannot be opened, is not a tar, is truncated before its first
    member) is skipped with a warning. A shard cut short (a read error after some samples, fewer
    samples than ``counts``, the index's record, says it holds, or a local file without the tar
    end-of-archive blocks, :func:`tar_ends_complete`) keeps the samples read before the cut and is
    warned about and counted the same way. ``max_consecutive_failures`` such shards in a row
    raise a :class:`ShardReadError` naming them and their errors (``None``: no limit).
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
        expected = counts.get(url) if counts is not None else None
        short = expected is not None and n < expected
        if n and not errors and not short and tar_ends_complete(url) is not False:
            failed.clear()
            in_a_row = 0
            continue
        if not n:
            why = f"unreadable shard {url}: " + (repr(errors[-1]) if errors else "no samples")
        elif errors:
            why = f"truncated shard {url}: a read error after {n} samples ({errors[-1]!r})"
        elif short:
            why = f"truncated shard {url}: {n} samples but its index records {expected}"
        else:
            why = f"truncated shard {url}: it ends after {n} samples without the tar end-of-archive blocks"
        failed[url] = why
        in_a_row += 1
        warnings.warn(f"skipping the rest of the {why}", stacklevel=2)
        if max_consecutive_failures is not None and in_a_row >= max_consecutive_failures:
            listed = "; ".join(list(failed.values())[:8])
            raise ShardReadError(
                f"{in_a_row} {what} shards in a row were unreadable or truncated (max_consecutive_failures="
                f"{max_consecutive_failures}, data.init_args.max_shard_failures): {listed}"
            )


class EvalShardSamples(IterableDataset):
    """Raw webdataset samples of this worker's share of an evaluation set (see :func:`eval_split`).

    Args:
        urls: all shards of the set, in a fixed order (the same on every rank).
        rank, world_size: this process's position, captured in the main process.
    """

    def __init__(
        self, urls: list[str], rank: int, world_size: int, counts: dict[str, int] | None = None,
        max_shard_failures: int | None = None,
    ):  # fmt: skip
        super().__init__()
        self.urls, self.rank, self.world_size = list(urls), rank, world_size
        self.counts, self.max_shard_failures = counts, max_shard_failures

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        shards, offset, stride = eval_split(len(self.urls), self.rank, self.world_size, worker, num_workers)
        sources = ({"url": self.urls[i]} for i in shards)
        samples = robust_tar_samples(sources, self.max_shard_failures, self.counts, "evaluation")
        return itertools.islice(samples, offset, None, stride)


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
    (default :func:`collate`, ``(tensor, label)`` pairs) turns ``batch_size`` rows into a batch.

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
        counts: dict[str, int] | None = None,
    ):
        super().__init__()
        self.urls, self.decoder, self.batch_size = list(urls), decoder, batch_size
        self.counts = counts
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
        samples = robust_tar_samples(shards, self.max_shard_failures, self.counts)
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
# The DataModule base
# --------------------------------------------------------------------------------------------------


def check_count(key: str, value: Any, optional: bool = False) -> None:
    """Reject a data module argument that is not an integer >= 1 (``optional``: or ``None``), naming
    it as ``data.init_args.<key>``."""
    if optional and value is None:
        return
    if isinstance(value, bool) or int(value) < 1:
        need = "an integer >= 1 or null" if optional else "an integer >= 1"
        raise ValueError(f"data.init_args.{key} must be {need}, got {value!r}")


def check_stream_args(**a: Any) -> None:
    """Reject bad shard-streaming arguments with the key (``data.init_args.<key>``) in the message."""

    def fail(key: str, need: str) -> None:
        raise ValueError(f"data.init_args.{key} {need}, got {a[key]!r}")

    for key in ("batch_size", "shuffle_buffer", "max_shard_failures", "max_sample_failures"):
        check_count(key, a[key])
    if a["num_workers"] < 0:
        fail("num_workers", "must be >= 0")
    if a["epoch_samples"] is not None and a["epoch_samples"] < 1:
        fail("epoch_samples", "must be >= 1 or null")
    check_count("num_classes", a["num_classes"], optional=True)


class ShardDataModule(L.LightningDataModule):
    """Train/val/test/predict loaders over webdataset shards, for any per-task decoder.

    Subclasses implement :meth:`train_decoder` and :meth:`eval_decoder` (a raw sample dict ->
    ``(tensor, label)`` row, ``CORRUPT_LABEL`` for a broken one). Nothing is read in ``__init__``:
    shard specifications are resolved when a loader (or ``num_*_samples``) is first needed.

    Args:
        train_shards / val_shards / test_shards / predict_shards: a folder with an ``index.json``,
            the path of an ``index.json``, or a brace pattern like ``/data/train-{000000..001281}.tar``
            (``None``: no such loader).
        batch_size: per device (per rank).
        num_workers: DataLoader worker processes per rank (0: load in the main process).
        epoch_samples: training samples per epoch over all ranks; ``None``: the total of the
            training index. Each rank runs ``epoch_samples // world_size // batch_size`` batches.
        shuffle_buffer: size of the training sample shuffle buffer, per worker (raw encoded samples).
        num_classes: number of classes when no shard index lists them; when an index lists them too,
            the two must agree (start-up fails naming both otherwise).
        pin_memory: pin batches in page-locked memory (only when CUDA is available).
        max_shard_failures: reading fails (naming the shards) after this many shards in a row were
            unreadable or truncated, instead of resampling unreadable shards for ever.
        max_sample_failures: decoding fails (naming the first causes) after this many samples in a
            row could not be decoded: the data do not fit the config (see :class:`RowDecoder`).
        seed: seed of the training stream; ``None``: the run's ``seed_everything`` seed.
    """

    def __init__(
        self,
        train_shards: str | None = None,
        val_shards: str | None = None,
        test_shards: str | None = None,
        predict_shards: str | None = None,
        batch_size: int = 128,
        num_workers: int = 8,
        epoch_samples: int | None = None,
        shuffle_buffer: int = 5000,
        num_classes: int | None = None,
        pin_memory: bool = True,
        max_shard_failures: int = 16,
        seed: int | None = None,
        max_sample_failures: int = 64,
    ):
        super().__init__()
        check_stream_args(
            batch_size=batch_size, num_workers=num_workers, epoch_samples=epoch_samples,
            shuffle_buffer=shuffle_buffer, max_shard_failures=max_shard_failures, num_classes=num_classes,
            max_sample_failures=max_sample_failures,
        )  # fmt: skip
        # No save_hyperparameters(): LightningCLI saves the whole config anyway, and Lightning refuses to
        # log hparams when a key (e.g. batch_size) is in both the module's and the datamodule's.
        self.train_shards, self.val_shards = train_shards, val_shards
        self.test_shards, self.predict_shards = test_shards, predict_shards
        self.batch_size, self.num_workers = batch_size, num_workers
        self.epoch_samples, self.shuffle_buffer = epoch_samples, shuffle_buffer
        self._num_classes = num_classes
        self.pin_memory = pin_memory
        self.max_shard_failures, self.max_sample_failures = max_shard_failures, max_sample_failures
        self.seed = seed
        self._resolved: dict[str, tuple[list[str], dict[str, int] | None, list[str] | None]] = {}

    # -- what a task's data module provides --------------------------------------------------------

    def train_decoder(self) -> Callable[[dict[str, Any]], tuple[torch.Tensor, int]]:
        raise NotImplementedError

    def eval_decoder(self, split: str) -> Callable[[dict[str, Any]], tuple[torch.Tensor, int]]:
        raise NotImplementedError

    def collate(self, rows: list) -> Any:
        """Rows of the decoders -> a batch (default: ``(stacked tensors, int64 labels)``)."""
        return collate(rows)

    # -- shard bookkeeping -------------------------------------------------------------------------

    def _resolve(self, split: str) -> tuple[list[str], dict[str, int] | None, list[str] | None] | None:
        """``(urls, {url: count} or None, classes or None)`` of the split (``None``: no such split)."""
        spec = getattr(self, f"{split}_shards")
        if spec is None:
            return None
        if split not in self._resolved:
            self._resolved[split] = resolve_shard_counts(spec)
        return self._resolved[split]

    def _total(self, split: str) -> int | None:
        resolved = self._resolve(split)
        return None if resolved is None or resolved[1] is None else sum(resolved[1].values())

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

    def index_meta(self, key: str) -> Any:
        """``key`` of the ``meta`` object of the first readable shard index that has one, or None."""
        return (self.index_field("meta") or {}).get(key)

    @staticmethod
    def agreed(key: str, given: Any, indexed: Any, where: str) -> Any:
        """A data fact given both in the config (``data.init_args.<key>``) and by the shard index
        (``where``): the one that is set, or a ``ValueError`` naming both values when they differ. The
        index describes the data as written; a config that says otherwise would decode every sample
        as corrupt."""
        if given is not None and indexed is not None and given != indexed:
            raise ValueError(
                f"data.init_args.{key} is {given} but the shard index's {where} is {indexed}: they must "
                f"agree (remove data.init_args.{key}, or write the shards again to match it)"
            )
        return given if given is not None else indexed

    def index_field(self, key: str) -> Any:
        """``key`` of the first readable shard index that has it (train, val, test, predict), or None."""
        for split in ("train", "val", "test", "predict"):
            spec = getattr(self, f"{split}_shards")
            if spec is None:
                continue
            path = Path(os.fspath(spec))
            index_path = path / INDEX_NAME if path.is_dir() else path
            if index_path.suffix == ".json" and index_path.is_file():
                value = read_index(index_path).get(key)
                if value is not None:
                    return value
        return None

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
        """Number of classes: from the indexes, else the ``num_classes`` argument (``None``: unknown).
        LightningCLI links it to the task's ``num_classes``."""
        classes = self.classes
        return self.agreed(
            "num_classes",
            self._num_classes,
            len(classes) if classes is not None else None,
            "classes list length",
        )

    # -- loaders -----------------------------------------------------------------------------------

    def split_classes(self, split: str) -> int | None:
        """How many classes the split's own index lists (labels are checked against it)."""
        classes = self._resolve(split)[2]
        return len(classes) if classes else self._num_classes

    def _loader_kwargs(self) -> dict[str, Any]:
        return dict(
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
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
            raise ValueError(f"{type(self).__name__}: train_shards is not set")
        stream = TrainShardStream(
            resolved[0],
            self.train_decoder(),
            self.batch_size,
            self.shuffle_buffer,
            self.max_shard_failures,
            rank=distributed_rank_world()[0],
            seed=self._train_seed(),
            collate_fn=self.collate,
            counts=resolved[1],
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
        pipeline = wds.DataPipeline(
            EvalShardSamples(urls, rank, world_size, resolved[1], self.max_shard_failures),
            wds.map(self.eval_decoder(split)),
            wds.batched(self.batch_size, collation_fn=self.collate, partial=True),
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

    # -- why a split gives no usable row -----------------------------------------------------------

    def corrupt_causes(self, split: str, samples: int = 64) -> str:
        """Why the first ``samples`` samples of ``split`` (``train``, ``val``, ``test``, ``predict``)
        fail to decode, read again in this process with the split's decoder: what a task names when an
        epoch had no usable row (the decoders run in DataLoader workers, which cannot tell it)."""
        resolved = self._resolve(split)
        if resolved is None:
            return f"no {split}_shards"
        decoder = self.train_decoder() if split == "train" else self.eval_decoder(split)
        if isinstance(decoder, RowDecoder):
            decoder.max_failures = None
        read = 0
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
            warnings.simplefilter("ignore")
            for raw in itertools.islice(EvalShardSamples(resolved[0], 0, 1, resolved[1]), samples):
                read += 1
                decoder(raw)
        if not read:
            return f"no sample could be read from the {split} shards"
        return decoder.causes() if isinstance(decoder, RowDecoder) else ""
