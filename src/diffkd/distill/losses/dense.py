"""What the dense KL losses on maps share (``cwd``, ``pixel_kd``): a temperature and the ``masked`` option that
restricts them to the task's ``valid_mask``."""

from __future__ import annotations

from torch import nn

__all__ = ["MaskableDenseLoss"]


class MaskableDenseLoss(nn.Module):
    """Base of a loss on (B, C, H, W) maps with a temperature ``tau`` and an optional ``valid_mask`` (B, H', W').

    Args:
        tau: the temperature.
        masked: restrict the loss to the valid positions of ``valid_mask`` (when the task gives one).
    """

    accepts = ("valid_mask",)

    def __init__(self, tau: float, masked: bool = False) -> None:
        super().__init__()
        if not isinstance(masked, bool):
            raise TypeError(f"masked must be a bool, got {masked!r}")
        self.tau = float(tau)
        self.masked = masked
