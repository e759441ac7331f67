"""The VAE of latent diffusion, read from a local diffusers folder (nothing is downloaded).

``load_vae(path)`` loads an ``AutoencoderKL`` saved with ``save_pretrained`` (``config.json`` plus
``diffusion_pytorch_model.safetensors``/``.bin``), e.g. the SD VAE DiT uses (``sd-vae-ft-ema``) or the
``vae/`` folder of an SD-XL checkout.  ``encode`` returns latents multiplied by the VAE's own
``scaling_factor`` (the form the diffusion model trains on and the latent shards store); ``decode``
divides it out again and returns images in [-1, 1].  (A small random VAE for tests and demos, where no
pretrained weights exist, is :func:`gspn_lightning.testing.tiny_vae`.)
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["decode", "encode", "load_vae", "to_uint8"]

_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def load_vae(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """An ``AutoencoderKL`` from the local folder ``path`` (its ``vae/`` subfolder also works)."""
    root = Path(path).expanduser()
    if (root / "vae" / "config.json").exists() and not (root / "config.json").exists():
        root = root / "vae"
    missing = [n for n in ("config.json",) if not (root / n).exists()]
    if not any((root / w).exists() for w in _WEIGHTS):
        missing.append(" or ".join(_WEIGHTS))
    if missing:
        raise FileNotFoundError(
            f"no VAE at {root}: missing {', '.join(missing)}. Put a diffusers AutoencoderKL folder there "
            "(what AutoencoderKL.save_pretrained writes, e.g. the SD VAE 'sd-vae-ft-ema' or the vae/ folder "
            "of a local SD-XL checkout); nothing is downloaded at run time"
        )
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(root), torch_dtype=dtype, low_cpu_mem_usage=False)
    return vae.to(device).eval().requires_grad_(False)


@torch.no_grad()
def encode(vae, images: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True) -> torch.Tensor:
    """Images in [-1, 1] ``(B, 3, H, W)`` -> scaled latents ``(B, C, H/f, W/f)`` (a posterior sample,
    or its mean with ``sample=False``)."""
    dist = vae.encode(images.to(vae.dtype)).latent_dist
    z = dist.sample(generator) if sample else dist.mean
    return z.float() * vae.config.scaling_factor


@torch.no_grad()
def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> images in [-1, 1] (float32)."""
    return vae.decode((latents / vae.config.scaling_factor).to(vae.dtype)).sample.float().clamp(-1, 1)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> uint8 in [0, 255], same shape."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
