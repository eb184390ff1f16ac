"""Optimisation helpers: learning-rate schedules stepped every iteration (lengths in epochs; the segmentation poly
schedule in steps, the detection multi-step schedule) and the linear learning-rate scaling rule."""

from diffkd.optim.lr_scaling import global_batch_size, scale_learning_rate
from diffkd.optim.schedulers import EpochWarmupScheduler, PolyLR, WarmupCosineLR, WarmupMultiStepLR, WarmupStepLR

__all__ = [
    "EpochWarmupScheduler",
    "PolyLR",
    "WarmupCosineLR",
    "WarmupMultiStepLR",
    "WarmupStepLR",
    "global_batch_size",
    "scale_learning_rate",
]
