"""Activation checkpointing of a model's blocks: ``run_block`` calls a block as usual, or through
``torch.utils.checkpoint`` (non-reentrant) so that its activations are recomputed in the backward pass
instead of stored.

A model that supports it keeps a ``grad_checkpointing`` flag (timm's name), switched by its
``set_grad_checkpointing(enable)``, and calls each block through :func:`run_block`. Checkpointing is
used only where it saves memory: in training with gradients enabled. The random draws inside a block
(drop path) are replayed in the recomputation (``preserve_rng_state``), so the loss and gradients are
those of the plain forward.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["run_block"]


def run_block(block: nn.Module, *args, checkpointing: bool = False, **kwargs):
    """``block(*args, **kwargs)``, through a non-reentrant activation checkpoint when
    ``checkpointing`` is set and gradients are being recorded."""
    if checkpointing and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False, **kwargs)
    return block(*args, **kwargs)
