"""The GSPN mixer: four directional line scans with input-dependent gates, the drop-in replacement for
attention (docs/design.md, "The GSPN mixer").

Data flow for an input ``(B, dim, H, W)``, ``E = d_inner``, ``S = d_state``, ``K = len(directions)``::

    x  = SiLU(dwconv(in_proj(x)))                        (B, E, H, W)   in_proj 1x1, dwconv k x k
    p  = proxy(x)                                        (B, S, H, W)   low-rank 1x1, E -> S
    g  = gates(p)                                        (B, K*6*E, H, W)  one 1x1 conv, S -> 6 E per direction
                                                         (by default never materialised: the fused op
                                                         projects each plane's logits on the fly)
    for each direction k, split g into g_neg, g_mid, g_pos, lam, u, d  (each (B, E, H, W)):
        h_k = gspn_scan(x, sigmoid(lam), *normalize_gates(g_neg, g_mid, g_pos, k), k, chunk_size)
        y_k = sigmoid(u) * h_k + d * x
    y  = sum_k softmax_k(merge)[k, c] * y_k              (B, E, H, W)   per-channel softmax over directions
                                                         (the projection g, the loop and the merge: one
                                                         fused op, gspn_propagate_proj, unless fused=False)
    out = out_proj(GRN(LayerNorm(y)))                    (B, dim, H, W)
                                                         (LayerNorm + GRN: one fused op, layer_norm_grn,
                                                         where the backend gives it; see nn/norm.py)

With GSPN-2's compact propagation (``d_prop = E' < E``) the propagation runs on ``prop_down(x)``
(1x1, ``E -> E'``) with ``K*6*E'`` gate maps, and ``y = prop_up(...)`` (1x1, ``E' -> E``) lifts it back.

Every step keeps the input's memory format, and the layer is written for channels-last maps (what the
token layout ``(B, N, C)`` is, and what the models feed it): the convolutions keep it, the fused
LayerNorm + GRN op reads and writes channels-last (as do the two modules where they run instead), and
no float32 map is made for a 16-bit input outside the ops (see :mod:`gspn_lightning.nn.norm`).  The forward
has no host syncs and no value-dependent shapes, so it can be captured in a CUDA graph (docs/design.md,
"The GSPN mixer").

Choices (the paper leaves them open):

- ``lam = sigmoid(.)``: the input injection stays in (0, 1); with row-stochastic taps the scan is a
  bounded-gain recurrence whose only growth is the accumulation of ``lam * x`` along a line, which the
  LayerNorm after the merge absorbs.
- ``u = sigmoid(.)``: an output gate in (0, 1), so a direction can be switched off per pixel/channel.
- ``d`` is linear (no activation), its bias initialised to 1 (as Mamba's ``D``): the layer starts with
  an identity skip of the depthwise-conv features next to the propagated ones.
- Gate logits, ``lam`` and ``u`` start near 0 (weights ~ N(0, 0.02), biases 0): uniform taps (1/3),
  ``lam = u = 0.5``.
- Merge: a per-channel softmax over directions (``merge_logits`` of shape ``(K, E)``, zero-initialised,
  i.e. the plain average at start).  It costs ``K * E`` parameters, against ``K * E * E`` for a 1x1
  conv over the concatenation, and keeps the merge a convex combination.
- Every direction scans in the image's own frame (the op scans rows or columns itself), so ``H != W``
  works and the four outputs are aligned without transposes.

``chunk_size=k`` makes the layer local: each scan restarts every ``k`` lines (of absolute position), so
a pixel sees only its own group of lines along each scan axis; ``None`` is the global scan.

The options of a GSPN layer (proxy rank, chunk, depthwise kernel, directions, backend, fused paths) are
declared once, in :class:`MixerOptions`, and passed down as one object: a model takes ``mixer=`` (a
``MixerOptions`` or a dict of its fields), hands it to its blocks, and each block to its mixer (with the
block's own ``chunk_size`` when the model makes some blocks global); the SD-XL swap takes the same object.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..ops import (
    DIRECTIONS,
    GATE_FIELDS,
    gspn_propagate,
    gspn_propagate_proj,
    gspn_scan,
    propagate_reference,
)
from .conv import DepthwiseConv2d
from .norm import GRN, LayerNorm2d, norm_grn

__all__ = ["GATE_FIELDS", "GSPNMixer", "GSPNTokenMixer", "MixerOptions", "check_scan_options"]


def check_scan_options(
    directions: Sequence[str], chunk_size: int | None
) -> tuple[tuple[str, ...], int | None]:
    """Validated ``(directions, chunk_size)`` of a GSPN layer: distinct members of ``DIRECTIONS``, and
    ``None`` or an int >= 1; ``ValueError`` naming the argument otherwise."""
    directions = tuple(directions)
    if (
        not directions
        or len(set(directions)) != len(directions)
        or any(d not in DIRECTIONS for d in directions)
    ):
        raise ValueError(f"directions must be distinct members of {DIRECTIONS}, got {directions!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or int(chunk_size) < 1):
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size!r}")
    return directions, None if chunk_size is None else int(chunk_size)


@dataclass(frozen=True)
class MixerOptions:
    """The options of a GSPN layer, declared once and passed down from a model to every mixer.

    Args:
        d_state: rank of the proxy from which all gates are projected (``None``: the layer's default,
            8 for :class:`GSPNMixer` and the SD-XL swap, ``hidden_size // 16`` in GSPN-DiT).
        chunk_size: ``None`` for global propagation, ``k`` for the local variant (restart every ``k``
            lines).  In a model, the chunk of its *local* blocks (the model's ``global_blocks`` are
            global whatever this says).
        dw_kernel: kernel size of the depthwise conv after ``in_proj`` (odd; 1 makes it pointwise;
            not used by the SD-XL swap, which has no such conv).
        directions: scan directions, a non-empty subset of ``("t2b", "b2t", "l2r", "r2l")``.
        backend: passed to the ops (``None``: ``$GSPN_BACKEND`` / auto); ``"planes"`` runs
            :func:`~gspn_lightning.ops.gspn_propagate_proj` as logits + per-plane kernel (CUDA's
            default until the new kernel is shown correct on a GPU), ``"kernel"`` its own op.
        fused: steps 2-4 (gate normalisation, the scans, the merge) as one op (see :class:`GSPNMixer`).
        fuse_gates: with ``fused``, the gate projection fused into the op too (see :class:`GSPNMixer`).
        d_prop: GSPN-2's compact propagation (arXiv 2512.07884): ``None`` propagates all ``d_inner``
            channels; ``d_prop = E' < d_inner`` projects the features into ``E'`` proxy channels (a
            1x1 ``prop_down``), propagates those (``K * 6 * E'`` gate maps per pixel instead of
            ``K * 6 * d_inner``) and lifts the result back to ``d_inner`` (a 1x1 ``prop_up``).
    """

    d_state: int | None = None
    chunk_size: int | None = None
    dw_kernel: int = 7
    directions: tuple[str, ...] = DIRECTIONS
    backend: str | None = None
    fused: bool = True
    fuse_gates: bool = True
    d_prop: int | None = None

    def __post_init__(self) -> None:
        directions, chunk_size = check_scan_options(self.directions, self.chunk_size)
        object.__setattr__(self, "directions", directions)
        object.__setattr__(self, "chunk_size", chunk_size)
        if self.d_state is not None:
            if isinstance(self.d_state, bool) or int(self.d_state) < 1:
                raise ValueError(f"d_state must be >= 1 or None, got {self.d_state!r}")
            object.__setattr__(self, "d_state", int(self.d_state))
        if self.d_prop is not None:
            if isinstance(self.d_prop, bool) or int(self.d_prop) < 1:
                raise ValueError(f"d_prop must be >= 1 or None, got {self.d_prop!r}")
            object.__setattr__(self, "d_prop", int(self.d_prop))
        if isinstance(self.dw_kernel, bool) or int(self.dw_kernel) < 1 or int(self.dw_kernel) % 2 == 0:
            raise ValueError(f"dw_kernel must be a positive odd integer, got {self.dw_kernel}")
        object.__setattr__(self, "dw_kernel", int(self.dw_kernel))
        object.__setattr__(self, "fused", bool(self.fused))
        object.__setattr__(self, "fuse_gates", bool(self.fuse_gates))

    @classmethod
    def build(cls, options: MixerOptions | Mapping | None = None, **overrides) -> MixerOptions:
        """``options`` (a ``MixerOptions``, a dict of its fields, or ``None``: the defaults) with
        ``overrides`` replacing fields; an unknown field is a ``TypeError`` naming it."""
        if options is None:
            base = cls()
        elif isinstance(options, cls):
            base = options
        elif isinstance(options, Mapping):
            unknown = sorted(set(options) - _MIXER_FIELDS)
            if unknown:
                raise TypeError(f"unknown mixer option(s) {unknown}; the options are {sorted(_MIXER_FIELDS)}")
            base = cls(**options)
        else:
            raise TypeError(f"mixer options must be a MixerOptions or a dict, got {type(options).__name__}")
        unknown = sorted(set(overrides) - _MIXER_FIELDS)
        if unknown:
            raise TypeError(f"unknown mixer option(s) {unknown}; the options are {sorted(_MIXER_FIELDS)}")
        return dataclasses.replace(base, **overrides) if overrides else base

    @classmethod
    def for_model(cls, options: MixerOptions | Mapping | None, **defaults) -> MixerOptions:
        """A model's options: a ``MixerOptions`` is taken as it is; a dict (or ``None``) is read over the
        model's own ``defaults`` (``GSPNDiT(mixer={"dw_kernel": 3})`` keeps its local chunk of 2)."""
        if isinstance(options, cls):
            return options
        if options is not None and not isinstance(options, Mapping):
            raise TypeError(f"mixer options must be a MixerOptions or a dict, got {type(options).__name__}")
        return cls.build({**defaults, **dict(options or {})})

    def as_dict(self) -> dict:
        """The fields as plain values (``directions`` a list): what a config or a checkpoint holds."""
        out = dataclasses.asdict(self)
        out["directions"] = list(self.directions)
        return out


_MIXER_FIELDS = frozenset(f.name for f in dataclasses.fields(MixerOptions))


class GSPNMixer(nn.Module):
    """Four-direction GSPN mixer, ``(B, dim, H, W) -> (B, dim, H, W)``.

    Args:
        dim: input/output channels.
        d_inner: width of the propagated features (default ``int(1.5 * dim)``).
        options: the layer's :class:`MixerOptions` (or a dict of them; ``None``: the defaults).
        **overrides: single fields of :class:`MixerOptions` replacing those of ``options``
            (``GSPNMixer(64, d_state=4, chunk_size=2)``):

        d_state: rank of the proxy from which all gates are projected (default 8).
        chunk_size: ``None`` for global propagation, ``k`` for the local variant (restart every ``k`` lines).
        dw_kernel: kernel size of the depthwise conv after ``in_proj`` (odd; 1 makes it pointwise).
        directions: scan directions, a non-empty subset of ``("t2b", "b2t", "l2r", "r2l")``.
        backend: passed to the ops (``None``: ``$GSPN_BACKEND`` / auto); ``"planes"`` runs
            :func:`~gspn_lightning.ops.gspn_propagate_proj` as logits + per-plane kernel (CUDA's
            default until the new kernel is shown correct on a GPU), ``"kernel"`` its own op.
        fused: steps 2-4 (gate normalisation, the scans, the merge) as one op,
            :func:`gspn_lightning.ops.gspn_propagate` (the default: it saves only its inputs for the
            backward); ``False`` composes :func:`normalize_gates` and :func:`gspn_scan` per direction,
            which is the same function (the fused op's reference) at several times the time and memory.
        fuse_gates: with ``fused``, the gate projection ``gates(proxy)`` is fused into the op too,
            :func:`gspn_lightning.ops.gspn_propagate_proj` (the default): the ``K * 6 * d_inner`` logit
            maps are computed per plane inside the kernel and never stored, neither for the forward
            nor for the backward.  ``False`` materialises them with the ``gates`` conv and calls
            :func:`gspn_lightning.ops.gspn_propagate` (the previous fused path).  Same parameters and
            state dict either way (the op reads ``gates.weight`` through a view).  On CUDA the
            channels-last kernel that projects them in registers runs with ``backend="kernel"``; the
            default there is still ``"planes"`` (logits materialised) until a GPU run proves it.
        d_prop: GSPN-2's compact propagation: ``x`` is projected to ``d_prop`` channels by the 1x1
            ``prop_down`` before the propagation and its result lifted back to ``d_inner`` by the 1x1
            ``prop_up`` (``None``: no projection, every channel propagated; must be ``< d_inner``).
    """

    def __init__(
        self,
        dim: int,
        d_inner: int | None = None,
        options: MixerOptions | Mapping | None = None,
        **overrides,
    ) -> None:
        super().__init__()
        opts = MixerOptions.build(options, **overrides)
        if opts.d_state is None:
            opts = dataclasses.replace(opts, d_state=8)
        self.options = opts
        self.dim = dim
        self.d_inner = d_inner = int(d_inner if d_inner is not None else int(1.5 * dim))
        self.d_state = d_state = opts.d_state
        self.chunk_size = opts.chunk_size
        self.directions = directions = opts.directions
        self.backend = opts.backend
        self.fused = opts.fused
        self.fuse_gates = opts.fuse_gates
        dw_kernel = opts.dw_kernel
        if opts.d_prop is not None and opts.d_prop >= d_inner:
            raise ValueError(
                f"d_prop must be below d_inner={d_inner} (None: no compact space), got {opts.d_prop}"
            )
        #: the channels propagated: ``d_inner``, or GSPN-2's compact ``d_prop``
        self.d_prop = d_prop = opts.d_prop or d_inner

        self.in_proj = nn.Conv2d(dim, d_inner, 1)
        self.dwconv = DepthwiseConv2d(d_inner, dw_kernel)
        self.act = nn.SiLU()
        self.proxy = nn.Conv2d(d_inner, d_state, 1)
        # GSPN-2's compact channel space (None: the layer propagates its d_inner channels themselves)
        self.prop_down = nn.Conv2d(d_inner, d_prop, 1) if d_prop < d_inner else None
        self.prop_up = nn.Conv2d(d_prop, d_inner, 1) if d_prop < d_inner else None
        self.gates = nn.Conv2d(d_state, len(directions) * len(GATE_FIELDS) * d_prop, 1)
        self.merge_logits = nn.Parameter(torch.zeros(len(directions), d_prop))
        self.norm = LayerNorm2d(d_inner)
        self.grn = GRN(d_inner)
        self.out_proj = nn.Conv2d(d_inner, dim, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Weights ~ truncated N(0, 0.02), biases 0, except the skip ``d`` whose bias is 1."""
        self.reset_propagation_parameters()
        nn.init.trunc_normal_(self.out_proj.weight, std=0.02)
        nn.init.zeros_(self.out_proj.bias)
        self.norm.reset_parameters()
        nn.init.zeros_(self.grn.gamma)
        nn.init.zeros_(self.grn.beta)

    def reset_propagation_parameters(self) -> None:
        """The layers up to the merge (what :meth:`propagate` uses): weights ~ truncated N(0, 0.02),
        biases 0, except the skip ``d`` whose bias is 1; the compact space's projections (``d_prop``)
        Xavier-uniform, so that the lift starts near an isometry."""
        for conv in (self.in_proj, self.dwconv, self.proxy, self.gates):
            nn.init.trunc_normal_(conv.weight, std=0.02)
            nn.init.zeros_(conv.bias)
        for conv in (self.prop_down, self.prop_up):
            if conv is not None:
                nn.init.xavier_uniform_(conv.weight.view(conv.out_channels, -1))
                nn.init.zeros_(conv.bias)
        with torch.no_grad():
            bias = self.gates.bias.view(len(self.directions), len(GATE_FIELDS), self.d_prop)
            bias[:, GATE_FIELDS.index("d")] = 1.0
        nn.init.zeros_(self.merge_logits)

    def extra_repr(self) -> str:
        return (
            f"chunk_size={self.chunk_size}, directions={self.directions}, fused={self.fused}, "
            f"fuse_gates={self.fuse_gates}"
            + (f", d_prop={self.d_prop}" if self.prop_down is not None else "")
        )

    def propagate(self, x: torch.Tensor) -> torch.Tensor:
        """Everything before the norm: ``(B, dim, H, W) -> (B, d_inner, H, W)``, the merged ``y``."""
        x = self.act(self.dwconv(self.in_proj(x)))
        p = self.proxy(x)
        if self.prop_down is None:
            return self._propagate(x, p)
        return self.prop_up(self._propagate(self.prop_down(x), p))  # GSPN-2's compact channel space

    def _propagate(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """The gates from the proxy ``p (B, S, H, W)``, the scans of ``x (B, d_prop, H, W)`` and their
        merge ``-> (B, d_prop, H, W)``."""
        B, _, H, W = x.shape
        weights = torch.softmax(self.merge_logits.float(), dim=0).to(x.dtype)
        if self.fused and self.fuse_gates:
            # (K*6*E, S, 1, 1) viewed as (K*6*E, S): no copy.  The casts are no-ops unless autocast made
            # the proxy 16-bit (the conv they replace would have run in that dtype too).
            w = self.gates.weight.view(self.gates.out_channels, self.d_state).to(p.dtype)
            bias = self.gates.bias.to(p.dtype)
            return gspn_propagate_proj(
                x, p, w, bias, weights, self.directions, self.chunk_size, backend=self.backend
            )
        g = self.gates(p).view(B, len(self.directions), len(GATE_FIELDS), self.d_prop, H, W)
        if self.fused:
            return gspn_propagate(x, g, weights, self.directions, self.chunk_size, backend=self.backend)

        def scan(*args):
            return gspn_scan(*args, backend=self.backend)

        return propagate_reference(x, g, weights, self.directions, self.chunk_size, scan=scan)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, dim, H, W) -> (B, dim, H, W)``."""
        return self.out_proj(norm_grn(self.norm, self.grn, self.propagate(x), backend=self.backend))


class GSPNTokenMixer(GSPNMixer):
    """:class:`GSPNMixer` on token sequences: ``(B, N, C)`` with ``N = H * W`` (row-major) ``-> (B, N, C)``.

    Same constructor and parameters as :class:`GSPNMixer` (state dicts are interchangeable); ``forward``
    takes the spatial size ``hw = (H, W)`` of the token grid.  A contiguous ``(B, N, C)`` tensor is a
    channels-last ``(B, C, H, W)`` map, so both conversions are views (no copy) and the whole layer runs
    channels-last.
    """

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:  # type: ignore[override]
        B, N, C = x.shape
        H, W = hw
        if H * W != N:
            raise ValueError(f"hw={tuple(hw)} gives {H * W} tokens but x has N={N}")
        # views both ways for contiguous tokens: (B, N, C) has the strides of a channels-last
        # (B, C, H, W) map (reshape copies only other token layouts), and the
        # out-projection of a channels-last map is channels-last, i.e. a contiguous (B, N, C) tensor
        y = super().forward(x.transpose(1, 2).reshape(B, C, H, W))
        return y.flatten(2).transpose(1, 2)
