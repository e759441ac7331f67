"""Gaussian diffusion on diffusers' schedulers: DiT's schedule, its training loss (MSE on eps plus the
variational bound for the learned variance), and samplers with classifier-free guidance.

Used by the diffusion task and the sampling command; knows nothing of Lightning or of the models
beyond their call signature ``model(x, t, y) -> (B, C or 2C, H, W)``.
"""

from .gaussian import PREDICTIONS, GaussianDiffusion, dit_betas, dit_scheduler, eps_from_prediction
from .sampling import SAMPLERS, make_sampler, sample

__all__ = ["PREDICTIONS", "SAMPLERS", "GaussianDiffusion", "eps_from_prediction", "dit_betas", "dit_scheduler", "make_sampler", "sample"]
