"""What every training task shares: the weight EMA's update point and the non-finite-loss policy.

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
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from .checkpointing import NonFiniteError

NONFINITE_POLICIES = ("error", "skip")


class TrainingTask(L.LightningModule):
    """Base of the task LightningModules. Subclasses set ``self.model`` and ``self.ema`` (or ``None``)
    and call :meth:`configure_fault_policy` in ``__init__`` and :meth:`check_loss` in ``training_step``."""

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
            return loss
        where = f"global step {self.trainer.global_step} (epoch {self.current_epoch}, batch {batch_idx})"
        value = loss.detach().float().flatten()[0].item()
        if self._nonfinite_policy == "error":
            raise NonFiniteError(
                f"non-finite training loss ({value}) at {where}; the weights are left as they were before "
                "this step. Lower the learning rate, check the inputs, or set nonfinite_loss: skip"
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
        ema = getattr(self, "ema", None)  # (no class attribute: it would shadow nn.Module's lookup)
        if ema is not None and not getattr(self, "_skip_this_step", False):
            ema.update(self.model)
        return out
