"""CLIP score of images against their captions, through torchmetrics, with a CLIP model from a local folder.

    from gspn_lightning.metrics.clip_score import clip_score
    score = clip_score(images_uint8, captions, "models/clip-vit-large-patch14")   # -> float

The score is torchmetrics' ``CLIPScore``: ``100 * cos(E_image, E_text)`` averaged over the pairs and
floored at 0 (Hessel et al. 2021 without their 2.5 weight; torchmetrics floors the mean, not each pair). The model is never downloaded: the folder (a
``transformers`` ``CLIPModel`` saved with its ``CLIPProcessor``, e.g. a local copy of
``openai/clip-vit-large-patch14``) is loaded with ``local_files_only=True`` and handed to torchmetrics
as a callable, which is how torchmetrics takes a model it does not know by name. Captions longer than
the text encoder's positions are truncated (by torchmetrics, with a warning).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from .inputs import image_batches

__all__ = ["clip_score", "load_local_clip"]


class _ProjectedFeatures(torch.nn.Module):
    """A ``CLIPModel`` whose ``get_image_features``/``get_text_features`` return the projected embeddings
    as tensors. transformers 5 returns an output object there (the projection in ``pooler_output``),
    which torchmetrics 1.9's ``CLIPScore`` divides by its norm as if it were the tensor."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(out) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return self._tensor(self.model.get_text_features(*args, **kwargs))


def load_local_clip(folder: str | os.PathLike):
    """``(CLIPModel, CLIPProcessor)`` from a local folder; a missing folder is one clear error."""
    path = Path(folder).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no CLIP model at {path} (a folder with config.json, the weights and the processor files, "
            "as CLIPModel.save_pretrained and CLIPProcessor.save_pretrained write them; nothing is downloaded)"
        )
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(path, local_files_only=True).eval()
    processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
    return model, processor


def clip_score(
    images,
    captions: Sequence[str],
    model_folder: str | os.PathLike,
    batch_size: int = 32,
    device: str | torch.device | None = None,
) -> float:
    """The mean CLIP score of ``images`` (any source :func:`~gspn_lightning.metrics.image_batches`
    reads, in caption order) against ``captions``."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    captions = list(captions)
    model, processor = load_local_clip(model_folder)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    # sync_on_compute=False: the score is of the images given here, even when a process group exists
    metric = CLIPScore(model_name_or_path=lambda: (_ProjectedFeatures(model), processor), sync_on_compute=False)
    metric = metric.to(device)
    batches, _ = image_batches(images, batch_size, "images")
    seen = 0
    for batch in batches:
        texts = captions[seen : seen + len(batch)]
        if len(texts) != len(batch):
            raise ValueError(f"more images than captions ({len(captions)})")
        metric.update(batch.to(device), texts)
        seen += len(batch)
    if seen != len(captions):
        raise ValueError(f"{seen} images for {len(captions)} captions")
    return float(metric.compute())
