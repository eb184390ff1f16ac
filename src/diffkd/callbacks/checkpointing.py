"""Checkpoint files that are always whole, and a ``last.ckpt`` that is always the newest state.

:class:`AtomicCheckpointIO` is the trainer's checkpoint writer (``diffkd.train`` installs it): every checkpoint —
the best, ``last.ckpt``, one written every N steps, a SLURM requeue's — goes to a temporary file beside its target,
is flushed to disk and renamed over the target, so a kill or a full disk during the write leaves the earlier file
whole and no truncated one. A failed write removes its partial file and says what was not written.

Lightning's ``ModelCheckpoint(save_last=True, save_top_k=1, monitor=...)`` rewrites ``last.ckpt`` only when it
saves a new best; a run resumed from it could lose whole epochs. :class:`LastCheckpoint` writes
``<dirpath>/last.ckpt`` at the end of every training epoch (validation included) and, optionally, every N optimizer
steps, independently of the best-by-metric checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

__all__ = ["AtomicCheckpointIO", "LastCheckpoint"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose files appear whole or not at all (local paths; URLs go to Lightning's writer)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())  # a full disk shows here at the latest, before the rename
            os.replace(tmp, path)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise OSError(
                err.errno,
                f"writing the checkpoint {path} failed ({err.strerror or err}): nothing was written there and the "
                f"checkpoints written before are whole. Free space in {path.parent} (or move paths.output_dir to "
                "another disk) and resume from the newest one with ckpt_path=<its path>",
            ) from err
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


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
        """Write ``last.ckpt`` (every rank calls it: saving is collective; rank 0 writes, atomically when the
        trainer's checkpoint writer is :class:`AtomicCheckpointIO`)."""
        if trainer.sanity_checking or getattr(trainer, "fast_dev_run", False):
            return
        trainer.save_checkpoint(self.path, weights_only=False)  # the full state (resumable); said, not defaulted
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
