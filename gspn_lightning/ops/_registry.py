"""torch.library registration of the compiled op: fake (meta) implementations and autograd.

The schemas and the CPU/CUDA kernels come from the C++ extensions (``csrc/gspn_ops.cpp`` and the
kernel files under ``csrc/cpu`` and ``csrc/cuda``); this module adds what lets ``torch.compile`` trace
the op (fake tensors) and what lets autograd differentiate it (the backward is another op,
``scan_bwd``).  ``layer_norm_grn_fwd`` (the mixer's LayerNorm + GRN) returns its output channels-last
with its statistics, which it saves for its backward (outputs without gradients).
The fake tensors have the kernels' strides: ``propagate_proj``'s kernels (CPU and CUDA) return ``y``,
``dx`` and ``dproxy`` channels-last, every other output is contiguous.  Double backward is not implemented by the kernel: differentiating ``scan_bwd`` raises a clear error
(the reference backend supports it).
"""

from __future__ import annotations

import torch

_REGISTERED = False


def _fake_fwd(x, *args):
    """Every forward op returns one tensor shaped like ``x``."""
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _fake_proj_fwd(x, *args):
    """``propagate_proj``'s map outputs are channels-last on every device (the lane kernels read and
    write a pixel's channels as one vector)."""
    return torch.empty_like(x, memory_format=torch.channels_last)


def _fake_proj_bwd(grad_y, x, proxy, weight, bias, merge, directions, chunk_size):
    fmt = torch.channels_last
    return (
        torch.empty_like(x, memory_format=fmt),
        torch.empty_like(proxy, memory_format=fmt),
        *(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (weight, bias, merge)),
    )


def _fake_scan_bwd(grad_h, x, lam, w_neg, w_mid, w_pos, h, direction, chunk_size):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(5))


def _fake_fused_bwd(grad_y, *args):
    """A fused op's backward returns one gradient per tensor input (``args`` ends with the directions
    and the chunk size)."""
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in args[:-2])


def _setup_context(ctx, inputs, output):
    x, lam, w_neg, w_mid, w_pos, direction, chunk_size = inputs
    ctx.save_for_backward(x, lam, w_neg, w_mid, w_pos, output)
    ctx.direction = direction
    ctx.chunk_size = chunk_size


def _backward(ctx, grad_h):
    x, lam, w_neg, w_mid, w_pos, h = ctx.saved_tensors
    grads = torch.ops.gspn_lightning.scan_bwd(
        grad_h, x, lam, w_neg, w_mid, w_pos, h, ctx.direction, ctx.chunk_size
    )
    return (*grads, None, None)


def _setup_fused(ctx, inputs, output):
    """A fused op saves only its tensor inputs: its backward recomputes the logits and the scans."""
    *tensors, directions, chunk_size = inputs
    ctx.save_for_backward(*tensors)
    ctx.directions = directions
    ctx.chunk_size = chunk_size


def _fused_backward(bwd_op: str):
    """The autograd backward of a fused op whose backward op ``bwd_op`` takes
    ``(grad_y, *tensor inputs, directions, chunk_size)`` (looked up now: the extension is loaded)."""
    op = getattr(torch.ops.gspn_lightning, bwd_op)

    def backward(ctx, grad_y):
        grads = op(grad_y, *ctx.saved_tensors, ctx.directions, ctx.chunk_size)
        return (*grads, None, None)

    return backward


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _fake_norm_fwd(y, weight, bias, gamma, beta, eps, grn_eps):
    """``layer_norm_grn_fwd``: out channels-last, the statistics in the accumulation dtype."""
    B, C, H, W = y.shape
    acc = _acc_dtype(y.dtype)
    return (
        torch.empty_like(y, memory_format=torch.channels_last),
        y.new_empty((B, H, W), dtype=acc),
        y.new_empty((B, H, W), dtype=acc),
        y.new_empty((B, C), dtype=acc),
    )


def _fake_norm_bwd(grad_out, y, weight, bias, gamma, beta, mean, rstd, gnorm, grn_eps):
    return (
        torch.empty_like(y, memory_format=torch.channels_last),
        *(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (weight, bias, gamma, beta)),
    )


def _setup_norm(ctx, inputs, output):
    """The norm op saves its input and its small statistics (never the normalised map, which its
    backward recomputes); the statistics are outputs without gradients."""
    y, weight, bias, gamma, beta, _eps, grn_eps = inputs
    _out, mean, rstd, gnorm = output
    ctx.save_for_backward(y, weight, bias, gamma, beta, mean, rstd, gnorm)
    ctx.grn_eps = grn_eps
    ctx.mark_non_differentiable(mean, rstd, gnorm)


def _norm_backward(ctx, grad_out, *_stats):
    grads = torch.ops.gspn_lightning.layer_norm_grn_bwd(grad_out, *ctx.saved_tensors, ctx.grn_eps)
    return (*grads, None, None)


def _setup_bwd_context(ctx, inputs, output):
    pass


def _refuse_double_backward(ctx, *grads):
    raise RuntimeError(
        "double backward (a gradient of a gradient, create_graph=True) through the GSPN scan kernel is "
        "not supported; use backend='reference' (or GSPN_BACKEND=reference), whose autograd supports "
        "higher-order gradients"
    )


def register() -> None:
    """Attach fake and autograd implementations to the ops the loaded extension defined."""
    global _REGISTERED
    if _REGISTERED:
        return
    for op, fake_fwd, fake_bwd, setup_context, backward in (
        ("scan", _fake_fwd, _fake_scan_bwd, _setup_context, _backward),
        ("propagate", _fake_fwd, _fake_fused_bwd, _setup_fused, _fused_backward("propagate_bwd")),
        (
            "propagate_proj",
            _fake_proj_fwd,
            _fake_proj_bwd,
            _setup_fused,
            _fused_backward("propagate_proj_bwd"),
        ),
        ("attention", _fake_fwd, _fake_fused_bwd, _setup_fused, _fused_backward("attention_bwd")),
        ("layer_norm_grn", _fake_norm_fwd, _fake_norm_bwd, _setup_norm, _norm_backward),
    ):
        torch.library.register_fake(f"gspn_lightning::{op}_fwd")(fake_fwd)
        torch.library.register_fake(f"gspn_lightning::{op}_bwd")(fake_bwd)
        torch.library.register_autograd(f"gspn_lightning::{op}_fwd", backward, setup_context=setup_context)
        # The backward op has no derivative of its own: refuse loudly instead of returning zeros.
        torch.library.register_autograd(
            f"gspn_lightning::{op}_bwd", _refuse_double_backward, setup_context=_setup_bwd_context
        )
    _REGISTERED = True
