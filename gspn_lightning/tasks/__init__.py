"""LightningModules: one per task."""

from .callbacks import PredictionWriter
from .classification import ClassificationTask

__all__ = ["ClassificationTask", "PredictionWriter"]
