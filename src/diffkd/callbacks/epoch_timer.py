"""Wall time per training epoch, logged as ``train/epoch_time_s`` (synchronises the device once per epoch)."""

from __future__ import annotations

import time

import lightning as L
import torch

__all__ = ["EpochTimer"]


class EpochTimer(L.Callback):
    """Logs the wall time of each training epoch (validation excluded) and keeps the list in ``times``."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def _sync(self, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sync(pl_module)
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sync(pl_module)
        seconds = time.perf_counter() - self._start
        self.times.append(seconds)
        pl_module.log("train/epoch_time_s", seconds, on_step=False, on_epoch=True, rank_zero_only=True)
