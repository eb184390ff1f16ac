"""A callback that sets every learning rate to a huge value at a given epoch: a blow-up after good epochs, for the
guard tests."""

from __future__ import annotations

import lightning as L


class BlowUpAtEpoch(L.Callback):
    def __init__(self, epoch: int, lr: float = 1e38) -> None:
        self.epoch, self.lr = int(epoch), float(lr)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch >= self.epoch:
            for group in trainer.optimizers[0].param_groups:
                group["lr"] = self.lr
