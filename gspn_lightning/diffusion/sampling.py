"""Sampling with diffusers schedulers and classifier-free guidance.

``sample(model, labels, noise, sampler="ddpm", steps=250, guidance_scale=1.0)`` runs the reverse process
from the given starting noise.  Reproducibility does not depend on how a batch is split: the caller
draws each sample's starting noise from its own seed (see :func:`per_sample_generators`), and the
stochastic DDPM steps draw each sample's noise from that sample's own generator too, so a sample is
the same whatever batch, rank or restart produces it.

- ``"ddpm"``: ancestral sampling with the model's learned variance (diffusers' ``learned_range``), as
  DiT samples (250 steps in its paper).
- ``"ddim"`` (eta 0) and ``"dpm++"`` (DPM-Solver++ 2M): deterministic fast solvers on the eps half
  only (the learned variance is split off first: diffusers' DPM-Solver with ``learned_range``
  assumes 3-channel pixels and breaks on 4-channel latents).

Guidance: the batch is run twice, with its labels and with the null class, and
``eps = eps_null + s (eps_cond - eps_null)``.  By default on all channels; DiT's published numbers
guide only the first 3 of the 4 latent channels (``guidance_channels=3`` reproduces that).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .gaussian import dit_scheduler, eps_from_prediction

__all__ = ["SAMPLERS", "make_sampler", "per_sample_generators", "sample"]

SAMPLERS = ("ddpm", "ddim", "dpm++")


def make_sampler(
    name: str, num_train_timesteps: int = 1000, learn_sigma: bool = True, clip_sample: float | None = None
):
    """A fresh diffusers scheduler for sampler ``name`` on DiT's training schedule.

    ``clip_sample``: clip every step's predicted ``x_0`` to ``[-clip_sample, clip_sample]`` (DDPM's
    choice for pixels in [-1, 1]; ``None``, DiT's choice for latents: no clipping).
    """
    if clip_sample is not None and not clip_sample > 0:
        raise ValueError(f"clip_sample must be a positive range or None, got {clip_sample}")
    base = dit_scheduler(num_train_timesteps, learn_sigma)
    clip = {"clip_sample": clip_sample is not None, "clip_sample_range": float(clip_sample or 1.0)}
    if name == "ddpm":
        return base.__class__.from_config(base.config, **clip) if clip_sample is not None else base
    if name == "ddim":
        from diffusers import DDIMScheduler

        # the last step lands on alpha_bar = 1 (the predicted x_0), as ADM's/DiT's DDIM does; "trailing"
        # steps (999, 999 - k, ..., k - 1 for k = 1000 / steps) start from pure noise and each step
        # lands exactly on the next one's timestep (diffusers' DDIM with DiT's "linspace" spacing
        # computes the previous timestep as t - k, which is not the next timestep it evaluates)
        return DDIMScheduler.from_config(base.config, set_alpha_to_one=True, timestep_spacing="trailing", **clip)
    if name == "dpm++":
        from diffusers import DPMSolverMultistepScheduler

        if clip_sample is not None:  # diffusers' DPM-Solver has only dynamic thresholding (a rescale)
            raise ValueError("clip_sample is supported by the 'ddpm' and 'ddim' samplers, not 'dpm++'")
        return DPMSolverMultistepScheduler.from_config(
            base.config, algorithm_type="dpmsolver++", solver_order=2, variance_type=None
        )
    raise ValueError(f"sampler must be one of {SAMPLERS}, got {name!r}")


def per_sample_generators(seeds: Sequence[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per sample, seeded by e.g. the sample's global index."""
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def initial_noise(shape: Sequence[int], seeds: Sequence[int], device, dtype=torch.float32) -> torch.Tensor:
    """``(len(seeds), *shape)`` standard normal noise, sample i drawn from ``seeds[i]`` alone."""
    return torch.stack(
        [torch.randn(tuple(shape), generator=g, dtype=dtype) for g in per_sample_generators(seeds)]
    ).to(device)


@torch.no_grad()
def sample(
    model,
    labels: torch.Tensor,
    noise: torch.Tensor,
    sampler: str = "ddpm",
    steps: int = 250,
    guidance_scale: float = 1.0,
    guidance_channels: int | None = None,
    null_class: int | None = None,
    seeds: Sequence[int] | None = None,
    learn_sigma: bool = True,
    clip_sample: float | None = None,
    progress: bool = False,
    prediction: str = "eps",
) -> torch.Tensor:
    """Denoise ``noise`` ``(B, C, H, W)`` for ``labels`` ``(B,)``; returns x_0 ``(B, C, H, W)``.

    Args:
        model: ``model(x, t, y) -> (B, 2C or C, H, W)`` (eps, and the variance interpolation when
            ``learn_sigma``).
        sampler: ``"ddpm"``, ``"ddim"`` or ``"dpm++"``.
        steps: number of denoising steps (DiT: 250 DDPM steps).
        guidance_scale: classifier-free guidance scale (1: none, and no second pass).
        guidance_channels: guide only the first this many channels of eps (``None``: all).
        null_class: the model's null label (default ``model.num_classes``).
        seeds: per-sample seeds for the stochastic DDPM steps (default: ``range(B)``).
        clip_sample: clip each step's predicted x_0 to this range (pixels in [-1, 1]: 1.0; latents:
            ``None``), as :func:`make_sampler`.
        progress: show a tqdm bar over the steps.
        prediction: what the model's first ``C`` channels predict (``"eps"``, ``"x0"`` or ``"v"``,
            as it was trained); turned into eps before guidance and the solver step.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if guidance_scale < 1.0:
        raise ValueError(f"guidance_scale must be >= 1 (1 = no guidance), got {guidance_scale}")
    B, C = noise.shape[:2]
    if labels.shape != (B,):
        raise ValueError(f"labels must have shape ({B},), got {tuple(labels.shape)}")
    scheduler = make_sampler(sampler, learn_sigma=learn_sigma, clip_sample=clip_sample)
    scheduler.set_timesteps(steps, device=noise.device)
    guided = guidance_scale != 1.0
    if guided:
        null = null_class if null_class is not None else model.num_classes
        labels_in = torch.cat([labels, torch.full_like(labels, null)])
    else:
        labels_in = labels
    step_generators = per_sample_generators(seeds if seeds is not None else range(B), noise.device)
    x = noise * scheduler.init_noise_sigma
    timesteps = scheduler.timesteps
    if progress:
        from tqdm.auto import tqdm

        timesteps = tqdm(timesteps, desc=f"{sampler} sampling", leave=False)
    for t in timesteps:
        x_in = scheduler.scale_model_input(x, t)
        x_in = torch.cat([x_in, x_in]) if guided else x_in
        t_in = torch.full((x_in.shape[0],), int(t), device=x.device, dtype=torch.long)
        out = model(x_in, t_in, labels_in).float()
        eps = eps_from_prediction(prediction, scheduler.alphas_cumprod, x_in.float(), t_in, out[:, :C])
        rest = out[:, C:]
        if guided:
            g = C if guidance_channels is None else guidance_channels
            cond, uncond = eps.chunk(2)
            eps = torch.cat(
                [uncond[:, :g] + guidance_scale * (cond[:, :g] - uncond[:, :g]), cond[:, g:]], dim=1
            )
            rest = rest[:B]
        if sampler == "ddpm" and learn_sigma:
            model_output = torch.cat([eps, rest], dim=1)
            x = scheduler.step(model_output, t, x, generator=step_generators).prev_sample
        elif sampler == "ddpm":
            x = scheduler.step(eps, t, x, generator=step_generators).prev_sample
        elif sampler == "ddim":
            # with clipping, the step's eps is recomputed from the clipped x_0, as ADM's DDIM does (the
            # diffusers default keeps the unclipped eps: x_0 and eps then disagree)
            x = scheduler.step(eps, t, x, use_clipped_model_output=clip_sample is not None).prev_sample
        else:
            x = scheduler.step(eps, t, x).prev_sample
    return x
