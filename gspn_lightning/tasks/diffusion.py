"""Class-conditional diffusion (GSPN-DiT / DiT) as a LightningModule: DiT's recipe.

Batches are ``(x, labels)``: VAE latents (already multiplied by the VAE's scaling factor when the
shards were written) or pixels in [-1, 1], any ``(C, H, W)``; a label of -1 marks a sample the data
pipeline could not decode, and such rows are dropped and counted (``*/corrupt``).

- Loss: DiT's hybrid loss (:class:`~gspn_lightning.diffusion.GaussianDiffusion`), logged overall
  (``train/loss``, ``train/mse``, ``train/vb``) and per quarter of the timestep range
  (``train/loss_q0`` .. ``train/loss_q3``: the early-noise quarter is q0).
- Optimisation (``optim``, shared with the other tasks, :class:`~gspn_lightning.tasks.base.TrainingTask`):
  by default AdamW, lr 1e-4, no weight decay, constant schedule after an optional warm-up; gradient clipping and bf16
  mixed precision are Trainer settings; label dropout 0.1 (the model's null class) for guidance.
- EMA 0.9999 of the weights, updated after each optimizer step, saved in checkpoints and used for
  sampling.
- Randomness: the noise, the timesteps and the label dropout of a training step are drawn from
  generators seeded by (seed, global step, micro-batch, rank)
  (:meth:`~gspn_lightning.tasks.base.TrainingTask.step_generator`), so a resumed run draws what the
  uninterrupted one drew.
- Validation: the same loss with a fixed noise/timestep draw per batch (comparable across epochs),
  for the raw and the EMA weights (``val/loss``, ``val_ema/loss``).
- Sampling: :meth:`DiffusionTask.sample_images` draws from the EMA model with fixed seeds and decodes
  (the VAE at ``vae``, a local diffusers folder, or nothing in pixel space). Sample grids and FID
  during training are callbacks that use it (:class:`~gspn_lightning.tasks.callbacks.SampleGrid`,
  :class:`~gspn_lightning.tasks.callbacks.InTrainingFID`, under ``trainer.callbacks`` in a config).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping

import torch
from torchmetrics import MeanMetric

from gspn_lightning.data.protocol import LatentData, provides
from gspn_lightning.diffusion import GaussianDiffusion, sample
from gspn_lightning.diffusion.sampling import initial_noise
from gspn_lightning.models.gspn_dit import weights_block

from .base import DIFFUSION_OPTIM, OptimSettings, TrainingTask, build_model, upgrade_hparams


def saved_block_upgrade(
    hparams: Mapping, state_keys: Iterable[str], current: Mapping | None = None
) -> dict | None:
    """The ``model_kwargs`` a GSPN-DiT checkpoint that records no ``block`` was trained with, read
    from its weights (``state_keys``): ``block: compact`` for one written before the option existed
    (its mixers have a GRN), and ``block: release`` only where the run it is compared with
    (``current``, that run's ``model_kwargs``) names a block; ``None`` when nothing is to change (not
    a GSPN-DiT, a block recorded, or the release block that a missing ``block`` means anyway)."""
    model = hparams.get("model")
    kwargs = upgrade_hparams(dict(hparams)).get("model_kwargs", hparams.get("model_kwargs")) or {}
    if not (isinstance(model, str) and model.startswith("gspn_dit")) or not isinstance(kwargs, Mapping):
        return None
    if "block" in kwargs:
        return None
    compact = weights_block(state_keys) == "compact"
    if compact or (isinstance(current, Mapping) and "block" in current):
        return {**kwargs, "block": "compact" if compact else "release"}
    return None


QUARTERS = 4


class DiffusionTask(TrainingTask):
    """Trains a class-conditional diffusion model built by name from the registry.

    Args:
        model: registered model name (``gspn_dit_xl_2``, ``dit_xl_2``, ...).
        model_kwargs: overrides passed to ``create_model`` (e.g. a smaller ``hidden_size``).
        num_classes: classes (the model adds a null class); linked from the data in the configs.
        in_chans: channels of the latents or pixels; linked from the data.
        image_size: latent (or pixel) size, recorded for sampling; linked from the data.
        optim: AdamW, its schedule and the weight EMA used for sampling
            (:class:`~gspn_lightning.tasks.base.OptimSettings`); by default DiT's,
            :data:`~gspn_lightning.tasks.base.DIFFUSION_OPTIM`: ``lr`` 1e-4, no weight decay, a constant
            lr (after ``warmup_steps``), no batch scaling, ``ema_decay`` 0.9999 over ``ema_scope`` all.
        class_dropout: probability of training on the null class (classifier-free guidance).
        learn_sigma: the model predicts its variance too (DiT's hybrid loss).
        snr_gamma: Min-SNR-gamma weighting of the MSE (``None``: DiT's plain MSE); see
            :class:`~gspn_lightning.diffusion.GaussianDiffusion`.
        prediction: the model predicts ``"eps"`` (DiT's), ``"x0"`` or ``"v"``; saved with the
            checkpoint, so sampling reads it back.
        clip_sample: clip each sampling step's predicted x_0 to this range (``1.0`` for pixels in
            [-1, 1], as DDPM does; ``None`` for latents, as DiT does).
        vae: local diffusers VAE folder to decode latents for grids and sampling (``None``: the one
            the latent shards record, if any; else the data are pixels).
        eval_weights: which weights evaluate: ``null`` (validation/test evaluate the raw weights and
            their EMA, predict and sampling use the EMA), ``raw`` or ``ema`` (only those, everywhere);
            see :class:`~gspn_lightning.tasks.base.TrainingTask`.
        nonfinite_loss / max_consecutive_skips: see :class:`~gspn_lightning.tasks.base.TrainingTask`.
        init_from: start from these weights (fine-tuning): a ``.ckpt`` of another run, a
            ``.safetensors`` file or a ``save_pretrained`` folder, loaded when the trainer configures the
            model, with a printed list of the keys loaded and not loaded (and why); only the weights:
            optimiser, schedule and step start fresh (see :mod:`gspn_lightning.tasks.weights`).
        init_strict: any missing, unexpected or shape-mismatched key is an error naming them; ``False``
            loads the matching keys and lists the others (a new head for other classes).
        init_weights: ``"ema"`` or ``"raw"`` weights of an ``init_from`` checkpoint (``None``: its EMA
            when it has one).
        compile: ``torch.compile`` the model (in place: checkpoints are the same as without).
        activation_checkpointing: recompute each block's activations in the backward pass instead of
            storing them (``torch.utils.checkpoint``, non-reentrant): less memory, the same gradients.
    """

    def __init__(
        self,
        model: str = "gspn_dit_xl_2",
        model_kwargs: dict | None = None,
        num_classes: int = 1000,
        in_chans: int = 4,
        image_size: int = 32,
        optim: OptimSettings = DIFFUSION_OPTIM,
        class_dropout: float = 0.1,
        learn_sigma: bool = True,
        snr_gamma: float | None = None,
        prediction: str = "eps",
        clip_sample: float | None = None,
        vae: str | None = None,
        eval_weights: str | None = None,
        nonfinite_loss: str = "error",
        max_consecutive_skips: int = 10,
        init_from: str | None = None,
        init_strict: bool = True,
        init_weights: str | None = None,
        compile: bool = False,
        activation_checkpointing: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.configure_fault_policy(nonfinite_loss, max_consecutive_skips)
        self.model = build_model(
            model, model_kwargs, num_classes=num_classes, in_channels=in_chans, input_size=image_size,
            class_dropout=class_dropout, learn_sigma=learn_sigma,
        )  # fmt: skip
        self.configure_switches(compile, activation_checkpointing)
        self.init_weights_from(init_from, init_strict, init_weights)
        self.init_optim(optim, DIFFUSION_OPTIM)
        self.init_eval_weights(eval_weights)
        self.diffusion = GaussianDiffusion(
            learn_sigma=learn_sigma, snr_gamma=snr_gamma, prediction=prediction
        )
        self.eval_loss = torch.nn.ModuleDict(
            {k: MeanMetric() for k in ("val", "val_ema", "test", "test_ema")}
        )
        self.init_sample_counts()
        self._vae = None

    @classmethod
    def saved_argument_upgrades(cls, hparams, state_keys, current=None) -> dict:
        """A GSPN-DiT checkpoint from before the ``block`` option builds, and is compared as, the
        compact block it was trained with (see :func:`saved_block_upgrade`)."""
        kwargs = saved_block_upgrade(hparams, state_keys, current.get("model_kwargs") if current else None)
        return {} if kwargs is None else {"model_kwargs": kwargs}

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.model(x, t, y)

    def setup(self, stage: str) -> None:
        dm = self.data()  # any TaskData; latents that know their VAE (LatentData) also give it
        if self.hparams.vae is None and provides(dm, LatentData) and dm.vae:
            self.hparams.vae = dm.vae  # the VAE the latent shards were made with decodes the samples

    # -- steps -----------------------------------------------------------------------------------

    def training_step(self, batch, batch_idx):
        x, labels = self.drop_corrupt(batch, "train")
        if labels.numel() == 0:  # a wholly corrupt batch: a zero loss keeps DDP ranks in step
            return sum(p.sum() for p in self.model.parameters()) * 0.0
        # the step's draws from generators of (seed, step, micro-batch, rank): the same after a resume
        model = functools.partial(self.model, generator=self.step_generator(batch_idx, "labels"))
        losses = self.diffusion.training_losses(
            model, x, labels, generator=self.step_generator(batch_idx, "diffusion")
        )
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
                self.log(
                    f"train/loss_q{q}", losses["loss"][sel].mean().detach(), on_step=True, on_epoch=False
                )
        self.log_lr()
        return loss

    def _eval_step(self, batch, batch_idx, stage: str):
        x, labels = self.drop_corrupt(batch, stage)
        if labels.numel() == 0:
            return
        # a fixed draw per (batch, rank): losses comparable from one evaluation to the next
        g = self.step_generator(batch_idx, "diffusion", device=x.device)
        t = torch.randint(0, self.diffusion.num_timesteps, (x.shape[0],), device=x.device, generator=g)
        noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=g)
        for name, net in self.eval_nets(stage):
            loss = self.diffusion.training_losses(net, x, labels, t=t, noise=noise)["loss"]
            self.eval_loss[name].update(loss.detach().mean(), weight=labels.numel())

    def _eval_epoch_end(self, stage: str) -> None:
        for name, _ in self.eval_nets(stage):
            metric = self.eval_loss[name]
            self.log(f"{name}/loss", metric.compute(), prog_bar=name == stage, sync_dist=False)
            metric.reset()

    # -- sampling: the contract of the generative callbacks (gspn_lightning.tasks.callbacks) ----------

    @property
    def num_classes(self) -> int:
        return self.hparams.num_classes

    def sampling_net(self):
        """The EMA where the task keeps one, unless ``eval_weights`` is ``raw`` (:meth:`predict_net`)."""
        return self.predict_net()

    def vae(self):
        if self.hparams.vae and self._vae is None:
            from gspn_lightning.diffusion.vae import load_vae

            # not a submodule (object.__setattr__): never in the task's state dict or checkpoints (the
            # VAE comes from its folder), which a callback sampling before a checkpoint save would
            # otherwise put there, and a resume would then refuse
            object.__setattr__(self, "_vae", load_vae(self.hparams.vae, self.device))
        return self._vae

    @torch.no_grad()
    def sample_images(
        self, labels: torch.Tensor, seeds: list[int], *, sampler: str = "ddim", steps: int = 50,
        guidance_scale: float = 1.0, guidance_channels: int | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """uint8 images ``(B, C', H', W')`` of the EMA model for ``labels``, sample i seeded by
        ``seeds[i]``, sampled with :func:`gspn_lightning.diffusion.sample` and decoded by the VAE (if
        any; else the first three channels of the pixels)."""
        from gspn_lightning.diffusion.vae import decode, to_uint8

        hp = self.hparams
        noise = initial_noise((hp.in_chans, hp.image_size, hp.image_size), seeds, self.device)
        net = self.sampling_net()
        was_training = net.training
        net.eval()
        x = sample(
            net, labels, noise, sampler=sampler, steps=steps, guidance_scale=guidance_scale,
            guidance_channels=guidance_channels, seeds=seeds, learn_sigma=hp.learn_sigma,
            clip_sample=hp.get("clip_sample"), prediction=hp.get("prediction", "eps"),
        )  # fmt: skip
        net.train(was_training)
        vae = self.vae()
        return to_uint8(decode(vae, x) if vae is not None else x[:, :3])

    def sampling_protocol(self) -> dict:
        """What the samples depend on besides the sampler settings (printed with every FID)."""
        hp = self.hparams
        return {"weights": self.predict_weights(), "clip_sample": hp.get("clip_sample"), "vae": hp.vae}
