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
concatenation, U-ViT's long skip) followed by ``x = x + DropPath(mixer(LN(x)))``; the mixer works on
the token grid itself (channels-first), so any latent size and aspect ratio works and no positional
table exists.  ``C_out = 2 C`` with ``learn_sigma`` (eps and the interpolation ``v`` of the learned
variance range, as DiT), else ``C``.

Two mixers (``block``), both of width ``D`` with the proxy rank ``d_state = D // 16`` of the paper's
generation models and the same propagation (:meth:`GSPNMixer.propagate
<gspn_lightning.nn.GSPNMixer.propagate>`: in-projection, 7x7 depthwise conv, gates from the proxy,
four scans, merge):

- ``"release"`` (the default), the block of the paper's released generation code, read for its facts:
  after the merge ``y`` a 1x1 conv, a 3x3 depthwise conv and the gate ``z * relu(z)``, then the
  out-projection::

      y = propagate(x)                            (B, E, h, w)     E = D, or d_prop (compact space)
      z = dwconv3x3(conv1x1(y))                   (B, D, h, w)     out_conv (E -> D, no bias), out_dconv
      out = out_proj(z * relu(z))                 (B, D, h, w)

  With ``mixer.d_prop = E' < D`` the whole propagation path is ``E'`` wide: ``in_proj`` maps into the
  compact space and ``out_conv`` lifts back to ``D`` (no extra layers).
- ``"compact"``: this project's first mixer, :class:`~gspn_lightning.nn.GSPNMixer` as the classifiers
  use it (LayerNorm, GRN and a linear out-projection after the merge, ``1 D^2`` less per block).  Its
  state-dict keys are unchanged, so checkpoints written before ``block`` existed load with
  ``block: compact``; loading one block's weights into the other is one error naming the block.  Kept
  for those checkpoints: on the digits demo it trails the release block (docs/generation.md).

Parameters per block of width ``D`` (biases aside): in-projection ``D^2``, gate proxy ``D^2/16`` and
the 24 gate maps from it ``1.5 D^2``, output ``D^2`` (compact) or ``2 D^2`` (release), and ``2 D^2``
for the long skip of each out block.  ``docs/model_sizes.md`` compares the B/L/XL counts with the
paper's and with the release's module definition, module by module.

Where this differs from the release (facts, not code, carried over; none changes the parameter count
by more than ``~30 D`` per block):

- gate activations as :mod:`gspn_lightning.nn.mixer` defines them (``lam``, ``u`` sigmoid, the skip
  ``d`` with bias 1) and a SiLU after the 7x7 depthwise conv; a per-channel softmax merge of the four
  directions (``4 D`` parameters, the release: 4 scalars); biases on the in-/out-projections and gates;
- the long skip fuses the residual streams (the release fuses the two blocks' branch outputs, Mamba's
  ``(hidden, residual)`` pairs); same parameters;
- local or global per block: ``mixer.chunk_size`` for the local blocks, ``global_blocks`` naming the
  global ones (by default the last two out blocks, as the release intends: its code builds every block
  local because the chunk it computes is never used; here the setting takes effect, and
  ``chunk_sizes()`` reports it);
- no MLP in a block (the paper's generation blocks have none, nor has the release).

Conditioning: the paper's additive ``c`` on the tokens (always), and optionally (``adaln_blocks``)
adaLN-Zero in every block as DiT does; both work with either block.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from ..nn import DropPath, GSPNMixer, LayerNorm2d, MixerOptions
from ..nn.checkpointing import run_block
from ..nn.conv import DepthwiseConv2d
from ..nn.embeddings import (
    AdaLNFinalLayer,
    LabelEmbedder,
    TimestepEmbedder,
    check_patch_input,
    init_conditioning,
    modulate,
)
from .registry import check_patch_grid, register_model

__all__ = ["BLOCKS", "GSPN_DIT_SIZES", "GSPNDiT", "GSPNDiTBlock", "ReleaseMixer", "weights_block"]

#: the GSPN-DiT block kinds: the release's (the default) and this project's first, compact one
BLOCKS = ("release", "compact")
#: a state-dict key that only the mixer of each block has (what a checkpoint's block is told by)
_BLOCK_MARKERS = {"release": "mixer.out_conv.weight", "compact": "mixer.grn.gamma"}


class ReleaseMixer(GSPNMixer):
    """The mixer of the release's GSPN-DiT block, ``(B, dim, h, w) -> (B, dim, h, w)``: the propagation
    of :class:`~gspn_lightning.nn.GSPNMixer` (``d_inner = dim``, or the compact ``options.d_prop``),
    then ``out_proj(z * relu(z))`` with ``z = out_dconv(out_conv(y))`` (a 1x1 conv back to ``dim`` and
    a 3x3 depthwise conv, both without bias) in place of the LayerNorm + GRN.

    Initialisation: the in- and out-projections Xavier-uniform (the release's, which are linears), the
    1x1 output conv Xavier-uniform too (as this project's other 1x1s; the release leaves it at PyTorch's
    default), the two depthwise convs PyTorch's default (the release's), so that the quadratic gate does
    not start from vanishing features; the proxy, gates and merge as
    :class:`~gspn_lightning.nn.GSPNMixer` (uniform taps, ``lam = u = 0.5``, skip ``d = 1``).
    """

    def __init__(self, dim: int, options: MixerOptions | Mapping | None = None, **overrides) -> None:
        opts = MixerOptions.build(options, **overrides)
        if opts.d_prop is not None and opts.d_prop >= dim:
            raise ValueError(
                f"d_prop must be below the width {dim} (None: no compact space), got {opts.d_prop}"
            )
        width = opts.d_prop or dim  # the in-projection maps into the compact space, out_conv lifts back
        super().__init__(dim, d_inner=width, options=dataclasses.replace(opts, d_prop=None))
        self.options = opts
        del self.norm, self.grn, self.out_proj  # this head replaces GSPNMixer's
        self.out_conv = nn.Conv2d(width, dim, 1, bias=False)
        self.out_dconv = DepthwiseConv2d(dim, 3, bias=False)
        self.out_act = nn.ReLU()
        self.out_proj = nn.Conv2d(dim, dim, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if "out_conv" not in self._modules:  # GSPNMixer.__init__'s call, before this head exists
            return super().reset_parameters()
        self.reset_propagation_parameters()
        for conv in (self.in_proj, self.out_conv, self.out_proj):
            nn.init.xavier_uniform_(conv.weight.view(conv.out_channels, -1))
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
        self.dwconv.reset_parameters()
        self.out_dconv.reset_parameters()

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", d_prop={self.d_inner}" if self.d_inner != self.dim else "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, dim, h, w) -> (B, dim, h, w)``."""
        z = self.out_dconv(self.out_conv(self.propagate(x)))  # (B, dim, h, w)
        return self.out_proj(z * self.out_act(z))


class GSPNDiTBlock(nn.Module):
    """``(B, D, h, w) [, skip (B, D, h, w)] -> (B, D, h, w)``: optional long-skip fusion, then a
    pre-norm residual GSPN mixer of width ``dim`` with the options ``mixer`` (``overrides``: single
    fields replacing them, e.g. this block's ``chunk_size``); ``block`` picks the mixer
    (:data:`BLOCKS`: ``"release"`` a :class:`ReleaseMixer`, ``"compact"`` a
    :class:`~gspn_lightning.nn.GSPNMixer`)."""

    def __init__(
        self,
        dim: int,
        mixer: MixerOptions | Mapping | None = None,
        skip: bool = False,
        drop_path: float = 0.0,
        adaln: bool = False,
        block: str = "release",
        **overrides,
    ) -> None:
        super().__init__()
        check_block(block)
        self.skip_linear = nn.Conv2d(2 * dim, dim, 1) if skip else None
        self.norm = LayerNorm2d(dim)
        if block == "release":
            self.mixer: GSPNMixer = ReleaseMixer(dim, mixer, **overrides)
        else:
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


def weights_block(keys: Iterable[str]) -> str | None:
    """The :data:`BLOCKS` kind of GSPN-DiT weights told by their state-dict keys (under any prefix, e.g.
    a task's ``model.`` or its EMA's), ``None`` when they are not a GSPN-DiT's."""
    for key in keys:
        for block, marker in _BLOCK_MARKERS.items():
            if key.endswith("mid_block." + marker):
                return block
    return None


def check_block(block: str) -> str:
    """``block`` if it is one of :data:`BLOCKS`, else a ``ValueError`` naming them."""
    if block not in BLOCKS:
        raise ValueError(f"block must be one of {BLOCKS}, got {block!r}")
    return block


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
            ``dw_kernel``, ``directions``, ``backend``, ``fused``, ``fuse_gates``, ``d_prop`` (GSPN-2's
            compact propagation: the channels propagated, below ``D``; ``None``: all).
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
        block: the block's mixer, ``"release"`` (the default: the release's 1x1 conv, 3x3 depthwise
            conv and ``z * relu(z)`` gate before the out-projection) or ``"compact"`` (this project's
            first block: LayerNorm + GRN before the out-projection; the checkpoints written before this
            option existed are of this block).
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
        block: str = "release",
    ) -> None:
        super().__init__()
        self.block = check_block(block)
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

        def make_block(i: int, skip: bool) -> GSPNDiTBlock:
            chunk = None if i in glob else mixer.chunk_size
            return GSPNDiTBlock(hidden_size, mixer, skip, rates[i], adaln_blocks, block, chunk_size=chunk)

        half = depth // 2
        self.patch_embed = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.t_embed = TimestepEmbedder(hidden_size)
        self.y_embed = LabelEmbedder(num_classes, hidden_size, class_dropout, label_init_std)
        self.in_blocks = nn.ModuleList(make_block(i, skip=False) for i in range(half))
        self.mid_block = make_block(half, skip=False)
        self.out_blocks = nn.ModuleList(make_block(half + 1 + i, skip=True) for i in range(half))
        self.norm = LayerNorm2d(hidden_size)
        self.final = AdaLNFinalLayer(hidden_size, patch_size, self.out_channels)
        self.grad_checkpointing = False
        self.reset_parameters()
        self.register_load_state_dict_pre_hook(self._refuse_other_block)

    def check_state_dict(self, state: Mapping[str, torch.Tensor], prefix: str = "") -> None:
        """A ``ValueError`` naming both blocks when ``state`` (keys under ``prefix``) holds the weights
        of a GSPN-DiT of the other :data:`BLOCKS` kind than this model's."""
        own = prefix + "mid_block." + _BLOCK_MARKERS[self.block]
        for other, marker in _BLOCK_MARKERS.items():
            if other != self.block and prefix + "mid_block." + marker in state and own not in state:
                raise ValueError(
                    f"these weights are of a GSPN-DiT with block={other!r}, this model has block="
                    f"{self.block!r}: build it with block: {other} (model_kwargs.block; checkpoints from "
                    "before the option existed are block: compact)"
                )

    def _refuse_other_block(self, module, state_dict, prefix, *args) -> None:
        self.check_state_dict(state_dict, prefix)

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
