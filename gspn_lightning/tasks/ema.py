"""Exponential moving average of a model's weights (a frozen copy updated after every step)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEMA(nn.Module):
    """``ema = decay * ema + (1 - decay) * model`` for parameters (float32), buffers copied.

    **Warm-up** (``warmup_power``, default ``None``: off, a fixed ``decay``): the decay of update ``n``
    (``n = 1`` the first optimizer step) grows with the steps, as timm's ``ModelEmaV3`` warms up,
    ``min(decay, 1 - (1 + (n - 1) / warmup_gamma) ** -warmup_power)``: 0 at the first update (the EMA
    becomes the weights), then e.g. with power 2/3 and gamma 1 about 0.37, 0.52, 0.60 ... and 0.999
    after about 32k updates. Without it, a short run's EMA stays near the random initialisation
    (0.9999 keeps 99 % of it for 100 steps).

    ``include(name, parameter) -> bool`` chooses the averaged parameters (default: all); the others
    are the model's own tensors, shared, so they follow the model and cost no memory.

    Held as a submodule of the task, so it is saved in and restored from checkpoints with the
    model, and moved to the right device with it.  Every DDP rank applies the same update to the
    same (all-reduced) weights, so the copies stay identical without communication.
    """

    def __init__(
        self, model: nn.Module, decay: float = 0.9999, include=None, warmup_power: float | None = None,
        warmup_gamma: float = 1.0,
    ):  # fmt: skip
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        if warmup_power is not None and not warmup_power > 0:
            raise ValueError(f"EMA warm-up power must be > 0, got {warmup_power}")
        if not warmup_gamma > 0:
            raise ValueError(f"EMA warm-up gamma must be > 0, got {warmup_gamma}")
        self.decay = decay
        self.warmup_power = warmup_power
        self.warmup_gamma = warmup_gamma
        named = list(model.named_parameters())
        self._averaged = [include is None or bool(include(n, p)) for n, p in named]
        # parameters outside the EMA are shared with the model, not copied (the memo makes deepcopy
        # reuse them): a frozen 2.6B backbone costs nothing extra
        memo = {id(p): p for (_, p), keep in zip(named, self._averaged) if not keep}
        self.module = copy.deepcopy(model, memo).eval()
        for (_, p), keep in zip(self.module.named_parameters(), self._averaged):
            if keep:
                p.requires_grad_(False)

    def decay_at(self, step: int | None) -> float:
        """The decay of the update after optimizer step ``step`` (1 for the first): ``decay``, or with
        the warm-up its value at that step (see the class docstring). ``None``: ``decay``."""
        if self.warmup_power is None or step is None:
            return self.decay
        n = max(0, int(step) - 1)
        return min(self.decay, 1.0 - (1.0 + n / self.warmup_gamma) ** -self.warmup_power)

    @torch.no_grad()
    def reset(self, model: nn.Module) -> None:
        """Make the EMA equal to ``model``'s current weights and buffers (a new starting point)."""
        for e, p, keep in zip(self.module.parameters(), model.parameters(), self._averaged):
            if keep:
                e.copy_(p.detach())
        for e, s in zip(self.module.buffers(), model.buffers()):
            e.copy_(s)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> None:
        """One EMA step towards ``model``, after optimizer step ``step`` (counted from 1; it sets the
        decay only with the warm-up on)."""
        decay = self.decay_at(step)
        pairs = [
            (e, p.detach())
            for e, p, keep in zip(self.module.parameters(), model.parameters(), self._averaged)
            if keep and e.is_floating_point()
        ]
        if pairs:
            torch._foreach_lerp_([e for e, _ in pairs], [p for _, p in pairs], 1.0 - decay)
        for e, s in zip(self.module.buffers(), model.buffers()):
            e.copy_(s)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def train(self, mode: bool = True):  # the EMA copy always evaluates (drop path off)
        return super().train(False)
