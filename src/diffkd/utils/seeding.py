"""Random streams that are functions of where the run is, so that a resumed run draws what the uninterrupted one
drew: every training batch reseeds the global generators from ``(seed, epoch, batch index, rank)``."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

__all__ = ["lightning_seed", "mix_seed", "seed_step"]


def lightning_seed(default: int = 0) -> int:
    """The seed ``lightning.seed_everything`` set (``PL_GLOBAL_SEED``), as Lightning's samplers use it."""
    return int(os.environ.get("PL_GLOBAL_SEED", default))


def mix_seed(*words: int) -> int:
    """A well-mixed 63-bit seed from non-negative integers (``numpy.random.SeedSequence``)."""
    entropy = [int(w) & 0xFFFF_FFFF_FFFF_FFFF for w in words]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def seed_step(seed: int, epoch: int, batch_idx: int, rank: int, device: torch.device | None = None) -> None:
    """Seed torch's CPU generator (and the current CUDA device's), Python's ``random`` and NumPy from
    ``(seed, epoch, batch index, rank)``: the DiffKD noise, dropout and any other draw of a training step depend on
    nothing else (the batch index, not the optimizer step: accumulated micro-batches draw differently). A few
    microseconds; no host-device sync."""
    s = mix_seed(seed, epoch, batch_idx, rank, 0x5EED)
    torch.default_generator.manual_seed(s)
    if device is not None and device.type == "cuda":
        torch.cuda.default_generators[device.index or 0].manual_seed(s)
    random.seed(s)
    np.random.seed(s % 2**32)
