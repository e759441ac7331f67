"""Callbacks used by the command line."""

from __future__ import annotations

import os

import torch
from lightning.pytorch.callbacks import BasePredictionWriter


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
