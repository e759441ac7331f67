"""Callbacks of the tasks: the prediction writer of the command line, the sample grids and
in-training FID of any generative task, and the SD-XL distillation's teacher | student grid (listed
under ``trainer.callbacks`` in a config).

The generative callbacks (:class:`SampleGrid`, :class:`InTrainingFID`) work with any LightningModule
that keeps this small contract (:class:`~gspn_lightning.tasks.DiffusionTask` does):

- ``num_classes``: an int attribute, the conditioning classes (labels ``0 .. num_classes - 1``);
- ``sample_images(labels, seeds, *, sampler, steps, guidance_scale, guidance_channels)``: uint8 images
  ``(B, C, H, W)`` (``C`` 1 or 3) for the int64 ``labels`` ``(B,)`` on the module's device, image ``i``
  a function of ``seeds[i]`` only (not of the batch it is drawn in), drawn with the module's weights
  for sampling (an EMA if it keeps one) and left in the mode it found them in;
- ``sampling_protocol()``: a dict of what else the images depend on (weights, decoder, clipping ...),
  printed with every FID since FIDs of different protocols do not compare.

The callbacks draw their images on rank 0 only, with fixed seeds, so a grid or an FID of one step
compares with those of other steps and of a resumed run.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from lightning.pytorch.callbacks import BasePredictionWriter, Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn


class PredictionWriter(BasePredictionWriter):
    """Saves what ``predict`` returns, one file per rank: ``<output_dir>/predictions-rank<r>.pt``.

    Each file holds the per-batch dicts of ``predict_step`` concatenated along the batch axis
    (for classification: ``pred``, ``topk``, ``topk_prob`` and the ``label`` read with the sample).
    """

    def __init__(self, output_dir: str = "predictions"):
        super().__init__(write_interval="epoch")
        self.output_dir = output_dir

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices):
        os.makedirs(self.output_dir, exist_ok=True)
        batches = predictions[0] if predictions and isinstance(predictions[0], list) else predictions
        merged = {}
        if batches:
            merged = {k: torch.cat([b[k].cpu() for b in batches]) for k in batches[0]}
        path = os.path.join(self.output_dir, f"predictions-rank{trainer.global_rank}.pt")
        torch.save(merged, path)


#: the seed of FID sample ``i`` is ``FID_SEED_BASE + i`` (the grids' seeds are ``0 .. k * n - 1``)
FID_SEED_BASE = 1_000_000


class _Sampling:
    """How a generative callback has the task sample (its own settings, the task's weights)."""

    def __init__(self, sampler: str, steps: int, guidance_scale: float, guidance_channels: int | None):
        # every setting is checked here, when the callback is built from the config (at start-up),
        # not when the first sample is drawn (for SampleGrid: at the end of the whole fit)
        from gspn_lightning.diffusion import SAMPLERS

        name = type(self).__name__
        if sampler not in SAMPLERS:
            raise ValueError(f"{name}: sampler must be one of {SAMPLERS}, got {sampler!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"{name}: steps must be an int >= 1, got {steps!r}")
        if not guidance_scale >= 1.0:
            raise ValueError(f"{name}: guidance_scale must be >= 1 (1 = no guidance), got {guidance_scale}")
        if guidance_channels is not None and (isinstance(guidance_channels, bool) or guidance_channels < 1):
            raise ValueError(f"{name}: guidance_channels must be >= 1 or null, got {guidance_channels!r}")
        self.sampling = {
            "sampler": sampler, "steps": int(steps), "guidance_scale": float(guidance_scale),
            "guidance_channels": guidance_channels,
        }  # fmt: skip

    @staticmethod
    def _check_task(pl_module) -> None:
        contract = ("num_classes", "sample_images", "sampling_protocol")
        missing = [n for n in contract if not hasattr(pl_module, n)]
        if missing:
            raise TypeError(
                f"{type(pl_module).__name__} cannot be sampled by a generative callback: it has no "
                f"{', '.join(missing)} (see gspn_lightning.tasks.callbacks)"
            )

    def _check_settings(self, pl_module) -> None:
        """What depends on the task too, checked when the fit starts (after the task's own set-up,
        before any data is read or step taken): the sampler with the task's ``clip_sample``
        (DPM-Solver has no clipping) and the VAE folder that decodes the samples."""
        from gspn_lightning.diffusion import make_sampler

        name, protocol = type(self).__name__, pl_module.sampling_protocol()
        clip = protocol.get("clip_sample")
        try:
            make_sampler(self.sampling["sampler"], clip_sample=clip)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc} (the task's model.init_args.clip_sample is {clip})") from None
        vae = protocol.get("vae")
        if vae and not os.path.isdir(os.path.expanduser(str(vae))):
            raise FileNotFoundError(
                f"{name}: the VAE folder {vae} that decodes the samples does not exist "
                "(model.init_args.vae, or the VAE the latent shards' index records)"
            )

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._check_task(pl_module)

    def on_fit_start(self, trainer, pl_module) -> None:
        self._check_settings(pl_module)


class SampleGrid(_Sampling, Callback):
    """A grid of samples every ``every_n_steps`` optimizer steps (and at the end of fit), written on
    rank 0 as ``<trainer.default_root_dir>/samples/step-NNNNNNN.png`` and logged as the image
    ``samples`` to TensorBoard (the default logger).

    Row ``k`` holds ``per_class`` samples of class ``k``, for the first ``classes`` classes; sample ``j``
    of the grid is seeded by ``j``, so the grids of different steps show the same noise.  The task keeps
    the contract of this module's docstring.

    Args:
        every_n_steps: the period in optimizer steps (0: only at the end of fit).
        classes / per_class: the grid's rows (the first classes) and columns.
        sampler / steps / guidance_scale / guidance_channels: how the task samples
            (:func:`gspn_lightning.diffusion.sample`).
    """

    def __init__(
        self,
        every_n_steps: int = 0,
        classes: int = 10,
        per_class: int = 8,
        sampler: str = "ddim",
        steps: int = 50,
        guidance_scale: float = 1.0,
        guidance_channels: int | None = None,
    ):
        super().__init__(sampler, steps, guidance_scale, guidance_channels)
        if every_n_steps < 0:
            raise ValueError(f"SampleGrid: every_n_steps must be >= 0, got {every_n_steps}")
        if classes < 1 or per_class < 1:
            raise ValueError(f"SampleGrid: classes and per_class must be >= 1, got {classes}, {per_class}")
        self.every_n_steps, self.classes, self.per_class = every_n_steps, classes, per_class
        self._last: int | None = None

    @torch.no_grad()
    def grid(self, pl_module) -> torch.Tensor:
        """A ``(3, H', W')`` uint8 grid: row ``k`` holds samples of class ``k`` (fixed seeds)."""
        from torchvision.utils import make_grid

        k, n = min(self.classes, pl_module.num_classes), self.per_class
        labels = torch.arange(k, device=pl_module.device).repeat_interleave(n)
        images = pl_module.sample_images(labels, list(range(k * n)), **self.sampling)
        return make_grid(images.cpu(), nrow=n, padding=2, pad_value=255)

    def write(self, trainer, pl_module) -> Path | None:
        """Write (rank 0) and log the grid of the current step; its path (``None`` on other ranks)."""
        self._last = trainer.global_step
        if trainer.global_rank != 0:
            return None
        from torchvision.io import write_png

        grid = self.grid(pl_module)
        root = Path(trainer.default_root_dir) / "samples"
        root.mkdir(parents=True, exist_ok=True)
        path = root / f"step-{trainer.global_step:07d}.png"
        write_png(grid, str(path))
        log_image(pl_module, "samples", grid, trainer.global_step)
        return path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step, every = trainer.global_step, self.every_n_steps
        if every and step > 0 and step % every == 0 and self._last != step:
            self.write(trainer, pl_module)

    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.global_step > 0 and self._last != trainer.global_step:
            self.write(trainer, pl_module)


def log_image(pl_module, tag: str, image: torch.Tensor, step: int) -> None:
    """Log the uint8 ``(3, H, W)`` ``image`` to every logger of ``pl_module`` that takes images
    (TensorBoard, the default logger)."""
    trainer = pl_module.trainer
    for logger in trainer.loggers if trainer is not None else []:
        experiment = getattr(logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_image"):
            experiment.add_image(tag, image, step)


class TeacherStudentGrid(Callback):
    """The SD-XL distillation at a glance: after each validation (not the sanity check), rank 0 draws
    ``prompts`` with the teacher and with the student (its EMA where kept) from the same noise and
    writes the grid (row ``k``: prompt ``k``, teacher left, student right) as
    ``<trainer.default_root_dir>/samples/teacher_student-step-NNNNNNN.png`` and logs it as the image
    ``teacher_student`` (TensorBoard). For :class:`~gspn_lightning.tasks.DistillationTask` (its
    :meth:`~gspn_lightning.tasks.DistillationTask.teacher_student_images`, which needs the text encoders).

    Args:
        prompts: the fixed prompts, the same at every validation.
        steps / guidance_scale: the DDIM steps and classifier-free guidance of the pipeline.
        size: ``[height, width]`` (or one side) of the images; ``None``: the data's resolution.
        seed: prompt ``k``'s noise is seeded by ``seed + k`` (for the teacher and the student).
    """

    def __init__(
        self,
        prompts: list[str],
        steps: int = 20,
        guidance_scale: float = 5.0,
        size: int | list[int] | None = None,
        seed: int = 0,
    ):
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"TeacherStudentGrid: prompts must be a non-empty list of strings, got {prompts!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"TeacherStudentGrid: steps must be an int >= 1, got {steps!r}")
        if not guidance_scale >= 0:
            raise ValueError(f"TeacherStudentGrid: guidance_scale must be >= 0, got {guidance_scale}")
        if size is not None:
            size = [size, size] if isinstance(size, int) else list(size)
            if len(size) != 2 or min(size) < 1:
                raise ValueError(f"TeacherStudentGrid: size must be an int or [height, width], got {size!r}")
        self.prompts, self.steps, self.guidance_scale = prompts, steps, float(guidance_scale)
        self.size, self.seed = (tuple(size) if size else None), seed

    def setup(self, trainer, pl_module, stage: str) -> None:
        if not hasattr(pl_module, "teacher_student_images"):
            raise TypeError(f"TeacherStudentGrid needs a DistillationTask, not {type(pl_module).__name__}")
        self._enabled = getattr(pl_module, "text_encoder", None) is not None
        if not self._enabled:  # shards with prompt embeddings: a valid run, without this grid
            rank_zero_warn(
                "TeacherStudentGrid draws nothing: it encodes its prompts, and model.init_args.text_encoders "
                "is false (set it true to see the grid)"
            )

    @torch.no_grad()
    def grid(self, pl_module) -> torch.Tensor:
        """A uint8 ``(3, H', W')`` grid: a row per prompt, teacher | student."""
        from torchvision.utils import make_grid

        teacher, student = pl_module.teacher_student_images(
            self.prompts, steps=self.steps, guidance_scale=self.guidance_scale, size=self.size, seed=self.seed
        )
        pairs = torch.stack([teacher, student], dim=1).flatten(0, 1)  # t0, s0, t1, s1, ...
        return make_grid(pairs, nrow=2, padding=2, pad_value=255)

    def write(self, trainer, pl_module) -> Path | None:
        """Write (rank 0) and log the grid of the current step; its path (``None`` on other ranks)."""
        if trainer.global_rank != 0:
            return None
        from torchvision.io import write_png

        grid = self.grid(pl_module)
        root = Path(trainer.default_root_dir) / "samples"
        root.mkdir(parents=True, exist_ok=True)
        path = root / f"teacher_student-step-{trainer.global_step:07d}.png"
        write_png(grid, str(path))
        log_image(pl_module, "teacher_student", grid, trainer.global_step)
        return path

    def on_validation_end(self, trainer, pl_module) -> None:
        # after the epoch-end collectives: the other ranks wait at the next one while rank 0 draws
        if not trainer.sanity_checking and getattr(self, "_enabled", True):
            self.write(trainer, pl_module)


class InTrainingFID(_Sampling, Callback):
    """FID (or any of ``metrics``) of ``num_samples`` samples against ``reference`` every
    ``every_n_steps`` optimizer steps, computed on rank 0 and logged under each metric's name (``fid``,
    ``sfid``, ``precision``, ``recall``, ``inception_score``, ``kid_mean``); the protocol (the task's
    ``sampling_protocol()`` and these settings) is printed with every result, since FIDs from different
    protocols do not compare.

    The samples are class-balanced (sample ``i`` of class ``i % num_classes``) and seeded by index
    (``FID_SEED_BASE + i``), drawn in batches of ``batch_size``; the task keeps the contract of this
    module's docstring.

    Args:
        reference: saved Inception statistics (``gspn stats``) or real
            images (a folder or an ``.npz``), as :func:`gspn_lightning.metrics.compute_metrics` reads.
        every_n_steps: the period in optimizer steps (>= 1).
        num_samples: samples per FID (>= 2).
        sampler / steps / guidance_scale / guidance_channels: how the task samples.
        batch_size: samples drawn at once.
        metrics: which of :data:`gspn_lightning.metrics.METRICS` to compute (default ``["fid"]``); a
            metric the reference cannot give (e.g. precision/recall against statistics saved without
            features) is refused when the callback is built.
    """

    def __init__(
        self,
        reference: str,
        every_n_steps: int,
        num_samples: int = 1000,
        sampler: str = "ddim",
        steps: int = 50,
        guidance_scale: float = 1.0,
        guidance_channels: int | None = None,
        batch_size: int = 100,
        metrics: list[str] | None = None,
    ):
        super().__init__(sampler, steps, guidance_scale, guidance_channels)
        if every_n_steps < 1 or num_samples < 2 or batch_size < 1:
            raise ValueError(
                "InTrainingFID: every_n_steps and batch_size must be >= 1 and num_samples >= 2, got "
                f"{every_n_steps}, {batch_size}, {num_samples}"
            )
        if not reference:
            raise ValueError("InTrainingFID: reference (statistics or real images) is required")
        if not os.path.exists(os.path.expanduser(str(reference))):
            raise FileNotFoundError(f"InTrainingFID: reference {reference} does not exist")
        self.reference, self.every_n_steps = reference, every_n_steps
        self.num_samples, self.batch_size = num_samples, batch_size
        self.metrics = self._check_metrics(reference, metrics)
        self._last: int | None = None

    @staticmethod
    def _check_metrics(reference, metrics: list[str] | None) -> list[str]:
        """The metric names, checked against what :mod:`gspn_lightning.metrics` knows and what a
        statistics reference holds, so that a run does not find out at its first evaluation."""
        from gspn_lightning.metrics.fid import METRICS, as_statistics

        metrics = ["fid"] if metrics is None else [str(m).lower() for m in metrics]
        unknown = sorted(set(metrics) - set(METRICS))
        if not metrics or unknown:
            raise ValueError(f"InTrainingFID: metrics must be a non-empty list from {list(METRICS)}, got {metrics}")
        try:
            stats = as_statistics(os.path.expanduser(str(reference)))
        except Exception:  # noqa: BLE001 - any unreadable file: the first evaluation reports it
            stats = None
        if stats is not None:
            if stats.features is None and stats.images is None:
                needs = sorted({"precision", "recall", "kid"} & set(metrics))
                if needs:
                    raise ValueError(
                        f"InTrainingFID: {needs} need the reference's features, and {reference} holds only "
                        "statistics; save them with `gspn stats --keep-features`"
                    )
            if stats.spatial is None and "sfid" in metrics:
                raise ValueError(
                    f"InTrainingFID: sfid needs spatial statistics (mu_s/sigma_s), which {reference} lacks; "
                    "compute it again with `gspn stats`"
                )
        return [m for m in METRICS if m in metrics]

    def protocol(self, pl_module) -> dict:
        return {
            "samples": self.num_samples, "class_balanced": True, **pl_module.sampling_protocol(),
            **self.sampling, "reference": self.reference,
            **({} if self.metrics == ["fid"] else {"metrics": self.metrics}),
        }  # fmt: skip

    @torch.no_grad()
    def compute(self, trainer, pl_module) -> dict[str, float]:
        """The metrics of ``num_samples`` samples of the task against ``reference`` (on this rank),
        by the names they are logged under."""
        from gspn_lightning.metrics import compute_metrics

        n, device = self.num_samples, pl_module.device
        images = []
        for start in range(0, n, self.batch_size):
            idx = list(range(start, min(n, start + self.batch_size)))
            labels = torch.tensor([i % pl_module.num_classes for i in idx], device=device)
            seeds = [FID_SEED_BASE + i for i in idx]
            images.append(pl_module.sample_images(labels, seeds, **self.sampling).cpu())
        out = compute_metrics(
            self.reference, torch.cat(images), metrics=self.metrics, progress=False, device=device
        )
        keys = {"is": "inception_score", "kid": "kid_mean"}
        values = {keys.get(m, m): float(out[keys.get(m, m)]) for m in self.metrics if keys.get(m, m) in out}
        labels = {"fid": "FID", "sfid": "sFID", "inception_score": "IS", "kid_mean": "KID"}
        shown = ", ".join(f"{labels.get(k, k)} {v:.3f}" for k, v in values.items())
        skipped = "".join(f"; {m} skipped: {why}" for m, why in (out.get("skipped") or {}).items())
        protocol = self.protocol(pl_module)
        rank_zero_info(f"{shown} at step {trainer.global_step}; protocol: {protocol}{skipped}")
        return values

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step, every = trainer.global_step, self.every_n_steps
        if step > 0 and step % every == 0 and self._last != step:
            self._last = step
            if trainer.global_rank == 0:
                for name, value in self.compute(trainer, pl_module).items():
                    pl_module.log(name, value, rank_zero_only=True, on_step=True, on_epoch=False)
