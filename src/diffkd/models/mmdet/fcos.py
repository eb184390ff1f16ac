"""MMDetection's FCOS with a caffe-style ResNet, FPN and GroupNorm head — the paper's FCOS student (R-50, 38.5 AP)
and teacher (R-101, 40.8 AP): MMDetection 3.3's ``fcos/fcos_r{50,101}-caffe_fpn_gn-head_ms-640-800-2x_coco.py``.

Registered (tags ``"detection"``, ``"coco"``, ``"mmdet"``): ``mmdet_fcos_r50_caffe_fpn_gn``,
``mmdet_fcos_r101_caffe_fpn_gn``, each ``fn(num_classes=81, weights_backbone=None, min_size=(640, 800),
max_size=1333, frozen_stages=None (1), **kwargs)``. Built on torchvision's ``FCOS`` (``model.backbone`` = the FPN with
levels ``'0', '1', '2', 'p6', 'p7'`` = P3–P7, ``model.head``, ``model.transform``; training returns a loss dict, eval
a list of ``{boxes, scores, labels}`` in the input images' coordinates), with MMDetection's numbers throughout:

- **Backbone, FPN, transform** (:mod:`diffkd.models.mmdet.common`): caffe-style ResNet (stride on the first 1×1),
  BatchNorm frozen (statistics and affine), stem + ``layer1`` frozen; FPN from C3 with P6 = conv(P5),
  P7 = conv(ReLU(P6)); BGR in 0..255 minus (102.9801, 115.9465, 122.7717), std 1, pad to 32.
- **Multi-scale training** ("ms-640-800" in 3.3 is ``RandomChoiceResize`` of the two scales (1333, 640) and
  (1333, 800), not a range): ``min_size=(640, 800)`` picks one of the two per training image; evaluation uses the
  last (800, MMDetection's test ``Resize`` (1333, 800)). An int is one scale for both.
- **Head** (:class:`MMDetFCOSHead`): per branch 4 × (3×3 conv without bias, GroupNorm(32), ReLU); the classification
  branch also feeds the centerness conv (``centerness_on_reg=False``); the regression is ``exp(scale_l · conv)`` in
  pixels with a learnable scale per level (``norm_on_bbox=False``); sigmoid classification with ``num_classes - 1``
  channels. Initialisation: every conv of the head N(0, 0.01), bias 0, the classifier's bias −log(99) (prior 0.01).
- **Points**: MMDetection's ``MlvlPointGenerator`` — ``((x + 0.5) · s, (y + 0.5) · s)`` on strides 8…128.
- **Training** (:meth:`MMDetFCOS.compute_loss`): FCOS assignment — a point is positive for the smallest-area box
  that contains it strictly (``center_sampling=False``) and whose largest distance lies in its level's regress
  range ((-1, 64), (64, 128), (128, 256), (256, 512), (512, ∞)), both ends inclusive. Losses (names as torchvision's
  FCOS, so the model drops into its experiments; MMDetection's names in brackets):
  ``classification`` (``loss_cls``) sigmoid focal loss γ 2, α 0.25, summed / number of positives;
  ``bbox_regression`` (``loss_bbox``) MMDetection's ``IoULoss`` in its default ``mode='log'``: −log(IoU) of the
  decoded boxes (IoU clamped at 1e-6), weighted by the centerness targets, summed / their sum;
  ``bbox_ctrness`` (``loss_centerness``) BCE of the centerness logits on the positives / number of positives.
  Each "/ x" is MMDetection's ``/ (x + float32 eps)``, the number of positives is at least 1 and, in a distributed
  run, both denominators are averaged over the ranks (MMDetection's ``reduce_mean``); with no positive the box and
  centerness losses are the (zero) sums of the empty predictions.
- **Test** (:meth:`MMDetFCOS.postprocess_detections`), MMDetection 3.3's ``predict_by_feat``: per level the sigmoid
  class scores above 0.05, the best 1000 of them (``nms_pre``); boxes decoded and clipped to the resized image, then
  scaled back to the input image by MMDetection's scale factors; score = class score × sigmoid(centerness) (no
  square root, as 3.3); boxes of zero width or height dropped; class-wise NMS at IoU 0.5 by MMDetection's offset
  trick (``labels · (max coordinate + 1)``); the best 100.

Labels: the data's contiguous labels 1..K (``data.contiguous_labels=true``, background 0, ``num_classes = K + 1``)
are MMDetection's classes 0..K-1 (channel ``l - 1`` of the classifier).

Weights:

- ``weights_backbone``: the path of the ImageNet caffe ResNet the configs start from —
  ``open-mmlab://detectron/resnet50_caffe`` = ``resnet50_caffe-788b5fa3.pth`` and ``detectron/resnet101_caffe`` =
  ``resnet101_caffe-3ad79236.pth`` under https://download.openmmlab.com/pretrain/third_party/ (MMDetection's
  ``tools/model_converters/detectron2pytorch.py`` layout: torchvision's key names, BatchNorm as running mean 0 and
  variance 1 around Detectron's affine scale/shift; that layout is assumed, the files were not at hand). Both
  configs name ``detectron/`` (Detectron 1), not the ``detectron2/`` MSRA files (``resnet50_msra-5891d200.pth``,
  ``resnet101_msra-6cc46731.pth``) of the other caffe configs; those load too when they hold the same keys.
  torchvision's weights (``"IMAGENET1K_V1"``) are pytorch-style (RGB, ImageNet std, stride on the 3×3) and refused.
- ``weights=<zoo .pth>`` (``create_teacher``, ``load_weights``): MMDetection v2/v3 checkpoints convert key for key
  (:meth:`MMDetFCOS.convert_foreign_checkpoint`; the v2 files' old ``fcos_cls``/``fcos_reg``/``fcos_centerness``
  names as MMDetection itself reads them); a file of another model is an error listing the keys and naming what it
  holds. A file whose config sets ``norm_on_bbox`` or ``centerness_on_reg`` (the "-normbbox-centeronreg" models:
  same keys, other outputs) is refused.

Named differences (what cannot match exactly):

- The resize of :class:`~diffkd.models.mmdet.common.MMDetTransform` (float image, not OpenCV's uint8): at most half
  a grey level per pixel where a resize happens.
- NMS is torchvision's ``nms`` (MMDetection: mmcv's kernel; same IoU, same offset trick), and on the GPU the focal
  loss is the PyTorch formula MMDetection uses on the CPU (MMDetection's GPU path is mmcv's CUDA kernel of the same
  formula): rounding only.
- The data side (random horizontal flip, dropping crowd and tiny boxes, grouping images by aspect ratio) belongs to
  the data module, not to the model.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import FCOS
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList

from diffkd.models.mmdet.boxes import bbox_overlaps, bbox_post_process, filter_scores_and_topk, rescale_boxes
from diffkd.models.mmdet.common import (
    LOSS_EPS,
    TAGS,
    MMDetWeightsError,
    backbone_neck_rules,
    check_style,
    check_target_labels,
    config_text,
    convert_keys,
    describe_mmdet_checkpoint,
    frozen_stages_of,
    is_mmdet_checkpoint,
    is_weights_file,
    mmdet_fpn,
    mmdet_resnet,
    mmdet_state_dict,
    mmdet_transform,
    refuse_pretrained,
    sigmoid_focal_loss,
)
from diffkd.models.variants import register_variant

__all__ = [
    "INF",
    "REGRESS_RANGES",
    "STRIDES",
    "ConvGNReLU",
    "MMDetFCOS",
    "MMDetFCOSHead",
    "MMDetPointGenerator",
    "Scale",
    "build_mmdet_fcos",
    "fcos_targets",
]

INF = 1e8
STRIDES = (8, 16, 32, 64, 128)
REGRESS_RANGES: tuple[tuple[float, float], ...] = ((-1, 64), (64, 128), (128, 256), (256, 512), (512, INF))
_CAFFE_FILES = {
    50: "open-mmlab://detectron/resnet50_caffe = resnet50_caffe-788b5fa3.pth",
    101: "open-mmlab://detectron/resnet101_caffe = resnet101_caffe-3ad79236.pth",
}
_CAFFE_URL = "https://download.openmmlab.com/pretrain/third_party/"


# ---------------------------------------------------------------------------------------------------- head
class Scale(nn.Module):
    """``x · scale`` with a learnable scalar (mmcv's ``Scale``; state-dict key ``scale``, a 0-dim tensor)."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale, dtype=torch.float))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class ConvGNReLU(nn.Module):
    """3×3 conv (no bias) → GroupNorm → ReLU: mmcv's ``ConvModule`` with ``norm_cfg=GN``, its keys ``conv``/``gn``."""

    def __init__(self, in_channels: int, out_channels: int, num_groups: int = 32) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.gn = nn.GroupNorm(num_groups, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.gn(self.conv(x)))


class MMDetFCOSHead(nn.Module):
    """MMDetection's ``FCOSHead`` (GN towers, centerness on the classification branch, scale + exp regression).

    Runs once on the list of FPN levels; ``cls_logits``, ``bbox_reg`` and ``bbox_ctrness`` run once per level, so
    the taps ``head.cls_logits:*`` etc. give one point per level.

    Args:
        num_classes: sigmoid classes (MMDetection's ``num_classes``: 80 on COCO; no background channel).
        in_channels, feat_channels: the FPN's and the towers' channels (256).
        stacked_convs: convs per tower (4).
        num_levels: FPN levels (5, one learnable scale each).
        num_groups: GroupNorm groups (32).
        prior_prob: the classifier's initial foreground probability (0.01).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 256,
        feat_channels: int = 256,
        stacked_convs: int = 4,
        num_levels: int = 5,
        num_groups: int = 32,
        prior_prob: float = 0.01,
    ) -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        widths = [in_channels] + [feat_channels] * (stacked_convs - 1)
        self.cls_convs = nn.ModuleList(ConvGNReLU(c, feat_channels, num_groups) for c in widths)
        self.reg_convs = nn.ModuleList(ConvGNReLU(c, feat_channels, num_groups) for c in widths)
        self.cls_logits = nn.Conv2d(feat_channels, self.num_classes, 3, padding=1)
        self.bbox_reg = nn.Conv2d(feat_channels, 4, 3, padding=1)
        self.bbox_ctrness = nn.Conv2d(feat_channels, 1, 3, padding=1)
        self.scales = nn.ModuleList(Scale(1.0) for _ in range(num_levels))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, x: Sequence[Tensor]) -> dict[str, list[Tensor]]:
        """Per level ``l`` of ``x`` ((N, C, H_l, W_l) each): ``cls_logits`` (N, K, H_l, W_l) (before the sigmoid),
        ``bbox_regression`` (N, 4, H_l, W_l) float32 distances (left, top, right, bottom) in input pixels,
        ``bbox_ctrness`` (N, 1, H_l, W_l) (before the sigmoid)."""
        if len(x) != len(self.scales):
            raise ValueError(f"the FCOS head has {len(self.scales)} level scales, got {len(x)} feature maps")
        logits, boxes, ctrness = [], [], []
        for feature, scale in zip(x, self.scales):
            cls_feat = feature
            for layer in self.cls_convs:
                cls_feat = layer(cls_feat)
            reg_feat = feature
            for layer in self.reg_convs:
                reg_feat = layer(reg_feat)
            logits.append(self.cls_logits(cls_feat))
            # float before exp (as MMDetection): a half-precision exp overflows at 11
            boxes.append(scale(self.bbox_reg(reg_feat)).float().exp())
            ctrness.append(self.bbox_ctrness(cls_feat))
        return {"cls_logits": logits, "bbox_regression": boxes, "bbox_ctrness": ctrness}


# ---------------------------------------------------------------------------------------------------- points
class MMDetPointGenerator(AnchorGenerator):
    """MMDetection's ``MlvlPointGenerator``: one point per cell at ``((x + offset) · s, (y + offset) · s)``.

    An ``AnchorGenerator`` only for torchvision's ``FCOS`` (which wants one at ``anchor_generator``); it yields
    points, not boxes.

    Args:
        strides: one per level (8, 16, 32, 64, 128).
        offset: 0.5 (cell centres).
    """

    def __init__(self, strides: Sequence[int] = STRIDES, offset: float = 0.5) -> None:
        super().__init__(tuple((int(s),) for s in strides), ((1.0,),) * len(strides))
        self.strides = tuple(int(s) for s in strides)
        self.offset = float(offset)

    def grid_points(
        self, sizes: Sequence[Sequence[int]], dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
    ) -> list[Tensor]:
        """Per level of size (H_l, W_l): (H_l·W_l, 2) points (x, y), row-major."""
        if len(sizes) != len(self.strides):
            raise ValueError(f"{len(sizes)} feature maps for {len(self.strides)} point strides")
        points = []
        for (height, width), stride in zip(sizes, self.strides):
            xs = ((torch.arange(int(width), device=device) + self.offset) * stride).to(dtype)
            ys = ((torch.arange(int(height), device=device) + self.offset) * stride).to(dtype)
            yy, xx = torch.meshgrid(ys, xs, indexing="ij")
            points.append(torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=-1))
        return points

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        """The points of all levels, (Σ H_l·W_l, 2), once per image."""
        f = feature_maps[0]
        joined = torch.cat(self.grid_points([m.shape[-2:] for m in feature_maps], f.dtype, f.device))
        return [joined for _ in image_list.image_sizes]


# ---------------------------------------------------------------------------------------------------- training
def fcos_targets(
    points: Tensor, regress_ranges: Tensor, boxes: Tensor, labels: Tensor, background: int
) -> tuple[Tensor, Tensor]:
    """FCOS's assignment of one image (MMDetection's ``FCOSHead._get_targets_single``, ``center_sampling=False``).

    Args:
        points: (P, 2) all levels' points.
        regress_ranges: (P, 2) each point's level range (lo, hi), both inclusive.
        boxes: (G, 4) ground truth x1, y1, x2, y2 in the transformed image's pixels.
        labels: (G,) classes 0..K-1.
        background: the label of unassigned points (K).

    Returns:
        ``labels`` (P,) and ``bbox_targets`` (P, 4) distances (left, top, right, bottom) to the assigned box.
    """
    num_points, num_gts = points.shape[0], boxes.shape[0]
    if num_gts == 0:
        return labels.new_full((num_points,), background), boxes.new_zeros((num_points, 4))
    areas = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))[None].repeat(num_points, 1)
    ranges = regress_ranges[:, None, :].expand(num_points, num_gts, 2)
    gt = boxes[None].expand(num_points, num_gts, 4)
    xs = points[:, 0, None].expand(num_points, num_gts)
    ys = points[:, 1, None].expand(num_points, num_gts)
    targets = torch.stack((xs - gt[..., 0], ys - gt[..., 1], gt[..., 2] - xs, gt[..., 3] - ys), -1)
    inside = targets.min(-1)[0] > 0
    largest = targets.max(-1)[0]
    in_range = (largest >= ranges[..., 0]) & (largest <= ranges[..., 1])
    areas[~inside] = INF
    areas[~in_range] = INF
    min_area, min_index = areas.min(dim=1)
    assigned = labels[min_index]
    assigned[min_area == INF] = background
    return assigned, targets[torch.arange(num_points, device=points.device), min_index]


def _reduce_mean(value: Tensor) -> Tensor:
    """The mean over the ranks of a distributed run (MMDetection's ``reduce_mean``); ``value`` otherwise."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    value = value.clone()
    dist.all_reduce(value.div_(dist.get_world_size()), op=dist.ReduceOp.SUM)
    return value


def _decode(points: Tensor, distances: Tensor) -> Tensor:
    """(M, 4) boxes x1, y1, x2, y2 from (M, 2) points and (M, 4) distances (left, top, right, bottom)."""
    return torch.stack(
        [
            points[:, 0] - distances[:, 0],
            points[:, 1] - distances[:, 1],
            points[:, 0] + distances[:, 2],
            points[:, 1] + distances[:, 3],
        ],
        -1,
    )


# ---------------------------------------------------------------------------------------------------- detector
class MMDetFCOS(FCOS):
    """torchvision's ``FCOS`` computing MMDetection's FCOS (see the module docstring).

    Args:
        backbone: :func:`~diffkd.models.mmdet.common.mmdet_fpn` (``out_channels`` 256, five levels).
        num_classes: classes including background 0 (81 on COCO with contiguous labels).
        min_size, max_size, **kwargs: :class:`~diffkd.models.mmdet.common.MMDetTransform`'s (``_skip_resize``...).
        score_thresh, nms_thresh, detections_per_img, topk_candidates: the test settings (``score_thr``, NMS IoU,
            ``max_per_img``, ``nms_pre``).
        regress_ranges: one (lo, hi) per level.
        label: the registry name, for messages.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int = 81,
        min_size: int | Sequence[int] = (640, 800),
        max_size: int = 1333,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_img: int = 100,
        topk_candidates: int = 1000,
        regress_ranges: Sequence[Sequence[float]] = REGRESS_RANGES,
        label: str = "mmdet_fcos",
        **kwargs: Any,
    ) -> None:
        if num_classes < 2:
            raise ValueError(f"{label}: num_classes={num_classes} counts background 0; it needs at least 2")
        head = MMDetFCOSHead(num_classes - 1, backbone.out_channels, num_levels=len(STRIDES))
        super().__init__(
            backbone,
            num_classes,
            anchor_generator=MMDetPointGenerator(STRIDES),
            head=head,
            score_thresh=score_thresh,
            nms_thresh=nms_thresh,
            detections_per_img=detections_per_img,
            topk_candidates=topk_candidates,
        )
        self.transform = mmdet_transform(min_size, max_size, "caffe", **kwargs)
        if len(regress_ranges) != len(STRIDES):
            raise ValueError(f"{label}: {len(regress_ranges)} regress ranges for {len(STRIDES)} levels")
        self.regress_ranges = tuple((float(lo), float(hi)) for lo, hi in regress_ranges)
        self.label = label
        self.box_coder = None  # torchvision's FCOS box coder: not used (distances are pixels here)

    # ------------------------------------------------------------------ forward
    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Training: ``{"classification", "bbox_regression", "bbox_ctrness"}`` scalar losses; eval: per image
        ``{"boxes": (D, 4), "scores": (D,), "labels": (D,)}`` in the input image's pixels, D ≤ 100.

        Args:
            images: (3, H_i, W_i) RGB in [0, 1].
            targets: per image ``boxes`` (G, 4) x1, y1, x2, y2 in pixels and ``labels`` (G,) in 1..K (training).
        """
        if self.training and targets is None:
            raise ValueError(f"{self.label}: training needs targets (boxes and labels)")
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        image_list, targets = self.transform(images, targets)
        features = list(self.backbone(image_list.tensors).values())
        head_outputs = self.head(features)
        points = self.anchor_generator.grid_points(
            [f.shape[-2:] for f in features], torch.float32, image_list.tensors.device
        )
        if self.training:
            assert targets is not None
            return self.compute_loss(targets, head_outputs, points)
        return self.postprocess_detections(head_outputs, points, image_list.image_sizes, original_sizes)

    # ------------------------------------------------------------------ training
    def compute_loss(
        self,
        targets: list[dict[str, Tensor]],
        head_outputs: dict[str, list[Tensor]],
        points: list[Tensor],
        num_anchors_per_level: list[int] | None = None,
    ) -> dict[str, Tensor]:
        """MMDetection's ``FCOSHead.loss_by_feat`` (module docstring).

        Args:
            targets: per image ``boxes`` (G, 4) in the transformed image's pixels, ``labels`` (G,) in 1..K.
            head_outputs: :meth:`MMDetFCOSHead.forward`'s lists over the levels.
            points: per level (H_l·W_l, 2), :meth:`MMDetPointGenerator.grid_points`.
            num_anchors_per_level: unused (torchvision's signature).
        """
        cls_scores = head_outputs["cls_logits"]
        bbox_preds = head_outputs["bbox_regression"]
        centernesses = head_outputs["bbox_ctrness"]
        num_classes = self.head.num_classes
        num_images = cls_scores[0].shape[0]
        device = bbox_preds[0].device
        check_target_labels(targets, num_classes, self.label)

        num_points = [p.shape[0] for p in points]
        all_points = torch.cat(points)
        ranges = torch.cat([p.new_tensor(r)[None].expand_as(p) for p, r in zip(points, self.regress_ranges)])
        per_image = [
            fcos_targets(all_points, ranges, t["boxes"].to(all_points), t["labels"].to(device) - 1, num_classes)
            for t in targets
        ]
        # MMDetection's order: level-major, then image, then row-major points (its sums add in this order)
        labels_per_image = [labels.split(num_points) for labels, _ in per_image]
        boxes_per_image = [boxes.split(num_points) for _, boxes in per_image]
        flat_labels = torch.cat([lab[level] for level in range(len(points)) for lab in labels_per_image])
        flat_targets = torch.cat([box[level] for level in range(len(points)) for box in boxes_per_image])
        flat_cls = torch.cat([c.permute(0, 2, 3, 1).reshape(-1, num_classes) for c in cls_scores]).float()
        flat_reg = torch.cat([b.permute(0, 2, 3, 1).reshape(-1, 4) for b in bbox_preds]).float()
        flat_ctr = torch.cat([c.permute(0, 2, 3, 1).reshape(-1) for c in centernesses]).float()
        flat_points = torch.cat([p.repeat(num_images, 1) for p in points])

        pos = ((flat_labels >= 0) & (flat_labels < num_classes)).nonzero().reshape(-1)
        num_pos = _reduce_mean(torch.tensor(float(len(pos)), device=device)).clamp(min=1.0)

        one_hot = F.one_hot(flat_labels, num_classes + 1)[:, :num_classes].to(flat_cls.dtype)
        loss_cls = sigmoid_focal_loss(flat_cls, one_hot, 2.0, 0.25).sum() / (num_pos + LOSS_EPS)

        pos_reg, pos_ctr, pos_targets = flat_reg[pos], flat_ctr[pos], flat_targets[pos]
        ctr_targets = self.centerness_target(pos_targets)
        ctr_denorm = _reduce_mean(ctr_targets.sum().detach()).clamp(min=1e-6)
        if len(pos) > 0:
            pos_points = flat_points[pos]
            if not bool((ctr_targets > 0).any()):
                loss_box = (_decode(pos_points, pos_reg) * ctr_targets[:, None]).sum()  # MMDetection's zero
            else:
                iou = bbox_overlaps(_decode(pos_points, pos_reg), _decode(pos_points, pos_targets), is_aligned=True)
                iou = iou.clamp(min=1e-6)
                loss_box = (-iou.log() * ctr_targets).sum() / (ctr_denorm + LOSS_EPS)
            bce = F.binary_cross_entropy_with_logits(pos_ctr, ctr_targets, reduction="none")
            loss_ctr = bce.sum() / (num_pos + LOSS_EPS)
        else:
            loss_box = pos_reg.sum()
            loss_ctr = pos_ctr.sum()
        return {"classification": loss_cls, "bbox_regression": loss_box, "bbox_ctrness": loss_ctr}

    @staticmethod
    def centerness_target(distances: Tensor) -> Tensor:
        """(M,) ``sqrt(min(l, r) / max(l, r) · min(t, b) / max(t, b))`` of (M, 4) positive distances."""
        if len(distances) == 0:
            return distances[:, 0]
        lr, tb = distances[:, [0, 2]], distances[:, [1, 3]]
        return torch.sqrt((lr.min(-1)[0] / lr.max(-1)[0]) * (tb.min(-1)[0] / tb.max(-1)[0]))

    # ------------------------------------------------------------------ evaluation
    def postprocess_detections(  # type: ignore[override]
        self,
        head_outputs: dict[str, list[Tensor]],
        points: list[Tensor],
        image_sizes: list[tuple[int, int]],
        original_sizes: list[tuple[int, int]] | None = None,
    ) -> list[dict[str, Tensor]]:
        """MMDetection 3.3's ``predict_by_feat`` with ``rescale=True`` (module docstring).

        Args:
            head_outputs: :meth:`MMDetFCOSHead.forward`'s lists over the levels.
            points: per level (H_l·W_l, 2).
            image_sizes: per image the resized, unpadded (h, w) — boxes are clipped to it.
            original_sizes: per image the input (h, w) the boxes are scaled back to (``None``: no rescale).

        Returns:
            Per image ``boxes`` (D, 4), ``scores`` (D,), ``labels`` (D,) in 1..K.
        """
        num_classes = self.head.num_classes
        detections = []
        for i, (height, width) in enumerate(image_sizes):
            scores_l, labels_l, boxes_l, points_l, ctr_l = [], [], [], [], []
            for level, level_points in enumerate(points):
                cls = head_outputs["cls_logits"][level][i].permute(1, 2, 0).reshape(-1, num_classes).float().sigmoid()
                reg = head_outputs["bbox_regression"][level][i].permute(1, 2, 0).reshape(-1, 4).float()
                ctr = head_outputs["bbox_ctrness"][level][i].permute(1, 2, 0).reshape(-1).float().sigmoid()
                scores, labels, keep = filter_scores_and_topk(cls, self.score_thresh, self.topk_candidates)
                scores_l.append(scores)
                labels_l.append(labels)
                boxes_l.append(reg[keep])
                points_l.append(level_points[keep])
                ctr_l.append(ctr[keep])
            boxes = _decode(torch.cat(points_l).float(), torch.cat(boxes_l))
            boxes[:, 0::2].clamp_(min=0, max=width)
            boxes[:, 1::2].clamp_(min=0, max=height)
            if original_sizes is not None:
                boxes = rescale_boxes(boxes, (height, width), original_sizes[i])
            boxes, scores, labels = bbox_post_process(
                boxes, torch.cat(scores_l) * torch.cat(ctr_l), torch.cat(labels_l), self.nms_thresh,
                self.detections_per_img,
            )  # fmt: skip
            detections.append({"boxes": boxes, "scores": scores, "labels": labels + 1})
        return detections

    # ------------------------------------------------------------------ MMDetection checkpoints
    def convert_foreign_checkpoint(self, obj: Any, origin: str) -> dict[str, Tensor] | None:
        """This model's state dict from an MMDetection v2/v3 checkpoint (``None``: not MMDetection's).

        Raises:
            MMDetWeightsError: a key that does not fit (listed, with what the file holds), or a file of an FCOS
                whose head settings compute other outputs.
        """
        if not is_mmdet_checkpoint(obj):
            return None
        state, meta = mmdet_state_dict(obj)
        config = config_text(meta)
        changed = [k for k in ("norm_on_bbox", "centerness_on_reg") if re.search(rf"{k}['\"]?\s*[=:]\s*True", config)]
        if changed:
            raise MMDetWeightsError(
                f"the MMDetection checkpoint {origin} is an FCOS with {' and '.join(changed)}=True (an "
                f"'-normbbox-centeronreg' config): its keys fit {self.label}, its outputs would not (this model "
                "computes the caffe GN-head configs: both False)"
            )
        check_style(meta, "caffe", origin, self.label, state)
        rules = _HEAD_RULES + backbone_neck_rules(3, "on_output")
        return convert_keys(state, rules, self, origin, lambda s: describe_mmdet_checkpoint(s, meta))


_HEAD_RULES = [
    (r"^bbox_head\.(cls_convs|reg_convs)\.(\d+)\.(conv\.weight|gn\.weight|gn\.bias)$", r"head.\1.\2.\3"),
    (r"^bbox_head\.(?:conv|fcos)_cls\.(weight|bias)$", r"head.cls_logits.\1"),
    (r"^bbox_head\.(?:conv|fcos)_reg\.(weight|bias)$", r"head.bbox_reg.\1"),
    (r"^bbox_head\.(?:conv|fcos)_centerness\.(weight|bias)$", r"head.bbox_ctrness.\1"),
    (r"^bbox_head\.scales\.(\d+)\.scale$", r"head.scales.\1.scale"),
]


# ---------------------------------------------------------------------------------------------------- registry
def build_mmdet_fcos(
    depth: int,
    num_classes: int = 81,
    weights_backbone: str | None = None,
    min_size: int | Sequence[int] = (640, 800),
    max_size: int = 1333,
    frozen_stages: int | None = None,
    *,
    pretrained: bool = False,
    trainable_layers: int | None = None,
    frozen_bn: bool = True,
    label: str,
    **kwargs: Any,
) -> MMDetFCOS:
    """MMDetection's caffe-style R-``depth`` FCOS with FPN and GN head (module docstring).

    Args:
        depth: 50 or 101.
        num_classes: classes including background 0.
        weights_backbone: the path of the Detectron caffe ResNet file (module docstring), or ``None``.
        min_size, max_size: training short sides (one chosen per image; evaluation uses the last) and the long-side
            limit.
        frozen_stages: the stem and this many stages take no gradient (-1: none; ``None``: 1, or from
            ``trainable_layers``).
        pretrained: only ``False``: the registry publishes no weights; load a zoo file with ``weights=``.
        trainable_layers: torchvision's spelling of ``frozen_stages`` (stages trained from ``layer4`` down:
            ``frozen_stages = 4 - trainable_layers``), as the detection configs pass it
            (:func:`~diffkd.models.mmdet.common.frozen_stages_of`).
        frozen_bn: only ``True`` (the configs freeze BatchNorm).
        label: the registry name, for messages.
        **kwargs: :class:`MMDetFCOS`'s (test settings, ``_skip_resize``...).
    """
    if pretrained:
        refuse_pretrained(label)
    frozen_stages = frozen_stages_of(label, frozen_stages, trainable_layers, frozen_bn)
    if weights_backbone is not None and not is_weights_file(str(weights_backbone)):
        raise ValueError(
            f"{label}: weights_backbone={weights_backbone!r} names pytorch-style ImageNet weights, but this "
            f"model is MMDetection's caffe-style R-{depth} (BGR 0..255, std 1, stride on the 1×1), initialised "
            f"from {_CAFFE_FILES[depth]}: download {_CAFFE_URL}{_CAFFE_FILES[depth].rsplit(' ', 1)[-1]} and "
            "pass its path"
        )
    weights = None if weights_backbone is None else str(weights_backbone)
    body = mmdet_resnet(depth, style="caffe", frozen_stages=frozen_stages, bn_requires_grad=False, weights=weights)
    backbone = mmdet_fpn(body, 1, "on_output", relu_before_extra=True)
    return MMDetFCOS(backbone, num_classes, min_size, max_size, label=label, **kwargs)


def _register(depth: int) -> None:
    name = f"mmdet_fcos_r{depth}_caffe_fpn_gn"
    doc = (
        f"MMDetection's fcos_r{depth}-caffe_fpn_gn-head_ms-640-800-2x_coco (see :func:`build_mmdet_fcos`); FPN "
        "levels '0', '1', '2', 'p6', 'p7' (P3–P7), 256 channels."
    )
    register_variant(build_mmdet_fcos, name, doc, TAGS, depth, label=name)


for _depth in (50, 101):
    _register(_depth)
del _depth
