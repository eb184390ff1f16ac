"""The linear learning-rate scaling rule: ``lr × global batch / base batch`` (Goyal et al.), applied once."""

from __future__ import annotations

from torch.optim import Optimizer

__all__ = ["global_batch_size", "scale_learning_rate"]


def global_batch_size(per_device: int, world_size: int, accumulate_grad_batches: int = 1) -> int:
    """Samples per optimizer step: ``per_device × world_size × accumulate_grad_batches`` (world size counts
    devices × nodes)."""
    return int(per_device) * int(world_size) * int(accumulate_grad_batches)


def scale_learning_rate(optimizer: Optimizer, global_batch: int, base_batch: int) -> float:
    """Multiply every group's ``lr`` (and ``initial_lr``, which schedulers start from) by
    ``global_batch / base_batch``; returns the factor."""
    if base_batch <= 0:
        raise ValueError(f"optim.lr_base_batch_size must be positive, got {base_batch}")
    factor = global_batch / base_batch
    for group in optimizer.param_groups:
        group["lr"] *= factor
        group["initial_lr"] = group["lr"]
    return factor
