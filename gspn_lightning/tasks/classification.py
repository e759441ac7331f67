"""Image classification (ImageNet-style) as a LightningModule.

The recipe of the paper (DeiT/Swin-style, 300 epochs): AdamW with weight decay 0.05 except on norms,
biases and other 1-D parameters; lr = optim.lr x global_batch / 512 with a per-step linear warm-up
then cosine decay; label smoothing 0.1; MixUp 0.8 / CutMix 1.0 on the batch with a soft-target loss;
an EMA of the weights evaluated alongside the raw model; top-1/top-5 accuracy from torchmetrics.
Gradient clipping and bf16 mixed precision are Trainer settings (see the configs).

Batches are ``(images, labels)``; a label of -1 marks a sample the data pipeline could not decode,
and a label ``>= num_classes`` is out of range for this model: such rows are dropped and counted
(``*/corrupt``), never fatal.  Validation and test count the samples they evaluate over all ranks
(``val/samples``) and check the count against the datamodule's index: every sample exactly once,
whatever the number of ranks and workers.  Evaluation metrics are only accumulated per step and
computed (synchronised over ranks) at epoch end, so a rank that has no evaluation batch at all (an
unreadable shard, fewer samples than ranks) still takes part in every collective and never
deadlocks its peers.

Fault handling shared with the other tasks (:class:`~gspn_lightning.tasks.base.TrainingTask`): the
EMA is updated right after each optimizer step, and a non-finite loss stops the run (or skips the
batch, ``nonfinite_loss: skip``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy
from torchvision.transforms import v2

from gspn_lightning.data.protocol import ClassData

from .base import (  # noqa: F401 (re-exported)
    CLASSIFICATION_OPTIM,
    OptimSettings,
    TrainingTask,
    build_model,
    param_groups,
    warmup_cosine,
)


class ClassificationTask(TrainingTask):
    """Trains a classifier built by name from the model registry.

    Args:
        model: registered model name (``gspn_t``, ``gspn_s``, ``gspn_b``).
        model_kwargs: overrides passed to ``create_model`` (e.g. a smaller ``embed_dim``).
        num_classes: number of classes (also passed to the model).
        in_chans: image channels (also passed to the model).
        image_size: the training image size, recorded in the checkpoint (the model takes any size).
            In configs these three come from the data through LightningCLI links.
        optim: AdamW, its schedule and the weight EMA (:class:`~gspn_lightning.tasks.base.OptimSettings`);
            by default the paper's recipe, :data:`~gspn_lightning.tasks.base.CLASSIFICATION_OPTIM`:
            ``lr`` 5e-4 for a global batch of ``base_batch_size`` 512 (scaled linearly), weight decay
            0.05, 20 ``warmup_epochs`` from ``warmup_lr`` 5e-7, a cosine to ``min_lr`` 5e-6, EMA 0.9999.
        label_smoothing: smoothing of the (mixed) one-hot targets.
        mixup_alpha: MixUp Beta parameter (0 disables MixUp).
        cutmix_alpha: CutMix Beta parameter (0 disables CutMix); with both on, one is picked per batch.
        mix_prob: probability that a training batch is mixed at all.
        batch_size: per-device batch size, only needed when there is no datamodule to read it from.
        eval_weights: which weights evaluate: ``null`` (validation/test evaluate the raw weights and
            their EMA, predict and sampling use the EMA), ``raw`` or ``ema`` (only those, everywhere);
            see :class:`~gspn_lightning.tasks.base.TrainingTask`.
        nonfinite_loss: ``"error"`` stops the run at a NaN/inf training loss (naming the step);
            ``"skip"`` skips such batches (no update), see :class:`~gspn_lightning.tasks.base.TrainingTask`.
        max_consecutive_skips: with ``"skip"``, more skipped batches in a row than this is an error.
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
        model: str = "gspn_t",
        model_kwargs: dict | None = None,
        num_classes: int = 1000,
        in_chans: int = 3,
        image_size: int | None = None,
        optim: OptimSettings = CLASSIFICATION_OPTIM,
        label_smoothing: float = 0.1,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        mix_prob: float = 1.0,
        batch_size: int | None = None,
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
        self.model = build_model(model, model_kwargs, num_classes=num_classes, in_chans=in_chans)
        self.configure_switches(compile, activation_checkpointing)
        self.init_weights_from(init_from, init_strict, init_weights)
        self.init_optim(optim, CLASSIFICATION_OPTIM)
        self.init_eval_weights(eval_weights)
        mixers = []
        with torch.device("cpu"):  # their Beta samplers live on the CPU (also when built under meta)
            if mixup_alpha > 0:
                mixers.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
            if cutmix_alpha > 0:
                mixers.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
        self.mixer = v2.RandomChoice(mixers) if mixers else None

        def accuracy():
            metrics = {"top1": MulticlassAccuracy(num_classes, top_k=1, average="micro")}
            if num_classes >= 5:
                metrics["top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
            return MetricCollection(metrics)

        self.train_acc = accuracy()
        self.val_acc, self.val_ema_acc = accuracy(), accuracy()
        self.test_acc, self.test_ema_acc = accuracy(), accuracy()
        # samples evaluated / dropped as corrupt (summed over ranks at epoch end), and the mean loss
        self.init_sample_counts()
        self.eval_loss = torch.nn.ModuleDict({k: MeanMetric() for k in ("val", "test")})

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    # -- helpers ---------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        dm = self.data(ClassData)
        data_classes = dm.num_classes if dm is not None else None
        if data_classes is not None and data_classes > self.hparams.num_classes:
            raise ValueError(
                f"the data's shard index lists {data_classes} classes but model num_classes is "
                f"{self.hparams.num_classes}: set model.init_args.num_classes to at least {data_classes}"
            )

    def _soft_targets(self, images, labels):
        k = self.hparams.num_classes
        if self.mixer is not None and torch.rand(()) < self.hparams.mix_prob:
            images, targets = self.mixer(images, labels)
        else:
            targets = F.one_hot(labels, k).to(images.dtype)
        eps = self.hparams.label_smoothing
        return images, targets * (1.0 - eps) + eps / k

    # -- steps -----------------------------------------------------------------------------------

    def training_step(self, batch, batch_idx):
        images, labels = self.drop_corrupt(batch, "train")
        if labels.numel() == 0:  # a wholly corrupt batch: a zero loss keeps DDP ranks in step
            return sum(p.sum() for p in self.model.parameters()) * 0.0
        images, targets = self._soft_targets(images, labels)
        logits = self.model(images)
        loss = torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        if self.check_loss(loss, batch_idx) is None:
            return None
        self.train_acc.update(logits.detach(), targets.argmax(-1))
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, sync_dist=True)
        self.log_dict({f"train/{k}": v for k, v in self.train_acc.items()}, on_step=False, on_epoch=True)
        self.log_lr()
        return loss

    def _eval_step(self, batch, batch_idx: int, stage: str) -> None:
        images, labels = self.drop_corrupt(batch, stage)
        if labels.numel() == 0:
            return
        # the raw weights and/or their EMA (eval_weights); val/loss is the first one's
        for i, (name, net) in enumerate(self.eval_nets(stage)):
            logits = net(images)
            if i == 0:
                loss = F.cross_entropy(logits.float(), labels)
                # no self.log here: a rank with no batches would skip the collectives of per-step logging
                self.eval_loss[stage].update(loss.detach(), weight=labels.numel())
            getattr(self, f"{name}_acc").update(logits, labels)

    def predict_step(self, batch, batch_idx):
        """Top-5 classes and probabilities from the EMA weights (the raw ones without EMA, or with
        ``eval_weights: raw``)."""
        images, labels = batch if isinstance(batch, (tuple, list)) else (batch, None)
        probs = self.predict_net()(images).float().softmax(-1)
        top = probs.topk(min(5, probs.shape[-1]), dim=-1)
        out = {"pred": top.indices[:, 0], "topk": top.indices, "topk_prob": top.values}
        if labels is not None:
            out["label"] = labels  # -1 marks a sample that could not be decoded
        return out

    def _eval_epoch_end(self, stage: str) -> None:
        """Compute (sync over ranks, on every rank) and log the epoch's evaluation metrics."""
        nets = self.eval_nets(stage)
        # the loss of the first evaluated weights: the raw ones, or the EMA with eval_weights: ema
        results = {f"{nets[0][0]}/loss": self.eval_loss[stage].compute()}
        self.eval_loss[stage].reset()
        for prefix, _ in nets:
            metrics = getattr(self, f"{prefix}_acc")
            results.update({f"{prefix}/{k}": v for k, v in metrics.compute().items()})
            metrics.reset()
        # already reduced over ranks by the metrics themselves: no sync_dist
        for key, value in results.items():
            self.log(key, value, prog_bar=key.startswith(f"{nets[0][0]}/top"), sync_dist=False)
