"""Channel-wise distillation (Shu et al., ICCV 2021; ``distance: {name: cwd}``), as CIRKD implements it
(winycg/CIRKD @05a2753 ``losses/cwd.py``, ``CriterionCWD(norm_type='channel', divergence='kl', temperature=4)``).

Each channel of a map (B, C, H, W) becomes a distribution over its H·W positions, φ(x)_c = softmax_{hw}(x_c / τ);
the loss is the KL from the teacher's to the student's, summed over positions, channels and images, normalised by
N·C and scaled by τ²::

    L = τ² / (N·C) · Σ_{n,c} Σ_{hw} φ(t)_{n,c,hw} · (log φ(t)_{n,c,hw} − log φ(s)_{n,c,hw})

CIRKD uses it on the logits (``--lambda-cwd-logit 3``) and on the feature after ASPP (``--lambda-cwd-fea 50``,
through its own 1×1 convolution when widths differ: here a ``conv1x1`` head), τ = 4 for both. Every position
counts, ignored pixels included; ``masked=True`` (an option, not CIRKD's) takes the softmax over the valid positions
only (``valid_mask`` resized to the map nearest-neighbour), and an image without any valid position adds nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from diffkd.distill.losses.dense import MaskableDenseLoss
from diffkd.distill.registry import register_distance
from diffkd.method.distances import mask_like

__all__ = ["ChannelWiseDistillation"]


@register_distance("cwd")
class ChannelWiseDistillation(MaskableDenseLoss):
    """``τ²/(N·C) · Σ KL(softmax_hw(t/τ) ‖ softmax_hw(s/τ))`` over images and channels (see the module docstring).

    Args:
        tau: the temperature (CIRKD: 4).
        masked: spatial softmax over the valid positions only (CIRKD: False, every position).
    """

    def __init__(self, tau: float = 4.0, masked: bool = False) -> None:
        super().__init__(tau, masked)

    def forward(self, student: Tensor, teacher: Tensor, valid_mask: Tensor | None = None) -> Tensor:
        """student, teacher (B, C, H, W); valid_mask (B, H', W') bool → scalar."""
        if student.dim() != 4 or student.shape != teacher.shape:
            raise ValueError(
                f"cwd needs maps (B, C, H, W) of equal shapes, got student {tuple(student.shape)} and teacher "
                f"{tuple(teacher.shape)}; for unequal widths put a conv1x1 head before it"
            )
        n, c, h, w = student.shape
        s = student.float().reshape(n, c, h * w) / self.tau
        t = teacher.detach().float().reshape(n, c, h * w) / self.tau
        keep: Tensor | None = None
        if self.masked and valid_mask is not None:
            keep = mask_like(valid_mask, student).reshape(n, 1, h * w)
            # the dtype's lowest finite value rather than −inf: an image with no valid position stays finite
            # (its terms are zeroed below) and exp() of the masked entries is exactly 0
            low = torch.finfo(s.dtype).min
            s, t = s.masked_fill(~keep, low), t.masked_fill(~keep, low)
        log_q = F.log_softmax(s, dim=-1)
        log_p = F.log_softmax(t, dim=-1)
        pointwise = log_p.exp() * (log_p - log_q)
        if keep is not None:
            pointwise = pointwise * keep
        return pointwise.sum() * self.tau**2 / (n * c)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, masked={self.masked}"
