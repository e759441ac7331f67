"""Building blocks of the GSPN backbones: stochastic depth, the MLP and the pre-norm GSPN block.

``LayerNorm2d`` and ``GRN`` live in :mod:`gspn_lightning.nn.norm` and are re-exported here.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .mixer import GSPNMixer, MixerOptions
from .norm import GRN, LayerNorm2d

__all__ = ["GRN", "DropPath", "GSPNBlock", "LayerNorm2d", "Mlp"]


class DropPath(nn.Module):
    """Stochastic depth: in training, zero the whole residual branch of a sample with probability ``p``
    and scale the kept ones by ``1 / (1 - p)``; the identity in eval mode.  Any shape ``(B, ...)``."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Mlp(nn.Module):
    """Channel MLP with 1x1 convs: ``(B, dim, H, W) -> (B, dim, H, W)``, hidden ``int(mlp_ratio * dim)``."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0, drop: float = 0.0) -> None:
        super().__init__()
        hidden = int(mlp_ratio * dim)
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class GSPNBlock(nn.Module):
    """Pre-norm residual block, ``(B, dim, H, W) -> (B, dim, H, W)``::

        x = x + DropPath(mixer(LN(x)))
        x = x + DropPath(MLP(LN(x)))

    ``mixer`` (:class:`~gspn_lightning.nn.mixer.MixerOptions`, or a dict of them) and ``overrides``
    (single fields of it, e.g. this block's ``chunk_size``: ``None`` global, ``k`` local) go to
    :class:`GSPNMixer`, with the mixer width ``d_inner``.
    """

    def __init__(
        self,
        dim: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        d_inner: int | None = None,
        mixer: MixerOptions | Mapping | None = None,
        **overrides,
    ) -> None:
        super().__init__()
        self.norm1 = LayerNorm2d(dim)
        self.mixer = GSPNMixer(dim, d_inner=d_inner, options=mixer, **overrides)
        self.norm2 = LayerNorm2d(dim)
        self.mlp = Mlp(dim, mlp_ratio)
        self.drop_path = DropPath(drop_path)

    @property
    def chunk_size(self) -> int | None:
        return self.mixer.chunk_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.mixer(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))
