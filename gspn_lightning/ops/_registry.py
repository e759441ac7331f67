"""torch.library registration of the compiled op: fake (meta) implementations and autograd.

The schemas and the CPU/CUDA kernels come from the C++ extensions (``csrc/gspn_ops.cpp`` and one
kernel file per backend); this module adds what lets ``torch.compile`` trace the op
(fake tensors) and what lets autograd differentiate it (the backward is another op, ``scan_bwd``).
Double backward is not implemented by the kernel: differentiating ``scan_bwd`` raises a clear error
(the reference backend supports it).
"""

from __future__ import annotations

import torch

_REGISTERED = False


def _fake_scan_fwd(x, lam, w_neg, w_mid, w_pos, direction, chunk_size):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _fake_scan_bwd(grad_h, x, lam, w_neg, w_mid, w_pos, h, direction, chunk_size):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(5))


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


def _setup_bwd_context(ctx, inputs, output):
    pass


def _refuse_double_backward(ctx, *grads):
    raise RuntimeError(
        "double backward (a gradient of a gradient, create_graph=True) through the GSPN scan kernel is "
        "not supported; use backend='reference' (or GSPN_BACKEND=reference), whose autograd supports "
        "higher-order gradients"
    )


def _fake_propagate_fwd(x, gates, merge, directions, chunk_size):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _fake_propagate_bwd(grad_y, x, gates, merge, directions, chunk_size):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (x, gates, merge))


def _setup_propagate(ctx, inputs, output):
    x, gates, merge, directions, chunk_size = inputs
    ctx.save_for_backward(x, gates, merge)  # only the inputs: the backward recomputes the scans
    ctx.directions = directions
    ctx.chunk_size = chunk_size


def _backward_propagate(ctx, grad_y):
    x, gates, merge = ctx.saved_tensors
    grads = torch.ops.gspn_lightning.propagate_bwd(grad_y, x, gates, merge, ctx.directions, ctx.chunk_size)
    return (*grads, None, None)


def register() -> None:
    """Attach fake and autograd implementations to the ops the loaded extension defined."""
    global _REGISTERED
    if _REGISTERED:
        return
    torch.library.register_fake("gspn_lightning::scan_fwd")(_fake_scan_fwd)
    torch.library.register_fake("gspn_lightning::scan_bwd")(_fake_scan_bwd)
    torch.library.register_autograd("gspn_lightning::scan_fwd", _backward, setup_context=_setup_context)
    # The backward op has no derivative of its own: refuse loudly instead of returning zeros.
    torch.library.register_autograd(
        "gspn_lightning::scan_bwd", _refuse_double_backward, setup_context=_setup_bwd_context
    )
    torch.library.register_fake("gspn_lightning::propagate_fwd")(_fake_propagate_fwd)
    torch.library.register_fake("gspn_lightning::propagate_bwd")(_fake_propagate_bwd)
    torch.library.register_autograd(
        "gspn_lightning::propagate_fwd", _backward_propagate, setup_context=_setup_propagate
    )
    torch.library.register_autograd(
        "gspn_lightning::propagate_bwd", _refuse_double_backward, setup_context=_setup_bwd_context
    )
    _REGISTERED = True
