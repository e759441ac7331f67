"""GSPN classification backbones (GSPN-T/S/B of arXiv 2501.12381).

Layout, for an input ``(B, in_chans, H, W)`` of any size (odd or non-square included)::

    stem        3x3 s2 conv -> LN -> GELU -> 3x3 s2 conv -> LN      (B, D, H/4, W/4)
    stage 1     depths[0] x GSPNBlock(D)
    downsample  3x3 s2 conv (padding 1: ceil halving) -> LN          (B, 2D, H/8, W/8)
    stage 2     depths[1] x GSPNBlock(2D)
    ...         stages 3, 4 at 4D, 8D
    head        LN -> global average pool -> Linear(8D, num_classes)  (B, num_classes)

Each block is ``x + DropPath(GSPNMixer(LN x))`` then ``x + DropPath(MLP(LN x))`` (mixer width
``d_inner_ratio * dim``, the other mixer options in ``mixer``, MLP ratio 4).  Blocks are *local* (the
scan restarts every ``mixer.chunk_size`` lines) unless ``global_blocks`` names them *global*.

``global_blocks`` has one entry per stage, each one of: ``"all"``, ``"none"`` (or ``None``), or a list of
0-based block indices within the stage.  E.g. GSPN-B: ``("none", "none", [0, 1, 2, 3, 4, 5, 6, 13],
"all")``.  ``mixer={"chunk_size": None}`` makes every block global.

Parameter count (num_classes=1000), in millions.  Per block of width ``C`` with ``E = 1.5 C``,
``S = d_state`` and four directions of six gate maps each (three taps, lam, u, d):

    in/out proj   2 C E + E + C             = 3 C^2 + 2.5 C
    dwconv 7x7    49 E + E                  = 75 C
    proxy+gates   (E S + S) + 24 (S E + E)  = 37.5 S C + 36 C + S   (linear in C: low-rank proxy)
    merge/LN/GRN  4 E + 2 E + 2 E           = 12 C
    MLP           8 C^2 + 5 C;   the block's two LNs 4 C
    => 11 C^2 + (37.5 S + 134.5) C + S per block (143,096 for C = 96, S = 8).

Measured (the totals are what ``gspn models`` prints):

    | model  | in/out | dw   | proxy+ | merge+ | MLP   | block | down-  | stem | LN+  | total | target |
    |        | proj   | conv | gates  | LN+GRN |       | LNs   | sample |      | head |       |        |
    |--------|-------:|-----:|-------:|-------:|------:|------:|-------:|-----:|-----:|------:|-------:|
    | gspn_t |  6.92  | 0.36 | 1.61   | 0.06   | 18.46 | 0.02  | 3.49   | 0.04 | 0.77 | 31.73 | 31.5   |
    | gspn_s | 10.97  | 0.58 | 4.88   | 0.09   | 29.24 | 0.03  | 4.41   | 0.05 | 0.87 | 51.13 | 50.8   |
    | gspn_b | 22.32  | 0.94 | 4.19   | 0.15   | 59.51 | 0.05  | 5.45   | 0.07 | 0.96 | 93.64 | 93.1   |

i.e. +0.7 %, +0.6 %, +0.6 % from the targets (the paper rounds to 30M / 50M / 89M).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..nn import GSPNBlock, GSPNMixer, LayerNorm2d, MixerOptions
from ..nn.checkpointing import run_block
from .registry import register_model

__all__ = ["GSPN_SIZES", "GSPNClassifier", "resolve_global_blocks"]

GlobalSpec = Sequence["str | Sequence[int] | None"]


def resolve_global_blocks(global_blocks: GlobalSpec | None, depths: Sequence[int]) -> list[set[int]]:
    """Turn the per-stage spec into the set of global block indices of each stage (validated)."""
    if global_blocks is None:
        return [set() for _ in depths]
    if isinstance(global_blocks, str) or len(global_blocks) != len(depths):
        raise ValueError(f"global_blocks needs one entry per stage ({len(depths)}), got {global_blocks!r}")
    resolved = []
    for stage, (spec, depth) in enumerate(zip(global_blocks, depths)):
        if spec is None or spec == "none":
            resolved.append(set())
        elif spec == "all":
            resolved.append(set(range(depth)))
        elif isinstance(spec, str):
            raise ValueError(f"global_blocks[{stage}] must be 'all', 'none' or a list of ints, got {spec!r}")
        else:
            idx = {int(i) for i in spec}
            bad = sorted(i for i in idx if not 0 <= i < depth)
            if bad:
                raise ValueError(f"global_blocks[{stage}] has indices {bad} outside stage of depth {depth}")
            resolved.append(idx)
    return resolved


class GSPNStage(nn.Module):
    """Optional downsampling (3x3 s2 conv + LN, ``in_dim -> dim``) then a sequence of GSPN blocks."""

    def __init__(self, in_dim: int, dim: int, blocks: list[GSPNBlock]) -> None:
        super().__init__()
        if in_dim == dim:
            self.downsample = nn.Identity()
        else:
            self.downsample = nn.Sequential(nn.Conv2d(in_dim, dim, 3, stride=2, padding=1), LayerNorm2d(dim))
        self.blocks = nn.Sequential(*blocks)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        for blk in self.blocks:
            x = run_block(blk, x, checkpointing=self.grad_checkpointing)
        return x


class GSPNClassifier(nn.Module):
    """GSPN image classifier, ``(B, in_chans, H, W) -> (B, num_classes)`` (features if ``num_classes=0``).

    Args:
        num_classes: classes of the linear head (0: no head, ``forward`` returns pooled features).
        in_chans: input channels.
        embed_dim: ``D``; stage widths are ``D * 2**i``.
        depths: blocks per stage.
        mixer: the options of every mixer (:class:`~gspn_lightning.nn.MixerOptions` or a dict of its
            fields read over this model's defaults ``d_state=8, chunk_size=2``): ``d_state`` the rank
            of the gate proxy, ``chunk_size`` the chunk of the local blocks (``None``: every block
            global), ``dw_kernel``, ``directions``, ``backend``, ``fused``, ``fuse_gates``.
        mlp_ratio: MLP hidden width over block width.
        drop_path_rate: stochastic depth, rising linearly from 0 to this over all blocks.
        global_blocks: which blocks are global, one entry per stage (see module docstring).
        d_inner_ratio: mixer width over block width.
        head_drop: dropout before the head.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        in_chans: int = 3,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 7, 2),
        mixer: MixerOptions | Mapping | None = None,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        global_blocks: GlobalSpec | None = ("none", "none", "all", "all"),
        d_inner_ratio: float = 1.5,
        head_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.mixer_options = mixer = MixerOptions.for_model(mixer, d_state=8, chunk_size=2)
        depths = tuple(int(d) for d in depths)
        if not depths or min(depths) < 1:
            raise ValueError(f"depths must be a non-empty list of positive ints, got {depths}")
        self.num_classes = num_classes
        self.dims = [embed_dim * 2**i for i in range(len(depths))]
        self.num_features = self.dims[-1]
        global_sets = resolve_global_blocks(global_blocks, depths)

        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, embed_dim // 2, 3, stride=2, padding=1),
            LayerNorm2d(embed_dim // 2),
            nn.GELU(),
            nn.Conv2d(embed_dim // 2, embed_dim, 3, stride=2, padding=1),
            LayerNorm2d(embed_dim),
        )
        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # python: meta-safe
        stages, in_dim, n = [], embed_dim, 0
        for i, (dim, depth) in enumerate(zip(self.dims, depths)):
            blocks = [
                GSPNBlock(
                    dim,
                    mlp_ratio=mlp_ratio,
                    drop_path=rates[n + j],
                    d_inner=int(d_inner_ratio * dim),
                    mixer=mixer,
                    chunk_size=None if j in global_sets[i] else mixer.chunk_size,
                )
                for j in range(depth)
            ]
            stages.append(GSPNStage(in_dim, dim, blocks))
            in_dim, n = dim, n + depth
        self.stages = nn.Sequential(*stages)
        self.norm = LayerNorm2d(self.num_features)
        self.head_drop = nn.Dropout(head_drop)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Convs and linears ~ truncated N(0, 0.02) with zero bias; mixers use their own init."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, GSPNMixer):
                m.reset_parameters()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of every block (recomputed in the backward pass, not stored)."""
        for stage in self.stages:
            stage.grad_checkpointing = bool(enable)

    def chunk_sizes(self) -> list[list[int | None]]:
        """The scan chunk of every block, per stage (``None`` = global)."""
        return [[blk.chunk_size for blk in stage.blocks] for stage in self.stages]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_chans, H, W) -> (B, 8D, ceil(H/32), ceil(W/32))``, normalised."""
        return self.norm(self.stages(self.stem(x)))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 8D, h, w) -> (B, num_classes)``: global average pool, dropout, linear."""
        return self.head(self.head_drop(x.mean(dim=(2, 3))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


#: the paper's reference sizes (mixer width 1.5 D, 7x7 depthwise conv, MLP ratio 4, local chunk 2)
GSPN_SIZES: dict[str, dict] = {
    "gspn_t": dict(
        embed_dim=96, depths=(2, 2, 7, 2), mixer={"d_state": 8}, drop_path_rate=0.2,
        global_blocks=("none", "none", "all", "all"),
    ),
    "gspn_s": dict(
        embed_dim=108, depths=(5, 5, 10, 2), mixer={"d_state": 16}, drop_path_rate=0.4,
        global_blocks=("none", "none", "none", "all"),
    ),
    "gspn_b": dict(
        embed_dim=120, depths=(4, 4, 15, 4), mixer={"d_state": 8}, drop_path_rate=0.5,
        global_blocks=("none", "none", (0, 1, 2, 3, 4, 5, 6, 13), "all"),
    ),
}  # fmt: skip

for _name, _cfg in GSPN_SIZES.items():
    register_model(_name, GSPNClassifier, task="classification", defaults=_cfg)
