"""What every training task shares: the optimiser and lr schedule, the weight EMA (what it covers and
when it updates) and the non-finite-loss policy.

- **Optimiser and schedule.** Every task takes them as one argument, ``optim``
  (:class:`OptimSettings`, with a default instance per task), read by :meth:`TrainingTask.init_optim`
  into ``self.optim``; :meth:`TrainingTask.configure_optimizers` builds AdamW with weight decay on
  matrices and kernels only (not on norms, biases and other 1-D parameters), the lr scaled by the global batch over
  ``base_batch_size`` when that is set, and a per-step schedule: linear warm-up then cosine decay
  (classification) or constant (diffusion, as DiT). Only parameters that require gradients are
  optimised.
- **EMA scope.** ``optim.ema_decay`` and ``optim.ema_scope``: :meth:`TrainingTask.init_ema` keeps an
  EMA of all parameters, or only of the trainable ones (``"trainable"``: the SD-XL task trains 0.4B of 2.6B); frozen parameters are then
  shared with the model, not copied.
- **Randomness of a step.** Every random draw of a training step is a function of ``(seed, global
  step, micro-batch within the accumulation, rank)``, never of how many steps this process has run, so a
  run resumed from a checkpoint draws what the uninterrupted run drew. The tasks' own draws (diffusion
  noise and timesteps, label and caption dropout, VAE samples) come from
  :meth:`TrainingTask.step_generator`, one generator per purpose; everything else that draws from the
  global RNG inside a step (drop path, dropout, mixup/cutmix) is covered by
  :meth:`TrainingTask.on_train_batch_start`, which seeds the global RNG from the same derivation
  before each training batch. Evaluation steps draw from ``(seed, batch index, rank)``: the same draws
  at every evaluation.

- **EMA after the optimizer step.** :meth:`TrainingTask.optimizer_step` updates the EMA right after
  the weights change, before any batch-end callback runs, so a checkpoint written at step ``n``
  holds the weights of step ``n`` and the EMA of the same ``n`` updates (resuming loses none). With
  gradient accumulation the EMA moves once per optimizer step.
- **Non-finite loss.** :meth:`TrainingTask.check_loss` is called by a task's ``training_step`` on
  its loss. With ``nonfinite_loss="error"`` (the default) a NaN/inf loss stops the run with a
  :class:`~gspn_lightning.tasks.checkpointing.NonFiniteError` naming the global step, epoch and
  batch, before the backward pass (so the weights stay finite). With ``"skip"`` the batch is
  skipped instead — no backward, no weight or EMA update; the step counter and lr schedule still
  advance — and more than ``max_consecutive_skips`` skipped batches in a row stop the run. Under
  DDP the decision is all-reduced, so every rank raises or skips at the same step.
- **Non-finite weights.** :meth:`TrainingTask.check_weights` runs after every optimizer step (one
  fused ``torch._foreach_norm`` over the optimised parameters and one host sync): an update that
  makes a weight NaN/inf through a finite loss stops the run at that step, before the EMA takes it.
- **Recovering.** The error's advice (:data:`RECOVERY`) works: ``--ckpt_path last`` never resumes the
  exception checkpoint of a diverged run, and :meth:`TrainingTask.apply_resumed_optim` applies the
  ``optim`` settings given to a resume (``lr``, ``base_batch_size``, ``weight_decay``, ``betas``) to
  the restored optimiser and schedule, with a warning naming each change.
- **Which weights evaluate.** Every task takes ``eval_weights`` (:data:`EVAL_WEIGHTS`): by default
  (``null``) validation and test evaluate the raw weights (``val/*``) and their EMA (``val_ema/*``)
  and ``predict`` and sampling use the EMA; ``raw`` or ``ema`` evaluates, predicts and samples with
  those weights only (:meth:`TrainingTask.eval_nets`, :meth:`TrainingTask.predict_net`), e.g.
  ``gspn predict ... --model.init_args.eval_weights raw`` after a run too short for its EMA.
- **The learning rate** is logged as ``lr`` each step (:meth:`TrainingTask.log_lr`) and shown on the
  progress bar in scientific notation (``3.0e-05``, where Lightning's bars would print ``0.000``).
- **Starting from weights.** Every task takes ``init_from`` (a ``.ckpt`` of another run, a
  ``.safetensors`` file or a ``save_pretrained`` folder), ``init_strict`` and ``init_weights``
  (:meth:`TrainingTask.init_weights_from`): the weights are loaded into the model (and the EMA
  restarts from them) when the trainer configures the model, before any step, and what loaded and
  what did not is printed (:mod:`gspn_lightning.tasks.weights`). Only weights: the optimiser, the
  schedule and the step count start fresh; a resume (``ckpt_path``) restores its own weights over them.
- **Compile and activation checkpointing.** ``compile`` and ``activation_checkpointing``
  (:meth:`TrainingTask.configure_switches`): ``torch.compile`` of the model in place (its state-dict
  keys unchanged, so checkpoints are the same with and without), and the model's per-block activation
  checkpointing (:func:`enable_activation_checkpointing`).
- **No training on nothing.** Rows the data marked corrupt are dropped and counted
  (:meth:`TrainingTask.count_corrupt`); a training epoch, or an evaluation, with no usable row on any
  rank is a :class:`~gspn_lightning.data.protocol.CorruptDataError` on every rank, naming the causes the
  datamodule finds in the split's first samples. ``trained_steps`` counts the optimizer steps that
  trained on a usable batch with a finite loss (saved in checkpoints); :meth:`TrainingTask.require_trained`
  refuses an export of a fit that trained none.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torchmetrics import SumMetric

from gspn_lightning.data.protocol import CorruptDataError, TaskData, task_data

from .checkpointing import (
    TASK_KEY,
    NonFiniteError,
    check_checkpoint_matches,
    check_checkpoint_task,
    checkpoint_task,
    load_checkpoint_file,
    task_class_name,
)
from .ema import ModelEMA

NONFINITE_POLICIES = ("error", "skip")
#: the advice of a NonFiniteError: what a user does next (tests/test_divergence.py follows it)
RECOVERY = (
    "To recover, resume from the last good checkpoint with a lower learning rate: --ckpt_path last "
    "--model.init_args.optim.lr <lower> (applied to the restored optimiser; the exception checkpoint of "
    "a diverged run is never the one 'last' resumes)"
)
SCHEDULES = ("cosine", "constant")
#: ``eval_weights`` of every task: ``None`` (raw and EMA evaluated, the EMA predicts), or one of these
EVAL_WEIGHTS = ("raw", "ema")
EMA_SCOPES = ("all", "trainable")


def derive_seed(*parts) -> int:
    """A 63-bit seed from ``parts`` (joined by ``/`` as strings): the same in every process, rank and
    platform, and unrelated for any two different tuples of parts."""
    return random.Random("/".join(map(str, parts))).getrandbits(63)


def cli_values(kwargs: dict | None) -> dict:
    """A dict of keyword options (a task's ``model_kwargs``, the SD-XL task's ``mixer``) with the string values
    read as YAML: a dict-valued argument set from the command line
    (``--model.init_args.model_kwargs.adaln_blocks true``) arrives with every value a string,
    where the same line in a config file would give ``True``; reading strings as YAML gives both the
    same meaning (``"all"`` stays ``"all"``, ``"1e-3"`` becomes a float, ``"null"`` None). Nested dicts
    (the ``mixer`` group: ``--model.init_args.model_kwargs.mixer.d_state 4``) are read the same way."""
    import yaml

    out = {}
    for key, value in (kwargs or {}).items():
        if isinstance(value, Mapping):
            value = cli_values(value)
        elif isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                pass  # not YAML: keep the string
        out[key] = value
    return out


def build_model(name: str, model_kwargs: dict | None, **facts):
    """``create_model(name, **facts, **model_kwargs)`` for a task, with errors that name the config key."""
    from gspn_lightning.models import create_model

    try:
        return create_model(name, **facts, **cli_values(model_kwargs))
    except KeyError as exc:
        raise ValueError(f"model.init_args.model: {exc.args[0]}") from None
    except TypeError as exc:
        raise TypeError(f"model.init_args.model_kwargs for model {name!r}: {exc}") from exc


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Per-block activation checkpointing of ``model``: the registry models' own
    ``set_grad_checkpointing`` (each block through a non-reentrant ``torch.utils.checkpoint``), or a
    diffusers model's ``enable_gradient_checkpointing`` (the SD-XL student)."""
    if hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(True)
    elif hasattr(model, "enable_gradient_checkpointing"):
        model.enable_gradient_checkpointing()
    else:
        raise ValueError(f"activation_checkpointing: {type(model).__name__} has no per-block checkpointing")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and kernels only: none on norms, biases and other 1-D parameters.
    Parameters that do not require gradients are left out."""
    decay, no_decay = [], []
    skip = set(getattr(model, "no_weight_decay", lambda: ())())
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, start: float, end: float) -> float:
    """Multiplier of the peak lr: linear from ``start`` to 1 over the warm-up, then cosine to ``end``."""
    if step < warmup_steps:
        return start + (1.0 - start) * step / max(1, warmup_steps)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_constant(step: int, warmup_steps: int, start: float) -> float:
    """Multiplier of the peak lr: linear from ``start`` to 1 over the warm-up, then 1."""
    if step < warmup_steps:
        return start + (1.0 - start) * step / max(1, warmup_steps)
    return 1.0


@dataclass(frozen=True)
class OptimSettings:
    """The optimiser, its per-step lr schedule and the weight EMA: one grouped argument, ``optim``, of
    every task (``--model.init_args.optim.lr``, ``model.init_args.optim: {lr: ..., warmup_steps: ...}``
    in a config).  Each task has its own default instance (:data:`CLASSIFICATION_OPTIM`,
    :data:`DIFFUSION_OPTIM`, :data:`DISTILLATION_OPTIM`); a config sets only the fields it changes.

    Args:
        lr: peak learning rate (for a global batch of ``base_batch_size`` if that is set).
        base_batch_size: scale ``lr`` (and ``warmup_lr``/``min_lr``) by global batch / this;
            ``None``: no scaling.
        weight_decay: AdamW weight decay (not on 1-D parameters).
        betas: AdamW betas.
        schedule: ``"cosine"`` (warm-up then cosine to ``min_lr``) or ``"constant"`` (warm-up then
            ``lr``).
        warmup_epochs / warmup_steps: length of the linear warm-up (epochs may be fractional; the two add).
        warmup_lr: lr at step 0 (unscaled, like ``lr``); ``None``: 0.
        min_lr: lr at the end of the cosine (unscaled, like ``lr``).
        ema_decay: decay of the weight EMA (``None``: no EMA).
        ema_scope: ``"all"`` parameters in the EMA, or only the ``"trainable"`` ones (the frozen ones
            are then shared with the model, not copied).
        ema_warmup: let the EMA decay grow with the optimizer steps, as timm's ``ModelEmaV3`` does:
            the decay of step ``n`` is ``min(ema_decay, 1 - (1 + (n - 1) / ema_warmup_gamma) **
            -ema_warmup_power)`` (0 at the first step). Off by default (a fixed ``ema_decay``).
        ema_warmup_power / ema_warmup_gamma: the warm-up's shape (2/3 and 1: 0.999 after about 32k
            steps; 3/4 reaches it after about 10k, for short runs).

    Gradient clipping is a Trainer setting (``trainer.gradient_clip_val``).
    """

    lr: float = 1e-4
    base_batch_size: int | None = None
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: str = "constant"
    warmup_epochs: float = 0.0
    warmup_steps: int = 0
    warmup_lr: float | None = None
    min_lr: float = 0.0
    ema_decay: float | None = 0.9999
    ema_scope: str = "all"
    ema_warmup: bool = False
    ema_warmup_power: float = 2.0 / 3.0
    ema_warmup_gamma: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not self.lr > 0:
            raise ValueError(f"optim.lr, the learning rate, must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if self.warmup_epochs < 0 or self.warmup_steps < 0:
            raise ValueError("the warm-up length (optim.warmup_epochs, optim.warmup_steps) must be >= 0")
        if self.base_batch_size is not None and self.base_batch_size < 1:
            raise ValueError(f"optim.base_batch_size must be >= 1 or null, got {self.base_batch_size}")
        if len(self.betas) != 2:
            raise ValueError(f"optim.betas must be two numbers, got {self.betas}")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"optim.ema_decay must be in [0, 1) or null, got {self.ema_decay}")
        if self.ema_scope not in EMA_SCOPES:
            raise ValueError(f"optim.ema_scope must be one of {EMA_SCOPES}, got {self.ema_scope!r}")
        if not self.ema_warmup_power > 0 or not self.ema_warmup_gamma > 0:
            raise ValueError(
                f"optim.ema_warmup_power and ema_warmup_gamma must be > 0, got {self.ema_warmup_power}, "
                f"{self.ema_warmup_gamma}"
            )

    @classmethod
    def build(cls, optim: OptimSettings | Mapping | None, default: OptimSettings) -> OptimSettings:
        """``optim`` as settings: an ``OptimSettings`` as it is, a dict (a checkpoint's hyper-parameters,
        or a caller's few fields) read over the task's ``default``, ``None``: ``default``."""
        if optim is None:
            return default
        if isinstance(optim, cls):
            return optim
        if not isinstance(optim, Mapping):
            raise TypeError(f"optim must be an OptimSettings or a dict, got {type(optim).__name__}")
        unknown = sorted(set(optim) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(f"unknown optim setting(s) {unknown}")
        return dataclasses.replace(default, **optim)

    def as_dict(self) -> dict:
        """Plain values (``betas`` a list), as saved in checkpoints and ``hparams.yaml``."""
        return {**dataclasses.asdict(self), "betas": list(self.betas)}


#: the paper's recipe (DeiT/Swin): lr 5e-4 per 512 samples, 20 warm-up epochs then a cosine to 5e-6
CLASSIFICATION_OPTIM = OptimSettings(
    lr=5e-4, base_batch_size=512, weight_decay=0.05, schedule="cosine", warmup_epochs=20.0, warmup_lr=5e-7,
    min_lr=5e-6, ema_decay=0.9999,
)  # fmt: skip
#: DiT's: AdamW at 1e-4, no weight decay, a constant lr, EMA 0.9999
DIFFUSION_OPTIM = OptimSettings(lr=1e-4, ema_decay=0.9999)
#: LinFusion's / the GSPN release's: as DiT's, the EMA over the trained (GSPN) parameters only
DISTILLATION_OPTIM = OptimSettings(lr=1e-4, ema_decay=0.9999, ema_scope="trainable")


#: the optim fields as flat task arguments in checkpoints written before the optim group existed
_LEGACY_OPTIM = {f.name: f.name for f in dataclasses.fields(OptimSettings)} | {"base_lr": "lr"}
#: the mixer options as flat model_kwargs in such checkpoints (``local_chunk_size`` the local chunk)
_LEGACY_MIXER = {"d_state": "d_state", "local_chunk_size": "chunk_size", "dw_kernel": "dw_kernel",
                 "directions": "directions", "backend": "backend"}  # fmt: skip


def upgrade_hparams(hparams: dict, renamed: dict[str, str] | None = None) -> dict:
    """The arguments that a checkpoint written before the ``optim`` and ``mixer`` groups needs to
    load: its flat optimiser/EMA arguments as ``optim``, its models' flat mixer options as
    ``model_kwargs.mixer``, and ``renamed`` arguments (old name -> new name) under their new names.
    Empty for a checkpoint of the current shape. (Its sample-grid and FID arguments, now callbacks,
    are dropped by ``load_from_checkpoint``, as any argument the task no longer takes.)"""
    out: dict = {}
    if "optim" not in hparams:
        optim = {new: hparams[old] for old, new in _LEGACY_OPTIM.items() if old in hparams}
        if optim:
            out["optim"] = optim
    kwargs = hparams.get("model_kwargs")
    if isinstance(kwargs, Mapping) and any(k in kwargs for k in _LEGACY_MIXER):
        mixer = {new: kwargs[old] for old, new in _LEGACY_MIXER.items() if old in kwargs}
        rest = {k: v for k, v in kwargs.items() if k not in _LEGACY_MIXER}
        out["model_kwargs"] = {**rest, "mixer": {**dict(rest.get("mixer") or {}), **mixer}}
    for old, new in (renamed or {}).items():
        if old in hparams and new not in hparams:
            out[new] = hparams[old]
    return out


def format_lr(value) -> str:
    """A learning rate as the progress bar shows it: ``3.0e-05``."""
    return f"{float(value):.1e}"


def show_lr_scientific(bar) -> None:
    """Make the progress bar ``bar`` (Lightning's TQDM or rich one, or ``None``) show ``lr`` in scientific
    notation: the rich bar prints every number with three decimals (``lr: 0.000`` for any lr below
    5e-4). Its metrics pass through :func:`format_lr` on their way to the bar; the loggers get the number."""
    if bar is None or getattr(bar, "_lr_scientific", False):
        return
    get_metrics = bar.get_metrics

    def metrics(trainer, pl_module):
        items = get_metrics(trainer, pl_module)
        value = items.get("lr")
        if isinstance(value, (int, float, torch.Tensor)) and not isinstance(value, bool):
            items = {**items, "lr": format_lr(value)}
        return items

    bar.get_metrics = metrics
    bar._lr_scientific = True


class TrainingTask(L.LightningModule):
    """Base of the task LightningModules. Subclasses take ``optim: OptimSettings`` (with their own
    default instance), set ``self.model`` and call :meth:`init_optim` and :meth:`configure_fault_policy`
    in ``__init__`` and :meth:`check_loss` in ``training_step``."""

    #: arguments renamed since checkpoints were first written (old name -> new name)
    RENAMED_ARGUMENTS: dict[str, str] = {}
    #: the arguments that define the network: a checkpoint recording other values is refused
    #: (:func:`~gspn_lightning.tasks.checkpointing.check_checkpoint_matches`)
    MODEL_ARGUMENTS: tuple[str, ...] = (
        "model", "model_kwargs", "num_classes", "in_chans", "image_size", "learn_sigma", "prediction",
    )  # fmt: skip

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, *args, **kwargs):
        """Lightning's, loading weights only (no code runs: see
        :func:`~gspn_lightning.tasks.checkpointing.load_checkpoint_file`), also for a checkpoint
        written before the ``optim`` and ``mixer`` groups (see :func:`upgrade_hparams`); arguments
        given here win, as in Lightning's. A checkpoint of another task is refused, naming it."""
        upgrade = {}
        if isinstance(checkpoint_path, (str, os.PathLike)):  # (a stream is read once, by Lightning)
            state = load_checkpoint_file(checkpoint_path, mmap=True)
            check_checkpoint_task(checkpoint_task(state), cls.__name__, checkpoint_path)
            hparams = state.get("hyper_parameters") or {}
            upgrade = upgrade_hparams(hparams, cls.RENAMED_ARGUMENTS)
            upgrade.update(cls.saved_argument_upgrades(hparams, state.get("state_dict") or {}))
            del state
        kwargs.setdefault("weights_only", True)
        return super().load_from_checkpoint(checkpoint_path, *args, **{**upgrade, **kwargs})

    @classmethod
    def saved_argument_upgrades(
        cls, hparams: Mapping, state_keys: Iterable[str], current: Mapping | None = None
    ) -> dict:
        """The arguments a checkpoint (its ``hparams`` and weights' ``state_keys``) was trained with but
        does not record, because their default changed since it was written: ``{name: value}``,
        applied when it is loaded by path and, on a resume, before it is compared with this run's
        arguments (``current``, that run's hyperparameters; ``None`` when loading by path).  None by
        default; a task whose defaults changed overrides it."""
        return {}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[TASK_KEY] = task_class_name(type(self))  # which task wrote it, for loading by path
        checkpoint["trained_steps"] = int(getattr(self, "trained_steps", 0))  # see require_trained

    # -- the datamodule -----------------------------------------------------------------------------

    def data(self, protocol: type = TaskData):
        """The trainer's datamodule as ``protocol`` declares it (:mod:`gspn_lightning.data.protocol`):
        ``None`` without a trainer or a datamodule (bare dataloaders), a ``TypeError`` naming what it
        lacks when it does not follow ``protocol``."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        return task_data(dm, protocol, type(self).__name__)

    # -- evaluation: the same hooks for every task ---------------------------------------------------

    def init_eval_weights(self, eval_weights: str | None) -> None:
        """Check the task's ``eval_weights`` argument (after :meth:`init_optim`, which makes the EMA):
        ``None``, ``"raw"`` or ``"ema"`` (which needs an EMA)."""
        if eval_weights is not None and eval_weights not in EVAL_WEIGHTS:
            raise ValueError(
                f"model.init_args.eval_weights must be one of {EVAL_WEIGHTS} or null (both), got {eval_weights!r}"
            )
        if eval_weights == "ema" and getattr(self, "ema", None) is None:
            raise ValueError(
                "model.init_args.eval_weights is ema but the task keeps no EMA (optim.ema_decay is null)"
            )

    @property
    def eval_weights(self) -> str | None:
        return self.hparams.get("eval_weights")

    def eval_nets(self, stage: str) -> list[tuple[str, torch.nn.Module]]:
        """The networks evaluated at ``stage`` with their log prefixes: the raw weights as ``stage``,
        their EMA as ``{stage}_ema`` where the task keeps one; only one of them with ``eval_weights``
        ``raw`` or ``ema``."""
        ema = getattr(self, "ema", None)
        nets = [(stage, self.model)] if self.eval_weights != "ema" else []
        if ema is not None and self.eval_weights != "raw":
            nets.append((f"{stage}_ema", ema.module))
        return nets

    def predict_net(self) -> torch.nn.Module:
        """The weights that predict and sample: the EMA where the task keeps one, unless
        ``eval_weights`` is ``raw``."""
        ema = getattr(self, "ema", None)
        return ema.module if ema is not None and self.eval_weights != "raw" else self.model

    def predict_weights(self) -> str:
        """``"ema"`` or ``"raw"``: which weights :meth:`predict_net` returns."""
        return "raw" if self.predict_net() is self.model else "ema"

    # -- the learning rate on the logger and the progress bar ------------------------------------------

    def log_lr(self) -> None:
        """Log the current lr as ``lr`` (each step, on the progress bar too)."""
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, prog_bar=True)

    def on_fit_start(self) -> None:
        show_lr_scientific(self.trainer.progress_bar_callback)

    def _eval_step(self, batch, batch_idx: int, stage: str) -> None:
        """Update this stage's metrics with one batch (no logging: a rank with no batch would skip
        the collectives of per-step logging)."""
        raise NotImplementedError

    def _eval_epoch_end(self, stage: str) -> None:
        """Compute, log and reset this stage's metrics (every rank takes part)."""
        raise NotImplementedError

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, batch_idx, "test")

    def on_validation_epoch_end(self):
        self._eval_epoch_end("val")
        self.log_sample_counts("val")

    def on_validation_start(self) -> None:
        # Evaluation must run no collective that a rank without a batch would skip. DDP's forward
        # broadcasts the module's buffers before the first forward after a training one (and before
        # the very first, the sanity check's): a rank with no validation batch never makes that
        # call and sits in the epoch-end metric sync, so the two ranks wait for each other forever.
        # Every rank calls this hook, batch or not: the pending sync is switched off on all of them
        # for the evaluation and switched back at its end, so training resumes in the same state
        # on every rank (the evaluation forwards, without grad, sync nothing else).
        wrapper = self._ddp_wrapper()
        if wrapper is not None:
            self._ddp_forward_sync = wrapper.require_forward_param_sync
            wrapper.require_forward_param_sync = False

    def on_validation_end(self) -> None:
        wrapper = self._ddp_wrapper()
        saved = getattr(self, "_ddp_forward_sync", None)
        if wrapper is not None and saved is not None:
            wrapper.require_forward_param_sync = saved
        self._ddp_forward_sync = None

    def _ddp_wrapper(self):
        """The trainer's ``DistributedDataParallel`` wrapper of this module (fit under DDP), else None."""
        if self._trainer is None:
            return None
        wrapper = getattr(self.trainer.strategy, "model", None)
        return wrapper if isinstance(wrapper, torch.nn.parallel.DistributedDataParallel) else None

    def on_test_epoch_end(self):
        self._eval_epoch_end("test")
        self.log_sample_counts("test")

    # -- randomness: every draw of a step from (seed, step, micro-batch, rank) -----------------------

    def run_seed(self) -> int:
        """The run's seed: the task's ``seed`` argument where it has one and it is set, else
        ``seed_everything``'s (``PL_GLOBAL_SEED``), else 0."""
        seed = self.hparams.get("seed")
        if seed is not None:
            return int(seed)
        return int(os.environ.get("PL_GLOBAL_SEED") or 0)

    def draw_key(self, batch_idx: int) -> tuple:
        """What the draws of the current step depend on: in a training step ``("train", global step,
        micro-batch within the gradient accumulation, rank)``; in an evaluation step ``("eval",
        batch index, rank)`` (the same draws at every evaluation)."""
        if self._trainer is not None and self.trainer.training:
            micro = batch_idx % max(1, self.trainer.accumulate_grad_batches)
            return ("train", self.global_step, micro, self.global_rank)
        return ("eval", batch_idx, self.global_rank)

    def step_generator(self, batch_idx: int, purpose: str | None = None, device=None) -> torch.Generator:
        """A generator (on ``device``, default the task's) seeded from the run's seed,
        :meth:`draw_key` and ``purpose`` (one stream per kind of draw: ``"diffusion"``, ``"labels"``,
        ...): a step's draws depend on the step, not on how many steps this process has run, so a
        resumed run draws what the uninterrupted one drew."""
        parts = self.draw_key(batch_idx) + ((purpose,) if purpose else ())
        return torch.Generator(device=device or self.device).manual_seed(derive_seed(self.run_seed(), *parts))

    def on_train_batch_start(self, batch, batch_idx):
        """Seed the global RNG (CPU and accelerators) from :meth:`draw_key` before each training batch:
        what a step draws from it (drop path, dropout, mixup/cutmix) is then, like the
        :meth:`step_generator` draws, the same in a resumed run as in the uninterrupted one, where
        ``seed_everything`` alone would replay the draws of steps 0, 1, ... after every restart. (A
        subclass that overrides this hook calls it.)"""
        torch.manual_seed(derive_seed(self.run_seed(), *self.draw_key(batch_idx), "global"))

    # -- corrupt rows and evaluated-sample counts --------------------------------------------------

    def init_sample_counts(self) -> None:
        """``self.counts``: samples evaluated / dropped as corrupt per evaluation stage, summed over
        ranks at epoch end (a rank with no batch still takes part)."""
        self.counts = torch.nn.ModuleDict(
            {k: SumMetric() for k in ("val_ok", "val_bad", "test_ok", "test_bad")}
        )

    def drop_corrupt(self, batch, stage: str):
        """``(x, labels)`` without the rows the data marked corrupt (label -1) or out of range for the
        model (``>= num_classes``), counted: ``train/corrupt`` per epoch, evaluation in ``self.counts``."""
        x, labels = batch
        ok = (labels >= 0) & (labels < self.hparams.num_classes)
        n_bad = self.count_corrupt(ok, stage)
        return (x[ok], labels[ok]) if n_bad else (x, labels)

    def count_corrupt(self, ok: torch.Tensor, stage: str) -> int:
        """Count a batch's good (``ok``) and corrupt rows as :meth:`drop_corrupt` does (for tasks whose
        batches are not ``(x, labels)``); returns the number of corrupt rows."""
        n_bad = int((~ok).sum())
        if stage == "train":
            self.log(
                "train/corrupt", float(n_bad), reduce_fx="sum", on_step=False, on_epoch=True, sync_dist=True
            )
            # the usable rows of the epoch over all ranks, for the epoch's check (no collective of its own)
            self.log(
                "train/usable", float(ok.sum()), reduce_fx="sum", on_step=False, on_epoch=True, sync_dist=True
            )
        else:
            self.counts[f"{stage}_ok"].update(torch.tensor(float(ok.sum()), device=ok.device))
            self.counts[f"{stage}_bad"].update(torch.tensor(float(n_bad), device=ok.device))
        return n_bad

    def log_sample_counts(self, stage: str) -> None:
        """Log how many samples this evaluation saw over all ranks and compare with the shard index:
        every sample exactly once."""
        ok_metric, bad_metric = self.counts[f"{stage}_ok"], self.counts[f"{stage}_bad"]
        seen, corrupt = int(ok_metric.compute().item()), int(bad_metric.compute().item())
        ok_metric.reset()
        bad_metric.reset()
        self.log(f"{stage}/samples", float(seen), sync_dist=False)
        self.log(f"{stage}/corrupt", float(corrupt), sync_dist=False)
        if seen == 0:  # the same sums on every rank: every rank raises
            self.no_usable_rows(stage, corrupt)
        dm = self.data()
        expected = getattr(dm, f"num_{stage}_samples") if dm is not None else None
        limit = self.trainer.limit_val_batches if stage == "val" else self.trainer.limit_test_batches
        if self.trainer.sanity_checking or expected is None or limit not in (None, 1.0):
            return
        if seen + corrupt != expected:
            rank_zero_warn(
                f"{stage}: evaluated {seen} samples (+{corrupt} corrupt) but the shard index lists {expected}; "
                "some samples were skipped or seen twice"
            )

    def on_train_epoch_start(self) -> None:
        self.check_train_epoch()  # the previous epoch's

    def on_train_end(self) -> None:
        self.check_train_epoch()  # the last epoch's

    def check_train_epoch(self) -> None:
        """A training epoch in which no rank had a usable row is an error, on every rank. It reads the
        epoch's ``train/usable`` and ``train/corrupt`` sums, which Lightning reduced over the ranks at
        the epoch's end (a collective in an epoch-end hook could pair with the lazy metric sync that
        only rank 0's progress bar starts), so it runs when the next epoch starts and when training
        ends."""
        metrics = self.trainer.callback_metrics  # the last finished epoch's (none before the first)
        if "train/usable" not in metrics:
            return
        usable, corrupt = float(metrics["train/usable"]), float(metrics.get("train/corrupt", 0.0))
        if usable == 0 and corrupt > 0:
            self.no_usable_rows("train", int(corrupt))

    def no_usable_rows(self, stage: str, corrupt: int) -> None:
        """Raise the :class:`CorruptDataError` of an epoch of ``stage`` without a usable row, with the
        causes the datamodule finds in the split's first samples."""
        dm = getattr(self.trainer, "datamodule", None)
        causes = ""
        if hasattr(dm, "corrupt_causes"):  # (the stages are the splits' names)
            try:
                causes = " " + dm.corrupt_causes(stage)
            except Exception as exc:  # the diagnosis must not hide the error itself
                causes = f" (the causes could not be read: {exc!r})"
        num_classes = self.hparams.get("num_classes")
        limit = (
            f", labels >= the model's num_classes={num_classes} included" if num_classes is not None else ""
        )
        where = "a training epoch" if stage == "train" else stage
        raise CorruptDataError(
            f"{where}: no usable row on any rank ({corrupt} corrupt rows{limit}): the run would train or "
            f"evaluate on nothing.{causes}"
        )

    # -- optimiser settings and EMA ---------------------------------------------------------------

    def init_optim(self, optim: OptimSettings | Mapping | None, default: OptimSettings) -> None:
        """Read the task's ``optim`` argument (see :meth:`OptimSettings.build`) into ``self.optim``,
        record it in the hyper-parameters as a plain dict (what a checkpoint holds and
        ``load_from_checkpoint`` hands back), and make ``self.ema`` of ``self.model`` as it says.
        Called by every task after :meth:`save_hyperparameters` and after ``self.model`` is built."""
        self.optim = OptimSettings.build(optim, default)
        if "optim" in self.hparams:
            self.hparams.optim = self.optim.as_dict()
        o = self.optim
        warmup = (o.ema_warmup_power, o.ema_warmup_gamma) if o.ema_warmup else (None, 1.0)
        self.init_ema(o.ema_decay, o.ema_scope, *warmup)

    def init_ema(
        self,
        decay: float | None,
        scope: str = "all",
        warmup_power: float | None = None,
        warmup_gamma: float = 1.0,
    ) -> None:
        """``self.ema``: an EMA of ``self.model`` (``decay=None``: none). ``scope="trainable"`` averages
        only the parameters that require gradients and shares the frozen ones with the model;
        ``warmup_power`` turns on the decay warm-up (:class:`~gspn_lightning.tasks.ema.ModelEMA`)."""
        if decay is not None and not 0.0 <= decay < 1.0:
            raise ValueError(f"optim.ema_decay must be in [0, 1) or null, got {decay}")
        if scope not in EMA_SCOPES:
            raise ValueError(f"optim.ema_scope must be one of {EMA_SCOPES}, got {scope!r}")
        include = None if scope == "all" else (lambda name, p: p.requires_grad)
        self.ema = (
            ModelEMA(self.model, decay, include=include, warmup_power=warmup_power, warmup_gamma=warmup_gamma)
            if decay is not None
            else None
        )

    # -- weights in: init_from -------------------------------------------------------------------

    def init_weights_from(
        self, init_from: str | None, strict: bool = True, weights: str | None = None
    ) -> None:
        """Record where the run's weights start (every task's ``init_from``, ``init_strict``,
        ``init_weights`` arguments); :meth:`configure_model` loads them (see
        :mod:`gspn_lightning.tasks.weights`). The file is not opened here: a checkpoint loaded later
        with ``load_from_checkpoint`` records the path but never reads it."""
        from .weights import INIT_WEIGHTS

        if weights is not None and weights not in INIT_WEIGHTS:
            raise ValueError(
                f"model.init_args.init_weights must be one of {INIT_WEIGHTS} or null, got {weights!r}"
            )
        self._init_from = (os.fspath(init_from) if init_from is not None else None, bool(strict), weights)
        self._init_report = None

    def init_targets(self) -> dict[str, torch.Tensor]:
        """The tensors ``init_from`` initialises, by state-dict name of ``self.model``: all of them
        (the distillation task: only the trained ones)."""
        return dict(self.model.state_dict())

    def load_init_weights(self):
        """Load ``init_from`` into the model (once; the EMA restarts from the loaded weights) and print
        what loaded and what did not. Strict: any missing, unexpected or shape-mismatched key is a
        ``ValueError`` naming them, before anything is loaded. Returns the
        :class:`~gspn_lightning.tasks.weights.InitReport` (``None`` without ``init_from``)."""
        from .weights import apply_weights, match_weights, read_init_source

        path, strict, weights = getattr(self, "_init_from", (None, True, None))
        if path is None or getattr(self, "_init_report", None) is not None:
            return getattr(self, "_init_report", None)
        state, source = read_init_source(path, weights)
        targets = self.init_targets()
        report = match_weights(targets, self.model.state_dict().keys(), state, source)
        if not report.loaded or (strict and not report.exact):
            advice = (
                " (init_strict: false loads the keys that match and lists the others)"
                if strict and report.loaded
                else ""
            )
            raise ValueError(
                f"model.init_args.init_from: the weights of {source} do not match this "
                f"{type(self).__name__}'s model{advice}: loaded {len(report.loaded)}; "
                + "; ".join(report.problems() or ["nothing in common"])
            )
        apply_weights(targets, state, report)
        if self.ema is not None:
            self.ema.reset(self.model)
        self._init_report = report
        self._print(report.summary() + ("" if report.exact else "\n  (init_strict: false: loaded the rest)"))
        return report

    def _print(self, message: str) -> None:
        if self._trainer is None or self.trainer.is_global_zero:
            print(message, flush=True)

    # -- switches: compile, activation checkpointing ---------------------------------------------

    def configure_switches(self, compile: bool = False, activation_checkpointing: bool = False) -> None:
        """Every task's ``compile`` and ``activation_checkpointing`` arguments: activation
        checkpointing is switched on now (:func:`enable_activation_checkpointing`), ``torch.compile``
        when the trainer configures the model (:meth:`configure_model`), in place
        (``nn.Module.compile``: the state-dict keys stay those of the plain model)."""
        self._compile = bool(compile)
        if activation_checkpointing:
            enable_activation_checkpointing(self.model)

    def configure_model(self) -> None:
        """Lightning's hook before the optimiser is built and a checkpoint restored: ``init_from``'s
        weights (:meth:`load_init_weights`), then ``compile`` (each once)."""
        self.load_init_weights()
        if getattr(self, "_compile", False) and not getattr(self, "_compiled", False):
            self.model.compile()
            self._compiled = True

    # -- optimisation ----------------------------------------------------------------------------

    def _global_batch(self) -> int:
        per_device = self.hparams.get("batch_size")
        dm = self.data()
        if per_device is None and dm is not None:
            per_device = dm.batch_size
        if per_device is None:
            raise ValueError("cannot scale the lr: set model.batch_size or use a datamodule with batch_size")
        return per_device * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def _steps_per_epoch(self) -> int:
        dm = self.data()
        epoch_samples = dm.epoch_samples if dm is not None else None
        if epoch_samples:
            return max(1, epoch_samples // self._global_batch())
        total = self.trainer.estimated_stepping_batches
        if math.isfinite(total) and self.trainer.max_epochs and self.trainer.max_epochs > 0:
            return max(1, int(total) // self.trainer.max_epochs)
        raise ValueError("cannot size the schedule: give the datamodule an epoch length (epoch_samples)")

    def configure_optimizers(self):
        o: OptimSettings = self.optim
        scale = self._global_batch() / o.base_batch_size if o.base_batch_size else 1.0
        optimizer = torch.optim.AdamW(
            param_groups(self.model, o.weight_decay), lr=o.lr * scale, betas=tuple(o.betas)
        )
        needs_epochs = o.warmup_epochs > 0 or o.schedule == "cosine"
        steps_per_epoch = self._steps_per_epoch() if needs_epochs else 1
        warmup = int(round(o.warmup_epochs * steps_per_epoch)) + int(o.warmup_steps)
        start = (o.warmup_lr or 0.0) / o.lr
        if o.schedule == "cosine":
            max_epochs = (
                self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 1
            )
            total = (
                self.trainer.max_steps
                if self.trainer.max_steps and self.trainer.max_steps > 0
                else (steps_per_epoch * max_epochs)
            )
            end = o.min_lr / o.lr
            fn = lambda step: warmup_cosine(step, warmup, total, start, end)  # noqa: E731
        else:
            fn = lambda step: warmup_constant(step, warmup, start)  # noqa: E731
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # -- faults ----------------------------------------------------------------------------------

    def configure_fault_policy(self, nonfinite_loss: str = "error", max_consecutive_skips: int = 10) -> None:
        if nonfinite_loss not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite_loss must be one of {NONFINITE_POLICIES}, got {nonfinite_loss!r}")
        if isinstance(max_consecutive_skips, bool) or int(max_consecutive_skips) < 1:
            raise ValueError(f"max_consecutive_skips must be an integer >= 1, got {max_consecutive_skips!r}")
        self._nonfinite_policy = nonfinite_loss
        self._max_skips = int(max_consecutive_skips)
        self._consecutive_skips = 0
        self._skip_this_step = False

    def check_loss(self, loss: torch.Tensor, batch_idx: int) -> torch.Tensor | None:
        """``loss`` if it is finite on every rank; otherwise raise or (``"skip"``) return ``None``."""
        bad = (~torch.isfinite(loss.detach())).any().float()
        if self.trainer.world_size > 1:
            bad = self.trainer.strategy.reduce(bad, reduce_op="sum")
        self._skip_this_step = False
        if float(bad) == 0:
            self._consecutive_skips = 0
            self._step_trains = True  # counted in trained_steps at the optimizer step
            return loss
        where = f"global step {self.trainer.global_step} (epoch {self.current_epoch}, batch {batch_idx})"
        value = loss.detach().float().flatten()[0].item()
        if self._nonfinite_policy == "error":
            raise NonFiniteError(
                f"non-finite training loss ({value}) at {where}; the weights are left as they were before "
                f"this step. {RECOVERY}, check the inputs, or set nonfinite_loss: skip"
            )
        self._consecutive_skips += 1
        if self._consecutive_skips > self._max_skips:
            raise NonFiniteError(
                f"non-finite training loss in {self._consecutive_skips} consecutive batches, the last at "
                f"{where}: more than max_consecutive_skips={self._max_skips}"
            )
        rank_zero_warn(f"skipping a batch with a non-finite loss ({value}) at {where}")
        self._skip_this_step = True
        return None

    def optimizer_step(self, *args, **kwargs):
        out = super().optimizer_step(*args, **kwargs)
        optimizer = args[2] if len(args) > 2 else kwargs.get("optimizer")
        if optimizer is not None:
            self.check_weights(optimizer)
        if getattr(self, "_step_trains", False):
            self.trained_steps = getattr(self, "trained_steps", 0) + 1
            self._step_trains = False
        ema = getattr(self, "ema", None)  # (no class attribute: it would shadow nn.Module's lookup)
        if ema is not None and not getattr(self, "_skip_this_step", False):
            # this optimizer step, counted from 1 (global_step counts the completed ones, this one not yet):
            # it sets the decay under the warm-up
            ema.update(self.model, step=self.trainer.global_step + 1 if self._trainer is not None else None)
        return out

    def check_weights(self, optimizer: torch.optim.Optimizer) -> None:
        """Stop the run at the optimizer step whose update made a weight NaN/inf (before the EMA
        takes it in), not at the next checkpoint save: one fused norm over the optimised parameters
        (``torch._foreach_norm``) and one host sync per step; under several processes the verdict is
        all-reduced (a sharded strategy holds a different part of the weights on each rank)."""
        params = [p for group in optimizer.param_groups for p in group["params"] if p.numel()]
        if not params:
            return
        with torch.no_grad():
            norms = torch._foreach_norm([p.detach() for p in params])
            bad = (~torch.isfinite(torch.stack([n.float() for n in norms]))).any().float()
        if self._trainer is not None and self.trainer.world_size > 1:
            bad = self.trainer.strategy.reduce(bad, reduce_op="sum")
        if float(bad) == 0:
            return
        from .checkpointing import nonfinite_tensors

        names = nonfinite_tensors(self.model) or ["(on another rank)"]
        step = self.trainer.global_step if self._trainer is not None else 0  # (counts completed steps)
        raise NonFiniteError(
            f"non-finite weights after the optimizer step from global step {step} to {step + 1} "
            f"(epoch {self.current_epoch}) in {', '.join(names)}; the loss was finite, the update was not. "
            f"Nothing of this step is saved. {RECOVERY}"
        )

    # -- optimiser settings on resume -------------------------------------------------------------

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse another task's checkpoint, or other model arguments than this run's (naming both);
        remember the optimiser settings the checkpoint was trained with, so that
        :meth:`apply_resumed_optim` can apply the ones this run was given instead."""
        hparams = checkpoint.get("hyper_parameters")
        if isinstance(hparams, dict):
            keys = checkpoint.get("state_dict") or {}
            hparams.update(type(self).saved_argument_upgrades(hparams, keys, self.hparams))
        check_checkpoint_matches(self, checkpoint)
        if getattr(self, "_init_report", None) is not None:
            self._print("init_from: this run restores a checkpoint, whose weights replace those of init_from")
        # a checkpoint from before the count: its steps trained (the data policy did not exist)
        self.trained_steps = int(checkpoint.get("trained_steps", checkpoint.get("global_step", 0)))
        hparams = checkpoint.get("hyper_parameters") or {}
        saved = hparams.get("optim", upgrade_hparams(hparams).get("optim"))
        self._checkpoint_optim = dict(saved) if isinstance(saved, Mapping) else None

    def on_train_start(self) -> None:
        self.apply_resumed_optim()

    def apply_resumed_optim(self) -> dict:
        """After a resume restored the optimiser and lr schedule: apply the optimiser settings of this
        run where they differ from the checkpoint's (``--model.init_args.optim.lr`` on the command
        line of a resume), with a warning naming each; never drop them silently. Returns
        ``{field: (checkpoint's, this run's)}`` of what was applied.

        ``lr`` (and ``base_batch_size``, which scales it) set the schedule's base lr and every
        parameter group's peak lr (the current lr is recomputed from the schedule at the restored
        step); ``weight_decay`` is set on the decayed group; ``betas`` on every group. The schedule's
        shape (warm-up, ``min_lr``, ``schedule``) and the EMA decay are not part of the restored
        state: they always follow this run's settings. Unchanged settings leave the restored state
        exactly as it was."""
        saved, self._checkpoint_optim = getattr(self, "_checkpoint_optim", None), None
        if not saved or getattr(self, "optim", None) is None:
            return {}
        try:
            old = OptimSettings.build(saved, self.optim)
        except (TypeError, ValueError):
            return {}
        new = self.optim
        fields = ("lr", "base_batch_size", "weight_decay", "betas")
        changed = {
            f: (getattr(old, f), getattr(new, f)) for f in fields if getattr(old, f) != getattr(new, f)
        }
        if not changed or not self.trainer.optimizers:
            return {}
        optimizer = self.trainer.optimizers[0]
        groups = optimizer.param_groups
        if {"lr", "base_batch_size"} & set(changed):
            scale = self._global_batch() / new.base_batch_size if new.base_batch_size else 1.0
            peak = new.lr * scale
            for group in groups:
                group["initial_lr"] = peak
            for config in self.trainer.lr_scheduler_configs:
                scheduler = config.scheduler
                if getattr(scheduler, "optimizer", None) is not optimizer:
                    continue
                scheduler.base_lrs = [peak] * len(groups)
                lambdas = getattr(scheduler, "lr_lambdas", None)
                if lambdas:
                    for group, fn in zip(groups, lambdas):
                        group["lr"] = peak * fn(scheduler.last_epoch)
                    scheduler._last_lr = [group["lr"] for group in groups]
        if "weight_decay" in changed:
            groups[0]["weight_decay"] = new.weight_decay  # param_groups(): [decayed, not decayed]
        if "betas" in changed:
            for group in groups:
                group["betas"] = tuple(new.betas)
        described = ", ".join(f"optim.{f} {a} -> {b}" for f, (a, b) in changed.items())
        rank_zero_warn(
            f"resuming with other optimiser settings than the checkpoint's: {described}; applied to the "
            f"restored optimiser (lr now {groups[0]['lr']:.6g} at step {self.trainer.global_step})"
        )
        return changed

    # -- what was trained ------------------------------------------------------------------------

    def require_trained(self, what: str) -> None:
        """Refuse ``what`` (an export of the trained weights) when no rank ever took an optimizer step
        on a usable batch with a finite loss (every batch corrupt or skipped, or no step at all): it
        would hand out untrained weights as the result. (Under DDP every rank counts the same steps:
        :meth:`check_loss` decides on all ranks together.)"""
        if not getattr(self, "trained_steps", 0):
            raise RuntimeError(
                f"refusing {what}: this run trained zero optimizer steps (global step {self.global_step}; "
                "every batch was corrupt or skipped, or none ran), so the weights are untrained"
            )
