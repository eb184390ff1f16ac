"""Optimisation helpers: learning-rate schedules configured in epochs and stepped every iteration, and the linear
learning-rate scaling rule."""

from diffkd.optim.lr_scaling import global_batch_size, scale_learning_rate
from diffkd.optim.schedulers import EpochWarmupScheduler, WarmupCosineLR, WarmupStepLR

__all__ = ["EpochWarmupScheduler", "WarmupCosineLR", "WarmupStepLR", "global_batch_size", "scale_learning_rate"]
