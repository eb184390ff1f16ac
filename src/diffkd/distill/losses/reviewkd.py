"""ReviewKD (Chen et al., CVPR 2021, "Distilling knowledge via knowledge review"; ``head: reviewkd`` with
``distance: {name: hcl}``), as mdistiller implements it for CIFAR-100 (megvii-research/mdistiller @a08d46f
``mdistiller/distillers/ReviewKD.py``).

One multi-tap point (:class:`~diffkd.distill.PointSpec` with address lists) over L levels, shallow to deep: the
student's stage outputs and its pooled feature as a 1×1 map; the teacher's pre-activation stage outputs and its
pooled feature. The head reviews the student's levels from the deepest up: one attention-based fusion module (ABF)
per level, each mapping the student map to C_mid channels (1×1 conv + BN), fusing it with the running residual of
the deeper levels — resized (nearest) to its size and mixed by two sigmoid attention maps from a 1×1 conv over
both — resizing (nearest) to the teacher level's size, and predicting the teacher level (3×3 conv + BN)::

    r_L, o_L = ABF_L(s_L)                  # the deepest level (the pooled feature) has no residual to fuse
    r_i, o_i = ABF_i(s_i, r_{i+1})         # i = L-1 … 1; r_i is the fused map at the teacher's size
    L_hcl = Σ_i hcl(o_i, t_i)

The hierarchical context loss of a level averages the MSE of the maps and of their adaptive average pools to
4×4, 2×2 and 1×1 (only pools smaller than the map), with weights 1, ½, ¼, ⅛, normalised by their sum.
C_mid = min(512, C of the student's deepest level) (mdistiller's rule; ``mid_channels`` overrides it).

mdistiller's CIFAR settings (``engine/cfg.py`` REVIEWKD, ``configs/cifar100/reviewkd.yaml``): CE weight 1, ReviewKD
weight 5 (the point's ``weight``), ramped in over 20 epochs (``warmup_epochs``: weight × min(epoch / 20, 1), with
the 1-based epoch the task passes, as mdistiller's). The channels and sizes mdistiller writes into its configs
(IN_CHANNELS, OUT_CHANNELS, SHAPES, OUT_SHAPES) are read here from the tapped maps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffkd.distill.registry import HeadOutput, register_distance, register_head

__all__ = ["ABF", "HCLLoss", "ReviewKDHead", "build_reviewkd", "hcl"]


class ABF(nn.Module):
    """Attention-based fusion of one level (parameter names as mdistiller's, so its weights load directly).

    Args:
        in_channels: C_s of the student level.
        mid_channels: C_mid, the width of the residual path.
        out_channels: C_t of the teacher level it predicts.
        fuse: whether a deeper level's residual is fused in (every level but the deepest).
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, kernel_size=1, bias=False), nn.BatchNorm2d(mid_channels)
        )
        self.conv2 = nn.Sequential(
            nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(out_channels)
        )
        self.att_conv = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, kernel_size=1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, student: Tensor, residual: Tensor | None, out_size: Sequence[int]) -> tuple[Tensor, Tensor]:
        """student (B, C_s, H, W), residual (B, C_mid, h, w) of the deeper level (``None`` for the deepest) →
        (prediction (B, C_t, H_t, W_t), fused map (B, C_mid, H_t, W_t)) at ``out_size`` = (H_t, W_t)."""
        x = self.conv1(student)
        if self.att_conv is not None:
            if residual is None:
                raise ValueError("this ABF level fuses a deeper level's residual; none was given")
            residual = F.interpolate(residual, size=x.shape[-2:], mode="nearest")
            att = self.att_conv(torch.cat([x, residual], dim=1))
            x = x * att[:, 0:1] + residual * att[:, 1:2]
        if tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, size=tuple(out_size), mode="nearest")
        return self.conv2(x), x


class ReviewKDHead(nn.Module):
    """The ABF chain over L levels.

    Args:
        student_channels, teacher_channels: C of each level, shallow to deep (the last: the pooled features).
        mid_channels: C_mid; ``None`` for mdistiller's min(``max_mid_channels``, student_channels[-1]).
        max_mid_channels: the cap of that rule (mdistiller: 512).

    ``abfs[i]`` serves level i (mdistiller keeps them deepest first: its ``abfs[j]`` is ``abfs[L-1-j]`` here).
    """

    def __init__(
        self,
        student_channels: Sequence[int],
        teacher_channels: Sequence[int],
        mid_channels: int | None = None,
        max_mid_channels: int = 512,
    ) -> None:
        super().__init__()
        if len(student_channels) != len(teacher_channels) or len(student_channels) < 2:
            raise ValueError(
                f"reviewkd needs as many student as teacher levels, at least 2 (stages and the pooled feature); "
                f"got {len(student_channels)} and {len(teacher_channels)}"
            )
        self.mid_channels = (
            int(mid_channels) if mid_channels is not None else min(max_mid_channels, student_channels[-1])
        )
        last = len(student_channels) - 1
        self.abfs = nn.ModuleList(
            ABF(cs, self.mid_channels, ct, fuse=i < last)
            for i, (cs, ct) in enumerate(zip(student_channels, teacher_channels))
        )

    def forward(self, students: Sequence[Tensor], teacher_sizes: Sequence[Sequence[int]]) -> list[Tensor]:
        """Student maps (B, C_s,i, H_i, W_i), shallow to deep → predictions (B, C_t,i, H_t,i, W_t,i) at the
        teacher sizes (H_t,i, W_t,i), shallow to deep."""
        if len(students) != len(self.abfs):
            raise ValueError(f"reviewkd head has {len(self.abfs)} levels, got {len(students)} student maps")
        outputs: list[Tensor] = []
        residual = None
        for level in reversed(range(len(self.abfs))):
            out, residual = self.abfs[level](students[level], residual, teacher_sizes[level])
            outputs.insert(0, out)
        return outputs

    def extra_repr(self) -> str:
        return f"levels={len(self.abfs)}, mid_channels={self.mid_channels}"


def _apply_reviewkd(head: nn.Module, students: Sequence[Tensor], teachers: Sequence[Tensor]) -> HeadOutput:
    if isinstance(students, Tensor) or isinstance(teachers, Tensor):
        raise ValueError(
            "head reviewkd reads several levels: list the taps on both sides of the point "
            "(student: [stage1, ..., pooled], teacher: [...]); see conf/distill/reviewkd.yaml"
        )
    teachers = [t.detach() for t in teachers]
    outputs = head(students, [t.shape[-2:] for t in teachers])
    return HeadOutput(outputs, teachers, {}, {})


@register_head("reviewkd", apply=_apply_reviewkd)
def build_reviewkd(
    student_channels: Sequence[int] | int,
    teacher_channels: Sequence[int] | int,
    *,
    vector: Sequence[bool] | bool,
    **kwargs: Any,
) -> ReviewKDHead:
    """ReviewKD's ABF chain for one multi-tap point (``head_kwargs``: ``mid_channels``, ``max_mid_channels``)."""
    if isinstance(student_channels, int) or isinstance(teacher_channels, int):
        raise ValueError(
            "head reviewkd fuses several levels: give the point lists of taps, shallow to deep, ending with the "
            "pooled features (student: [layer1, layer2, layer3, avgpool], teacher: [...]), not one address"
        )
    return ReviewKDHead(student_channels, teacher_channels, **kwargs)


def hcl(student: Tensor, teacher: Tensor, pyramid: Sequence[int] = (4, 2, 1)) -> Tensor:
    """The hierarchical context loss of one level: (B, C, H, W) maps of equal shape → scalar."""
    loss = F.mse_loss(student, teacher)
    weight, total = 1.0, 1.0
    for size in pyramid:
        if size >= student.shape[-2]:
            continue
        weight /= 2.0
        pooled_s = F.adaptive_avg_pool2d(student, (size, size))
        pooled_t = F.adaptive_avg_pool2d(teacher, (size, size))
        loss = loss + weight * F.mse_loss(pooled_s, pooled_t)
        total += weight
    return loss / total


@register_distance("hcl")
class HCLLoss(nn.Module):
    """ReviewKD's hierarchical context loss summed over the levels (see the module docstring).

    Args:
        pyramid: the pooled sizes (mdistiller: 4, 2, 1).
    """

    def __init__(self, pyramid: Sequence[int] = (4, 2, 1)) -> None:
        super().__init__()
        self.pyramid = tuple(int(p) for p in pyramid)

    def forward(self, student: Sequence[Tensor], teacher: Sequence[Tensor]) -> Tensor:
        """Lists of (B, C_i, H_i, W_i) predictions and teacher maps, level by level → scalar."""
        if isinstance(student, Tensor) or isinstance(teacher, Tensor) or len(student) != len(teacher):
            raise ValueError(
                "distance hcl compares lists of maps level by level (the reviewkd head's output); use it with "
                "head: reviewkd on a point that lists its taps"
            )
        total = student[0].new_zeros(())
        for s, t in zip(student, teacher):
            if s.shape != t.shape:
                raise ValueError(
                    f"distance hcl: a level's prediction is {tuple(s.shape)}, its teacher {tuple(t.shape)}"
                )
            total = total + hcl(s, t.detach().to(s.dtype), self.pyramid)
        return total

    def extra_repr(self) -> str:
        return f"pyramid={self.pyramid}"
