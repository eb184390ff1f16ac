"""Optimisation helpers: learning-rate schedules configured in epochs and stepped every iteration."""

from diffkd.optim.schedulers import EpochWarmupScheduler, WarmupCosineLR, WarmupStepLR

__all__ = ["EpochWarmupScheduler", "WarmupCosineLR", "WarmupStepLR"]
