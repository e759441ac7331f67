"""How often a trained classifier recognises each generated sample as the class it was conditioned on
(``gspn evaluate --classifier``)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["class_accuracy"]


@torch.no_grad()
def class_accuracy(
    images: np.ndarray, labels: np.ndarray, net, size: int, mean, std, batch_size: int = 200
) -> tuple[float, np.ndarray]:
    """Fraction of samples the classifier assigns to their conditioning class, and the predictions."""
    preds = []
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(images[start : start + batch_size]).permute(0, 3, 1, 2).float() / 255
        if x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        preds.append(net((x - m) / s).argmax(-1))
    pred = torch.cat(preds).numpy()
    return float((pred == labels).mean()), pred
