"""Comparing our losses with reference figures stored from another project's code (mdistiller, ...)."""

from __future__ import annotations

import torch


def as_float64(values) -> torch.Tensor:
    """A stored list (or nested lists) of numbers as a float64 tensor."""
    return torch.tensor(values, dtype=torch.float64)


def max_rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest element-wise |ours − ref| / |ref| (entries where ref is 0 must be 0 to 1e-12 absolute)."""
    ours, ref = ours.detach().double(), ref.double()
    assert ours.shape == ref.shape
    zero = ref.abs() < 1e-300
    assert (ours[zero].abs() < 1e-12).all()
    return float(((ours - ref).abs()[~zero] / ref.abs()[~zero]).max()) if (~zero).any() else 0.0
