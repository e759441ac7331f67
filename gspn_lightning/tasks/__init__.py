"""LightningModules (one per task) and the callbacks and checkpointing they share."""

from .callbacks import InTrainingFID, PredictionWriter, SampleGrid, TeacherStudentGrid
from .checkpointing import ResumableCheckpoint
from .classification import ClassificationTask
from .diffusion import DiffusionTask
from .distill import DistillationTask

__all__ = [
    "ClassificationTask",
    "DiffusionTask",
    "DistillationTask",
    "InTrainingFID",
    "PredictionWriter",
    "ResumableCheckpoint",
    "SampleGrid",
    "TeacherStudentGrid",
]
