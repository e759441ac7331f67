"""Diffusion on diffusers: DiT's schedule, the variational-bound loss against an independent
derivation, samplers, guidance and per-sample reproducibility."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from gspn_lightning.diffusion import PREDICTIONS, SAMPLERS, GaussianDiffusion, dit_scheduler, sample
from gspn_lightning.diffusion.sampling import initial_noise
from gspn_lightning.models import create_model


def test_dit_schedule_facts():
    s = dit_scheduler()
    assert s.config.clip_sample is False and s.config.timestep_spacing == "linspace"
    assert s.config.variance_type == "learned_range"
    assert s.betas[0].item() == pytest.approx(1e-4) and s.betas[-1].item() == pytest.approx(0.02)
    s.set_timesteps(250)
    assert s.timesteps[0] == 999 and s.timesteps[-1] == 0 and len(s.timesteps) == 250


def _independent_vb(diff: GaussianDiffusion, x0, xt, t, eps, v):
    """The bound re-derived from q(x_{t-1} | x0) and q(x_t | x_{t-1}) by Bayes (precisions add), with
    torch.distributions for the KL and the bin probabilities, in float64."""
    betas = diff.scheduler.betas.double()
    out = []
    for i in range(x0.shape[0]):
        ti = int(t[i])
        alpha = 1 - betas[ti]
        abar = torch.prod(1 - betas[: ti + 1])
        abar_prev = torch.prod(1 - betas[:ti]) if ti > 0 else torch.tensor(1.0, dtype=torch.float64)

        def post(x0_, xt_, ti=ti, alpha=alpha, abar_prev=abar_prev):
            if ti == 0:
                return x0_, None
            prec = 1 / (1 - abar_prev) + alpha / betas[ti]
            mean = (abar_prev.sqrt() * x0_ / (1 - abar_prev) + alpha.sqrt() * xt_ / betas[ti]) / prec
            return mean, 1 / prec

        # the model's x0 from eps, and its variance between the (clipped) posterior one and beta_t
        x0_hat = (xt[i] - (1 - abar).sqrt() * eps[i]) / abar.sqrt()
        mean_p, _ = post(x0_hat, xt[i])
        if ti == 0:  # q(x_{-1} | x_1, x_0) is x_0 itself: the model's mean is its x0 estimate
            mean_p = x0_hat
        t1 = max(ti, 1)  # clipped: the posterior variance at t = 0 is replaced by the one at t = 1
        var_post_clip = betas[t1] * (1 - torch.prod(1 - betas[:t1])) / (1 - torch.prod(1 - betas[: t1 + 1]))
        frac = (v[i] + 1) / 2
        logvar_p = frac * torch.log(betas[ti]) + (1 - frac) * torch.log(var_post_clip)
        p = Normal(mean_p, (0.5 * logvar_p).exp())
        if ti > 0:
            mean_q, var_q = post(x0[i], xt[i])
            q = Normal(mean_q, var_q.sqrt().expand_as(mean_q))
            out.append(kl_divergence(q, p).mean() / math.log(2))
        else:
            lo = torch.where(x0[i] < -0.999, torch.full_like(x0[i], -math.inf), x0[i] - 1 / 255)
            hi = torch.where(x0[i] > 0.999, torch.full_like(x0[i], math.inf), x0[i] + 1 / 255)
            prob = p.cdf(hi) - p.cdf(lo)
            out.append(-torch.log(prob).mean() / math.log(2))
    return torch.stack(out)


def test_vb_terms_match_an_independent_derivation():
    torch.manual_seed(0)
    diff = GaussianDiffusion()
    B = 6
    x0 = (torch.rand(B, 2, 3, 3, dtype=torch.float64) * 2 - 1).round(decimals=2)
    x0[0, 0, 0, 0], x0[0, 0, 0, 1] = -1.0, 1.0  # the open-ended end bins
    t = torch.tensor([0, 0, 1, 17, 500, 999])
    noise = torch.randn_like(x0)
    xt = diff.q_sample(x0, t, noise)
    eps = noise + 0.3 * torch.randn_like(noise)
    v = torch.rand_like(x0) * 2 - 1
    ours = diff.vb_terms(x0, xt, t, eps, v)
    ref = _independent_vb(diff, x0, xt, t, eps, v)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-9)
    assert torch.all(ours[2:] >= 0)


def test_training_losses_hybrid_and_gradients():
    torch.manual_seed(0)
    model = create_model("dit_s_2", hidden_size=32, depth=1, num_heads=4, num_classes=5)
    for p in model.final.parameters():
        torch.nn.init.normal_(p, std=0.02)
    diff = GaussianDiffusion()
    x0 = torch.rand(4, 4, 8, 8) * 2 - 1
    losses = diff.training_losses(model, x0, torch.tensor([0, 1, 2, 3]))
    assert set(losses) == {"loss", "mse", "vb", "t"}
    torch.testing.assert_close(losses["loss"], losses["mse"] + losses["vb"])
    # the bound trains the variance half only: its gradient through eps is cut
    model.zero_grad()
    losses["vb"].sum().backward()
    grad_rows = model.final.linear.weight.grad  # rows: 8 channels x 2*2 pixels, pixel-shuffled
    out_channel = torch.arange(grad_rows.shape[0]) // 4  # pixel_shuffle: channel c owns rows 4c..4c+3
    assert grad_rows[out_channel < 4].abs().sum() == 0 and grad_rows[out_channel >= 4].abs().sum() > 0
    with pytest.raises(ValueError, match="8 channels"):
        GaussianDiffusion().training_losses(lambda x, t, y: x, x0, torch.zeros(4, dtype=torch.long))


class ConstantEps(torch.nn.Module):
    """eps = 1 for a real label, 0 for the null class; variance output 0."""

    num_classes = 10

    def forward(self, x, t, y):
        eps = (y != self.num_classes).float().view(-1, 1, 1, 1).expand_as(x)
        return torch.cat([eps, torch.zeros_like(x)], dim=1)


def test_guidance_scale_and_channels():
    noise = torch.zeros(1, 4, 2, 2)
    y = torch.tensor([3])
    run = lambda **kw: sample(ConstantEps(), y, noise, sampler="ddim", steps=1, **kw)  # noqa: E731
    plain = run()
    full = run(guidance_scale=3.0)
    three = run(guidance_scale=3.0, guidance_channels=3)
    # one DDIM step from x = 0 is linear in eps: guided eps = 3 (cond 1, null 0)
    torch.testing.assert_close(full, 3 * plain)
    torch.testing.assert_close(three[:, :3], 3 * plain[:, :3])
    torch.testing.assert_close(three[:, 3:], plain[:, 3:])
    with pytest.raises(ValueError, match="guidance_scale"):
        run(guidance_scale=0.5)
    with pytest.raises(ValueError, match="sampler"):
        sample(ConstantEps(), y, noise, sampler="euler")


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_samples_do_not_depend_on_the_batch_split(sampler):
    torch.manual_seed(0)
    model = create_model("gspn_dit_s_2", hidden_size=16, depth=2, num_classes=10, mixer={"backend": "reference"}).eval()
    for p in model.final.parameters():
        torch.nn.init.normal_(p, std=0.02)
    seeds = [11, 12, 13, 14]
    labels = torch.tensor([0, 1, 2, 3])
    noise = initial_noise((4, 8, 8), seeds, "cpu")
    whole = sample(model, labels, noise, sampler=sampler, steps=4, guidance_scale=1.5, seeds=seeds)
    parts = torch.cat(
        [
            sample(
                model,
                labels[i : i + 2],
                noise[i : i + 2],
                sampler=sampler,
                steps=4,
                guidance_scale=1.5,
                seeds=seeds[i : i + 2],
            )  # fmt: skip
            for i in (0, 2)
        ]
    )
    assert torch.isfinite(whole).all()
    torch.testing.assert_close(parts, whole, rtol=1e-4, atol=1e-4)
    again = sample(model, labels, noise, sampler=sampler, steps=4, guidance_scale=1.5, seeds=seeds)
    torch.testing.assert_close(again, whole, rtol=0, atol=0)
    other = sample(model, labels, noise, sampler=sampler, steps=4, guidance_scale=1.5, seeds=[1, 2, 3, 4])
    assert (other - whole).abs().max() > 1e-3 if sampler == "ddpm" else True  # ddpm steps are stochastic


class OracleEps(torch.nn.Module):
    """The exact eps of a data distribution that is one image ``x0``: every sampler must return it."""

    num_classes = 10

    def __init__(self, x0: torch.Tensor, scale: float = 1.0):
        super().__init__()
        self.x0, self.scale = x0, scale
        self.abar = dit_scheduler(learn_sigma=False).alphas_cumprod

    def forward(self, x, t, y):
        a = self.abar[t].view(-1, 1, 1, 1)
        return self.scale * (x - a.sqrt() * self.x0) / (1 - a).sqrt()


class Oracle(OracleEps):
    """The exact prediction of kind ``prediction`` (eps, x0 or v) for the one-image distribution."""

    def __init__(self, x0: torch.Tensor, prediction: str):
        super().__init__(x0)
        self.prediction = prediction

    def forward(self, x, t, y):
        a = self.abar[t].view(-1, 1, 1, 1)
        eps = (x - a.sqrt() * self.x0) / (1 - a).sqrt()
        x0 = self.x0.expand_as(x)
        return {"eps": eps, "x0": x0, "v": a.sqrt() * eps - (1 - a).sqrt() * x0}[self.prediction]


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_samplers_recover_the_one_image_of_an_exact_model(sampler, prediction):
    torch.manual_seed(0)
    x0 = torch.rand(1, 1, 6, 5) * 2 - 1
    noise = torch.randn(3, 1, 6, 5)
    out = sample(Oracle(x0, prediction), torch.zeros(3, dtype=torch.long), noise, sampler=sampler, steps=20,
                 learn_sigma=False, guidance_scale=2.0, prediction=prediction)  # fmt: skip
    torch.testing.assert_close(out, x0.expand_as(out), atol=1e-4, rtol=0)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_prediction_targets_and_their_eps(prediction):
    """The exact model of each kind has zero loss, and its prediction maps back to the true noise;
    with ``learn_sigma`` the bound sees the same eps whatever the parameterisation."""
    torch.manual_seed(0)
    x0 = torch.rand(1, 1, 4, 6) * 2 - 1
    t = torch.tensor([0, 5, 300, 999])
    noise = torch.randn(4, 1, 4, 6)
    diff = GaussianDiffusion(learn_sigma=False, prediction=prediction)
    exact = Oracle(x0, prediction)
    losses = diff.training_losses(exact, x0.expand(4, -1, -1, -1), torch.zeros(4, dtype=torch.long), t=t, noise=noise)
    assert losses["loss"].max() < 1e-8
    xt = diff.q_sample(x0.expand(4, -1, -1, -1), t, noise)
    torch.testing.assert_close(diff.eps_from_prediction(xt, t, exact(xt, t, None)), noise, atol=1e-4, rtol=1e-4)
    hybrid = GaussianDiffusion(learn_sigma=True, prediction=prediction)
    eps_model = GaussianDiffusion(learn_sigma=True)
    v = torch.full_like(noise, 0.3)
    with_v = lambda model: lambda x, t, y: torch.cat([model(x, t, y), v], 1)  # noqa: E731
    got = hybrid.training_losses(with_v(exact), x0.expand(4, -1, -1, -1), t, t=t, noise=noise)
    ref = eps_model.training_losses(with_v(Oracle(x0, "eps")), x0.expand(4, -1, -1, -1), t, t=t, noise=noise)
    torch.testing.assert_close(got["vb"], ref["vb"], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="prediction"):
        GaussianDiffusion(prediction="noise")


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_clip_sample_bounds_the_predicted_image(sampler):
    torch.manual_seed(0)
    x0 = torch.full((1, 1, 4, 4), 3.0)  # outside [-1, 1]: clipping must pull samples towards the range
    noise = torch.randn(2, 1, 4, 4)
    run = lambda **kw: sample(OracleEps(x0), torch.zeros(2, dtype=torch.long), noise, sampler=sampler,  # noqa: E731
                              steps=10, learn_sigma=False, **kw)  # fmt: skip
    free, clipped = run(), run(clip_sample=1.0)
    assert free.mean() > 2.9
    assert clipped.abs().max() < 1.1
    with pytest.raises(ValueError, match="clip_sample"):
        sample(OracleEps(x0), torch.zeros(2, dtype=torch.long), noise, sampler="dpm++", clip_sample=1.0)


def test_ddim_steps_land_on_the_next_timestep_and_clipping_stays_consistent():
    """Each DDIM step moves x to exactly the noise level of the timestep evaluated next, and with
    clipping its eps is recomputed from the clipped x_0 (ADM's DDIM): x_next = sqrt(abar') clip(x0) +
    sqrt(1 - abar') eps(clip(x0))."""
    torch.manual_seed(0)
    x0 = torch.full((1, 1, 4, 4), 3.0)
    seen = []

    class Recorder(OracleEps):
        def forward(self, x, t, y):
            seen.append((int(t[0]), x.clone()))
            return super().forward(x, t, y)

    noise = torch.randn(1, 1, 4, 4)
    sample(Recorder(x0), torch.zeros(1, dtype=torch.long), noise, sampler="ddim", steps=4, learn_sigma=False,
           clip_sample=1.0)  # fmt: skip
    abar = dit_scheduler(learn_sigma=False).alphas_cumprod.double()
    assert [t for t, _ in seen] == [999, 749, 499, 249]
    for (t, x), (t_next, x_next) in zip(seen, seen[1:]):
        a, a_next = abar[t].float(), abar[t_next].float()
        eps = (x - a.sqrt() * 1.0) / (1 - a).sqrt()  # from the clipped x_0 = 1
        torch.testing.assert_close(x_next, a_next.sqrt() * 1.0 + (1 - a_next).sqrt() * eps, atol=1e-5, rtol=1e-5)


def test_min_snr_weighting_against_its_formula():
    x0 = torch.rand(4, 1, 4, 4) * 2 - 1
    t = torch.tensor([0, 100, 400, 999])
    noise = torch.randn_like(x0)
    zero = lambda x, t, y: torch.zeros_like(x)  # noqa: E731  (mse = mean noise^2 per sample)
    plain = GaussianDiffusion(learn_sigma=False).training_losses(zero, x0, t, t=t, noise=noise)
    weighted = GaussianDiffusion(learn_sigma=False, snr_gamma=5.0).training_losses(zero, x0, t, t=t, noise=noise)
    abar = dit_scheduler(learn_sigma=False).alphas_cumprod.double()[t]
    snr = abar / (1 - abar)
    expect = plain["mse"] * (torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / snr).float()
    torch.testing.assert_close(weighted["mse"], plain["mse"])  # the logged MSE stays unweighted
    torch.testing.assert_close(weighted["loss"], expect)
    assert weighted["loss"][0] < 1e-3 * plain["loss"][0] and weighted["loss"][3] == plain["loss"][3]
    with pytest.raises(ValueError, match="snr_gamma"):
        GaussianDiffusion(snr_gamma=0.0)


def test_min_snr_weights_the_x0_error_alike_for_every_prediction():
    """Hang et al.: the three parameterisations weighted so that each is min(SNR, gamma) times the x0
    error. A model wrong by the same x0 error gets the same weighted loss whatever it predicts."""
    torch.manual_seed(0)
    x0 = torch.rand(4, 1, 4, 4) * 2 - 1
    t = torch.tensor([1, 100, 400, 999])
    noise = torch.randn_like(x0)
    err = 0.05 * torch.randn_like(x0)
    losses = {}
    for prediction in PREDICTIONS:
        diff = GaussianDiffusion(learn_sigma=False, snr_gamma=5.0, prediction=prediction)
        abar = diff._at(diff.alphas_cumprod, t, x0)
        wrong_x0 = x0 + err
        eps = (diff.q_sample(x0, t, noise) - abar.sqrt() * wrong_x0) / (1 - abar).sqrt()
        out = {"eps": eps, "x0": wrong_x0, "v": abar.sqrt() * eps - (1 - abar).sqrt() * wrong_x0}[prediction]
        losses[prediction] = diff.training_losses(lambda x, t_, y, out=out: out, x0, t, t=t, noise=noise)["loss"]
    abar = dit_scheduler(learn_sigma=False).alphas_cumprod.double()[t]
    expect = (abar / (1 - abar)).clamp(max=5.0).float() * err.square().mean((1, 2, 3))
    for prediction in PREDICTIONS:
        torch.testing.assert_close(losses[prediction], expect, rtol=1e-3, atol=1e-7)
