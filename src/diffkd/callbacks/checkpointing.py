"""``last.ckpt`` that is always the newest state, written atomically.

Lightning's ``ModelCheckpoint(save_last=True, save_top_k=1, monitor=...)`` rewrites ``last.ckpt`` only when it
saves a new best; a run resumed from it could lose whole epochs. This callback writes ``<dirpath>/last.ckpt`` at the
end of every training epoch (validation included) and, optionally, every N optimizer steps, independently of the
best-by-metric checkpoint. Each write goes to ``last.ckpt.tmp`` and is renamed over ``last.ckpt``: a kill during
the write leaves the previous ``last.ckpt`` whole.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L

__all__ = ["LastCheckpoint"]


class LastCheckpoint(L.Callback):
    """Args:
    dirpath: the folder of ``last.ckpt`` (the run's ``checkpoints/``).
    every_n_train_steps: also write it every N optimizer steps (long epochs); ``None``: epoch ends only.
    filename: the file name (``last.ckpt``).
    """

    def __init__(self, dirpath: str, every_n_train_steps: int | None = None, filename: str = "last.ckpt") -> None:
        super().__init__()
        if every_n_train_steps is not None and every_n_train_steps < 1:
            raise ValueError(f"every_n_train_steps must be >= 1 or null, got {every_n_train_steps}")
        self.dirpath = Path(dirpath)
        self.every_n_train_steps = every_n_train_steps
        self.filename = filename
        self.last_model_path = ""
        self._saved_step: int | None = None

    @property
    def path(self) -> Path:
        return self.dirpath / self.filename

    def save(self, trainer: L.Trainer) -> None:
        """Write ``last.ckpt`` atomically (every rank calls it: saving is collective; rank 0 writes)."""
        if trainer.sanity_checking or getattr(trainer, "fast_dev_run", False):
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        trainer.save_checkpoint(tmp, weights_only=False)  # the full state (resumable); said, not defaulted
        if trainer.is_global_zero:
            os.replace(tmp, self.path)
        trainer.strategy.barrier("last_checkpoint")
        self.last_model_path = str(self.path)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        n = self.every_n_train_steps
        if n and trainer.global_step > 0 and trainer.global_step % n == 0 and self._new_step(trainer):
            self.save(trainer)

    def _new_step(self, trainer: L.Trainer) -> bool:
        # with gradient accumulation several batches end on the same optimizer step: write once
        step = trainer.global_step
        if self._saved_step == step:
            return False
        self._saved_step = step
        return True

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {"dirpath": str(self.dirpath), "last_model_path": self.last_model_path}
