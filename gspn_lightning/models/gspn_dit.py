"""GSPN-DiT: the paper's class-conditional diffusion backbone (GSPN, CVPR 2025, Sec. 4.2).

Data flow for a latent ``(B, C, H, W)``, patch ``p``, hidden ``D``, grid ``h = H / p``, ``w = W / p``::

    x = patch_embed(x)                         (B, D, h, w)     conv p x p, stride p
    c = t_embed(t) + y_embed(y)                (B, D)           y may be the null class (guidance)
    x = x + c                                  (B, D, h, w)     the condition is added to every token
    skips = []
    for blk in in_blocks:  x = blk(x); skips.append(x)          depth // 2 blocks
    x = mid_block(x)
    for blk in out_blocks: x = blk(x, skips.pop())              depth // 2 blocks, long skips
    x = norm(x)
    out = final(x, c)                          (B, C_out, H, W) adaLN shift/scale, linear, unshuffle

A block is ``x = skip_linear(cat(x, skip))`` (out blocks only: a 1x1 linear on the channel
concatenation, U-ViT's long skip) followed by ``x = x + DropPath(GSPNMixer(LN(x)))``; the mixer works
on the token grid itself (channels-first), so any latent size and aspect ratio works and no positional
table exists.  ``C_out = 2 C`` with ``learn_sigma`` (eps and the interpolation ``v`` of the learned
variance range, as DiT), else ``C``.

Choices where the paper and its code are silent or self-contradictory (facts, not code, carried over):

- Mixer width ``d_inner = D`` and proxy rank ``d_state = D // 16``, as in the paper's generation
  models; the mixer is this project's :class:`~gspn_lightning.nn.GSPNMixer` (LayerNorm, GRN and a
  linear out-projection after the merge).  The release's block instead has a 1x1 output conv, a 3x3
  depthwise conv and a ReLU gate before its out-projection, about ``1 D^2`` more per block, which is
  why these models have fewer parameters than the paper's (see ``docs/model_sizes.md``).
- Local or global per block: ``mixer.chunk_size`` for the local blocks, ``global_blocks`` naming the
  global ones (by default the last two out blocks, as the release intends: its code builds every block
  local because the chunk it computes is never used; here the setting takes effect, and
  ``chunk_sizes()`` reports it).
- No MLP in a block (the paper's generation blocks have none).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from ..nn import DropPath, GSPNMixer, LayerNorm2d, MixerOptions
from ..nn.checkpointing import run_block
from ..nn.embeddings import (
    AdaLNFinalLayer,
    LabelEmbedder,
    TimestepEmbedder,
    check_patch_input,
    init_conditioning,
    modulate,
)
from .registry import check_patch_grid, register_model

__all__ = ["GSPN_DIT_SIZES", "GSPNDiT", "GSPNDiTBlock"]


class GSPNDiTBlock(nn.Module):
    """``(B, D, h, w) [, skip (B, D, h, w)] -> (B, D, h, w)``: optional long-skip fusion, then a
    pre-norm residual GSPN mixer of width ``dim`` with the options ``mixer`` (``overrides``: single
    fields replacing them, e.g. this block's ``chunk_size``)."""

    def __init__(
        self,
        dim: int,
        mixer: MixerOptions | Mapping | None = None,
        skip: bool = False,
        drop_path: float = 0.0,
        adaln: bool = False,
        **overrides,
    ) -> None:
        super().__init__()
        self.skip_linear = nn.Conv2d(2 * dim, dim, 1) if skip else None
        self.norm = LayerNorm2d(dim)
        self.mixer = GSPNMixer(dim, d_inner=dim, options=mixer, **overrides)
        self.drop_path = DropPath(drop_path)
        # adaLN-Zero (DiT's block conditioning, an option here): shift, scale and gate from c
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 3 * dim)) if adaln else None

    @property
    def chunk_size(self) -> int | None:
        return self.mixer.chunk_size

    def forward(
        self, x: torch.Tensor, skip: torch.Tensor | None = None, c: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.skip_linear is not None:
            if skip is None:
                raise ValueError("this block has a long skip: pass the matching in-block's output")
            x = self.skip_linear(torch.cat([x, skip], dim=1))  # (B, D, h, w)
        if self.ada is None:
            return x + self.drop_path(self.mixer(self.norm(x)))  # (B, D, h, w)
        if c is None:
            raise ValueError("this block is adaLN-conditioned: pass the condition c (B, D)")
        shift, scale, gate = self.ada(c)[:, :, None, None].chunk(3, dim=1)  # (B, D, 1, 1) each
        return x + self.drop_path(gate * self.mixer(modulate(self.norm(x), shift, scale)))  # (B, D, h, w)


class GSPNDiT(nn.Module):
    """Class-conditional GSPN diffusion backbone: ``forward(x (B, C, H, W), t (B,), y (B,))``.

    Args:
        in_channels: latent (or pixel) channels ``C``.
        patch_size: ``p``; ``H`` and ``W`` must be multiples of it.
        hidden_size: ``D``.
        depth: number of in + out blocks (even); one middle block is added.
        num_classes: classes; label ``num_classes`` is the null class of classifier-free guidance.
        class_dropout: probability of training on the null class.
        label_init_std: std of the label table's initialisation (DiT's 0.02; a short training
            learns the classes sooner from a larger one).
        learn_sigma: output ``2 C`` channels (eps and the variance interpolation) instead of ``C``.
        mixer: the options of every mixer (:class:`~gspn_lightning.nn.MixerOptions` or a dict of its
            fields read over this model's defaults ``chunk_size=2``): ``d_state`` the rank of the gate
            proxy (``None``: ``D // 16``), ``chunk_size`` the scan chunk of the local blocks,
            ``dw_kernel``, ``directions``, ``backend``, ``fused``, ``fuse_gates``.
        global_blocks: which blocks are global, as indices in execution order (in blocks
            ``0 .. depth/2 - 1``, the middle block ``depth/2``, out blocks after it), or ``"all"`` /
            ``"none"``; default ``None``: the last two out blocks.
        drop_path_rate: stochastic depth, rising linearly over the blocks.
        input_size: nominal latent size (the task's ``image_size``): a multiple of ``patch_size``, checked
            when the model is built; the forward takes any grid of whole patches.
        adaln_blocks: condition every block by adaLN-Zero (shift, scale and a gate from ``c``, zero at
            the start) as DiT does, on top of the paper's ``c`` added to the tokens.  Not in the paper;
            it makes the timestep and class reach every block, which speeds up short trainings (the
            CPU digits demo).
    """

    def __init__(
        self,
        in_channels: int = 4,
        patch_size: int = 2,
        hidden_size: int = 368,
        depth: int = 24,
        num_classes: int = 1000,
        class_dropout: float = 0.1,
        label_init_std: float = 0.02,
        learn_sigma: bool = True,
        mixer: MixerOptions | Mapping | None = None,
        global_blocks: str | Iterable[int] | None = None,
        drop_path_rate: float = 0.0,
        input_size: int = 32,
        adaln_blocks: bool = False,
    ) -> None:
        super().__init__()
        if depth < 2 or depth % 2:
            raise ValueError(f"depth must be an even number >= 2, got {depth}")
        check_patch_grid(input_size, patch_size)
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.num_classes = num_classes
        self.input_size = input_size
        n_blocks = depth + 1
        glob = self._global_set(global_blocks, n_blocks)
        mixer = MixerOptions.for_model(mixer, chunk_size=2)
        if mixer.d_state is None:
            mixer = MixerOptions.build(mixer, d_state=max(1, hidden_size // 16))
        self.mixer_options = mixer
        rates = [drop_path_rate * i / max(n_blocks - 1, 1) for i in range(n_blocks)]

        def block(i: int, skip: bool) -> GSPNDiTBlock:
            chunk = None if i in glob else mixer.chunk_size
            return GSPNDiTBlock(hidden_size, mixer, skip, rates[i], adaln_blocks, chunk_size=chunk)

        half = depth // 2
        self.patch_embed = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.t_embed = TimestepEmbedder(hidden_size)
        self.y_embed = LabelEmbedder(num_classes, hidden_size, class_dropout, label_init_std)
        self.in_blocks = nn.ModuleList(block(i, skip=False) for i in range(half))
        self.mid_block = block(half, skip=False)
        self.out_blocks = nn.ModuleList(block(half + 1 + i, skip=True) for i in range(half))
        self.norm = LayerNorm2d(hidden_size)
        self.final = AdaLNFinalLayer(hidden_size, patch_size, self.out_channels)
        self.grad_checkpointing = False
        self.reset_parameters()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of every block (recomputed in the backward pass, not stored)."""
        self.grad_checkpointing = bool(enable)

    @staticmethod
    def _global_set(spec: str | Iterable[int] | None, n_blocks: int) -> set[int]:
        if spec is None:
            return {n_blocks - 2, n_blocks - 1}
        if spec == "all":
            return set(range(n_blocks))
        if spec == "none":
            return set()
        if isinstance(spec, str):
            raise ValueError(
                f"global_blocks must be 'all', 'none', None or a list of block indices, got {spec!r}"
            )
        out = {int(i) for i in spec}
        bad = sorted(i for i in out if not 0 <= i < n_blocks)
        if bad:
            raise ValueError(f"global_blocks {bad} out of range: the model has blocks 0..{n_blocks - 1}")
        return out

    def blocks(self) -> list[GSPNDiTBlock]:
        """All blocks in execution order (in, middle, out)."""
        return [*self.in_blocks, self.mid_block, *self.out_blocks]

    def chunk_sizes(self) -> list[int | None]:
        """The scan chunk of every block in execution order (``None`` = global)."""
        return [b.chunk_size for b in self.blocks()]

    def reset_parameters(self) -> None:
        """Linears/1x1s Xavier-uniform with zero bias, the patch embedding like a linear, embeddings
        N(0, 0.02), the mixers their own initialisation, the block modulations (``adaln_blocks``) and the
        output layer zero (adaLN-Zero)."""
        for m in self.modules():
            if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)):
                nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        init_conditioning(self.patch_embed, self.t_embed, self.y_embed)
        for m in self.modules():
            if isinstance(m, GSPNMixer):
                m.reset_parameters()
        for blk in self.blocks():
            if blk.ada is not None:
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
        """``x (B, C, H, W)``, timesteps ``t (B,)``, labels ``y (B,)`` -> ``(B, C_out, H, W)``."""
        p = self.patch_size
        check_patch_input(x, self.in_channels, p)
        c = self.t_embed(t) + self.y_embed(y, force_drop, generator)  # (B, D)
        # channels-last from here on, the layout the mixers run in (else the residual adds, the long-skip
        # concatenations and their 1x1 convs mix layouts or take the slow channels-first convolution path)
        h = self.patch_embed(x).contiguous(memory_format=torch.channels_last) + c[:, :, None, None]  # (B, D, H/p, W/p)
        ckpt = self.grad_checkpointing
        skips = []
        for blk in self.in_blocks:
            h = run_block(blk, h, c=c, checkpointing=ckpt)  # (B, D, H/p, W/p)
            skips.append(h)
        h = run_block(self.mid_block, h, c=c, checkpointing=ckpt)  # (B, D, H/p, W/p)
        for blk in self.out_blocks:
            h = run_block(blk, h, skips.pop(), c, checkpointing=ckpt)  # (B, D, H/p, W/p)
        return self.final(self.norm(h), c)  # (B, C_out, H, W)


#: the paper's sizes (hidden, depth); patch 2 or 4 over a 32 x 32 x 4 SD-VAE latent
GSPN_DIT_SIZES: dict[str, dict] = {
    "s": dict(hidden_size=368, depth=24),
    "b": dict(hidden_size=900, depth=30),
    "l": dict(hidden_size=1200, depth=56),
    "xl": dict(hidden_size=1500, depth=56),
}

for _size, _cfg in GSPN_DIT_SIZES.items():
    for _patch in (2, 4):
        register_model(
            f"gspn_dit_{_size}_{_patch}", GSPNDiT, task="diffusion", defaults={**_cfg, "patch_size": _patch}
        )
