"""LightningModules: the task-agnostic distillation module and the tasks built on it."""

from diffkd.tasks.base import DistillationModule, NonFiniteLossError
from diffkd.tasks.classification import ClassificationModule

__all__ = ["ClassificationModule", "DistillationModule", "NonFiniteLossError"]
