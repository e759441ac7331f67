"""Checkpoints a run can always resume from: :class:`ResumableCheckpoint` and :func:`resolve_last`.

Shared by every task (the command line adds one ``ResumableCheckpoint`` to each run). What it adds to
Lightning's ``ModelCheckpoint``:

- **Resume picks the run's progress, not the newest file.** ``ckpt_path="last"`` resolves (with
  :func:`resolve_last`) to the checkpoint with the highest completed ``global_step`` among all
  ``*.ckpt`` files of the checkpoint folder (``last.ckpt``, the step/best checkpoints, the exception
  checkpoint) and SLURM's ``hpc_ckpt_*.ckpt``, that loads and carries the full training state. A
  newer file that does not load is reported with a warning naming it and the file used instead.
  At equal steps ``last.ckpt`` wins over the others and the exception checkpoint loses to all.
  The exception checkpoint of a diverged run (a ``NonFiniteError``; marked ``"diverged"`` in the
  file) is never chosen, with a warning: resuming it would repeat the step that diverged. (Passed
  by path it is resumed as any other.)
  When checkpoint files exist but none loads, resuming is an error (never a silent fresh start);
  ``validate``/``test``/``predict`` with ``last`` and no checkpoint at all is an error too (``fit``
  starts fresh, so the same command line can start and resume a run).
- **Atomic writes in the checkpoint's own folder**: each file is written under a temporary name in
  the same folder, flushed to disk (``fsync``), then renamed over the old one, so a kill at any
  moment leaves either the previous file or the new one, never a truncated one (also when the
  system temp folder is on another filesystem). Leftover temporary files are removed at set-up.
- **Never non-finite weights**: a save is refused with an error naming the step and the tensors
  when any parameter or buffer of the module is NaN/inf.
- **Every step interval is saved**: with ``every_n_train_steps`` and a ``monitor`` that only
  validation produces, Lightning defers the whole save until validation; here ``last.ckpt`` is
  still written at the step (the ranked top-k copy follows at validation). The final step of a run
  is always saved to ``last.ckpt``, also when ``max_steps`` is not a multiple of the interval.
- **Exception checkpoint** (``on_exception.ckpt``, ``save_on_exception=True``): written only while
  fitting, after this run has completed at least one optimizer step beyond the last saved one and
  with finite weights; it holds the full state (model, optimiser, schedule, EMA, loops). In a
  multi-process run only a SIGTERM (which Lightning delivers to every rank at the same point)
  writes it, because a save after a one-rank exception would wait for peers that are elsewhere.
  It is removed when the run completes.
- **SIGTERM** (a scheduler's pre-emption): the state is saved as above and the process exits with
  status 143 (128 + SIGTERM), not 0. SLURM requeueing follows Lightning's own convention
  (``SLURMEnvironment(auto_requeue=True)`` saves ``hpc_ckpt_<n>.ckpt`` on the requeue signal and
  requeues the job); those files are resume candidates too.
"""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

EXCEPTION_NAME = "on_exception"
TMP_MARK = ".tmp-"
SIGTERM_EXIT_CODE = 128 + 15
#: the key that marks the exception checkpoint of a diverged run (its value: the error), never resumed by ``last``
DIVERGED_KEY = "diverged"
#: keys a checkpoint needs to resume training (what ``save_weights_only=False`` writes)
FULL_STATE_KEYS = ("state_dict", "global_step", "optimizer_states", "lr_schedulers", "loops")


class NonFiniteError(RuntimeError):
    """Raised instead of saving (or training on) non-finite values."""


def nonfinite_tensors(module: torch.nn.Module, limit: int = 5) -> list[str]:
    """Names of up to ``limit`` floating-point parameters/buffers of ``module`` holding NaN or inf."""
    bad = []
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            bad.append(name)
            if len(bad) >= limit:
                break
    return bad


# --------------------------------------------------------------------------------------------------
# Atomic file writes
# --------------------------------------------------------------------------------------------------


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_path(filepath: str) -> str:
    """Where a checkpoint is written before its rename: a hidden file in the target's own folder."""
    folder, name = os.path.split(os.fspath(filepath))
    return os.path.join(folder, f".{name}{TMP_MARK}{os.getpid()}")


def commit_file(tmp: str, filepath: str) -> None:
    """fsync ``tmp`` and atomically rename it to ``filepath`` (same folder), then fsync the folder."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, filepath)
    _fsync_dir(os.path.dirname(os.path.abspath(filepath)))


def remove_stale_temp_files(folder: str) -> list[str]:
    """Delete checkpoint temp files a killed writer left in ``folder``; returns their paths."""
    stale = glob.glob(os.path.join(glob.escape(folder), f".*.ckpt{TMP_MARK}*"))
    for path in stale:
        try:
            os.remove(path)
        except OSError:
            pass
    return stale


# --------------------------------------------------------------------------------------------------
# Choosing the checkpoint to resume from
# --------------------------------------------------------------------------------------------------


def _rank(path: str) -> int:
    """Tie-break at equal steps: last.ckpt > other checkpoints > the exception checkpoint."""
    stem = Path(path).stem
    if re.fullmatch(r"last(-v\d+)?", stem):
        return 2
    if stem == EXCEPTION_NAME:
        return 0
    return 1


def probe_checkpoint(path: str, full_state: bool = True, info: dict | None = None) -> int:
    """Open ``path`` as a checkpoint and return its ``global_step``; raise if it cannot be used.

    The file is opened memory-mapped (the tensors are not read), which reads its whole zip
    directory and pickled structure: a truncated or half-written file fails here. ``full_state``
    also requires the optimiser, schedule and loop state that resuming a fit needs.
    """
    try:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except RuntimeError as exc:
        if "mmap can only be used" not in str(exc):
            raise
        ckpt = torch.load(path, map_location="cpu", weights_only=False)  # legacy (non-zip) format
    if not isinstance(ckpt, dict):
        raise ValueError("not a Lightning checkpoint (not a dict)")
    needed = FULL_STATE_KEYS if full_state else ("state_dict", "global_step")
    missing = [k for k in needed if k not in ckpt]
    if missing:
        raise ValueError(f"missing {', '.join(missing)} (saved with save_weights_only?)")
    if info is not None:  # what else the selection needs to know about the file
        info[DIVERGED_KEY] = ckpt.get(DIVERGED_KEY)
    return int(ckpt["global_step"])


def checkpoint_candidates(folder: str, extra_folders: tuple[str, ...] = ()) -> list[str]:
    """Every finished ``*.ckpt`` in ``folder`` and SLURM ``hpc_ckpt_*.ckpt`` in ``extra_folders``."""
    paths = [p for p in glob.glob(os.path.join(glob.escape(folder), "*.ckpt")) if os.path.isfile(p)]
    for extra in extra_folders:
        paths += [
            p for p in glob.glob(os.path.join(glob.escape(extra), "hpc_ckpt_*.ckpt")) if os.path.isfile(p)
        ]
    return sorted({os.path.normpath(p) for p in paths})


def resolve_last(folder: str, extra_folders: tuple[str, ...] = (), full_state: bool = True) -> str | None:
    """The checkpoint to resume from: the highest completed step that loads (see the module docstring).

    Returns ``None`` when there is no checkpoint at all. Raises ``RuntimeError`` naming every file
    when checkpoints exist but none can be loaded.
    """
    paths = checkpoint_candidates(folder, extra_folders)
    if not paths:
        return None
    good: dict[str, int] = {}
    bad: dict[str, str] = {}
    diverged: dict[str, str] = {}
    for path in paths:
        info: dict = {}
        try:
            step = probe_checkpoint(path, full_state, info)
        except Exception as exc:  # any failure to read means: not usable
            bad[path] = f"{type(exc).__name__}: {exc}"
            continue
        if info.get(DIVERGED_KEY):
            diverged[path] = str(info[DIVERGED_KEY])
        else:
            good[path] = step
    for path, why in diverged.items():
        # resuming it would take the same step to the same non-finite value again
        rank_zero_warn(
            f"ckpt_path='last': not resuming from {path}, the exception checkpoint of a diverged run "
            f"({why.splitlines()[0][:200]}); pass it by path to resume from it on purpose"
        )
    if not good and diverged and not bad:
        raise RuntimeError(
            f"ckpt_path='last': the only checkpoint in {folder} is the exception checkpoint of a diverged "
            f"run ({', '.join(diverged)}); pass it by path (--ckpt_path FILE) with a lower "
            "--model.init_args.optim.lr, or remove it to start afresh"
        )
    if not good:
        details = "; ".join(f"{p} ({why})" for p, why in bad.items())
        raise RuntimeError(f"ckpt_path='last': no checkpoint in {folder} can be loaded: {details}")
    best = max(good, key=lambda p: (good[p], _rank(p), os.path.getmtime(p)))
    newer_bad = [p for p in bad if os.path.getmtime(p) >= os.path.getmtime(best)]
    for path in newer_bad:
        rank_zero_warn(
            f"checkpoint {path} cannot be loaded ({bad[path]}); resuming from {best} "
            f"(step {good[best]}) instead"
        )
    return best


# --------------------------------------------------------------------------------------------------
# The callback
# --------------------------------------------------------------------------------------------------


class ResumableCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` with the resume, atomicity and fault guarantees of the module docstring.

    Takes every ``ModelCheckpoint`` argument; ``save_on_exception`` (default ``True`` here) controls
    the exception checkpoint. Its default ``filename`` is ``"{epoch:03d}-{step}"``, which Lightning
    turns into ``epoch=007-step=1234.ckpt``.
    """

    def __init__(self, *args: Any, save_on_exception: bool = True, **kwargs: Any):
        kwargs.setdefault("filename", "{epoch:03d}-{step}")
        super().__init__(*args, save_on_exception=save_on_exception, **kwargs)
        self._train_start_step: int | None = None

    # -- resolving ckpt_path="last" ----------------------------------------------------------------

    def checkpoint_folder(self, trainer) -> str:
        if self.dirpath is not None:
            return os.fspath(self.dirpath)
        return os.fspath(self._ModelCheckpoint__resolve_ckpt_dir(trainer))

    def _find_last_checkpoints(self, trainer) -> set[str]:
        # Lightning takes the newest by mtime among what this returns: return only the right one.
        folder = self.checkpoint_folder(trainer)
        if not _is_local_file_protocol(folder):
            return super()._find_last_checkpoints(trainer)
        extra = (os.fspath(trainer.default_root_dir),) if trainer.default_root_dir else ()
        fitting = trainer.state.fn == TrainerFn.FITTING
        best = resolve_last(folder, extra, full_state=fitting)
        if best is None and not fitting:
            # fit may start fresh (set-and-forget resume); evaluating untrained weights may not
            raise FileNotFoundError(
                f"ckpt_path='last': there is no checkpoint in {folder} to {trainer.state.fn.value}"
            )
        if best is not None:
            rank_zero_info(f"ckpt_path='last' resolved to {best}")
        return {best} if best is not None else set()

    # -- writing -----------------------------------------------------------------------------------

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero and self.dirpath and _is_local_file_protocol(self.dirpath):
            for path in remove_stale_temp_files(os.fspath(self.dirpath)):
                rank_zero_info(f"removed an unfinished checkpoint write: {path}")

    def _check_finite(self, trainer, filepath: str) -> None:
        bad = nonfinite_tensors(trainer.lightning_module)
        if bad:
            raise NonFiniteError(
                f"refusing to save checkpoint {filepath} at global step {trainer.global_step}: "
                f"non-finite values in {', '.join(bad)}"
            )

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        self._check_finite(trainer, filepath)
        if not _is_local_file_protocol(filepath):
            return super()._save_checkpoint(trainer, filepath)
        tmp = temp_path(filepath) if trainer.is_global_zero else None
        tmp = trainer.strategy.broadcast(tmp)
        trainer.save_checkpoint(tmp, self.save_weights_only)
        if trainer.is_global_zero:
            if os.path.isfile(tmp):
                commit_file(tmp, filepath)
            elif os.path.exists(tmp):  # a sharded strategy wrote a folder
                os.replace(tmp, filepath)
        trainer.strategy.barrier("ResumableCheckpoint.commit")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            from weakref import proxy

            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    # -- when to write -----------------------------------------------------------------------------

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if getattr(self, "_diverged", None):
            checkpoint[DIVERGED_KEY] = self._diverged

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._train_start_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        n = self._every_n_train_steps
        if n >= 1 and trainer.global_step % n == 0 and not self._should_skip_saving_checkpoint(trainer):
            # Lightning deferred this save (monitor not logged yet): keep the resume point anyway.
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer, pl_module) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))  # the final step
        super().on_train_end(trainer, pl_module)
        exc_path = self.exception_checkpoint_path(trainer)
        if trainer.is_global_zero and os.path.isfile(exc_path):
            os.remove(exc_path)

    def exception_checkpoint_path(self, trainer) -> str:
        return os.path.join(self.checkpoint_folder(trainer), EXCEPTION_NAME + self.FILE_EXTENSION)

    def _should_save_on_exception(self, trainer, exception: BaseException | None = None) -> bool:
        if not self.save_on_exception or trainer.fast_dev_run or trainer.sanity_checking:
            return False
        if trainer.state.fn != TrainerFn.FITTING or self._train_start_step is None:
            return False  # validate/test/predict, or training never started
        if trainer.global_step <= max(self._train_start_step, self._last_global_step_saved):
            return False  # nothing new since the run started or since the last save
        return trainer.world_size == 1 or isinstance(exception, SIGTERMException)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException) and exception.code in (None, 0):
            exception.code = SIGTERM_EXIT_CODE  # pre-empted is not "finished": exit non-zero
        if not self._should_save_on_exception(trainer, exception):
            return
        if nonfinite_tensors(pl_module):
            rank_zero_warn(f"not saving {EXCEPTION_NAME}.ckpt: the weights are not finite")
            return
        path = self.exception_checkpoint_path(trainer)
        # a divergence is marked in the file: `last` never resumes it (the same step would diverge again)
        self._diverged = (
            f"{type(exception).__name__}: {exception}" if isinstance(exception, NonFiniteError) else None
        )
        try:
            self._save_checkpoint(trainer, path)
        finally:
            self._diverged = None
        rank_zero_info(
            f"{type(exception).__name__} at global step {trainer.global_step}: saved {path} "
            "(resume with --ckpt_path last)"
        )
