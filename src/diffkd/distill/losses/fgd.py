"""FGD (Yang et al., "Focal and Global Knowledge Distillation for Detectors", CVPR 2022) as distances.

Two registered distances, both for one FPN level (B, C, H, W) of a detector, both reading the ground-truth boxes:

- ``fgd``: FGD's ``FeatureLoss`` as published (yzd-v/FGD ``mmdet/distillation/losses/fgd.py`` at c03a6cf) —
  ``α·L_fg + β·L_bg + γ·L_at + λ·L_global`` with its learnable parts (the student 1×1 ``align`` conv when the widths
  differ, and the two GcBlock context modules). FGD keeps **one module per FPN level**; so do the configs
  (``conf/distill/fgd_*.yaml``: one point per level, each point has its own distance instance).
- ``fgd_mse``: only FGD's attention-weighted foreground/background MSE ``α·L_fg + β·L_bg`` (plus ``γ·L_at`` when
  ``gamma_fgd > 0``), no parameters. It is **our reading** of DiffKD's "attention-based MSE loss inspired by FGD to
  balance the foreground and background distillations" (DiffKD†, paper Table 4/5): the paper gives no formula.

The terms, with ``F_s``/``F_t`` the student/teacher maps (N, C, H, W) and T the temperature:

- attention ``S(F) = H·W·softmax_hw(mean_c |F| / T)`` (N, H, W), ``C(F) = C·softmax_c(mean_hw |F| / T)`` (N, C);
- masks from the boxes mapped onto the level (see ``box_frame``), floor/ceil'd to cells ``[x0, x1] × [y0, y1]``
  (inclusive): ``M_fg[y, x] = max over the boxes covering the cell of 1 / ((y1 − y0 + 1)(x1 − x0 + 1))`` and
  ``M_bg = 1[M_fg = 0] / Σ 1[M_fg = 0]`` per image;
- ``L_fg = Σ S_t C_t M_fg (F_s − F_t)² / N`` and ``L_bg`` likewise with ``M_bg`` — the **teacher's** attentions
  weigh both networks' features (sums over C·H·W, divided by the batch size only, hence α ≈ 1e-3 … 1e-5);
- ``L_at = Σ |C_s − C_t| / N + Σ |S_s − S_t| / N``;
- ``L_global = Σ (R_s(F_s) − R_t(F_t))² / N`` with the GcBlock ``R(F) = F + W₂ ReLU(LN(W₁ Σ_j softmax(W_k F)_j F_j))``,
  separate (trained) blocks for the student and the teacher side, ``W_k`` Kaiming-initialised (fan-in), ``W₂``
  zero-initialised.

``box_frame`` — how boxes reach a level's cells:

- ``"image"`` (default, FGD as published): ``x · W / w_i``, ``y · H / h_i`` with ``(h_i, w_i)`` the size of image i
  before padding (mmdet's ``img_shape``) and (H, W) the level's size, which covers the *padded* batch. A box is
  therefore stretched by ``padded / image`` size (by up to the batch's padding; the images of a torchvision batch
  are grouped by aspect ratio, so it stays small).
- ``"padded"`` (a deliberate deviation, geometrically exact): ``x · W / W_pad``, ``y · H / H_pad`` with the padded
  batch size, i.e. ``x / stride`` on the levels whose stride divides the padding (P2–P5; P6/P7 are ceil'd maps).
  Needs ``padded_size`` from the task (:class:`~diffkd.tasks.DetectionModule` gives it).

Hyper-parameters of FGD's configs (``configs/distillers/fgd/``, one per detector, all levels alike): Faster R-CNN
``temp 0.5, α 5e-5, β 2.5e-5, γ 5e-5, λ 5e-7`` on P2–P5; RetinaNet ``0.5, 1e-3, 5e-4, 5e-4, 5e-6`` on P3–P7; FCOS
``0.8, 1.6e-3, 8e-4, 8e-4, 8e-6`` on P3–P7. The defaults below are ``FeatureLoss``'s own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffkd.distill.registry import register_distance

__all__ = ["FGDFeatureMSE", "FGDLoss", "GlobalContext", "fgd_attention", "fgd_feature_loss", "fgd_masks"]

BoxFrame = Literal["image", "padded"]


def fgd_attention(feat: Tensor, temp: float) -> tuple[Tensor, Tensor]:
    """FGD's spatial and channel attention of a map.

    Args:
        feat: (N, C, H, W).
        temp: the temperature T.

    Returns:
        ``S`` (N, H, W) ``= H·W·softmax_hw(mean_c |F| / T)`` and ``C`` (N, C) ``= C·softmax_c(mean_hw |F| / T)``;
        each sums to H·W resp. C per sample (mean 1).
    """
    n, c, h, w = feat.shape
    value = feat.abs()
    spatial = h * w * F.softmax((value.mean(dim=1) / temp).reshape(n, -1), dim=1).reshape(n, h, w)
    channel = c * F.softmax(value.mean(dim=(2, 3)) / temp, dim=1)
    return spatial, channel


def _check_frame(box_frame: str) -> None:
    if box_frame not in ("image", "padded"):
        raise ValueError(f"box_frame={box_frame!r}; choose 'image' (FGD) or 'padded'")


def _frames(
    box_frame: BoxFrame, n: int, image_sizes: Sequence[Sequence[int]] | None, padded_size: Sequence[int] | None
) -> list[tuple[float, float]]:
    if box_frame == "image":
        if image_sizes is None or len(image_sizes) != n:
            raise ValueError(f"box_frame='image' needs image_sizes for each of the {n} images")
        return [(float(h), float(w)) for h, w in image_sizes]
    if box_frame == "padded":
        if padded_size is None:
            raise ValueError("box_frame='padded' needs padded_size (the padded batch's (H, W)) from the task")
        return [(float(padded_size[0]), float(padded_size[1]))] * n
    _check_frame(box_frame)
    return []


def fgd_masks(
    gt_boxes: Sequence[Tensor],
    size: tuple[int, int],
    frames: Sequence[tuple[float, float]],
    device: torch.device | None = None,
) -> tuple[Tensor, Tensor]:
    """FGD's foreground (scale) and background masks of one level.

    Args:
        gt_boxes: per image, (n_i, 4) xyxy boxes in pixels of that image's frame.
        size: (H, W) of the level.
        frames: per image, the (height, width) in pixels that the level's (H, W) spans (see ``box_frame``).
        device: where the masks live (default: the boxes').

    Returns:
        ``fg`` (N, H, W): for each cell the largest ``1 / (box area in cells)`` of the boxes covering it (0
        outside every box); ``bg`` (N, H, W): ``1[fg = 0]`` normalised to sum 1 per image (all zeros when boxes cover
        the whole level).
    """
    h, w = size
    n = len(gt_boxes)
    if device is None:
        device = gt_boxes[0].device if n else torch.device("cpu")
    ys = torch.arange(h, device=device).view(1, h, 1)
    xs = torch.arange(w, device=device).view(1, 1, w)
    fg = torch.zeros(n, h, w, device=device)
    for i, (boxes, (frame_h, frame_w)) in enumerate(zip(gt_boxes, frames)):
        if boxes.numel() == 0:
            continue
        boxes = boxes.to(device=device, dtype=torch.float32)
        x0 = torch.floor(boxes[:, 0] / frame_w * w).long().view(-1, 1, 1)
        x1 = torch.ceil(boxes[:, 2] / frame_w * w).long().view(-1, 1, 1)
        y0 = torch.floor(boxes[:, 1] / frame_h * h).long().view(-1, 1, 1)
        y1 = torch.ceil(boxes[:, 3] / frame_h * h).long().view(-1, 1, 1)
        # FGD's area counts the inclusive cell ranges before they are clipped to the map
        scale = 1.0 / ((y1 + 1 - y0) * (x1 + 1 - x0)).float()
        inside = (ys >= y0) & (ys <= y1) & (xs >= x0) & (xs <= x1)  # (n_i, H, W)
        fg[i] = torch.where(inside, scale, torch.zeros((), device=device)).amax(dim=0)
    bg = (fg == 0).float()
    bg = bg / bg.sum(dim=(1, 2), keepdim=True).clamp_min(1.0)
    return fg, bg


def fgd_feature_loss(
    student: Tensor, teacher: Tensor, fg: Tensor, bg: Tensor, spatial_t: Tensor, channel_t: Tensor
) -> tuple[Tensor, Tensor]:
    """FGD's ``(L_fg, L_bg)``: squared differences weighted by the teacher's attentions and the masks, summed over
    C·H·W and divided by the batch size.

    Args:
        student, teacher: (N, C, H, W).
        fg, bg: (N, H, W) masks (:func:`fgd_masks`).
        spatial_t, channel_t: the teacher's attentions (N, H, W) and (N, C) (:func:`fgd_attention`).
    """
    n = student.shape[0]
    weighted = (student - teacher).square() * spatial_t.unsqueeze(1) * channel_t[:, :, None, None]
    fg_loss = (weighted * fg.unsqueeze(1)).sum() / n
    bg_loss = (weighted * bg.unsqueeze(1)).sum() / n
    return fg_loss, bg_loss


def _attention_loss(s_spatial: Tensor, s_channel: Tensor, t_spatial: Tensor, t_channel: Tensor) -> Tensor:
    n = s_spatial.shape[0]
    return (s_channel - t_channel).abs().sum() / n + (s_spatial - t_spatial).abs().sum() / n


class GlobalContext(nn.Module):
    """FGD's GcBlock ``R(F) = F + W₂ ReLU(LN(W₁ context))``, ``context = Σ_j softmax_j(W_k F)_j F_j``.

    Args:
        channels: C of the map; the bottleneck is C // 2.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv_mask = nn.Conv2d(channels, 1, kernel_size=1)
        self.channel_add = nn.Sequential(
            nn.Conv2d(channels, channels // 2, kernel_size=1),
            nn.LayerNorm([channels // 2, 1, 1]),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels // 2, channels, kernel_size=1),
        )
        nn.init.kaiming_normal_(self.conv_mask.weight, a=0, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.conv_mask.bias)
        nn.init.zeros_(self.channel_add[-1].weight)
        nn.init.zeros_(self.channel_add[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        """(N, C, H, W) → (N, C, H, W): ``x`` plus its channel-wise global context."""
        n, c, h, w = x.shape
        weights = F.softmax(self.conv_mask(x).reshape(n, 1, h * w), dim=2)  # (N, 1, HW)
        context = torch.bmm(x.reshape(n, c, h * w), weights.transpose(1, 2)).reshape(n, c, 1, 1)
        return x + self.channel_add(context)


class _FGDTerms(nn.Module):
    """What FGD's two distances share: the temperature, the weights of ``L_fg``, ``L_bg``, ``L_at``, the box frame,
    and the masks, attentions and feature terms of one level."""

    label = "fgd"
    needs = ("gt_boxes", "image_sizes")
    accepts = ("padded_size",)

    def __init__(self, temp: float, alpha_fgd: float, beta_fgd: float, gamma_fgd: float, box_frame: BoxFrame) -> None:
        super().__init__()
        _check_frame(box_frame)
        self.temp = float(temp)
        self.alpha_fgd, self.beta_fgd, self.gamma_fgd = float(alpha_fgd), float(beta_fgd), float(gamma_fgd)
        self.box_frame: BoxFrame = box_frame

    def forward(
        self,
        student: Tensor,
        teacher: Tensor,
        gt_boxes: Sequence[Tensor],
        image_sizes: Sequence[Sequence[int]],
        padded_size: Sequence[int] | None = None,
    ) -> Tensor:
        """The weighted sum of the distance's terms (a scalar).

        Args:
            student: (N, C_s, H, W); teacher: (N, C_t, H, W) (C_s = C_t unless the distance aligns the student).
            gt_boxes: per image, (n_i, 4) xyxy boxes in the pixels of the (transformed) image.
            image_sizes: per image, (h_i, w_i) before padding.
            padded_size: (H_pad, W_pad) of the padded batch (``box_frame="padded"``).
        """
        student, teacher = self._aligned(student.float()), teacher.detach().float()
        if student.shape != teacher.shape:
            raise ValueError(f"{self.label}: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ")
        n, _, h, w = student.shape
        t_spatial, t_channel = fgd_attention(teacher, self.temp)
        fg, bg = fgd_masks(gt_boxes, (h, w), _frames(self.box_frame, n, image_sizes, padded_size), student.device)
        fg_loss, bg_loss = fgd_feature_loss(student, teacher, fg, bg, t_spatial, t_channel)
        return self._combine(student, teacher, fg_loss, bg_loss, t_spatial, t_channel)

    def _aligned(self, student: Tensor) -> Tensor:
        """The student map at the teacher's width (here: as it is)."""
        return student

    def _combine(
        self, student: Tensor, teacher: Tensor, fg_loss: Tensor, bg_loss: Tensor, t_spatial: Tensor, t_channel: Tensor
    ) -> Tensor:
        """The loss from ``L_fg``, ``L_bg`` and the teacher's attentions S_t (N, H, W), C_t (N, C)."""
        raise NotImplementedError

    def _attention_term(self, student: Tensor, t_spatial: Tensor, t_channel: Tensor) -> Tensor:
        """``L_at`` between the student's attentions and the teacher's."""
        s_spatial, s_channel = fgd_attention(student, self.temp)
        return _attention_loss(s_spatial, s_channel, t_spatial, t_channel)

    def _repr_weights(self) -> str:
        return f"temp={self.temp}, alpha={self.alpha_fgd}, beta={self.beta_fgd}, gamma={self.gamma_fgd}"


@register_distance("fgd")
class FGDLoss(_FGDTerms):
    """FGD's loss on one FPN level (module docstring), with its learnable align conv and GcBlocks.

    Args:
        student_channels, teacher_channels: widths of the two maps (256 on an FPN); a 1×1 ``align`` conv maps the
            student to the teacher's width when they differ (FGD's, default PyTorch initialisation).
        temp: attention temperature T.
        alpha_fgd, beta_fgd, gamma_fgd, lambda_fgd: weights of ``L_fg``, ``L_bg``, ``L_at``, ``L_global``.
        box_frame: ``"image"`` (FGD) or ``"padded"`` (see the module docstring).
    """

    def __init__(
        self,
        student_channels: int = 256,
        teacher_channels: int = 256,
        temp: float = 0.5,
        alpha_fgd: float = 0.001,
        beta_fgd: float = 0.0005,
        gamma_fgd: float = 0.001,
        lambda_fgd: float = 0.000005,
        box_frame: BoxFrame = "image",
    ) -> None:
        super().__init__(temp, alpha_fgd, beta_fgd, gamma_fgd, box_frame)
        self.lambda_fgd = float(lambda_fgd)
        self.teacher_channels = int(teacher_channels)
        self.align = (
            nn.Conv2d(student_channels, teacher_channels, kernel_size=1)
            if student_channels != teacher_channels
            else None
        )
        self.global_s = GlobalContext(teacher_channels)
        self.global_t = GlobalContext(teacher_channels)

    def _aligned(self, student: Tensor) -> Tensor:
        return student if self.align is None else self.align(student)

    def _combine(
        self, student: Tensor, teacher: Tensor, fg_loss: Tensor, bg_loss: Tensor, t_spatial: Tensor, t_channel: Tensor
    ) -> Tensor:
        at_loss = self._attention_term(student, t_spatial, t_channel)
        global_loss = (self.global_s(student) - self.global_t(teacher)).square().sum() / student.shape[0]
        return (
            self.alpha_fgd * fg_loss
            + self.beta_fgd * bg_loss
            + self.gamma_fgd * at_loss
            + self.lambda_fgd * global_loss
        )

    def extra_repr(self) -> str:
        return f"{self._repr_weights()}, lambda={self.lambda_fgd}, box_frame={self.box_frame!r}"


@register_distance("fgd_mse")
class FGDFeatureMSE(_FGDTerms):
    """FGD's attention-weighted fg/bg MSE ``α·L_fg + β·L_bg (+ γ·L_at)`` without parameters: our reading of the
    DiffKD paper's "attention-based MSE inspired by FGD" (DiffKD†), which it does not define.

    After a DiffKD head the student is the denoised feature; the attentions are the teacher's (and, for ``L_at``,
    the denoised student's).

    Args:
        temp: attention temperature T.
        alpha_fgd, beta_fgd: weights of ``L_fg`` and ``L_bg`` (FGD's per-detector values).
        gamma_fgd: weight of FGD's attention loss ``L_at`` (0: not included — the paper mentions only the
            foreground/background balance).
        box_frame: ``"image"`` (FGD) or ``"padded"`` (see the module docstring).
    """

    label = "fgd_mse"

    def __init__(
        self,
        temp: float = 0.5,
        alpha_fgd: float = 0.001,
        beta_fgd: float = 0.0005,
        gamma_fgd: float = 0.0,
        box_frame: BoxFrame = "image",
    ) -> None:
        super().__init__(temp, alpha_fgd, beta_fgd, gamma_fgd, box_frame)

    def _combine(
        self, student: Tensor, teacher: Tensor, fg_loss: Tensor, bg_loss: Tensor, t_spatial: Tensor, t_channel: Tensor
    ) -> Tensor:
        loss = self.alpha_fgd * fg_loss + self.beta_fgd * bg_loss
        if self.gamma_fgd:
            loss = loss + self.gamma_fgd * self._attention_term(student, t_spatial, t_channel)
        return loss

    def extra_repr(self) -> str:
        return f"{self._repr_weights()}, box_frame={self.box_frame!r}"
