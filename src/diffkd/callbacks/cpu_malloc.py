"""Keeps freed CPU memory in the process during CPU training (see :mod:`diffkd.utils.cpu_malloc`)."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.accelerators import CPUAccelerator

from diffkd.utils.cpu_malloc import CpuMalloc, check_cpu_malloc, configure_cpu_malloc

__all__ = ["CpuMallocCallback"]


class CpuMallocCallback(L.Callback):
    """On a CPU trainer, sets glibc's malloc to keep freed blocks (``mode="keep"``), in every training process.

    It acts in ``setup``, which each process runs (spawned DDP processes too) before the data loaders fork their
    workers; on other accelerators it does nothing, since their activations live in the device's caching
    allocator already. ``mode="default"`` leaves malloc alone.
    """

    def __init__(self, mode: CpuMalloc = "keep") -> None:
        self.mode = check_cpu_malloc(mode)
        self.applied = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if isinstance(trainer.accelerator, CPUAccelerator) and not self.applied:
            self.applied = configure_cpu_malloc(self.mode)
