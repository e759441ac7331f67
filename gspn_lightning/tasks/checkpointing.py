"""Checkpoints a run can always resume from: :class:`ResumableCheckpoint` and :func:`resolve_last`.

Shared by every task (the command line adds one ``ResumableCheckpoint`` to each run). What it adds to
Lightning's ``ModelCheckpoint``:

- **Resume picks the run's progress, not the newest file.** ``ckpt_path="last"`` resolves (with
  :func:`resolve_last`) to the checkpoint with the highest completed ``global_step`` among all
  ``*.ckpt`` files of the checkpoint folder (``last.ckpt``, the step/best checkpoints, the exception
  checkpoint) and SLURM's ``hpc_ckpt_*.ckpt``, that loads and carries the full training state. A
  newer file that does not load is reported with a warning naming it and the file used instead.
  At equal steps ``last.ckpt`` wins over the others and the exception checkpoint loses to all.
  A file that is not plain data (a pickle that names code: classes or functions other than
  tensors, containers and numbers) is never unpickled: it is skipped with a warning naming it, and
  the selection goes on among the others (:func:`load_checkpoint_file`).
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
- **Superseded checkpoints are removed on resume**: a fit resumed from a checkpoint at step ``s``
  (a top-k/step file given by path, say) deletes the checkpoints of its folder that load and hold
  a step beyond ``s``: the abandoned continuation's ranked files (otherwise never tracked, so never
  deleted, GBs each for SD-XL), its ``last.ckpt`` (which Lightning would keep beside a new
  ``last-v1.ckpt``, and which a later ``--ckpt_path last`` would prefer for its higher step) and its
  exception checkpoint. The file resumed from and files that do not load are left alone.

"""

from __future__ import annotations

import glob
import os
import pickle
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
#: keys a checkpoint needs to resume training (what a save without ``save_weights_only`` writes)
FULL_STATE_KEYS = ("state_dict", "global_step", "optimizer_states", "lr_schedulers", "loops")


class NonFiniteError(RuntimeError):
    """Raised instead of saving (or training on) non-finite values."""


class UnsafeCheckpointError(ValueError):
    """A checkpoint file that a weights-only load refuses: it would run code to unpickle."""


class CheckpointMismatchError(ValueError):
    """A checkpoint written by another task, or for other model arguments than the run's."""


def load_checkpoint_file(path, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)``: tensors, numbers, strings and containers only.

    ``mmap`` maps the tensors instead of reading them (a file of the legacy non-zip format is read
    whole). A file that names any other global (a class, a function: code) raises
    :class:`UnsafeCheckpointError` naming the file and that global; nothing in it runs.
    """
    try:
        try:
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except RuntimeError as exc:
            if not mmap or "mmap can only be used" not in str(exc):
                raise
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(
            r"(Unsupported global: GLOBAL \S+|Unsupported operand \S+|[^\n.]*not an allowed[^\n.]*)", str(exc)
        )
        why = found.group(1) if found else str(exc).strip().splitlines()[-1]
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it is not plain data (tensors, numbers, strings, containers) "
            f"and unpickling it could run code ({why}); nothing in it was executed"
        ) from None


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
    ckpt = load_checkpoint_file(path, mmap=True)
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
    for path, why in bad.items():
        if why.startswith(UnsafeCheckpointError.__name__):  # never silent, whatever its age
            rank_zero_warn(f"skipping checkpoint {path}: {why}")
    newer_bad = [
        p for p in bad
        if os.path.getmtime(p) >= os.path.getmtime(best) and not bad[p].startswith(UnsafeCheckpointError.__name__)
    ]  # fmt: skip
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
        if trainer.ckpt_path and trainer.is_global_zero:
            self.remove_superseded(trainer)

    def remove_superseded(self, trainer) -> list[str]:
        """Delete the checkpoints beyond the resumed step (see the module docstring)."""
        folder = self.checkpoint_folder(trainer)
        if not _is_local_file_protocol(folder) or not os.path.isdir(folder):
            return []
        keep = {os.path.normpath(os.path.abspath(p)) for p in (trainer.ckpt_path, *self.best_k_models)}
        removed = []
        for path in checkpoint_candidates(folder):
            if os.path.normpath(os.path.abspath(path)) in keep:
                continue
            try:
                step = probe_checkpoint(path, full_state=False)
            except Exception:  # not ours to judge: a file that does not load stays (and is warned about)
                continue
            if step > trainer.global_step:
                os.remove(path)
                removed.append(path)
                rank_zero_info(
                    f"removed {path} (step {step}): superseded by this run, resumed at step {trainer.global_step}"
                )
        return removed

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


# --------------------------------------------------------------------------------------------------
# Checkpoints by path: which task wrote it, for which model
# --------------------------------------------------------------------------------------------------

#: the checkpoint key naming the task class that wrote it (``module.Class``)
TASK_KEY = "gspn_task"


def task_class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def checkpoint_task(checkpoint: dict) -> str | None:
    """The task class that wrote ``checkpoint`` (``module.Class``): its own record, else the class
    path the command line saved with its hyper-parameters; ``None`` when neither is there."""
    hparams = checkpoint.get("hyper_parameters") or {}
    return checkpoint.get(TASK_KEY) or hparams.get("_class_path")


def _plain(value: Any) -> Any:
    """A value as plain data for comparison (namespaces and mappings as dicts, tuples as lists)."""
    if hasattr(value, "as_dict") and callable(value.as_dict):  # a jsonargparse Namespace
        value = value.as_dict()
    if isinstance(value, dict) or hasattr(value, "items"):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def model_argument_differences(saved: dict, current: dict, names) -> list[str]:
    """``name: checkpoint X, this run Y`` for each of ``names`` whose values differ (a name the
    checkpoint does not record, or that either side leaves unset (``None``), is not compared)."""
    out = []
    for name in names:
        if name not in saved or name not in current:
            continue
        a, b = _plain(saved[name]), _plain(current[name])
        if a is None or b is None or a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):  # name the differing entries
            for key in sorted(set(a) | set(b)):
                if a.get(key, "<unset>") != b.get(key, "<unset>"):
                    out.append(
                        f"{name}.{key}: checkpoint {a.get(key, '<unset>')!r}, this run {b.get(key, '<unset>')!r}"
                    )
        else:
            out.append(f"{name}: checkpoint {a!r}, this run {b!r}")
    return out


def check_checkpoint_task(written: str | None, expected: str, path: Any = None) -> None:
    """Refuse a checkpoint that another task class wrote (``written``, ``module.Class``) than
    ``expected`` (a class name or path), naming it."""
    name = expected.rsplit(".", 1)[-1]
    if written and written.rsplit(".", 1)[-1] != name:
        where = f" {path}" if path else ""
        raise CheckpointMismatchError(
            f"checkpoint{where} was written by {written.rsplit('.', 1)[-1]} ({written}), not by "
            f"{name}: use it with that task's config"
        )


def check_checkpoint_matches(task, checkpoint: dict, path: Any = None) -> None:
    """Refuse ``checkpoint`` for ``task`` when another task wrote it or when its model arguments
    (``type(task).MODEL_ARGUMENTS``) differ from the task's, naming both values of each."""
    from gspn_lightning.tasks.base import cli_values, upgrade_hparams

    def typed(hparams: dict) -> dict:  # dict options set on the command line arrive as strings
        return {k: cli_values(_plain(v)) if isinstance(_plain(v), dict) else v for k, v in hparams.items()}

    cls = type(task)
    check_checkpoint_task(checkpoint_task(checkpoint), cls.__name__, path)
    saved = dict(checkpoint.get("hyper_parameters") or {})
    saved.update(upgrade_hparams(saved, getattr(cls, "RENAMED_ARGUMENTS", {})))
    names = getattr(cls, "MODEL_ARGUMENTS", ())
    diffs = model_argument_differences(typed(saved), typed(dict(task.hparams)), names)
    if diffs:
        where = f" {path}" if path else ""
        raise CheckpointMismatchError(
            f"the checkpoint{where} was written for other model arguments than this run's: "
            + "; ".join(diffs)
            + ". Give the checkpoint's values (the command line, not the checkpoint, defines the model)"
        )
