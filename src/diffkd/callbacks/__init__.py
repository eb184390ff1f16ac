"""Lightning callbacks: the student's EMA (recipe B2), the always-newest ``last.ckpt``, epoch wall time, CPU malloc
settings."""

from diffkd.callbacks.checkpointing import AtomicCheckpointIO, LastCheckpoint
from diffkd.callbacks.cpu_malloc import CpuMallocCallback
from diffkd.callbacks.ema import EMA, ema_state_from_checkpoint

__all__ = ["EMA", "AtomicCheckpointIO", "CpuMallocCallback", "LastCheckpoint", "ema_state_from_checkpoint"]
