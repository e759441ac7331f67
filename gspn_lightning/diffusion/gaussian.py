"""DiT's diffusion process and training loss.

The noise schedule is a diffusers ``DDPMScheduler`` configured as DiT trains (linear betas 1e-4 to
0.02 over 1,000 steps, learned variance range, no clipping, linspace spacing: diffusers' defaults
clip samples and use "leading" spacing, which DiT does not).  diffusers has no variational-bound
loss, so :meth:`GaussianDiffusion.training_losses` computes DiT's (improved-DDPM's ``L_hybrid``)::

    loss = MSE(eps_pred, eps) + L_vb            (L_vb only when the model learns its variance)
    L_vb = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))            for t > 0, in bits per dim
         = -log p(x_0 | x_1) under a discretised Gaussian (8-bit bins of [-1, 1])   for t = 0

where ``p``'s mean comes from the *detached* eps prediction (so L_vb trains only the variance) and its
log-variance interpolates, by ``(v + 1) / 2``, between the clipped posterior log-variance and
``log beta_t``.  The Gaussian CDF is the exact one (``torch.special.ndtr``), not the tanh
approximation of the original code; the two differ by about 1e-3 relative in the t = 0 term only.
"""

from __future__ import annotations

import math

import torch

__all__ = ["PREDICTIONS", "GaussianDiffusion", "dit_betas", "dit_scheduler", "eps_from_prediction"]


def _dit_beta_range(num_train_timesteps: int) -> tuple[float, float]:
    return 1e-4 * 1000 / num_train_timesteps, 0.02 * 1000 / num_train_timesteps


def dit_betas(num_train_timesteps: int = 1000) -> torch.Tensor:
    """DiT's linear betas in float32, as :func:`dit_scheduler` computes them, without diffusers."""
    start, end = _dit_beta_range(num_train_timesteps)
    return torch.linspace(start, end, num_train_timesteps, dtype=torch.float32)


def dit_scheduler(num_train_timesteps: int = 1000, learn_sigma: bool = True):
    """The ``diffusers.DDPMScheduler`` DiT trains and samples with."""
    from diffusers import DDPMScheduler

    start, end = _dit_beta_range(num_train_timesteps)
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_start=start,
        beta_end=end,
        beta_schedule="linear",
        variance_type="learned_range" if learn_sigma else "fixed_small",
        clip_sample=False,
        timestep_spacing="linspace",
    )


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.dim())))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor
) -> torch.Tensor:
    """log P(x) of data in [-1, 1] quantised to 256 levels, under N(mean, e^(2 log_scale)), elementwise.
    The end bins extend to -inf / +inf."""
    inv = torch.exp(-log_scale)
    upper = inv * (x - mean + 1.0 / 255)
    lower = inv * (x - mean - 1.0 / 255)
    log_cdf_upper = torch.special.log_ndtr(upper)
    log_one_minus_cdf_lower = torch.special.log_ndtr(-lower)
    mid = torch.log((torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_one_minus_cdf_lower, mid))


PREDICTIONS = ("eps", "x0", "v")


def eps_from_prediction(
    prediction: str, alphas_cumprod: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, pred: torch.Tensor
) -> torch.Tensor:
    """The noise estimate implied by a model output ``pred`` of kind ``prediction`` (``"eps"``, ``"x0"``
    or ``"v"``) at ``x_t``, timesteps ``t`` (B,) or a scalar, ``alphas_cumprod`` the schedule's table."""
    if prediction == "eps":
        return pred
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    t = torch.as_tensor(t, device=xt.device).reshape(-1)
    abar = alphas_cumprod.to(xt.device, torch.float64)[t].to(xt.dtype).view(-1, *([1] * (xt.dim() - 1)))
    if prediction == "x0":  # x_t = sqrt(abar) x0 + sqrt(1 - abar) eps
        return (xt - abar.sqrt() * pred) / (1 - abar).sqrt()
    return abar.sqrt() * pred + (1 - abar).sqrt() * xt  # v = sqrt(abar) eps - sqrt(1 - abar) x0


class GaussianDiffusion:
    """Tables of a DDPM schedule (in float64) and DiT's training loss.

    Args:
        scheduler: a diffusers scheduler with ``betas`` (default :func:`dit_scheduler`, built only when
            the ``scheduler`` attribute is read: the tables and the loss need only :func:`dit_betas`,
            so training runs without diffusers).
        learn_sigma: the model outputs ``2 C`` channels (eps and the variance interpolation ``v``).
        snr_gamma: Min-SNR-gamma weighting of the MSE (Hang et al., 2023), so the nearly clean steps,
            easy and many, stop dominating the gradient: with ``SNR_t = abar_t / (1 - abar_t)`` each
            sample's MSE is weighted by ``min(SNR_t, gamma) / SNR_t`` for eps, ``min(SNR_t, gamma)``
            for x0 and ``min(SNR_t, gamma) / (SNR_t + 1)`` for v prediction, the same weighting of
            the x0 error in all three (``None``: unweighted, DiT's choice; 5 is the paper's value).
            The logged ``mse`` stays unweighted.
        prediction: what the model's first ``C`` channels predict: ``"eps"`` (the noise, DiT's),
            ``"x0"`` (the clean sample) or ``"v"`` (``sqrt(abar) eps - sqrt(1 - abar) x0``); the
            MSE is taken against that target.  Samplers turn any of them into eps
            (:meth:`eps_from_prediction`).
    """

    def __init__(
        self,
        scheduler=None,
        learn_sigma: bool = True,
        snr_gamma: float | None = None,
        prediction: str = "eps",
    ) -> None:
        if snr_gamma is not None and not snr_gamma > 0:
            raise ValueError(f"snr_gamma must be positive or None, got {snr_gamma}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        self.prediction = prediction
        self._scheduler = scheduler
        self.learn_sigma = learn_sigma
        self.snr_gamma = snr_gamma
        betas = (scheduler.betas if scheduler is not None else dit_betas()).double()
        alphas = 1.0 - betas
        abar = torch.cumprod(alphas, 0)
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        self.num_timesteps = len(betas)
        self.betas = betas
        self.alphas_cumprod = abar
        self.sqrt_recip_abar = torch.sqrt(1.0 / abar)
        self.sqrt_recipm1_abar = torch.sqrt(1.0 / abar - 1)
        self.posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
        # the posterior variance is 0 at t = 0: clip its log to the value at t = 1
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
        )
        self.posterior_mean_coef1 = betas * torch.sqrt(abar_prev) / (1.0 - abar)
        self.posterior_mean_coef2 = (1.0 - abar_prev) * torch.sqrt(alphas) / (1.0 - abar)
        snr = abar / (1.0 - abar)
        if snr_gamma is None:
            self.mse_weight = torch.ones_like(snr)
        else:
            per_target = {"eps": snr, "x0": torch.ones_like(snr), "v": snr + 1}[prediction]
            self.mse_weight = snr.clamp(max=snr_gamma) / per_target

    @property
    def scheduler(self):
        """The diffusers scheduler given, else DiT's (:func:`dit_scheduler`, made on first read)."""
        if self._scheduler is None:
            self._scheduler = dit_scheduler(len(self.betas), self.learn_sigma)
        return self._scheduler

    @staticmethod
    def _at(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``table[t]`` shaped to broadcast against ``like`` (B, ...), in ``like``'s dtype."""
        v = table.to(t.device)[t].to(like.dtype)
        return v.view(-1, *([1] * (like.dim() - 1)))

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the model is trained to output for ``x_t = q_sample(x0, t, noise)``."""
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x0
        abar = self._at(self.alphas_cumprod, t, x0)
        return abar.sqrt() * noise - (1 - abar).sqrt() * x0

    def eps_from_prediction(self, xt: torch.Tensor, t: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """The noise estimate implied by the model's prediction ``pred`` at ``x_t``."""
        return eps_from_prediction(self.prediction, self.alphas_cumprod, xt, t, pred)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``."""
        abar = self._at(self.alphas_cumprod, t, x0)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def posterior(
        self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = (
            self._at(self.posterior_mean_coef1, t, xt) * x0 + self._at(self.posterior_mean_coef2, t, xt) * xt
        )
        return mean, self._at(self.posterior_log_variance_clipped, t, xt).expand_as(xt)

    def p_mean_logvar(
        self, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of the model's p(x_{t-1} | x_t) from its eps and variance output v."""
        frac = (v + 1) / 2
        min_log = self._at(self.posterior_log_variance_clipped, t, xt)
        max_log = self._at(torch.log(self.betas), t, xt)
        log_var = frac * max_log + (1 - frac) * min_log
        x0 = self._at(self.sqrt_recip_abar, t, xt) * xt - self._at(self.sqrt_recipm1_abar, t, xt) * eps
        mean, _ = self.posterior(x0, xt, t)
        return mean, log_var

    def vb_terms(
        self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """Per-sample variational-bound term in bits per dimension (KL for t > 0, decoder NLL at 0)."""
        true_mean, true_log_var = self.posterior(x0, xt, t)
        mean, log_var = self.p_mean_logvar(xt, t, eps, v)
        kl = _mean_flat(normal_kl(true_mean, true_log_var, mean, log_var)) / math.log(2.0)
        nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(
        self,
        model,
        x0: torch.Tensor,
        y: torch.Tensor,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-sample losses ``{"loss", "mse", "vb", "t"}`` of ``model(x_t, t, y)`` on clean ``x0``.

        ``t`` defaults to uniform over all steps and ``noise`` to N(0, 1).  The loss is computed in
        float32 whatever the model's output dtype.
        """
        B = x0.shape[0]
        if t is None:
            t = torch.randint(0, self.num_timesteps, (B,), device=x0.device, generator=generator)
        if noise is None:
            noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        xt = self.q_sample(x0, t, noise)
        out = model(xt, t, y).float()
        C = x0.shape[1]
        if self.learn_sigma:
            if out.shape[1] != 2 * C:
                raise ValueError(f"learn_sigma: the model must output {2 * C} channels, got {out.shape[1]}")
            eps, v = out[:, :C], out[:, C:]
        else:
            if out.shape[1] != C:
                raise ValueError(f"the model must output {C} channels, got {out.shape[1]}")
            eps, v = out, None
        mse = _mean_flat((self.target(x0, noise, t).float() - eps) ** 2)
        losses = {"mse": mse, "t": t}
        weighted = mse * self.mse_weight.to(t.device)[t].float() if self.snr_gamma is not None else mse
        if v is not None:
            # the bound trains the variance only: the mean comes from a detached eps
            eps_hat = self.eps_from_prediction(xt.float(), t, eps.detach())
            vb = self.vb_terms(x0.float(), xt.float(), t, eps_hat, v)
            losses["vb"] = vb
            losses["loss"] = weighted + vb
        else:
            losses["loss"] = weighted
        return losses
