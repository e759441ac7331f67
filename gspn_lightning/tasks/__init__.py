"""LightningModules: one per task."""

from .classification import ClassificationTask

__all__ = ["ClassificationTask"]
