"""SD-XL (and any diffusers ``UNet2DConditionModel``) with GSPN in place of self-attention.

    from gspn_lightning.models.sdxl import swap_self_attention, save_gspn_weights, load_gspn_weights

    names = swap_self_attention(unet, d_state=8)     # every attn1 -> GSPNSelfAttention, local (chunk 4)
    swap_self_attention(other_unet, chunk_size=None)  # global propagation instead
    save_gspn_weights(unet, "gspn.safetensors")                      # only the GSPN modules' weights
    load_gspn_weights(fresh_swapped_unet, "gspn.safetensors")

    gspn sdxl-swap --config configs/sdxl/unet_config.json      # the counts of a swap, on meta

Every ``attn1`` (self-attention) of a diffusers ``BasicTransformerBlock`` becomes a
:class:`GSPNSelfAttention` initialised from it; ``attn2`` (cross-attention) is left as it is.  The
attention receives ``(B, H*W, C)`` tokens and is never told ``H`` and ``W``: a forward pre-hook on each
enclosing ``Transformer2DModel`` records its input's ``hidden_states.shape[-2:]`` into the GSPN modules
below it, so any latent aspect ratio works (the token count alone cannot tell 16x32 from 32x16).

This file does not import Lightning; diffusers is imported inside the functions that need it, so the
package imports without it.
"""

from __future__ import annotations

import copy
import fnmatch
import json
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..nn.mixer import MixerOptions
from ..ops import attention_reference, gspn_attention, gspn_scan

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "GSPNSelfAttention",
    "attention_errors",
    "example_inputs",
    "gspn_state_dict",
    "latent_multiple",
    "load_gspn_weights",
    "relative_error",
    "save_gspn_weights",
    "saved_gspn_options",
    "swap_and_load_gspn_weights",
    "swap_self_attention",
]

#: the swap's default ``chunk_size``: local propagation restarting every 4 lines, as the GSPN release's
#: SD-XL swap does; ``chunk_size=None`` is global (and the meaning of an adapter that records no chunk)
DEFAULT_CHUNK_SIZE = 4


class GSPNSelfAttention(nn.Module):
    """GSPN in place of a pretrained self-attention, ``(B, N, C) -> (B, N, C)`` with ``N = H * W``.

    ``to_q``, ``to_k``, ``to_v`` and ``to_out`` are exact copies of the pretrained attention's
    projections, used as GSPN relates to linear attention (``E`` = the attention's inner width,
    ``K`` = number of directions, ``S`` = ``d_state``)::

        q, k, v = to_q(x), to_k(x), to_v(x)                    (B, E, H, W) each, x the block's normed input
        taps    = gates(proxy(x))                             low-rank: C -> S -> K * 3 * E logits
        lam     = sigmoid(k)                                  input weight, like linear attention's phi(k)
        num     = sum_k m_k * sigmoid(q + u_bias) * scan_k(v, lam, taps_k)    (the propagated input is V)
        den     = sum_k m_k *                    scan_k(1, lam, taps_k)
        out     = to_out(num / den)                           m = softmax over directions of merge_logits

    The denominator is the same propagation applied to a constant 1 (one fused op,
    :func:`~gspn_lightning.ops.gspn_attention`, carries both per channel with the taps computed once).
    Because the taps of every pixel are row-stochastic, ``num / den`` (without the gate) is a convex combination of ``v`` over the pixels the four scans reach, with weights
    ``lam = sigmoid(k)`` times the path weights: an attention-like weighted average of values, the
    normalised form of linear attention ``phi(q)^T S / phi(q)^T z``, rather than a running sum whose size
    grows with the image.  That keeps the output on the scale the pretrained ``to_out`` and the block's
    residual expect, at any resolution.  ``sigmoid(q + u_bias)`` is GSPN's output gate ``u`` from Q.

    Initialisation (so the module starts close to a useful operator, not noise):

    - the copied Q/K/V/out are used from step 0 (nothing random sits between ``v`` and ``to_out``);
    - ``proxy`` and ``gates`` weights ~ truncated N(0, 0.02), biases 0: near-uniform taps (1/3 each), so
      each scan spreads its average over a widening cone, and the four directions together cover the
      image: an average over the whole (global) or the chunk (local) that favours nearby pixels;
    - ``merge_logits`` = 0: the directions are summed with equal weight (numerator and denominator alike);
    - ``u_bias`` = ``u_bias_init`` (default 3, ``sigmoid`` about 0.95 at ``q = 0``): the output gate starts
      nearly open, so the module's output is about the teacher's scale; training can close it per
      pixel and channel through Q.

    The teacher's softmax weights depend on ``q . k`` jointly; this module's only depend on ``k`` (and
    the learned taps), so it starts as an approximation (measured in ``tests/test_sdxl_swap.py`` and
    ``benchmarks/sdxl_init.py``) that distillation refines.

    Args:
        attn: the pretrained diffusers ``Attention`` (self-attention: ``to_k`` reads ``query_dim``).
        options: the layer's :class:`~gspn_lightning.nn.MixerOptions` (or a dict of them), the same
            object the GSPN models take; ``**overrides``: single fields of it.  Used here:
            ``d_state`` (rank of the proxy from which the gate logits are projected; ``None``: 8),
            ``chunk_size`` (``None`` global, ``k`` local: restart every ``k`` lines; when ``options``
            is ``None`` or a dict without it, :data:`DEFAULT_CHUNK_SIZE`, 4; a ``MixerOptions`` object is
            taken as it is), ``directions``,
            ``backend`` and ``fused`` (one :func:`gspn_propagate` call, or ``normalize_gates`` +
            ``gspn_scan`` per direction: the same function).  ``dw_kernel`` and ``fuse_gates`` do not
            apply (the module has no depthwise conv and projects its gates itself); ``d_prop`` (the
            compact propagation) is refused (it would add layers the pretrained weights do not have).
        u_bias_init: initial bias of the output gate logits.
    """

    def __init__(
        self,
        attn: nn.Module,
        options: MixerOptions | Mapping | None = None,
        u_bias_init: float = 3.0,
        **overrides,
    ) -> None:
        super().__init__()
        _check_attention(attn)
        opts = MixerOptions.build(MixerOptions.for_model(options, chunk_size=DEFAULT_CHUNK_SIZE), **overrides)
        if opts.d_prop is not None:
            raise ValueError("d_prop (compact propagation) does not apply to the SD-XL swap")
        d_state = opts.d_state if opts.d_state is not None else 8
        chunk_size, directions, backend, fused = opts.chunk_size, opts.directions, opts.backend, opts.fused
        self.to_q = copy.deepcopy(attn.to_q)
        self.to_k = copy.deepcopy(attn.to_k)
        self.to_v = copy.deepcopy(attn.to_v)
        self.to_out = copy.deepcopy(attn.to_out)
        self.rescale_output_factor = float(attn.rescale_output_factor)
        self.query_dim = self.to_q.in_features
        self.inner_dim = inner = self.to_v.out_features
        self.d_state = int(d_state)
        self.chunk_size = chunk_size
        self.directions = directions
        self.u_bias_init = float(u_bias_init)
        self.backend = backend
        self.fused = bool(fused)
        #: (H, W) of the token grid, written by the enclosing Transformer2DModel's pre-hook
        self.spatial_size: tuple[int, int] | None = None
        factory = {"device": self.to_v.weight.device, "dtype": self.to_v.weight.dtype}
        self.proxy = nn.Linear(self.query_dim, self.d_state, **factory)
        self.gates = nn.Linear(self.d_state, len(directions) * 3 * inner, **factory)
        self.merge_logits = nn.Parameter(torch.empty(len(directions), inner, **factory))
        self.u_bias = nn.Parameter(torch.empty(inner, **factory))
        self.reset_gspn_parameters()

    def reset_gspn_parameters(self) -> None:
        """Initialise the new parameters (see the class docstring); the copied projections are untouched."""
        for lin in (self.proxy, self.gates):
            nn.init.trunc_normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)
        nn.init.zeros_(self.merge_logits)
        nn.init.constant_(self.u_bias, self.u_bias_init)

    def extra_repr(self) -> str:
        return (
            f"query_dim={self.query_dim}, inner_dim={self.inner_dim}, d_state={self.d_state}, "
            f"chunk_size={self.chunk_size}, directions={self.directions}, fused={self.fused}"
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """``(B, N, C) -> (B, N, C)``; ``N`` must equal ``H * W`` of :attr:`spatial_size`."""
        if encoder_hidden_states is not None:
            raise ValueError("GSPNSelfAttention replaces self-attention: encoder_hidden_states must be None")
        if attention_mask is not None:
            raise ValueError("GSPNSelfAttention does not support attention_mask (self-attention over a grid)")
        if hidden_states.dim() != 3:
            raise ValueError(f"hidden_states must be (B, N, C), got shape {tuple(hidden_states.shape)}")
        if self.spatial_size is None:
            raise RuntimeError(
                "GSPNSelfAttention does not know the token grid's (H, W): it is set by the pre-hook that "
                "swap_self_attention puts on the enclosing Transformer2DModel (or set .spatial_size yourself)"
            )
        B, N, _ = hidden_states.shape
        H, W = self.spatial_size
        if H * W != N:
            raise ValueError(f"spatial_size={(H, W)} gives {H * W} tokens but hidden_states has N={N}")

        E = self.inner_dim
        # token layout throughout: (B, N, E) viewed as (B, H, W, E), no transposes to planes
        q, k, v, proxy = (
            p(hidden_states).view(B, H, W, -1) for p in (self.to_q, self.to_k, self.to_v, self.proxy)
        )
        logits = self.merge_logits  # softmax in float32 at least (16-bit weights), float64 kept as it is
        merge = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=0).to(v.dtype)
        gates = (self.gates.weight, self.gates.bias, merge, self.u_bias)
        args = (q, k, v, proxy, *gates, self.directions, self.chunk_size)
        if self.fused:
            out = gspn_attention(*args, backend=self.backend)
        else:
            out = attention_reference(*args, scan=lambda *a: gspn_scan(*a, backend=self.backend))
        out = out.reshape(B, N, E)
        for layer in self.to_out:
            out = layer(out)
        return out / self.rescale_output_factor


def _check_attention(attn: nn.Module) -> None:
    """The diffusers ``Attention`` features this module reproduces; anything else is refused by name."""
    for name in ("to_q", "to_k", "to_v", "to_out"):
        if not hasattr(attn, name):
            raise TypeError(f"attn must be a diffusers Attention with {name}, got {type(attn).__name__}")
    if attn.to_k.in_features != attn.to_q.in_features:
        raise ValueError(
            "attn is a cross-attention (to_k reads another width than to_q): only attn1 is swapped"
        )
    unsupported = {
        "group_norm": getattr(attn, "group_norm", None) is not None,
        "spatial_norm": getattr(attn, "spatial_norm", None) is not None,
        "norm_q": getattr(attn, "norm_q", None) is not None,
        "residual_connection": bool(getattr(attn, "residual_connection", False)),
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ValueError(f"attn uses {bad}, which GSPNSelfAttention does not reproduce")


def _chunk_for(name: str, chunk_size) -> int | None:
    """``chunk_size`` as given to :func:`swap_self_attention`, resolved for the layer ``name``."""
    if chunk_size is None or isinstance(chunk_size, int):
        return chunk_size
    if isinstance(chunk_size, Mapping):
        for pattern, value in chunk_size.items():
            if fnmatch.fnmatchcase(name, pattern):
                return value
        return None
    raise TypeError(
        f"chunk_size must be None, an int or a mapping of name patterns, got {type(chunk_size).__name__}"
    )


def _record_spatial_size(module: nn.Module, args: tuple, kwargs: dict) -> None:
    hidden = args[0] if args else kwargs.get("hidden_states")
    if hidden is None or hidden.dim() != 4:
        raise ValueError("GSPN swap: the Transformer2DModel input must be continuous (B, C, H, W) latents")
    hw = tuple(int(s) for s in hidden.shape[-2:])
    for gspn in module._gspn_modules:
        gspn.spatial_size = hw


def swap_self_attention(
    unet: nn.Module, options: MixerOptions | Mapping | None = None, u_bias_init: float = 3.0, **overrides
) -> list[str]:
    """Replace every ``attn1`` of the ``BasicTransformerBlock``s in ``unet`` by a :class:`GSPNSelfAttention`.

    Works on any diffusers ``UNet2DConditionModel`` (SD 1.x/2.x, SD-XL) and on a single
    ``Transformer2DModel``; ``attn2`` (cross-attention) stays.  Each enclosing ``Transformer2DModel``
    gets a forward pre-hook that records the latent's ``(H, W)`` into the GSPN modules below it.

    Args:
        unet: the model, changed in place (on any device, meta included).
        options: the :class:`~gspn_lightning.nn.MixerOptions` of every swapped layer (taken as it is), or
            a dict of them (read over the swap's default ``chunk_size``).
        u_bias_init: see :class:`GSPNSelfAttention`.
        **overrides: single fields of ``options`` (``d_state``, ``directions``, ``backend``, ``fused``), and
            ``chunk_size``: an int (local everywhere; by default :data:`DEFAULT_CHUNK_SIZE`, 4, the GSPN
            release's choice for SD-XL, unless ``options`` says otherwise), ``None`` (global everywhere),
            or a mapping from ``fnmatch`` patterns of the replaced names to ``int | None``, first match
            wins, unmatched layers global; e.g. ``{"down_blocks.*": 8, "*": None}``.

    Returns:
        The qualified names of the replaced modules (``...transformer_blocks.0.attn1``), in module order.
    """
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    per_layer = "chunk_size" in overrides
    chunk_size = overrides.pop("chunk_size", None)
    _chunk_for("", chunk_size)  # a wrong type is refused before anything changes
    options = MixerOptions.build(MixerOptions.for_model(options, chunk_size=DEFAULT_CHUNK_SIZE), **overrides)
    replaced: list[str] = []
    hosts = [(n, m) for n, m in unet.named_modules() if isinstance(m, Transformer2DModel)]
    if isinstance(unet, Transformer2DModel) and ("", unet) not in hosts:
        hosts.insert(0, ("", unet))
    for host_name, host in hosts:
        modules = getattr(host, "_gspn_modules", None)
        if modules is None:
            host._gspn_modules = modules = []
            host.register_forward_pre_hook(_record_spatial_size, with_kwargs=True)
        for block_name, block in host.named_modules():
            if not isinstance(block, BasicTransformerBlock) or isinstance(block.attn1, GSPNSelfAttention):
                continue
            name = ".".join(p for p in (host_name, block_name, "attn1") if p)
            chunk = {"chunk_size": _chunk_for(name, chunk_size)} if per_layer else {}
            block.attn1 = GSPNSelfAttention(block.attn1, options, u_bias_init, **chunk)
            modules.append(block.attn1)
            replaced.append(name)
    if not replaced and not any(isinstance(m, GSPNSelfAttention) for m in unet.modules()):
        raise ValueError(
            f"{type(unet).__name__} has no BasicTransformerBlock inside a Transformer2DModel to swap"
        )
    return replaced


def gspn_state_dict(unet: nn.Module) -> dict[str, torch.Tensor]:
    """The state of every :class:`GSPNSelfAttention` in ``unet`` (copied Q/K/V/out included), by full name."""
    state = {
        f"{name}.{key}": t
        for name, module in unet.named_modules()
        if isinstance(module, GSPNSelfAttention)
        for key, t in module.state_dict().items()
    }
    if not state:
        raise ValueError("unet has no GSPNSelfAttention modules: call swap_self_attention(unet) first")
    return state


def save_gspn_weights(unet: nn.Module, path: str | Path) -> None:
    """Write only the GSPN modules' weights to a safetensors file (the adapter, not the whole UNet)."""
    from safetensors.torch import save_file

    state = {k: t.detach().contiguous() for k, t in gspn_state_dict(unet).items()}
    config = {
        name: {"d_state": m.d_state, "chunk_size": m.chunk_size, "directions": list(m.directions)}
        for name, m in unet.named_modules()
        if isinstance(m, GSPNSelfAttention)
    }
    save_file(
        state, str(path), metadata={"format": "gspn-lightning sdxl adapter", "layers": json.dumps(config)}
    )


def load_gspn_weights(unet: nn.Module, path: str | Path) -> None:
    """Load a :func:`save_gspn_weights` file into a UNet already swapped with the same options.

    Raises ``ValueError`` naming missing or unexpected keys, or mismatched shapes."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GSPN weights file not found: {path}")
    loaded = load_file(str(path))
    own = gspn_state_dict(unet)
    missing, unexpected = sorted(own.keys() - loaded.keys()), sorted(loaded.keys() - own.keys())
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match this UNet's GSPN modules: missing {missing[:5]} ({len(missing)}), "
            f"unexpected {unexpected[:5]} ({len(unexpected)})"
        )
    bad = [k for k in own if own[k].shape != loaded[k].shape]
    if bad:
        raise ValueError(f"{path}: shape mismatch for {bad[:5]} (swapped with other d_state or directions?)")
    with torch.no_grad():
        for key, t in own.items():
            t.copy_(loaded[key])


def saved_gspn_options(path: str | Path) -> dict:
    """The :func:`swap_self_attention` options a :func:`save_gspn_weights` file was written with.

    Returns ``{"d_state": int, "directions": [...], "chunk_size": {layer name: int | None}}`` (the
    per-layer chunk sizes as a mapping of exact names, which :func:`swap_self_attention` accepts). A
    layer that records no ``chunk_size`` is global (``None``): what the swap built before its default
    became local, so an adapter of that time rebuilds the layers it was trained with.
    Raises ``ValueError`` if the layers were swapped with different ``d_state`` or ``directions`` (one
    swap call cannot reproduce that)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GSPN weights file not found: {path}")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if "layers" not in meta:
        raise ValueError(f"{path} has no 'layers' metadata: not written by save_gspn_weights")
    layers = json.loads(meta["layers"])
    options = {}
    for key in ("d_state", "directions"):
        values = {json.dumps(v[key]) for v in layers.values()}
        if len(values) != 1:
            raise ValueError(f"{path}: the layers use different {key} ({sorted(values)}); swap them yourself")
        options[key] = json.loads(values.pop())
    options["chunk_size"] = {name: v.get("chunk_size") for name, v in layers.items()}
    return options


def swap_and_load_gspn_weights(unet: nn.Module, path: str | Path, **overrides) -> list[str]:
    """Swap ``unet``'s self-attention with the options saved in the adapter file ``path`` (or
    ``overrides`` of them, e.g. ``backend``), then load its weights.  Returns the replaced names;
    raises ``ValueError`` if the file's layers are not exactly the UNet's ``attn1`` layers."""
    options = {**saved_gspn_options(path), **overrides}
    names = swap_self_attention(unet, **options)
    saved = options["chunk_size"] if isinstance(options["chunk_size"], Mapping) else None
    if saved is not None and sorted(saved) != sorted(names):
        extra, absent = sorted(set(saved) - set(names)), sorted(set(names) - set(saved))
        raise ValueError(
            f"{path} was saved from another UNet: layers not in this one {extra[:3]}, not in the file {absent[:3]}"
        )
    load_gspn_weights(unet, path)
    return names


def example_inputs(
    unet: nn.Module, height: int, width: int, batch: int = 1, text_len: int = 7, generator=None
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Random ``(sample, timesteps, kwargs)`` for ``unet(sample, timesteps, **kwargs)`` at a latent of
    ``height x width``, shaped from the UNet's config: text embeddings of ``cross_attention_dim`` and,
    for SD-XL's ``text_time`` conditioning, pooled text embeddings and the six micro-conditioning ids
    (original size, crop top-left, target size, in pixels = 8 x latent)."""
    cfg = unet.config
    param = next(unet.parameters())
    factory = {"device": param.device, "dtype": param.dtype}
    if param.device.type == "meta":
        generator = None

    def randn(*shape):
        return torch.randn(*shape, generator=generator, **factory)

    sample = randn(batch, cfg.in_channels, height, width)
    timesteps = torch.linspace(10, 990, batch, device=param.device).long()
    kwargs: dict = {"encoder_hidden_states": randn(batch, text_len, cfg.cross_attention_dim)}
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        ids = torch.tensor([8 * height, 8 * width, 0, 0, 8 * height, 8 * width], **factory)
        kwargs["added_cond_kwargs"] = {"text_embeds": randn(batch, pooled), "time_ids": ids.expand(batch, 6)}
    return sample, timesteps, kwargs


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` (Frobenius, float64)."""
    return float((a.double() - b.double()).norm() / b.double().norm())


@torch.no_grad()
def attention_errors(teacher: nn.Module, student: nn.Module, forward) -> dict[str, dict[str, float]]:
    """Each GSPN module of ``student`` against the teacher's self-attention of the same name, layer by layer.

    ``forward(model)`` runs a model (the same inputs each call).  The teacher's ``attn1`` inputs and
    outputs are captured during ``forward(teacher)``, the grid sizes during ``forward(student)``; then
    every GSPN module is applied to the *teacher's* input of its layer, so errors do not compound.
    Returns ``{name: {"gspn": e, "uniform_attention": e_u}}`` with ``e`` the relative error of the GSPN
    output and ``e_u`` that of ``to_out(mean of V)``, the output of a perfectly uniform attention (a
    reference point; a zero output scores 1).
    """
    names = [n for n, m in student.named_modules() if isinstance(m, GSPNSelfAttention)]
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    sizes: dict[str, tuple[int, int]] = {}

    def capture(name):
        def hook(module, args, out):
            captured[name] = (args[0], out)

        return hook

    def size(name):
        def hook(module, args, out):
            sizes[name] = module.spatial_size

        return hook

    hooks = [teacher.get_submodule(n).register_forward_hook(capture(n)) for n in names]
    hooks += [student.get_submodule(n).register_forward_hook(size(n)) for n in names]
    try:
        forward(teacher)
        forward(student)
    finally:
        for h in hooks:
            h.remove()
    result = {}
    for n in names:
        gspn, attn = student.get_submodule(n), teacher.get_submodule(n)
        x, target = captured[n]
        gspn.spatial_size = sizes[n]
        v_mean = attn.to_v(x).mean(1, keepdim=True).expand(-1, x.shape[1], -1)
        uniform = attn.to_out[0](v_mean) / attn.rescale_output_factor
        result[n] = {
            "gspn": relative_error(gspn(x), target),
            "uniform_attention": relative_error(uniform, target),
        }
    return result


def latent_multiple(unet, vae) -> int:
    """The pixel sizes a UNet/VAE pair takes exactly: multiples of the VAE's downsampling factor times
    the UNet's (``2 ** (levels - 1)``: SD-XL 8 x 4 = 32). A size off that grid is padded by the VAE
    or interpolated by the UNet's up blocks, which is not the computation the teacher was trained
    for (and the latents no longer tile the image)."""
    vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    unet_factor = 2 ** (len(unet.config.block_out_channels) - 1)
    return vae_factor * unet_factor
