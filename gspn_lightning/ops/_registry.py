"""torch.library registration of the compiled op: fake (meta) implementations and autograd.

The schemas and the CPU/CUDA kernels come from the C++ extensions (``csrc/gspn_ops.cpp`` and the
kernel files under ``csrc/cpu`` and ``csrc/cuda``); this module adds what lets ``torch.compile`` trace
the op (fake tensors) and what lets autograd differentiate it (the backward is another op,
``scan_bwd``).
For CUDA tensors ``propagate_proj_fwd``/``_bwd`` are implemented here, in Python, by materialising the
gate logits and calling the fused CUDA op (no CUDA kernel computes the projection on the fly yet).
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


def _fake_propagate_proj_fwd(x, proxy, weight, bias, merge, directions, chunk_size):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _fake_propagate_proj_bwd(grad_y, x, proxy, weight, bias, merge, directions, chunk_size):
    return tuple(
        torch.empty_like(t, memory_format=torch.contiguous_format) for t in (x, proxy, weight, bias, merge)
    )


def _setup_propagate_proj(ctx, inputs, output):
    x, proxy, weight, bias, merge, directions, chunk_size = inputs
    ctx.save_for_backward(x, proxy, weight, bias, merge)  # the backward recomputes logits and scans
    ctx.directions = directions
    ctx.chunk_size = chunk_size


def _backward_propagate_proj(ctx, grad_y):
    grads = torch.ops.gspn_lightning.propagate_proj_bwd(grad_y, *ctx.saved_tensors, ctx.directions, ctx.chunk_size)
    return (*grads, None, None)


def _project(proxy, weight, bias, K):
    """The materialised logits ``(B, K, 6, C, H, W)`` (the CUDA implementation below)."""
    B, _, H, W = proxy.shape
    gates = torch.nn.functional.conv2d(proxy, weight[:, :, None, None], bias)
    return gates.view(B, K, 6, -1, H, W)


def proj_fwd_materialised(x, proxy, weight, bias, merge, directions, chunk_size):
    """``propagate_proj_fwd`` by materialising the logits (one 1x1 convolution) and calling
    ``propagate_fwd``: the implementation registered for CUDA tensors, where no kernel computes the
    projection on the fly yet."""
    gates = _project(proxy, weight, bias, len(directions))
    return torch.ops.gspn_lightning.propagate_fwd(x, gates, merge, directions, chunk_size)


def proj_bwd_materialised(grad_y, x, proxy, weight, bias, merge, directions, chunk_size):
    """``propagate_proj_bwd`` likewise: ``propagate_bwd`` on the recomputed logits, then the adjoint of
    the 1x1 projection."""
    gates = _project(proxy, weight, bias, len(directions))
    dx, dgates, dmerge = torch.ops.gspn_lightning.propagate_bwd(grad_y, x, gates, merge, directions, chunk_size)
    B, _, H, W = proxy.shape
    dg = dgates.reshape(B, -1, H * W)
    dproxy = torch.matmul(weight.t(), dg).view(proxy.shape)
    dweight = torch.matmul(dg, proxy.reshape(B, -1, H * W).transpose(1, 2)).sum(0)
    return dx, dproxy, dweight, dg.sum((0, 2)), dmerge


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
    torch.library.register_fake("gspn_lightning::propagate_proj_fwd")(_fake_propagate_proj_fwd)
    torch.library.register_fake("gspn_lightning::propagate_proj_bwd")(_fake_propagate_proj_bwd)
    torch.library.register_autograd(
        "gspn_lightning::propagate_proj_fwd", _backward_propagate_proj, setup_context=_setup_propagate_proj
    )
    torch.library.register_autograd(
        "gspn_lightning::propagate_proj_bwd", _refuse_double_backward, setup_context=_setup_bwd_context
    )
    # CUDA: no kernel with the projection fused in yet; materialise the logits around the fused op.
    torch.library.impl("gspn_lightning::propagate_proj_fwd", "CUDA")(proj_fwd_materialised)
    torch.library.impl("gspn_lightning::propagate_proj_bwd", "CUDA")(proj_bwd_materialised)
    _REGISTERED = True
