"""SD-XL distillation: the UNet with GSPN in place of self-attention (the student) learns from the
original UNet (the teacher) on image + caption data.

    gspn fit --config configs/sdxl/distill.yaml                     # a real SD-XL folder
    gspn fit --config configs/sdxl/tiny.yaml                        # the tiny pipeline, CPU, seconds
    gspn distill-export CKPT OUT_DIR                                # GSPN weights of a checkpoint
    gspn write-captions SRC OUT --embed-with SDXL_FOLDER            # caption shards + embeddings

- **Models.** Everything comes from the local SD-XL folder ``pretrained`` (diffusers layout; a missing or
  incomplete folder gets :func:`~gspn_lightning.models.sdxl_pipeline.check_sdxl_folder`'s one error
  listing what is missing; nothing downloads). The teacher is the folder's UNet, frozen; the student is a
  deep copy with every ``attn1`` swapped by :func:`~gspn_lightning.models.sdxl.swap_self_attention`
  (``mixer``; local propagation with ``chunk_size`` 4 unless it says otherwise, ``chunk_size: null``
  global). ``trainable: gspn`` (default) trains only the GSPN modules (each one whole: its
  copied Q/K/V/out and the new gates); ``all`` trains the whole student. The VAE and the two text
  encoders are frozen; with prompt embeddings stored in the shards the text encoders are not needed
  (``text_encoders: false``).
- **Noise.** DDPM training noise with the folder's noise schedule (``DDPMScheduler`` from the
  ``scheduler/`` config, as diffusers' SD-XL training does): ``t`` uniform in ``[0, T)``,
  ``add_noise``, target ``eps`` (or the velocity for a ``v_prediction`` folder). Latents are the VAE's
  posterior samples (its mean in evaluation) times ``scaling_factor``.
- **Loss** = ``noise_weight MSE(student eps, target) + alpha MSE(student eps, teacher eps) + beta mean_l MSE(GSPN_l
  output, teacher attn1_l output)``, the layer outputs captured by forward hooks on both UNets (each
  UNet on its own hidden states, as LinFusion and the GSPN release distil); alpha = beta = 0.5,
  noise_weight = 1. Logged
  as ``train/loss``, ``train/noise``, ``train/distill``, ``train/layer``.
- **Conditioning.** SD-XL micro-conditioning from the batch's recorded original size and crop top-left,
  the target size being the batch's own. Caption dropout (``caption_dropout``) for classifier-free
  guidance replaces a row's conditioning by the unconditional one: zeros (``uncond: zeros``, SD-XL's
  ``force_zeros_for_empty_prompt`` convention that its pipeline uses at sampling) or the empty prompt's
  embeddings (``uncond: empty``, needs the text encoders).
- **Determinism and resume.** Noise, timesteps, the VAE sample and the dropout are drawn from a
  generator seeded by ``(seed, global step, micro-batch, rank)``
  (:meth:`~gspn_lightning.tasks.base.TrainingTask.step_generator`), and the data stream resumes exactly,
  so a run resumed with ``--ckpt_path last`` takes the same steps as an uninterrupted one.
- **Memory.** With ``trainable: gspn`` the student's frozen parameters *are* the teacher's tensors (one
  copy, when ``frozen_dtype`` is float32, the student's own dtype): SD-XL's teacher and student then
  cost 2.6B + 0.42B parameters, not 2 x 2.6B. (With ``frozen_dtype: bfloat16`` the teacher is a second,
  half-size copy instead.)
- **Checkpoints** hold only what training changes: the student's trainable parameters, their EMA, the
  optimiser/schedule/loop state. The teacher, the VAE, the text encoders and the frozen part of the
  student are *not* saved (they come from ``pretrained``): an SD-XL run with ``trainable: gspn`` saves
  about 0.4B parameters + EMA + AdamW moments instead of 2 x 2.6B. Loading checks that every trainable
  tensor is in the file (a checkpoint of other ``mixer`` options or ``trainable`` is refused by name).
  A checkpoint records which SD-XL folder it was trained on (``pretrained``, with a fingerprint of
  the folder's files: names, sizes, and the bytes at the start and end of each); loading it with a
  folder of other contents (resume, validate, export) stops and names both folders. The same folder
  moved elsewhere is accepted (same fingerprint).
- **Export.** At the end of fit, rank 0 writes ``<export_dir>/gspn.safetensors`` and (with EMA)
  ``gspn_ema.safetensors`` with :func:`~gspn_lightning.models.sdxl.save_gspn_weights`; ``export_dir``
  defaults to ``<trainer.default_root_dir>/gspn``. A fit (or a checkpoint, for ``gspn distill-export``)
  that trained zero optimizer steps (every batch corrupt or skipped) exports nothing: an error says so.
- **Validation**: the same losses on held-out shards (exactly once over ranks), with a fixed draw per
  batch, for the raw and the EMA student (``val/*``, ``val_ema/*``).
- Precision (``bf16-mixed``), the strategy (``ddp``, ``fsdp``) and the number of devices are Trainer
  settings; ``gradient_checkpointing`` turns on the student UNet's own.
"""

from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric

from gspn_lightning.models.sdxl import (
    DEFAULT_CHUNK_SIZE,
    latent_multiple,
    save_gspn_weights,
    swap_self_attention,
)
from gspn_lightning.models.sdxl_pipeline import added_cond_kwargs, encode_prompt, load_sdxl

from .base import DISTILLATION_OPTIM, OptimSettings, TrainingTask, cli_values, upgrade_hparams
from .checkpointing import CheckpointMismatchError, _plain

#: the checkpoint key recording the SD-XL folder a run was trained on (path and fingerprint)
PRETRAINED_KEY = "sdxl_pretrained"


def folder_fingerprint(folder: str | os.PathLike, edge: int = 1 << 16) -> str:
    """A digest of an SD-XL folder that tells folders of other weights apart without reading them
    whole: every file's relative path and size, and its first and last ``edge`` bytes (a weights
    file's tail is tensor data; a small file is read whole). Hidden files are left out."""
    import hashlib

    root = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        size = path.stat().st_size
        digest.update(f"{rel.as_posix()}\0{size}\0".encode())
        with open(path, "rb") as f:
            digest.update(f.read(edge))
            if size > edge:
                f.seek(max(edge, size - edge))
                digest.update(f.read(edge))
    return digest.hexdigest()


TRAINABLE = ("gspn", "all")
UNCOND = ("zeros", "empty")
TERMS = ("loss", "noise", "distill", "layer")
#: frozen submodules loaded from the SD-XL folder: never saved in checkpoints
FROZEN_MODULES = ("teacher", "vae", "text_encoder", "text_encoder_2")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@contextlib.contextmanager
def capture_outputs(model: torch.nn.Module, names: list[str]):
    """Within the block, ``outs[name]`` is the output of ``model``'s submodule ``name`` in the last forward."""
    outs: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(module, args, output):
            outs[name] = output

        return fn

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        yield outs
    finally:
        for h in handles:
            h.remove()


def _cast(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``module`` in ``dtype`` (floating-point tensors), left alone when it already is."""
    if any(p.is_floating_point() and p.dtype != dtype for p in module.parameters()):
        module.to(dtype)
    return module


def _share_frozen(student: torch.nn.Module, teacher: torch.nn.Module) -> int:
    """Make every frozen parameter of ``student`` the teacher's own tensor of the same name (and dtype):
    with ``trainable: gspn`` the student's non-GSPN weights equal the teacher's, so one copy is enough
    (2.2B parameters of SD-XL's UNet: 8.6 GB in float32). Returns how many parameters are shared."""
    shared = 0
    teacher_params = dict(teacher.named_parameters())
    for name, p in list(student.named_parameters()):
        t = teacher_params.get(name)
        if p.requires_grad or t is None or t.shape != p.shape or t.dtype != p.dtype or not torch.equal(t, p):
            continue
        owner, _, leaf = name.rpartition(".")
        student.get_submodule(owner)._parameters[leaf] = t
        shared += p.numel()
    return shared


def saved_mixer_upgrade(hparams: dict, renamed: dict | None = None) -> dict | None:
    """The ``mixer`` a checkpoint's ``hparams`` meant, when it does not say it: a checkpoint written before
    the swap's default became local (``chunk_size`` 4) records no ``chunk_size`` and was trained global,
    so its mixer gets ``chunk_size: None``. ``None`` for a checkpoint that records it (every checkpoint
    since: the task writes the resolved value into its hyperparameters)."""
    hparams = {**hparams, **upgrade_hparams(hparams, renamed)}
    mixer = _plain(hparams.get("mixer"))
    if isinstance(mixer, dict) and "chunk_size" in mixer:
        return None
    return {**(mixer or {}), "chunk_size": None}


class DistillationTask(TrainingTask):
    """Distil SD-XL's UNet into its GSPN-swapped copy (see the module docstring).

    Args:
        pretrained: the local SD-XL folder (diffusers layout).
        mixer: the options of every swapped layer, the GSPN models' mixer group
            (:class:`~gspn_lightning.nn.MixerOptions`: ``d_state``, ``directions``, ``backend``,
            ``fused``) plus ``chunk_size`` (an int, by default 4: local, as the GSPN release's SD-XL;
            ``null`` global; or ``{name pattern: chunk}``) and ``u_bias_init``; see
            :func:`~gspn_lightning.models.sdxl.swap_self_attention`. The resolved ``chunk_size`` is
            recorded in the hyperparameters (a checkpoint that records none was trained global, and
            loads so).
        trainable: ``"gspn"`` (only the GSPN modules) or ``"all"`` (the whole student).
        alpha, beta: weights of the output distillation and the per-layer attention terms.
        noise_weight: weight of the denoising term (1 in the recipe; 0 distils only, e.g. from a
            teacher whose own denoising is not worth learning, like the tiny random one of the tests).
        optim: AdamW, its schedule and the EMA (:class:`~gspn_lightning.tasks.base.OptimSettings`); by
            default :data:`~gspn_lightning.tasks.base.DISTILLATION_OPTIM`: ``lr`` 1e-4, no weight decay,
            a constant lr after ``warmup_steps``, ``ema_decay`` 0.9999 over the trainable parameters
            only (``ema_scope: trainable``, the only scope this task takes: the frozen parts are never
            saved, so an EMA of them could not be restored).
        caption_dropout: probability of training a row unconditionally (classifier-free guidance).
        uncond: the unconditional embedding: ``"zeros"`` or ``"empty"`` (the empty prompt's).
        text_encoders: load the frozen text encoders to encode captions; ``False`` when the shards
            hold the prompt embeddings (a batch without them is then an error).
        frozen_dtype: dtype of the teacher, VAE and text encoders (``"bfloat16"`` halves their memory).
        gradient_checkpointing: the student UNet's gradient checkpointing (the other tasks'
            ``activation_checkpointing``, through the same switch: diffusers' per-block checkpointing).
        export_dir: where the GSPN weights go at the end of fit (``None``: ``<default_root_dir>/gspn``).
        seed: seed of the noise/timestep/dropout draws (``None``: the run's ``seed_everything``, else 0).
        eval_weights: which weights evaluate: ``null`` (validation/test evaluate the raw weights and
            their EMA, predict and sampling use the EMA), ``raw`` or ``ema`` (only those, everywhere);
            see :class:`~gspn_lightning.tasks.base.TrainingTask`.
        nonfinite_loss / max_consecutive_skips: see :class:`~gspn_lightning.tasks.base.TrainingTask`.
        init_from: start the student's trained weights from a file: the adapter ``gspn distill-export``
            (or the end of a fit) wrote (``gspn.safetensors``, ``gspn_ema.safetensors``), or a ``.ckpt``
            of another distillation run (its EMA, or ``init_weights: raw``); only the weights, the
            optimiser, schedule and step start fresh. The frozen weights always come from
            ``pretrained``. ``init_strict`` / ``init_weights``: as in the other tasks (see
            :mod:`gspn_lightning.tasks.weights`).
        compile: ``torch.compile`` the student (in place: checkpoints are the same as without).
    """

    RENAMED_ARGUMENTS = {"gspn_options": "mixer"}

    def __init__(
        self,
        pretrained: str,
        mixer: dict | None = None,
        trainable: str = "gspn",
        alpha: float = 0.5,
        beta: float = 0.5,
        noise_weight: float = 1.0,
        optim: OptimSettings = DISTILLATION_OPTIM,
        caption_dropout: float = 0.1,
        uncond: str = "zeros",
        text_encoders: bool = True,
        frozen_dtype: str = "float32",
        gradient_checkpointing: bool = False,
        export_dir: str | None = None,
        seed: int | None = None,
        eval_weights: str | None = None,
        nonfinite_loss: str = "error",
        max_consecutive_skips: int = 10,
        init_from: str | None = None,
        init_strict: bool = True,
        init_weights: str | None = None,
        compile: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        # typed, as saved with the checkpoint, with the chunk size the swap uses spelled out
        mixer = {"chunk_size": DEFAULT_CHUNK_SIZE, **(cli_values(mixer) if mixer is not None else {})}
        self.hparams.mixer = mixer
        optim = OptimSettings.build(optim, DISTILLATION_OPTIM)
        if optim.ema_scope != "trainable":
            raise ValueError("model.init_args.optim.ema_scope must be trainable for DistillationTask")
        self.configure_fault_policy(nonfinite_loss, max_consecutive_skips)
        if trainable not in TRAINABLE:
            raise ValueError(f"model.init_args.trainable must be one of {TRAINABLE}, got {trainable!r}")
        if uncond not in UNCOND:
            raise ValueError(f"model.init_args.uncond must be one of {UNCOND}, got {uncond!r}")
        if uncond == "empty" and not text_encoders:
            raise ValueError("model.init_args.uncond: empty needs the text encoders (text_encoders: true)")
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"model.init_args.caption_dropout must be in [0, 1], got {caption_dropout}")
        if min(alpha, beta, noise_weight) < 0 or max(alpha, beta, noise_weight) == 0:
            raise ValueError(
                "model.init_args.alpha, beta and noise_weight must be >= 0 and not all 0, got "
                f"{alpha}, {beta}, {noise_weight}"
            )
        if frozen_dtype not in _DTYPES:
            raise ValueError(
                f"model.init_args.frozen_dtype must be one of {list(_DTYPES)}, got {frozen_dtype!r}"
            )
        text_parts = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2") if text_encoders else ()
        parts = load_sdxl(pretrained, parts=("unet", "vae", "scheduler") + text_parts)
        self.force_zeros_for_empty_prompt = parts.force_zeros_for_empty_prompt

        teacher = parts.unet
        student = _cast(copy.deepcopy(teacher), torch.float32)  # master weights in float32
        self.gspn_names = swap_self_attention(student, **mixer)
        for p in student.parameters():
            p.requires_grad_(trainable == "all")
        if trainable == "gspn":
            for name in self.gspn_names:
                student.get_submodule(name).requires_grad_(True)
        self.model = student.train()
        self.configure_switches(compile, activation_checkpointing=gradient_checkpointing)
        self.init_weights_from(init_from, init_strict, init_weights)
        dtype = _DTYPES[frozen_dtype]
        self.teacher = _cast(teacher, dtype).requires_grad_(False).eval()
        self.shared_with_teacher = _share_frozen(student, self.teacher)
        self.vae = _cast(parts.vae, dtype).requires_grad_(False).eval()
        if text_encoders:
            self.text_encoder = _cast(parts.text_encoder, dtype).requires_grad_(False).eval()
            self.text_encoder_2 = _cast(parts.text_encoder_2, dtype).requires_grad_(False).eval()
            self.tokenizers = parts.tokenizers
        else:
            self.text_encoder = self.text_encoder_2 = None
            self.tokenizers = None

        from diffusers import DDPMScheduler

        self.noise_scheduler = DDPMScheduler.from_config(parts.scheduler.config)
        if self.noise_scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"{pretrained}/scheduler: prediction_type {self.noise_scheduler.config.prediction_type!r} "
                "is not supported (epsilon or v_prediction)"
            )
        self.init_optim(optim, DISTILLATION_OPTIM)
        self.init_eval_weights(eval_weights)
        self.eval_terms = torch.nn.ModuleDict(
            {f"{s}_{t}": MeanMetric() for s in ("val", "val_ema", "test", "test_ema") for t in TERMS}
        )
        self.init_sample_counts()
        self.strict_loading = False  # the frozen parts are not in checkpoints: checked in on_load_checkpoint
        self._uncond_cache: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- modes, seeds --------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        # the image size is checked against the UNet and VAE before any data is read
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        check = getattr(dm, "check_resolution", None)
        if callable(check):
            multiple = latent_multiple(self.teacher, self.vae)
            check(
                multiple,
                f"the VAE of {self.hparams.pretrained} and its UNet's down-sampling take multiples of {multiple} pixels",
            )

    def train(self, mode: bool = True):
        super().train(mode)
        for name in FROZEN_MODULES:  # the frozen parts always evaluate (no dropout)
            module = getattr(self, name, None)
            if module is not None:
                module.eval()
        return self

    # -- conditioning ----------------------------------------------------------------------------------

    @torch.no_grad()
    def _encode_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.text_encoder is None:
            raise ValueError(
                "the batch has no prompt_embeds/pooled_prompt_embeds and model.init_args.text_encoders is "
                "false: write the shards with `gspn write-captions ... --embed-with SDXL_FOLDER`, or set text_encoders: true"
            )
        embeds, pooled = encode_prompt(self.tokenizers, [self.text_encoder, self.text_encoder_2], captions)
        return embeds.float(), pooled.float()

    def text_conditioning(self, batch: dict, drop: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(prompt_embeds, pooled)`` of the batch, rows where ``drop`` is set unconditional."""
        if "prompt_embeds" in batch:
            embeds, pooled = batch["prompt_embeds"].float(), batch["pooled_prompt_embeds"].float()
        else:
            embeds, pooled = self._encode_text(list(batch["caption"]))
        if not bool(drop.any()):
            return embeds, pooled
        if self.hparams.uncond == "zeros":
            u_embeds, u_pooled = torch.zeros_like(embeds[:1]), torch.zeros_like(pooled[:1])
        else:
            if self._uncond_cache is None:
                self._uncond_cache = self._encode_text([""])
            u_embeds, u_pooled = (t.to(embeds.device) for t in self._uncond_cache)
        embeds = torch.where(drop.view(-1, 1, 1), u_embeds, embeds)
        pooled = torch.where(drop.view(-1, 1), u_pooled, pooled)
        return embeds, pooled

    @torch.no_grad()
    def encode_latents(self, pixels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """VAE latents times ``scaling_factor``: a posterior sample with ``generator``, else the mean."""
        dist = self.vae.encode(pixels.to(next(self.vae.parameters()).dtype)).latent_dist
        latents = dist.sample(generator=generator) if generator is not None else dist.mode()
        return latents.float() * float(self.vae.config.scaling_factor)

    # -- the loss ----------------------------------------------------------------------------------------

    def draw(self, batch: dict, generator: torch.Generator, train: bool) -> dict[str, torch.Tensor]:
        """The random part of a step, from ``generator`` in this order: the latents (a VAE posterior
        sample in training, the mean in evaluation), the caption-dropout mask (never in evaluation), the
        timesteps and the noise."""
        pixels = batch["pixels"]
        B, device = pixels.shape[0], pixels.device
        latents = self.encode_latents(pixels, generator if train else None)
        p = self.hparams.caption_dropout if train else 0.0
        drop = torch.rand(B, device=device, generator=generator) < p
        T = self.noise_scheduler.config.num_train_timesteps
        t = torch.randint(0, T, (B,), device=device, generator=generator)
        noise = torch.randn(latents.shape, device=device, generator=generator)
        return {"latents": latents, "drop": drop, "t": t, "noise": noise}

    def losses(
        self, student: torch.nn.Module, batch: dict, generator: torch.Generator | None = None,
        train: bool = False, draws: dict | None = None,
    ) -> dict[str, torch.Tensor]:  # fmt: skip
        """The loss terms (``loss``, ``noise``, ``distill``, ``layer``: scalars) of ``student`` on ``batch``,
        with ``draws`` (:meth:`draw`'s, made from ``generator`` when not given)."""
        d = draws if draws is not None else self.draw(batch, generator, train)
        latents, t, noise = d["latents"], d["t"], d["noise"]
        embeds, pooled = self.text_conditioning(batch, d["drop"])
        size, crop = batch["original_size"].cpu(), batch["crop_top_left"].cpu()
        cond = added_cond_kwargs(pooled, size, crop, tuple(batch["pixels"].shape[-2:]))
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        if self.noise_scheduler.config.prediction_type == "epsilon":
            target = noise
        else:
            target = self.noise_scheduler.get_velocity(latents, noise, t)

        hp = self.hparams
        need_teacher = hp.alpha > 0 or hp.beta > 0
        names = self.gspn_names if hp.beta > 0 else []
        if need_teacher:
            dtype = next(self.teacher.parameters()).dtype
            with torch.no_grad(), capture_outputs(self.teacher, names) as t_feats:
                eps_t = self.teacher(
                    noisy.to(dtype), t, encoder_hidden_states=embeds.to(dtype),
                    added_cond_kwargs={k: v.to(dtype) for k, v in cond.items()},
                ).sample  # fmt: skip
        with capture_outputs(student, names) as s_feats:
            eps_s = student(noisy, t, encoder_hidden_states=embeds, added_cond_kwargs=cond).sample
        out = {"noise": F.mse_loss(eps_s.float(), target.float())}
        zero = out["noise"].new_zeros(())
        out["distill"] = F.mse_loss(eps_s.float(), eps_t.float()) if hp.alpha > 0 else zero
        if names:
            layer = [F.mse_loss(s_feats[n].float(), t_feats[n].float()) for n in names]
            out["layer"] = torch.stack(layer).mean()
        else:
            out["layer"] = zero
        out["loss"] = hp.noise_weight * out["noise"] + hp.alpha * out["distill"] + hp.beta * out["layer"]
        return out

    # -- steps ---------------------------------------------------------------------------------------------

    def _good_rows(self, batch: dict, stage: str) -> dict | None:
        ok = batch["label"] >= 0
        n_bad = self.count_corrupt(ok, stage)
        if not n_bad:
            return batch
        if not bool(ok.any()):
            return None
        keep = ok.nonzero().flatten().tolist()
        return {k: ([v[i] for i in keep] if isinstance(v, list) else v[ok]) for k, v in batch.items()}

    def training_step(self, batch, batch_idx):
        batch = self._good_rows(batch, "train")
        if batch is None:  # a wholly corrupt batch: a zero loss keeps DDP ranks in step
            return sum(p.sum() for p in self.model.parameters() if p.requires_grad) * 0.0
        g = self.step_generator(batch_idx)  # (seed, "train", global step, micro-batch, rank)
        terms = self.losses(self.model, batch, g, train=True)
        loss = terms["loss"]
        if self.check_loss(loss, batch_idx) is None:
            return None
        for name in TERMS:
            self.log(f"train/{name}", terms[name].detach(), prog_bar=name == "loss", on_step=True,
                     on_epoch=True, sync_dist=True, batch_size=len(batch["label"]))  # fmt: skip
        self.log_lr()
        return loss

    @torch.no_grad()
    def _eval_step(self, batch, batch_idx, stage: str):
        batch = self._good_rows(batch, stage)
        if batch is None:
            return
        n = batch["pixels"].shape[0]
        for name, net in self.eval_nets(stage):
            # the same draw for every evaluation of this batch: comparable from one epoch to the next
            g = self.step_generator(batch_idx)  # (seed, "eval", batch, rank)
            terms = self.losses(net, batch, g, train=False)
            for term in TERMS:
                self.eval_terms[f"{name}_{term}"].update(terms[term].detach(), weight=n)

    def _eval_epoch_end(self, stage: str) -> None:
        for name, _ in self.eval_nets(stage):
            for term in TERMS:
                metric = self.eval_terms[f"{name}_{term}"]
                self.log(f"{name}/{term}", metric.compute(), prog_bar=name == stage and term == "loss",
                         sync_dist=False)  # fmt: skip
                metric.reset()

    # -- looking at it: the teacher and the student on the same prompts and noise -------------------------

    def grid_size(self) -> tuple[int, int]:
        """``(height, width)`` of the teacher | student images: the data's resolution, else the UNet's."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        resolution = getattr(dm, "resolution", None)
        if resolution is not None:
            return tuple(resolution)
        side = int(self.teacher.config.sample_size) * 2 ** (len(self.vae.config.block_out_channels) - 1)
        return side, side

    @torch.no_grad()
    def teacher_student_images(
        self, prompts: list[str], *, steps: int = 20, guidance_scale: float = 5.0,
        size: tuple[int, int] | None = None, seed: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """uint8 ``(P, 3, H, W)`` images of the teacher and of the student (its EMA where kept, as
        :meth:`predict_net` says) for ``prompts``, drawn by SD-XL's pipeline with a DDIM schedule of
        ``steps``; image ``k`` of both from the noise of ``seed + k``, so the two differ only by the UNet."""
        if self.text_encoder is None:
            raise ValueError(
                "the teacher | student grid encodes its prompts: it needs model.init_args.text_encoders: true"
            )
        from diffusers import DDIMScheduler, StableDiffusionXLPipeline

        height, width = size or self.grid_size()
        frozen = _DTYPES[self.hparams.frozen_dtype]
        out = []
        for unet in (self.teacher, self.predict_net()):
            pipe = StableDiffusionXLPipeline(
                vae=self.vae, text_encoder=self.text_encoder, text_encoder_2=self.text_encoder_2,
                tokenizer=self.tokenizers[0], tokenizer_2=self.tokenizers[1], unet=unet,
                scheduler=DDIMScheduler.from_config(self.noise_scheduler.config),
                force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt, add_watermarker=False,
            )  # fmt: skip
            pipe.set_progress_bar_config(disable=True)
            generators = [torch.Generator("cpu").manual_seed(seed + k) for k in range(len(prompts))]
            was_training = unet.training
            unet.eval()
            # a float32 student beside bfloat16 frozen parts (frozen_dtype): one dtype inside the pipeline
            with torch.autocast(self.device.type, dtype=frozen, enabled=frozen != torch.float32):
                images = pipe(
                    prompt=list(prompts), height=height, width=width, num_inference_steps=steps,
                    guidance_scale=guidance_scale, generator=generators, output_type="pt",
                ).images  # fmt: skip
            unet.train(was_training)
            out.append((images.float() * 255).round().clamp(0, 255).to(torch.uint8).cpu())
        return out[0], out[1]

    # -- checkpoints: only what training changes -----------------------------------------------------

    def unsaved_keys(self) -> set[str]:
        """State-dict keys left out of checkpoints: the frozen modules and the student's frozen part
        (also where the EMA shares it)."""
        keys = {k for k in self.state_dict() if k.split(".", 1)[0] in FROZEN_MODULES}
        averaged = self.ema._averaged if self.ema is not None else []
        for i, (name, p) in enumerate(self.model.named_parameters()):
            if not p.requires_grad:
                keys.add(f"model.{name}")
                if self.ema is not None and not averaged[i]:
                    keys.add(f"ema.module.{name}")
        return keys

    def init_targets(self) -> dict[str, torch.Tensor]:
        """``init_from`` initialises what a checkpoint holds of the student: its trainable weights (the
        GSPN modules with ``trainable: gspn``); the frozen ones come from ``pretrained``."""
        unsaved = self.unsaved_keys()
        return {k: t for k, t in self.model.state_dict().items() if f"model.{k}" not in unsaved}

    #: the arguments that define the trained network (a checkpoint of others is refused by name)
    MODEL_ARGUMENTS = ("mixer", "trainable")

    def pretrained_fingerprint(self) -> str:
        if getattr(self, "_pretrained_fingerprint", None) is None:
            self._pretrained_fingerprint = folder_fingerprint(self.hparams.pretrained)
        return self._pretrained_fingerprint

    def check_pretrained(self, checkpoint: dict) -> None:
        """Stop when ``checkpoint`` was trained on another SD-XL folder than this task's, naming both
        (a checkpoint from before the fingerprint: a warning when the paths differ)."""
        record = checkpoint.get(PRETRAINED_KEY)
        mine = str(self.hparams.pretrained)
        if record is None:
            saved = (checkpoint.get("hyper_parameters") or {}).get("pretrained")
            if saved and os.path.realpath(saved) != os.path.realpath(mine):
                from lightning.pytorch.utilities import rank_zero_warn

                rank_zero_warn(
                    f"the checkpoint was trained on the SD-XL folder {saved} and does not record its "
                    f"contents; loading it with {mine} (check that it holds the same weights)"
                )
            return
        if record["fingerprint"] != self.pretrained_fingerprint():
            raise CheckpointMismatchError(
                f"the checkpoint was trained on the SD-XL folder {record['path']}, but this run's "
                f"pretrained folder {mine} holds other files or weights (fingerprint "
                f"{self.pretrained_fingerprint()[:12]} != {record['fingerprint'][:12]}): its GSPN weights "
                "belong to that base model. Set model.init_args.pretrained to the checkpoint's folder"
            )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[PRETRAINED_KEY] = {
            "path": os.path.realpath(self.hparams.pretrained), "fingerprint": self.pretrained_fingerprint(),
        }  # fmt: skip
        drop = self.unsaved_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in drop}
        checkpoint["distill_unsaved"] = (
            "teacher, vae, text encoders and the frozen student parameters: loaded from hyper_parameters.pretrained"
        )

    @classmethod
    def saved_argument_upgrades(cls, hparams, state_keys, current=None) -> dict:
        """A checkpoint from before the local default (no ``chunk_size`` recorded) builds, and is
        compared as, the global layers it was trained with (see :func:`saved_mixer_upgrade`)."""
        mixer = saved_mixer_upgrade(hparams, cls.RENAMED_ARGUMENTS)
        return {} if mixer is None else {"mixer": mixer}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # the task, the mixer/trainable arguments and the optimiser settings it was trained with
        super().on_load_checkpoint(checkpoint)
        self.check_pretrained(checkpoint)
        expected = set(self.state_dict()) - self.unsaved_keys()
        saved = set(checkpoint["state_dict"])
        missing = sorted(expected - saved)
        unexpected = sorted(saved - set(self.state_dict()))
        if missing or unexpected:
            raise ValueError(
                "the checkpoint does not match this DistillationTask (other mixer options or trainable?): "
                f"missing {missing[:5]} ({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})"
            )

    # -- export ----------------------------------------------------------------------------------------

    def export_gspn(self, out_dir: str | Path) -> list[Path]:
        """Write ``gspn.safetensors`` (raw) and ``gspn_ema.safetensors`` (EMA, if any) into ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        written = [out / "gspn.safetensors"]
        save_gspn_weights(self.model, written[0])
        if self.ema is not None:
            written.append(out / "gspn_ema.safetensors")
            save_gspn_weights(self.ema.module, written[1])
        return written

    def on_fit_end(self):
        self.require_trained("to export the GSPN weights (gspn.safetensors)")  # on every rank
        if self.global_rank != 0:
            return
        out = self.hparams.export_dir or os.path.join(self.trainer.default_root_dir, "gspn")
        for path in self.export_gspn(out):
            print(f"exported GSPN weights: {path}")
