"""The built-in heads (``diffkd``, ``conv1x1``, ``identity``) and distances (``kl``, ``mse``, ``dist``, ``dkd``),
registered like any user's would be."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from diffkd.distill.registry import HeadOutput, register_distance, register_head
from diffkd.method import DIST, DKD, MSE, DiffKD, KLDivergence

register_distance("kl")(KLDivergence)
register_distance("mse")(MSE)
register_distance("dist")(DIST)
register_distance("dkd")(DKD)


def _apply_diffkd(head: nn.Module, student: Tensor, teacher: Tensor) -> HeadOutput:
    out = head(student, teacher)
    losses = {"diff": out.diffusion_loss}
    if out.ae_loss is not None:
        losses["ae"] = out.ae_loss
    stats = {"gamma": out.gamma.detach().mean()} if out.gamma is not None else {}
    return HeadOutput(out.student, out.teacher, losses, stats)


@register_head("diffkd", apply=_apply_diffkd, term_weights={"diff": "diff_weight", "ae": "ae_weight"})
def build_diffkd(student_channels: int, teacher_channels: int, *, vector: bool, **kwargs: Any) -> nn.Module:
    """DiffKD (:class:`~diffkd.method.DiffKD`): kernel-1 denoiser for vectors (logits), kernel 3 for maps. The
    distiller hands it (B, C, H, W) tensors (vectors as (B, C, 1, 1)), so it guesses no layout of its own."""
    defaults = {"kernel_size": 1 if vector else 3, "input_layout": "bchw"}
    return DiffKD(student_channels, teacher_channels, **{**defaults, **kwargs})


@register_head("conv1x1")
def build_conv1x1(student_channels: int, teacher_channels: int, *, vector: bool, **kwargs: Any) -> nn.Module:
    """FitNet's adapter: 1×1 convolution (no bias) + BatchNorm to the teacher's width."""
    return nn.Sequential(
        nn.Conv2d(student_channels, teacher_channels, 1, bias=False, **kwargs), nn.BatchNorm2d(teacher_channels)
    )


@register_head("identity")
def build_identity(student_channels: int, teacher_channels: int, *, vector: bool, **kwargs: Any) -> None:
    """No head: the distance compares the tapped tensors directly (equal widths required)."""
    if student_channels != teacher_channels:
        raise ValueError(
            f"student has {student_channels} channels and teacher {teacher_channels}; a direct distance needs equal "
            "widths — use head: conv1x1 (FitNet adapter) or head: diffkd"
        )
    if kwargs:
        raise TypeError(f"head identity takes no head_kwargs, got {sorted(kwargs)}")
    return None
