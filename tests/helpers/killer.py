"""A callback that kills its own process with SIGKILL at a given optimizer step: a real ``kill -9`` at an exact
point of the run, for the resume tests."""

from __future__ import annotations

import os
import signal

import lightning as L


class KillAtStep(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = int(step)

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)
