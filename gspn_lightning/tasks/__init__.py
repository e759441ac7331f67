"""LightningModules (one per task) and the callbacks and checkpointing they share."""

from .callbacks import PredictionWriter
from .checkpointing import ResumableCheckpoint
from .classification import ClassificationTask

__all__ = ["ClassificationTask", "PredictionWriter", "ResumableCheckpoint"]
