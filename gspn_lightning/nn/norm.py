"""Channels-first normalisation layers for ``(B, C, H, W)`` feature maps, written for channels-last
memory: neither copies the map for a layout change nor makes a float32 copy of a 16-bit map.

- :class:`LayerNorm2d` normalises the channels of each pixel with ``F.layer_norm`` on the ``(B, H, W, C)``
  permutation of its input, a view: for a channels-last input (what the GSPN mixer's convolutions and
  the token layout ``(B, N, C)`` give) the view is contiguous and nothing is copied; a contiguous
  ``(B, C, H, W)`` input works too (``F.layer_norm`` makes the one copy it needs internally).  Either
  way the output is channels-last.
- :class:`GRN` computes its statistics in float32 by a reduction that accumulates in float32
  (``vector_norm(x, dtype=float32)``), applies itself in the input's dtype, and has its own backward
  (:func:`grn`): about half the kernels of autograd's, and no float32 map for a 16-bit input.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import layer_norm_grn, layer_norm_grn_selected

__all__ = ["GRN", "LayerNorm2d", "grn", "norm_grn"]

_HALF = (torch.float16, torch.bfloat16)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel axis of a ``(B, C, H, W)`` tensor (each pixel normalised on its own).

    Same parameters (``weight``, ``bias`` of shape ``(C,)``) as ``nn.LayerNorm(C)``.  The statistics
    are always computed in float32 (inside ``F.layer_norm``).  Under autocast a 16-bit input gives a
    16-bit output (CUDA autocast would otherwise run the layer norm on a float32 copy of the map and
    return a float32 map that the next convolution casts back); a float32 input is left to autocast.
    The output is channels-last (see the module docstring).
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__(num_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.permute(0, 2, 3, 1)  # (B, H, W, C): a view, contiguous when x is channels-last
        device = x.device.type
        if x.dtype in _HALF and torch.is_autocast_enabled(device):
            weight = None if self.weight is None else self.weight.to(x.dtype)
            bias = None if self.bias is None else self.bias.to(x.dtype)
            with torch.autocast(device, enabled=False):
                t = F.layer_norm(t, self.normalized_shape, weight, bias, self.eps)
        else:
            t = F.layer_norm(t, self.normalized_shape, self.weight, self.bias, self.eps)
        return t.permute(0, 3, 1, 2)


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """GRN's statistics: float32 for 16-bit inputs, the input's own dtype otherwise."""
    return torch.float32 if dtype in _HALF else dtype


def _grn_formula(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float) -> torch.Tensor:
    """GRN with autograd's own backward (what :func:`grn` differentiates when a graph of the gradient
    is asked for, ``create_graph=True``)."""
    g = torch.linalg.vector_norm(x, dim=(2, 3), keepdim=True, dtype=_stats_dtype(x.dtype))
    n = g / (g.mean(dim=1, keepdim=True) + eps)
    return torch.addcmul(beta.to(x.dtype), x, (gamma * n + 1).to(x.dtype))


def _no_autocast(device_type: str):
    """Autocast off for ``device_type``; nothing where it has no autocast (``meta``: MAC counting)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class _GRN(torch.autograd.Function):
    """``out = x * (1 + gamma N) + beta`` with ``N = g / (mean_c g + eps)``, ``g = ||x||_2`` over the
    spatial axes, and a hand-written backward.

    With ``s = 1 + gamma N`` and ``ds = sum_hw(dout * x)`` (per batch and channel):

    - ``dgamma = sum_b ds N``, ``dbeta = sum_{b,hw} dout``;
    - ``dN = ds gamma``; ``dg = (dN - mean_c(dN N)) / (mean_c g + eps)``;
    - ``dx = dout * s + x * dg / g`` (``dg / g`` taken as 0 where ``g = 0``: that channel of ``x`` is 0).

    Two passes over the map in the forward (the norm, the output) and four in the backward (the
    product for ``ds``, the sum for ``dbeta``, ``dout * s``, the ``addcmul``), every map in ``x``'s
    dtype; the per-(batch, channel) statistics in float32 (or float64 for a float64 input).
    """

    @staticmethod
    def forward(ctx, x, gamma, beta, eps):
        dt = _stats_dtype(x.dtype)
        g = torch.linalg.vector_norm(x, dim=(2, 3), keepdim=True, dtype=dt)  # (B, C, 1, 1)
        m = g.mean(dim=1, keepdim=True).add_(eps)  # (B, 1, 1, 1)
        n = g / m
        s = (gamma * n).add_(1).to(x.dtype)
        ctx.save_for_backward(x, gamma, beta, g, m, n, s)
        ctx.eps = eps
        return torch.addcmul(beta.to(x.dtype), x, s)

    @staticmethod
    def backward(ctx, grad):
        with _no_autocast(grad.device.type):  # the dtypes are chosen here, as in grn()
            return _GRN._backward(ctx, grad)

    @staticmethod
    def _backward(ctx, grad):
        x, gamma, beta, g, m, n, s = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiate the formula, twice if asked
            params = (x, gamma, beta)
            needed = [p for p, need in zip(params, ctx.needs_input_grad, strict=False) if need]
            grads = iter(
                torch.autograd.grad(_grn_formula(x, gamma, beta, ctx.eps), needed, grad, create_graph=True)
            )
            return (*(next(grads) if need else None for need in ctx.needs_input_grad[:3]), None)
        dx = dgamma = dbeta = None
        dt = g.dtype
        ds = (grad * x).sum(dim=(2, 3), keepdim=True, dtype=dt)  # (B, C, 1, 1)
        if ctx.needs_input_grad[1]:
            dgamma = (ds * n).sum(dim=0, keepdim=True).to(gamma.dtype)
        if ctx.needs_input_grad[2]:
            dbeta = grad.sum(dim=(0, 2, 3), keepdim=True, dtype=dt).to(beta.dtype)
        if ctx.needs_input_grad[0]:
            dn = ds * gamma
            dg = (dn - (dn * n).mean(dim=1, keepdim=True)) / m
            t = dg / g.clamp_min(torch.finfo(dt).tiny)
            dx = torch.addcmul(grad * s, x, t.to(x.dtype))
        return dx, dgamma, dbeta, None


def grn(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Global Response Normalisation of a ``(B, C, H, W)`` map (any memory format; the output has
    ``x``'s): ``x * (1 + gamma * N) + beta``, ``N = ||x||_2 / (mean_c ||x||_2 + eps)`` over ``(H, W)``
    per channel, ``gamma`` and ``beta`` of shape ``(1, C, 1, 1)``.  See :class:`_GRN` for the backward.
    """
    # Autocast off: the dtypes are chosen here (maps in x's dtype, statistics in float32), and CUDA
    # autocast would run the norm and the sums on a float32 copy of a 16-bit map.
    with _no_autocast(x.device.type):
        return _GRN.apply(x, gamma, beta, eps)


class GRN(nn.Module):
    """Global Response Normalisation (ConvNeXt-V2), channels-first: ``(B, C, H, W) -> (B, C, H, W)``.

    ``G = ||x||_2`` over the spatial axes per channel, ``N = G / (mean_c G + eps)``, and
    ``out = gamma * (x * N) + beta + x``, computed as ``x * (gamma N + 1) + beta`` (one pass over
    ``x``) by :func:`grn`.  ``gamma`` and ``beta`` start at zero, so the layer starts as the identity
    (and, with ``gamma = 0``, passes no gradient between pixels).
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.zeros(1, num_channels, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, num_channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return grn(x, self.gamma, self.beta, self.eps)


def norm_grn(norm: LayerNorm2d, grn: GRN, y: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """``grn(norm(y))`` for a ``(B, C, H, W)`` map, with the modules' parameters: the fused op
    (:func:`gspn_lightning.ops.layer_norm_grn`, channels-last output in ``y``'s dtype) where
    :func:`~gspn_lightning.ops.layer_norm_grn_selected` says so (``backend=None``: ``$GSPN_BACKEND``,
    default ``"auto"``: the kernel on the CPU, the composition on CUDA for now), else
    the two modules composed.  Same value and gradients either way (to rounding: the op also keeps the
    normalised map in float32 between the two, where the composition rounds it to a 16-bit ``y``'s
    dtype)."""
    if norm.weight is None or not layer_norm_grn_selected(backend, y.device):
        return grn(norm(y))
    return layer_norm_grn(y, norm.weight, norm.bias, grn.gamma, grn.beta, norm.eps, grn.eps)
