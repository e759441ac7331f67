"""Class-conditional diffusion (GSPN-DiT / DiT) as a LightningModule: DiT's recipe.

Batches are ``(x, labels)``: VAE latents (already multiplied by the VAE's scaling factor when the
shards were written) or pixels in [-1, 1], any ``(C, H, W)``; a label of -1 marks a sample the data
pipeline could not decode, and such rows are dropped and counted (``*/corrupt``).

- Loss: DiT's hybrid loss (:class:`~gspn_lightning.diffusion.GaussianDiffusion`), logged overall
  (``train/loss``, ``train/mse``, ``train/vb``) and per quarter of the timestep range
  (``train/loss_q0`` .. ``train/loss_q3``: the early-noise quarter is q0).
- Optimisation (shared with the other tasks, :class:`~gspn_lightning.tasks.base.TrainingTask`): AdamW,
  lr 1e-4, no weight decay, constant schedule after an optional warm-up; gradient clipping and bf16
  mixed precision are Trainer settings; label dropout 0.1 (the model's null class) for guidance.
- EMA 0.9999 of the weights, updated after each optimizer step, saved in checkpoints and used for
  sampling.
- Validation: the same loss with a fixed noise/timestep draw per batch (comparable across epochs),
  for the raw and the EMA weights (``val/loss``, ``val_ema/loss``).
- Sample grids: every ``sample_every_n_steps`` optimizer steps (and at the end of fit) rank 0 draws
  ``sample_per_class`` samples for each of the first ``sample_classes`` classes from the EMA model
  with fixed seeds, decodes them (the VAE at ``vae``, a local diffusers folder, or nothing in pixel
  space) and writes ``<root>/samples/step-NNNNNNN.png``, also logged to TensorBoard when it is the
  logger.
"""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_only
from torchmetrics import MeanMetric

from gspn_lightning.diffusion import GaussianDiffusion, sample
from gspn_lightning.diffusion.sampling import initial_noise

from .base import OptimSettings, TrainingTask, build_model

QUARTERS = 4


class DiffusionTask(TrainingTask):
    """Trains a class-conditional diffusion model built by name from the registry.

    Args:
        model: registered model name (``gspn_dit_xl_2``, ``dit_xl_2``, ...).
        model_kwargs: overrides passed to ``create_model`` (e.g. a smaller ``hidden_size``).
        num_classes: classes (the model adds a null class); linked from the data in the configs.
        in_chans: channels of the latents or pixels; linked from the data.
        image_size: latent (or pixel) size, recorded for sampling; linked from the data.
        lr, weight_decay, betas, warmup_steps: AdamW and its (constant after warm-up) schedule.
        base_batch_size: scale ``lr`` by global batch / this (``None``: no scaling, as DiT).
        class_dropout: probability of training on the null class (classifier-free guidance).
        learn_sigma: the model predicts its variance too (DiT's hybrid loss).
        snr_gamma: Min-SNR-gamma weighting of the MSE (``None``: DiT's plain MSE); see
            :class:`~gspn_lightning.diffusion.GaussianDiffusion`.
        prediction: the model predicts ``"eps"`` (DiT's), ``"x0"`` or ``"v"``; saved with the
            checkpoint, so sampling reads it back.
        ema_decay: decay of the weight EMA used for sampling (``None`` disables it).
        sample_every_n_steps: write a grid of EMA samples this often (0: only at the end of fit).
        sample_classes / sample_per_class: the grid's classes (the first k) and columns.
        sampler / sample_steps / guidance_scale / guidance_channels: how grids are sampled.
        clip_sample: clip each sampling step's predicted x_0 to this range (``1.0`` for pixels in
            [-1, 1], as DDPM does; ``None`` for latents, as DiT does).
        vae: local diffusers VAE folder to decode latents for grids and sampling (``None``: the one
            the latent shards record, if any; else the data are pixels).
        fid_every_n_steps: compute FID of ``fid_num_samples`` EMA samples (class-balanced, seeded by
            index, drawn as the grids are) against ``fid_reference`` this often (0: never). The
            reference is saved Inception statistics (``gspn stats``) or
            real images; the protocol is printed with every result, since FIDs from different
            protocols do not compare. Logged as ``fid``.
        ema_scope: ``"all"`` parameters or only the ``"trainable"`` ones in the EMA.
        nonfinite_loss / max_consecutive_skips: see :class:`~gspn_lightning.tasks.base.TrainingTask`.
    """

    def __init__(
        self,
        model: str = "gspn_dit_xl_2",
        model_kwargs: dict | None = None,
        num_classes: int = 1000,
        in_chans: int = 4,
        image_size: int = 32,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        base_batch_size: int | None = None,
        class_dropout: float = 0.1,
        learn_sigma: bool = True,
        snr_gamma: float | None = None,
        prediction: str = "eps",
        ema_decay: float | None = 0.9999,
        sample_every_n_steps: int = 0,
        sample_classes: int = 10,
        sample_per_class: int = 8,
        sampler: str = "ddim",
        sample_steps: int = 50,
        guidance_scale: float = 1.0,
        guidance_channels: int | None = None,
        clip_sample: float | None = None,
        vae: str | None = None,
        fid_every_n_steps: int = 0,
        fid_num_samples: int = 1000,
        fid_reference: str | None = None,
        ema_scope: str = "all",
        nonfinite_loss: str = "error",
        max_consecutive_skips: int = 10,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.configure_fault_policy(nonfinite_loss, max_consecutive_skips)
        if sample_every_n_steps < 0:
            raise ValueError(f"sample_every_n_steps must be >= 0, got {sample_every_n_steps}")
        if fid_every_n_steps < 0 or fid_num_samples < 2:
            raise ValueError("fid_every_n_steps must be >= 0 and fid_num_samples >= 2")
        if fid_every_n_steps and not fid_reference:
            raise ValueError("model.init_args.fid_every_n_steps needs model.init_args.fid_reference")
        self.model = build_model(
            model, model_kwargs, num_classes=num_classes, in_channels=in_chans, input_size=image_size,
            class_dropout=class_dropout, learn_sigma=learn_sigma,
        )  # fmt: skip
        self.init_ema(ema_decay, ema_scope)
        self.optim = OptimSettings(
            lr=lr, base_batch_size=base_batch_size, weight_decay=weight_decay, betas=tuple(betas),
            warmup_steps=warmup_steps, schedule="constant",
        )  # fmt: skip
        self.diffusion = GaussianDiffusion(learn_sigma=learn_sigma, snr_gamma=snr_gamma, prediction=prediction)
        self.eval_loss = torch.nn.ModuleDict({k: MeanMetric() for k in ("val", "val_ema", "test", "test_ema")})
        self.init_sample_counts()
        self._vae = None
        self._last_grid: int | None = None
        self._last_fid: int | None = None

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.model(x, t, y)

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if self.hparams.vae is None and getattr(dm, "vae", None):
            self.hparams.vae = dm.vae  # the VAE the latent shards were made with decodes the samples

    # -- steps -----------------------------------------------------------------------------------

    def training_step(self, batch, batch_idx):
        x, labels = self.drop_corrupt(batch, "train")
        if labels.numel() == 0:  # a wholly corrupt batch: a zero loss keeps DDP ranks in step
            return sum(p.sum() for p in self.model.parameters()) * 0.0
        losses = self.diffusion.training_losses(self.model, x, labels)
        loss = losses["loss"].mean()
        if self.check_loss(loss, batch_idx) is None:
            return None
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, sync_dist=True)
        self.log("train/mse", losses["mse"].mean(), on_step=True, on_epoch=True, sync_dist=True)
        if "vb" in losses:
            self.log("train/vb", losses["vb"].mean(), on_step=True, on_epoch=True, sync_dist=True)
        quarter = losses["t"] * QUARTERS // self.diffusion.num_timesteps
        for q in range(QUARTERS):
            sel = quarter == q
            if sel.any():
                self.log(f"train/loss_q{q}", losses["loss"][sel].mean().detach(), on_step=True, on_epoch=False)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, prog_bar=True)
        return loss

    def _eval_step(self, batch, batch_idx, stage: str):
        x, labels = self.drop_corrupt(batch, stage)
        if labels.numel() == 0:
            return
        # a fixed draw per (batch, rank): losses comparable from one evaluation to the next
        g = torch.Generator(device=x.device).manual_seed(1_000_003 * batch_idx + self.global_rank)
        t = torch.randint(0, self.diffusion.num_timesteps, (x.shape[0],), device=x.device, generator=g)
        noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=g)
        nets = [(stage, self.model)] + ([(f"{stage}_ema", self.ema.module)] if self.ema is not None else [])
        for name, net in nets:
            loss = self.diffusion.training_losses(net, x, labels, t=t, noise=noise)["loss"]
            self.eval_loss[name].update(loss.detach().mean(), weight=labels.numel())

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, batch_idx, "test")

    def _eval_epoch_end(self, stage: str) -> None:
        for name in (stage, f"{stage}_ema"):
            metric = self.eval_loss[name]
            if name.endswith("_ema") and self.ema is None:
                continue
            self.log(f"{name}/loss", metric.compute(), prog_bar=name == stage, sync_dist=False)
            metric.reset()
        self.log_sample_counts(stage)

    def on_validation_epoch_end(self):
        self._eval_epoch_end("val")

    def on_test_epoch_end(self):
        self._eval_epoch_end("test")

    # -- sample grids ----------------------------------------------------------------------------

    def sampling_net(self):
        return self.ema.module if self.ema is not None else self.model

    def vae(self):
        if self.hparams.vae and self._vae is None:
            from gspn_lightning.diffusion.vae import load_vae

            self._vae = load_vae(self.hparams.vae, self.device)
        return self._vae

    @torch.no_grad()
    def draw_images(self, labels: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        """uint8 images ``(B, C', H', W')`` of the EMA model for ``labels``, sample i seeded by
        ``seeds[i]``, sampled and decoded as configured."""
        from gspn_lightning.diffusion.vae import decode, to_uint8

        hp = self.hparams
        noise = initial_noise((hp.in_chans, hp.image_size, hp.image_size), seeds, self.device)
        net = self.sampling_net()
        was_training = net.training
        net.eval()
        x = sample(
            net, labels, noise, sampler=hp.sampler, steps=hp.sample_steps, guidance_scale=hp.guidance_scale,
            guidance_channels=hp.guidance_channels, seeds=seeds, learn_sigma=hp.learn_sigma,
            clip_sample=hp.get("clip_sample"), prediction=hp.get("prediction", "eps"),
        )  # fmt: skip
        net.train(was_training)
        vae = self.vae()
        return to_uint8(decode(vae, x) if vae is not None else x[:, :3])

    def fid_protocol(self) -> dict:
        hp = self.hparams
        return {
            "samples": hp.fid_num_samples, "class_balanced": True, "weights": "ema" if self.ema else "raw",
            "sampler": hp.sampler, "steps": hp.sample_steps, "guidance_scale": hp.guidance_scale,
            "guidance_channels": hp.guidance_channels, "clip_sample": hp.get("clip_sample"), "vae": hp.vae,
            "reference": hp.fid_reference,
        }  # fmt: skip

    @torch.no_grad()
    def compute_fid(self, batch_size: int = 100) -> float:
        """FID of ``fid_num_samples`` EMA samples against ``fid_reference`` (on this rank)."""
        from lightning.pytorch.utilities import rank_zero_info

        from gspn_lightning.metrics import compute_metrics

        hp = self.hparams
        n = hp.fid_num_samples
        images = []
        for start in range(0, n, batch_size):
            idx = list(range(start, min(n, start + batch_size)))
            labels = torch.tensor([i % hp.num_classes for i in idx], device=self.device)
            images.append(self.draw_images(labels, [1_000_000 + i for i in idx]).cpu())
        out = compute_metrics(hp.fid_reference, torch.cat(images), kid=False, progress=False, device=self.device)
        rank_zero_info(f"FID {out['fid']:.3f} at step {self.global_step}; protocol: {self.fid_protocol()}")
        return out["fid"]

    @torch.no_grad()
    def sample_grid(self) -> torch.Tensor:
        """A ``(3, H', W')`` uint8 grid: row ``k`` holds samples of class ``k`` (fixed seeds)."""
        from torchvision.utils import make_grid

        hp = self.hparams
        k, n = min(hp.sample_classes, hp.num_classes), hp.sample_per_class
        labels = torch.arange(k, device=self.device).repeat_interleave(n)
        images = self.draw_images(labels, list(range(k * n)))
        return make_grid(images.cpu(), nrow=n, padding=2, pad_value=255)

    @rank_zero_only
    def write_sample_grid(self) -> Path:
        from torchvision.io import write_png

        grid = self.sample_grid()
        root = Path(self.trainer.default_root_dir) / "samples"
        root.mkdir(parents=True, exist_ok=True)
        path = root / f"step-{self.global_step:07d}.png"
        write_png(grid, str(path))
        experiment = getattr(self.logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_image"):
            experiment.add_image("samples", grid, self.global_step)
        return path

    def on_train_batch_end(self, outputs, batch, batch_idx):
        step = self.global_step
        every = self.hparams.sample_every_n_steps
        if every and step > 0 and step % every == 0 and self._last_grid != step:
            self._last_grid = step
            self.write_sample_grid()
        every = self.hparams.fid_every_n_steps
        if every and step > 0 and step % every == 0 and self._last_fid != step:
            self._last_fid = step
            if self.global_rank == 0:
                self.log("fid", self.compute_fid(), rank_zero_only=True, on_step=True, on_epoch=False)

    def on_fit_end(self):
        if self.global_step > 0 and self._last_grid != self.global_step:
            self.write_sample_grid()

