"""A depthwise ``k x k`` conv ("same" padding, stride 1) whose CPU backward avoids ATen's slow
depthwise weight gradient.

On CPU, ATen's backward of a depthwise conv (``groups == channels``) spends several times the forward's
time in the weight gradient: at the global GSPN mixer's shape (8, 576, 14, 14) with a 7x7 kernel, about
34 ms against 5 ms for the forward, on one core.  Both gradients are depthwise convs themselves:

- input:  ``conv2d(grad_out, flip(weight), padding=p, groups=C)`` (stride 1, padding ``p = k // 2``),
- weight: the correlation of each channel's input with its output gradient, summed over the batch,
  i.e. a depthwise conv of the ``(1, C*B, H, W)`` input with the ``(C*B, 1, H, W)`` output gradient as
  kernels, whose ``(2p+1) x (2p+1)`` output is summed over ``B``,

which run at about the forward's speed.  Same function and parameters as ``nn.Conv2d`` (a subclass: the
state dict does not change); CUDA and any other configuration keep ``nn.Conv2d``'s path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DepthwiseConv2d", "depthwise_conv2d"]


class _DepthwiseConv2d(torch.autograd.Function):
    """Depthwise conv, stride 1, padding ``k // 2`` (odd square kernel ``k``), with the backward as two
    depthwise convs.  The backward is built from differentiable ops, so double backward works."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2, groups=x.shape[1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        B, C, H, W = x.shape
        k = weight.shape[-1]
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = F.conv2d(grad, weight.flip(-1, -2), padding=k // 2, groups=C)
        if ctx.needs_input_grad[1]:
            xs = x.transpose(0, 1).reshape(1, C * B, H, W)
            gs = grad.transpose(0, 1).reshape(C * B, 1, H, W)
            gw = F.conv2d(xs, gs, padding=k // 2, groups=C * B).view(C, B, k, k).sum(1).unsqueeze(1)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = grad.sum((0, 2, 3))
        return gx, gw, gb


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=k // 2, groups=C)`` for a ``(C, 1, k, k)`` weight, odd ``k``;
    on CPU with the backward above."""
    k = weight.shape[-1]
    fast = (
        x.device.type == "cpu"
        and x.dim() == 4
        and weight.shape == (x.shape[1], 1, k, k)
        and k % 2 == 1
        and x.dtype == weight.dtype
        and (bias is None or bias.dtype == x.dtype)
        and torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cpu")
    )
    if not fast:
        return F.conv2d(x, weight, bias, padding=k // 2, groups=x.shape[1])
    return _DepthwiseConv2d.apply(x, weight, bias)


class DepthwiseConv2d(nn.Conv2d):
    """``nn.Conv2d(channels, channels, k, padding=k // 2, groups=channels)`` (odd ``k``) with the CPU
    backward of :func:`depthwise_conv2d`."""

    def __init__(self, channels: int, kernel_size: int, bias: bool = True) -> None:
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}")
        super().__init__(
            channels, channels, kernel_size, padding=kernel_size // 2, groups=channels, bias=bias
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return depthwise_conv2d(x, self.weight, self.bias)
