"""Lightning callbacks: the student's EMA (recipe B2)."""

from diffkd.callbacks.ema import EMA, ema_state_from_checkpoint

__all__ = ["EMA", "ema_state_from_checkpoint"]
