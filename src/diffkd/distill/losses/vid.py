"""Variational information distillation (Ahn et al., CVPR 2019; ``head: vid`` with ``distance: {name: vid}``), as
mdistiller implements it (megvii-research/mdistiller @a08d46f ``mdistiller/distillers/VID.py``).

At each tapped stage a regressor μ(·) — 1×1 conv (Cs→Ct, no bias), ReLU, 1×1 conv, ReLU, 1×1 conv — predicts the
teacher's map from the student's, under a Gaussian with a per-channel variance σ²_c = softplus(α_c) + ε. The loss is
the negative log-likelihood (without its constant), averaged over images, channels and positions::

    L = mean_{n,c,h,w} ½ · ((μ(s)_{n,c,h,w} − t_{n,c,h,w})² / σ²_c + log σ²_c)

α starts at log(exp(5 − ε) − 1), i.e. σ² = 5, ε = 1e-5 (mdistiller's ``VID.INIT_PRED_VAR``, ``VID.EPS``). Where
the spatial sizes differ, the larger map is average-pooled to the smaller (adaptive, as mdistiller; the distiller
itself still asks for equal sizes or ``align``). mdistiller distils every stage output after the stem
(``feats[1:]``), each with weight 1 (``VID.LOSS.FEAT_WEIGHT``), CE weight 1: here one point per stage.

The head and the distance go together: the head hands the distance its prediction and the variance stacked,
``(B, 2, Ct, H, W)`` (``[μ(s), σ²]``), since a distance sees only (student, teacher).

**On purpose unlike mdistiller**: α is a trained parameter of the head (the paper, the authors' code and
RepDistiller train it); mdistiller keeps its ``log_scales`` in a plain list, so they never reach its optimizer and
σ² stays 5. ``head_kwargs: {learn_variance: false}`` reproduces that (α becomes a buffer).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffkd.distill.registry import HeadOutput, register_distance, register_head

__all__ = ["VIDLoss", "VIDRegressor", "build_vid"]


class VIDRegressor(nn.Module):
    """The regressor μ and the per-channel variance parameter α of one VID stage.

    Args:
        student_channels, teacher_channels: Cs and Ct.
        init_pred_var: the initial σ² (mdistiller: 5).
        eps: ε added to softplus(α) (mdistiller: 1e-5).
        learn_variance: α a trained parameter (default; the paper) or a fixed buffer (mdistiller's training).
    """

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        init_pred_var: float = 5.0,
        eps: float = 1e-5,
        learn_variance: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(learn_variance, bool):
            raise TypeError(f"learn_variance must be a bool, got {learn_variance!r}")
        if init_pred_var <= eps:
            raise ValueError(f"init_pred_var must exceed eps, got {init_pred_var} and {eps}")
        c = teacher_channels
        self.regressor = nn.Sequential(
            nn.Conv2d(student_channels, c, 1, bias=False),
            nn.ReLU(),
            nn.Conv2d(c, c, 1, bias=False),
            nn.ReLU(),
            nn.Conv2d(c, c, 1, bias=False),
        )
        self.eps = float(eps)
        self.init_pred_var = float(init_pred_var)
        self.learn_variance = learn_variance
        alpha = torch.full((c,), math.log(math.expm1(self.init_pred_var - self.eps)))
        if learn_variance:
            self.log_scale = nn.Parameter(alpha)
        else:
            self.register_buffer("log_scale", alpha)

    def variance(self) -> Tensor:
        """σ² (Ct,) = softplus(α) + ε."""
        return F.softplus(self.log_scale) + self.eps

    def forward(self, student: Tensor) -> Tensor:
        """μ(s): the predicted teacher map (B, Ct, H, W)."""
        return self.regressor(student)

    def extra_repr(self) -> str:
        return f"init_pred_var={self.init_pred_var}, eps={self.eps}, learn_variance={self.learn_variance}"


def _apply_vid(head: nn.Module, student: Tensor, teacher: Tensor) -> HeadOutput:
    """μ(s) and σ² stacked for the ``vid`` distance, the larger map average-pooled to the smaller one's size."""
    teacher = teacher.detach()
    sh, th = student.shape[-2:], teacher.shape[-2:]
    if sh[0] > th[0]:
        student = F.adaptive_avg_pool2d(student, th)
    elif sh[0] < th[0]:
        teacher = F.adaptive_avg_pool2d(teacher, sh)
    mean = head(student)
    var = head.variance().view(1, -1, 1, 1).to(mean)
    packed = torch.stack([mean, var.expand_as(mean)], dim=1)
    return HeadOutput(packed, teacher, {}, {"pred_var": var.detach().mean()})


@register_head("vid", apply=_apply_vid)
def build_vid(student_channels: int, teacher_channels: int, *, vector: bool, **kwargs: Any) -> VIDRegressor:
    """VID's regressor and variance for one stage (``head_kwargs``: ``init_pred_var``, ``eps``, ``learn_variance``)."""
    if vector:
        raise ValueError("head vid regresses feature maps; tap a stage's output (B, C, H, W), not a vector")
    return VIDRegressor(student_channels, teacher_channels, **kwargs)


@register_distance("vid")
class VIDLoss(nn.Module):
    """The Gaussian NLL ``mean ½((μ − t)²/σ² + log σ²)`` of VID (see the module docstring); its student is the
    ``vid`` head's ``(B, 2, C, H, W)`` stack of μ(s) and σ²."""

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        """student (B, 2, C, H, W) from ``head: vid``, teacher (B, C, H, W) → scalar."""
        if student.dim() != 5 or student.shape[1] != 2 or student[:, 0].shape != teacher.shape:
            raise ValueError(
                f"distance vid reads the vid head's (B, 2, C, H, W) stack of prediction and variance, got "
                f"{tuple(student.shape)} for a teacher of {tuple(teacher.shape)}; use head: vid with distance: vid"
            )
        if student.dtype in (torch.float16, torch.bfloat16):
            student = student.float()
        mean, var = student.unbind(dim=1)
        t = teacher.detach().to(mean.dtype)
        return (0.5 * ((mean - t) ** 2 / var + torch.log(var))).mean()
