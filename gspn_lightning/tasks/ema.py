"""Exponential moving average of a model's weights (a frozen copy updated after every step)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEMA(nn.Module):
    """``ema = decay * ema + (1 - decay) * model`` for parameters (float32), buffers copied.

    ``include(name, parameter) -> bool`` chooses the averaged parameters (default: all); the others
    are the model's own tensors, shared, so they follow the model and cost no memory.

    Held as a submodule of the task, so it is saved in and restored from checkpoints with the
    model, and moved to the right device with it.  Every DDP rank applies the same update to the
    same (all-reduced) weights, so the copies stay identical without communication.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, include=None):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        named = list(model.named_parameters())
        self._averaged = [include is None or bool(include(n, p)) for n, p in named]
        # parameters outside the EMA are shared with the model, not copied (the memo makes deepcopy
        # reuse them): a frozen 2.6B backbone costs nothing extra
        memo = {id(p): p for (_, p), keep in zip(named, self._averaged) if not keep}
        self.module = copy.deepcopy(model, memo).eval()
        for (_, p), keep in zip(self.module.named_parameters(), self._averaged):
            if keep:
                p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        pairs = [
            (e, p.detach())
            for e, p, keep in zip(self.module.parameters(), model.parameters(), self._averaged)
            if keep and e.is_floating_point()
        ]
        if pairs:
            torch._foreach_lerp_([e for e, _ in pairs], [p for _, p in pairs], 1.0 - self.decay)
        for e, s in zip(self.module.buffers(), model.buffers()):
            e.copy_(s)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def train(self, mode: bool = True):  # the EMA copy always evaluates (drop path off)
        return super().train(False)
