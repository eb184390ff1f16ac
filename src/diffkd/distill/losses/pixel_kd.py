"""Pixel-wise KD for dense predictions (``distance: {name: pixel_kd}``): Hinton's KL at every pixel, averaged over
the pixels — CIRKD's ``CriterionKD`` (winycg/CIRKD @05a2753 ``losses/kd.py``, used by ``train_kd.py`` and
``train_cirkd.py`` with ``--kd-temperature 1`` and ``--lambda-kd 1``).

For logit maps s, t (B, K, H, W) and p = softmax(t/τ), q = softmax(s/τ) at each pixel::

    L = τ² · (1 / |P|) · Σ_{pixels ∈ P} KL(p ‖ q)

CIRKD reshapes the maps to (B·H·W, K) and calls ``F.kl_div(..., reduction="batchmean")``, so P is **every** pixel
of the (1/8-resolution) logit maps, ignored ones included. ``masked=True`` makes P the valid pixels only (the
task's ``valid_mask``, resized to the map nearest-neighbour) — not CIRKD's arithmetic, an option.

Why not the built-in ``kl``: it is the classification ``batchmean`` (sum over classes *and* positions, divided by
B), which for maps is H·W times this mean over pixels.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from diffkd.distill.losses.dense import MaskableDenseLoss
from diffkd.distill.registry import register_distance
from diffkd.method.distances import mask_like

__all__ = ["PixelKD", "pixel_kl"]


def pixel_kl(student: Tensor, teacher: Tensor, tau: float) -> Tensor:
    """KL(softmax(t/τ) ‖ softmax(s/τ)) at every position, in fp32 from log-softmax forms.

    Args:
        student, teacher: logits (B, K, H, W) or (B, K); the teacher is detached.
        tau: the temperature.
    Returns:
        (B, H, W) (or (B,)) pointwise KL, not yet multiplied by τ².
    """
    log_q = F.log_softmax(student.float() / tau, dim=1)
    log_p = F.log_softmax(teacher.detach().float() / tau, dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)


@register_distance("pixel_kd")
class PixelKD(MaskableDenseLoss):
    """``τ² · mean over pixels of KL(softmax(t/τ) ‖ softmax(s/τ))`` (see the module docstring).

    Args:
        tau: the temperature (CIRKD ``--kd-temperature``, default 1).
        masked: average over the valid pixels only (``valid_mask`` from the task) instead of every pixel
            (CIRKD: False). Without a mask from the task every pixel counts either way.
    """

    def __init__(self, tau: float = 1.0, masked: bool = False) -> None:
        super().__init__(tau, masked)

    def forward(self, student: Tensor, teacher: Tensor, valid_mask: Tensor | None = None) -> Tensor:
        """student, teacher (B, K, H, W) logits (or (B, K)); valid_mask (B, H', W') bool → scalar."""
        if student.shape != teacher.shape:
            raise ValueError(
                f"pixel_kd needs equal shapes, got student {tuple(student.shape)} and teacher {tuple(teacher.shape)}"
            )
        kl = pixel_kl(student, teacher, self.tau)
        if self.masked and valid_mask is not None:
            weight = mask_like(valid_mask, student).to(kl.dtype)
            # a division on the device: no host sync, and no valid pixel gives 0 rather than NaN
            return (kl * weight).sum() / weight.sum().clamp_min(1.0) * self.tau**2
        return kl.mean() * self.tau**2

    def extra_repr(self) -> str:
        return f"tau={self.tau}, masked={self.masked}"
