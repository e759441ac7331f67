"""DiT, the attention baseline of the paper's generation comparison (Peebles & Xie, ICCV 2023).

Data flow for a latent ``(B, C, H, W)``, patch ``p``, hidden ``D``, ``N = (H / p) (W / p)`` tokens::

    x = patch_embed(x)                          (B, D, h, w)     conv p x p, stride p
    x = tokens(x) + sincos_2d(h, w)             (B, N, D)        fixed positions, computed per grid
    c = t_embed(t) + y_embed(y)                 (B, D)
    for blk in blocks: x = blk(x, c)            (B, N, D)        adaLN-Zero transformer blocks
    out = final(grid(x), c)                     (B, C_out, H, W)

An adaLN-Zero block regresses six vectors from ``c``: shift/scale/gate for attention and for the MLP::

    x = x + gate_a * Attn(modulate(LN(x), shift_a, scale_a))
    x = x + gate_m * MLP(modulate(LN(x), shift_m, scale_m))

with the regression zero-initialised, so every block starts as the identity.  Attention is
``scaled_dot_product_attention`` (flash / memory-efficient where available), the MLP GELU(tanh) with
ratio 4.  Sizes are DiT's: S 384/12/6, B 768/12/12, L 1024/24/16, XL 1152/28/16 (hidden/depth/heads),
patch 2, 4 or 8; DiT-XL/2 has 675M parameters.  Conditioning, positions and the output layer are the
ones :mod:`.gspn_dit` uses (``gspn_lightning.nn.embeddings``), so the comparison differs only in the
token mixer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.checkpointing import run_block
from ..nn.embeddings import (
    AdaLNFinalLayer,
    LabelEmbedder,
    TimestepEmbedder,
    check_patch_input,
    init_conditioning,
    modulate,
    sincos_pos_embed_2d,
)
from .registry import check_patch_grid, register_model

__all__ = ["DIT_SIZES", "DiT", "DiTBlock"]


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block, ``(B, N, D), c (B, D) -> (B, N, D)``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden size {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = (
            self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        )  # (B, heads, N, D/heads) each
        y = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, D/heads)
        return self.proj(y.transpose(1, 2).reshape(B, N, D))  # (B, N, D)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.ada(c)[:, None].chunk(
            6, dim=-1
        )  # (B, 1, D) each
        x = x + gate_a * self.attention(modulate(self.norm1(x), shift_a, scale_a))  # (B, N, D)
        return x + gate_m * self.mlp(modulate(self.norm2(x), shift_m, scale_m))  # (B, N, D)


class DiT(nn.Module):
    """Class-conditional DiT: ``forward(x (B, C, H, W), t (B,), y (B,)) -> (B, C_out, H, W)``.

    Same conditioning arguments as :class:`~gspn_lightning.models.gspn_dit.GSPNDiT` (``num_classes``,
    ``class_dropout``, ``label_init_std``, ``learn_sigma``, ``input_size``: the nominal size, a multiple of ``patch_size``; positions are computed for
    whatever grid comes in).
    """

    def __init__(
        self,
        in_channels: int = 4,
        patch_size: int = 2,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        class_dropout: float = 0.1,
        label_init_std: float = 0.02,
        learn_sigma: bool = True,
        input_size: int = 32,
    ) -> None:
        super().__init__()
        if hidden_size % 4:
            raise ValueError(f"hidden size must be divisible by 4 (2-D sin-cos positions), got {hidden_size}")
        check_patch_grid(input_size, patch_size)
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.num_classes = num_classes
        self.input_size = input_size
        self.patch_embed = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.t_embed = TimestepEmbedder(hidden_size)
        self.y_embed = LabelEmbedder(num_classes, hidden_size, class_dropout, label_init_std)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final = AdaLNFinalLayer(hidden_size, patch_size, self.out_channels)
        self.grad_checkpointing = False
        self.reset_parameters()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of every block (recomputed in the backward pass, not stored)."""
        self.grad_checkpointing = bool(enable)

    def reset_parameters(self) -> None:
        """DiT's initialisation: linears Xavier-uniform with zero bias, the patch embedding like a
        linear, label table and timestep MLP N(0, 0.02), every adaLN regression and the output zero."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        init_conditioning(self.patch_embed, self.t_embed, self.y_embed)
        for blk in self.blocks:
            nn.init.zeros_(blk.ada[1].weight)
            nn.init.zeros_(blk.ada[1].bias)
        self.final.reset_parameters()

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        force_drop: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        B, C, H, W = x.shape
        p = self.patch_size
        check_patch_input(x, self.in_channels, p)
        h, w = H // p, W // p
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, D)
        tokens = tokens + sincos_pos_embed_2d(self.hidden_size, h, w, x.device, tokens.dtype)  # (B, N, D)
        c = self.t_embed(t) + self.y_embed(y, force_drop, generator)  # (B, D)
        for blk in self.blocks:
            tokens = run_block(blk, tokens, c, checkpointing=self.grad_checkpointing)  # (B, N, D)
        grid = tokens.transpose(1, 2).reshape(B, self.hidden_size, h, w)  # (B, D, h, w)
        return self.final(grid, c)  # (B, C_out, H, W)


#: DiT's sizes (hidden, depth, heads)
DIT_SIZES: dict[str, dict] = {
    "s": dict(hidden_size=384, depth=12, num_heads=6),
    "b": dict(hidden_size=768, depth=12, num_heads=12),
    "l": dict(hidden_size=1024, depth=24, num_heads=16),
    "xl": dict(hidden_size=1152, depth=28, num_heads=16),
}

for _size, _cfg in DIT_SIZES.items():
    for _patch in (2, 4, 8):
        register_model(
            f"dit_{_size}_{_patch}", DiT, task="diffusion", defaults={**_cfg, "patch_size": _patch}
        )
