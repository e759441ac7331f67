"""Exponential moving average of a model's weights (a frozen copy updated after every step)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEMA(nn.Module):
    """``ema = decay * ema + (1 - decay) * model`` for parameters (float32), buffers copied.

    Held as a submodule of the task, so it is saved in and restored from checkpoints with the
    model, and moved to the right device with it.  Every DDP rank applies the same update to the
    same (all-reduced) weights, so the copies stay identical without communication.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        self.module.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        pairs = [
            (e, p.detach())
            for e, p in zip(self.module.parameters(), model.parameters())
            if e.is_floating_point()
        ]
        if pairs:
            torch._foreach_lerp_([e for e, _ in pairs], [p for _, p in pairs], 1.0 - self.decay)
        for e, s in zip(self.module.buffers(), model.buffers()):
            e.copy_(s)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def train(self, mode: bool = True):  # the EMA copy always evaluates (drop path off)
        return super().train(False)
