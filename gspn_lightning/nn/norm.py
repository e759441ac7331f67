"""Channels-first normalisation layers for ``(B, C, H, W)`` feature maps."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GRN", "LayerNorm2d"]


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel axis of a ``(B, C, H, W)`` tensor (each pixel normalised on its own).

    Same parameters (``weight``, ``bias`` of shape ``(C,)``) as ``nn.LayerNorm(C)``; the statistics are
    computed in float32 under autocast, as ``F.layer_norm`` does.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__(num_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class GRN(nn.Module):
    """Global Response Normalisation (ConvNeXt-V2), channels-first: ``(B, C, H, W) -> (B, C, H, W)``.

    ``G = ||x||_2`` over the spatial axes per channel, ``N = G / (mean_c G + eps)``, and
    ``out = gamma * (x * N) + beta + x``.  ``gamma`` and ``beta`` start at zero, so the layer starts as
    the identity (and, with ``gamma = 0``, passes no gradient between pixels).
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.zeros(1, num_channels, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, num_channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = torch.linalg.vector_norm(x.float(), dim=(2, 3), keepdim=True)
        n = (g / (g.mean(dim=1, keepdim=True) + self.eps)).to(x.dtype)
        # x * (gamma N + 1) + beta: the same function in one pass over x (and two in the backward),
        # against four passes (and their backward) for the sum as written above
        return torch.addcmul(self.beta, x, self.gamma * n + 1)
