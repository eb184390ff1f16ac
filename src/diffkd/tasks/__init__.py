"""LightningModules: the task-agnostic distillation module and the tasks built on it."""

from diffkd.tasks.base import DistillationModule, map_tensors
from diffkd.tasks.classification import ClassificationModule
from diffkd.tasks.detection import DetectionModule
from diffkd.tasks.nonfinite import NonFiniteGuard, NonFiniteLossError
from diffkd.tasks.segmentation import SegmentationModule

__all__ = [
    "ClassificationModule",
    "DetectionModule",
    "DistillationModule",
    "NonFiniteGuard",
    "NonFiniteLossError",
    "SegmentationModule",
    "map_tensors",
]
