"""Conditioning layers of the diffusion models: timestep and class embeddings, fixed 2-D sin-cos
positions, and the adaLN-modulated output layer.

Shared by the GSPN-DiT and DiT families (``gspn_lightning.models.gspn_dit`` / ``.dit``), so the two sides
of the paper's comparison condition and decode identically and differ only in their token mixers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "AdaLNFinalLayer",
    "LabelEmbedder",
    "TimestepEmbedder",
    "check_patch_input",
    "init_conditioning",
    "modulate",
    "sincos_pos_embed_2d",
]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: ``x * (1 + scale) + shift``; ``shift``/``scale`` broadcast against ``x``."""
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """Diffusion timesteps ``(B,)`` (integers or floats) -> ``(B, hidden)``: sinusoidal features of
    ``freq_dim`` channels (periods from 1 to ``max_period``), then Linear-SiLU-Linear."""

    def __init__(self, hidden: int, freq_dim: int = 256, max_period: float = 10000.0) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.max_period = max_period
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def sinusoid(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(
            -math.log(self.max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half
        )  # (half,)
        args = t.float()[:, None] * freqs[None]  # (B, half)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2 half)
        if self.freq_dim % 2:
            emb = F.pad(emb, (0, 1))  # (B, freq_dim)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        if t.dim() != 1:
            raise ValueError(f"timesteps must be 1-D (B,), got shape {tuple(t.shape)}")
        return self.mlp(self.sinusoid(t).to(self.mlp[0].weight.dtype))  # (B, hidden)


class LabelEmbedder(nn.Module):
    """Class labels ``(B,)`` -> ``(B, hidden)``, with one extra "null" class (index ``num_classes``) for
    classifier-free guidance.  In training, each label is replaced by the null class with probability
    ``dropout``, drawn from ``generator`` (the global RNG when ``None``; a training task passes one
    seeded per step, so a resumed run drops the same labels); ``force_drop`` (a bool mask) replaces
    chosen ones (for the unconditional half of a guided batch)."""

    def __init__(self, num_classes: int, hidden: int, dropout: float = 0.1, init_std: float = 0.02) -> None:
        super().__init__()
        if not init_std > 0:
            raise ValueError(f"label embedding init_std must be > 0, got {init_std}")
        self.init_std = init_std  # DiT's 0.02; larger makes the class visible from the first step
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"class dropout must be in [0, 1), got {dropout}")
        self.num_classes = num_classes
        self.dropout = dropout
        self.table = nn.Embedding(num_classes + 1, hidden)  # last row: the null class

    @property
    def null_class(self) -> int:
        return self.num_classes

    def forward(
        self,
        y: torch.Tensor,
        force_drop: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        if y.dim() != 1:
            raise ValueError(f"labels must be 1-D (B,), got shape {tuple(y.shape)}")
        # checked on the CPU only (a check on the GPU would synchronise every step; there the
        # embedding lookup itself fails on a bad index)
        if y.device.type == "cpu" and y.numel() and (int(y.min()) < 0 or int(y.max()) > self.num_classes):
            raise ValueError(
                f"class labels must be in [0, {self.num_classes}] ({self.num_classes} is the null class), "
                f"got values in [{int(y.min())}, {int(y.max())}]"
            )
        drop = None
        if self.training and self.dropout > 0:
            drop = torch.rand(y.shape, device=y.device, generator=generator) < self.dropout
        if force_drop is not None:
            drop = force_drop if drop is None else drop | force_drop
        if drop is not None:
            y = torch.where(drop, torch.full_like(y, self.null_class), y)
        return self.table(y)  # (B, hidden)


def sincos_pos_embed_2d(dim: int, h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Fixed 2-D sin-cos positions ``(h * w, dim)`` for a row-major ``h x w`` token grid: half of the
    channels encode the row, half the column (``dim`` divisible by 4), frequencies 1 / 10000^(k / (dim/4)).
    Computed for any grid, so a model using it runs on any input size."""
    if dim % 4:
        raise ValueError(f"sin-cos position dim must be divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, device=device, dtype=torch.float64) / quarter)  # (dim/4,)
    rows = torch.arange(h, device=device, dtype=torch.float64)[:, None] * omega  # (h, dim/4)
    cols = torch.arange(w, device=device, dtype=torch.float64)[:, None] * omega  # (w, dim/4)
    row_emb = torch.cat([rows.sin(), rows.cos()], dim=1)  # (h, dim/2)
    col_emb = torch.cat([cols.sin(), cols.cos()], dim=1)  # (w, dim/2)
    grid = torch.cat(
        [row_emb[:, None].expand(h, w, dim // 2), col_emb[None].expand(h, w, dim // 2)], dim=-1
    )  # (h, w, dim)
    return grid.reshape(h * w, dim).to(dtype)


class AdaLNFinalLayer(nn.Module):
    """Output layer of a diffusion backbone, channels-first: ``(B, hidden, h, w)`` tokens and the
    condition ``c`` ``(B, hidden)`` -> ``(B, out_channels, h * patch, w * patch)``.

    LayerNorm without affine, shift/scale from ``c`` (adaLN), a linear map of every token to its
    ``patch x patch x out_channels`` pixels, unpatchified by a pixel shuffle.  The modulation and the
    linear start at zero, so an untrained model predicts 0 (DiT's adaLN-Zero initialisation).
    """

    def __init__(self, hidden: int, patch: int, out_channels: int) -> None:
        super().__init__()
        self.patch = patch
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.linear = nn.Linear(hidden, patch * patch * out_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for lin in (self.ada[1], self.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.ada(c)[:, None, None].chunk(2, dim=-1)  # (B, 1, 1, hidden) each
        x = modulate(self.norm(x.permute(0, 2, 3, 1)), shift, scale)  # (B, h, w, hidden)
        x = self.linear(x).permute(0, 3, 1, 2)  # (B, p*p*out, h, w)
        return F.pixel_shuffle(x, self.patch)  # (B, out, h*p, w*p)


def init_conditioning(patch_embed: nn.Conv2d, t_embed: TimestepEmbedder, y_embed: LabelEmbedder) -> None:
    """DiT's initialisation of the conditioning path: the patch embedding like a linear layer
    (Xavier-uniform, zero bias), the label table N(0, ``y_embed.init_std``: DiT's 0.02 by default) and
    the timestep MLP N(0, 0.02)."""
    w = patch_embed.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.zeros_(patch_embed.bias)
    nn.init.normal_(y_embed.table.weight, std=y_embed.init_std)
    for lin in (t_embed.mlp[0], t_embed.mlp[2]):
        nn.init.normal_(lin.weight, std=0.02)


def check_patch_input(x: torch.Tensor, in_channels: int, patch: int) -> None:
    """A clear error for an input a patchifying backbone cannot take."""
    _, C, H, W = x.shape
    if C != in_channels:
        raise ValueError(f"expected {in_channels} input channels, got {C}")
    if H % patch or W % patch:
        raise ValueError(f"input size {H}x{W} is not a multiple of the patch size {patch}")
