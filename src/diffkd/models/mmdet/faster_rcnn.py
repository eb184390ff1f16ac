"""MMDetection's Faster R-CNN (R-50/R-101/X-101-64x4d FPN, ``faster_rcnn/faster-rcnn_*_fpn_2x_coco``) on torchvision's
``FasterRCNN`` classes, and an FPN-only teacher read from any ResNet/ResNeXt + FPN zoo checkpoint.

Registered names (tags ``"detection"``, ``"coco"``, ``"mmdet"``):

* ``mmdet_faster_rcnn_r50_fpn``, ``mmdet_faster_rcnn_r101_fpn``, ``mmdet_faster_rcnn_x101_64x4d_fpn``:
  ``fn(num_classes=81, pretrained=False, weights=None, weights_backbone=None, min_size=800, max_size=1333,
  frozen_stages=None (1), **kwargs)`` → :class:`MMDetFasterRCNN`. ``num_classes`` counts background 0 (our COCO data
  with ``data.contiguous_labels=true``: labels 1..80, so 81). ``weights`` loads a checkpoint (an MMDetection zoo file
  is converted, see below); ``weights_backbone`` ImageNet weights (``"IMAGENET1K_V1"``: torchvision's ResNet-50/101,
  MMDetection's ``torchvision://resnet50/101``; or a file path). ``**kwargs``: the test/train settings under
  torchvision's names (``rpn_pre_nms_top_n_test``, ``box_detections_per_img``, ... see :data:`SETTINGS`), defaults
  MMDetection's; ``_skip_resize``; and the torchvision detectors' ``trainable_layers`` (= 4 - ``frozen_stages``) and
  ``frozen_bn`` (must stay true), so that ``model.student.name=mmdet_faster_rcnn_r50_fpn`` works with the detection
  model config.
* ``mmdet_fpn_teacher_r50``, ``mmdet_fpn_teacher_r101``, ``mmdet_fpn_teacher_x101_64x4d``: ``fn(style="pytorch",
  min_size=800, max_size=1333, **kwargs)`` → :class:`MMDetFPNTeacher`, a backbone + Faster R-CNN FPN (C2–C5,
  max-pooled P6: levels ``'0'..'3', 'pool'``) and nothing else. Its weights come from *any* MMDetection checkpoint
  with that backbone and FPN — e.g. ``cascade_mask_rcnn_x101_64x4d_fpn_20e_coco`` (45.6 AP), the paper's stronger
  Faster R-CNN teacher (Table 5): backbone + neck load strictly, the file's heads are left out with a log line.
  :class:`~diffkd.tasks.DetectionModule` refuses it at setup where the teacher's heads are needed
  (``regression_kd_weight > 0``, ``teacher_runs: heads``). ``mmdet_faster_rcnn_<backbone>_fpn(backbone_only=True)``
  builds the same model (``model.teacher.backbone_only=true``).

What they compute (MMDetection 3.3's ``_base_/models/faster-rcnn_r50_fpn.py``, its ``RPNHead``, ``StandardRoIHead``,
``SingleRoIExtractor``, ``Shared2FCBBoxHead``, ``MaxIoUAssigner``, ``RandomSampler``, ``DeltaXYWHBBoxCoder``,
``CrossEntropyLoss``/``L1Loss``, ``multiclass_nms`` and mmcv's ``batched_nms``), on top of
:mod:`~diffkd.models.mmdet.common` (pytorch-style ResNet with frozen BN statistics and stem + stage 1, FPN with
max-pooled P6, RGB mean/std transform with mmcv's rescale, pad 32, MMDetection's anchors):

- **RPN** (:class:`MMDetRPN`, ``model.rpn``; its head is torchvision's ``RPNHead``, the same 3×3 conv + ReLU + two
  1×1 convs): anchors scales (8,), ratios (0.5, 1, 2), strides 4..64 on P2–P6. Proposals per image: per level the
  ``nms_pre`` highest sigmoid scores (1000 test, 2000 train; sorted as MMDetection sorts), decoded (stds 1, ``wh``
  clip log(1000/16), clamped to the resized image), boxes of zero width or height dropped (``min_bbox_size`` 0), NMS
  0.7 per level (mmcv's ``batched_nms``: coordinate offsets by level below 10000 boxes, a loop over levels above),
  the best 1000. Training: anchors valid where MMDetection's valid flags are (inside each image's own padded size),
  MaxIoUAssigner(0.7, 0.3, min_pos_iou 0.3, low-quality matches to every anchor at a box's best IoU, the later box
  winning), RandomSampler(256, 0.5, no boxes as proposals), sigmoid cross-entropy and L1 on the deltas, each per
  level summed and divided by the number of sampled anchors of the batch (+ float32 eps).
- **RoI head** (:class:`MMDetRoIHeads`, ``model.roi_heads``): RoIAlign 7×7, ``sampling_ratio`` 0, ``aligned=True``
  on P2–P5 with MMDetection's level rule ``floor(log2(sqrt(wh) / 56 + 1e-6))`` (:class:`MMDetRoIAlign`,
  ``box_roi_pool``); torchvision's ``TwoMLPHead`` (fc6/fc7 = ``shared_fcs.0/1``, 1024, Xavier-uniform) and
  ``FastRCNNPredictor`` (``cls_score`` normal 0.01, ``bbox_pred`` normal 0.001). Training: the ground-truth boxes
  first among the proposals, MaxIoUAssigner(0.5, 0.5, min_pos_iou 0.5, no low-quality matches),
  RandomSampler(512, 0.25), softmax cross-entropy over the sampled RoIs, L1 on the class-specific deltas of the
  positives divided by the number of sampled RoIs; coder stds (0.1, 0.1, 0.2, 0.2). Test: softmax, class-specific
  decode clamped to the resized image, boxes scaled back to the input image, then score > 0.05, NMS 0.5 per class
  (``batched_nms``), at most 100.
- **Sampling** replays MMDetection's random draws: ``torch.randperm`` on the CPU generator, in its order (RPN image
  by image, positives then negatives, then the RoI head likewise), so the same seed samples the same anchors and RoIs.
- **Losses** under MMDetection's names: ``loss_rpn_cls``, ``loss_rpn_bbox``, ``loss_cls``, ``loss_bbox`` (torchvision's
  Faster R-CNN: ``loss_objectness``, ``loss_rpn_box_reg``, ``loss_classifier``, ``loss_box_reg``); their sum is
  MMDetection's training loss (its ``acc`` is a metric, not a loss).

Class layout: torchvision's background-first. ``box_predictor.cls_score`` has ``num_classes`` rows with background
at 0 (MMDetection's ``fc_cls``: background last), ``box_predictor.bbox_pred`` ``4·num_classes`` (MMDetection's
``fc_reg``: ``4·(num_classes - 1)``, class-specific) whose 4 background rows are zero and never used. Conversion
reorders and pads; softmax and cross-entropy run on the logits put back in MMDetection's order, so the numbers are
MMDetection's bit for bit (a permuted softmax sums in another order).

Checkpoints: ``convert_foreign_checkpoint`` (called by :func:`~diffkd.models.checkpoint.load_weights`, so
``create_teacher(name, weights=<zoo .pth>)`` and ``model.teacher.weights=<zoo .pth>`` read MMDetection v2/v3 files)
maps ``backbone.*``, ``neck.*``, ``rpn_head.rpn_conv/rpn_cls/rpn_reg``, ``roi_head.bbox_head.shared_fcs.0/1``,
``fc_cls``, ``fc_reg`` key for key; a missing, unexpected or misshapen key is an error listing them and naming what
the file holds ("Cascade Mask R-CNN X-101-64x4d FPN, 80 classes → ..."). A caffe-style file (its ``meta`` config says
``style='caffe'``) is refused by the pytorch-style models. BatchNorm's ``num_batches_tracked``, absent from some
files, is filled with 0.

Named differences from MMDetection (everything else is computed as it computes it; the tests measure it):

- the transform's resize (:mod:`~diffkd.models.mmdet.common`: the float image is resized, MMDetection resizes the
  decoded uint8 image with OpenCV);
- NMS and RoIAlign are torchvision's ops; MMDetection calls mmcv's compiled ones, which implement the same
  algorithms (IoU without the +1 offset; Detectron2's aligned RoIAlign with adaptive sampling); the reference tests
  run MMDetection with torchvision's ops (mmcv-lite has no compiled ops), so they do not cover mmcv's kernels;
- the ImageNet initialisation of X-101-64x4d: MMDetection loads ``open-mmlab://resnext101_64x4d``
  (``resnext101_64x4d-ee2c6f71.pth``), torchvision has another ResNeXt-101 64x4d (``IMAGENET1K_V1``, 83.25 top-1,
  trained with torchvision's newer recipe); ``weights_backbone=<path of the open-mmlab file>`` loads MMDetection's;
- under bf16 autocast RoIs stay float32 (MMDetection's fp16 mode casts them to the features' dtype);
- the sampling replay above holds for the model alone: a training step that draws other random numbers between the
  detector's calls (e.g. DiffKD's noise), or a multi-scale transform (its scale is a torch draw, MMDetection's data
  pipeline draws with numpy), shifts the stream: the samples are then MMDetection's in distribution, not draw for
  draw.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models.detection.faster_rcnn import FasterRCNN, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops import MultiScaleRoIAlign

from diffkd.models.mmdet.boxes import (
    DeltaXYWHCoder,
    batched_nms,
    bbox_overlaps,
    bbox_post_process,
    max_iou_assign,
    rescale_boxes,
)
from diffkd.models.mmdet.common import (
    COCO_NUM_CLASSES,
    LOSS_EPS,
    RESNETS,
    TAGS,
    MMDetAnchorGenerator,
    MMDetTransform,
    Rule,
    backbone_neck_rules,
    check_style,
    check_target_boxes,
    convert_backbone_fpn,
    convert_keys,
    describe_mmdet_checkpoint,
    fill_num_batches_tracked,
    frozen_stages_of,
    is_mmdet_checkpoint,
    mmdet_fpn,
    mmdet_resnet,
    mmdet_state_dict,
    mmdet_transform,
    refuse_pretrained,
    with_weights,
)
from diffkd.models.variants import register_variant

__all__ = [
    "BACKBONES",
    "SETTINGS",
    "ZOO",
    "DeltaXYWHCoder",
    "MMDetFPNTeacher",
    "MMDetFasterRCNN",
    "MMDetRPN",
    "MMDetRoIAlign",
    "MMDetRoIHeads",
    "batched_nms",
    "bbox_overlaps",
    "build_faster_rcnn",
    "build_fpn_teacher",
    "describe_mmdet_checkpoint",
    "max_iou_assign",
    "random_sample",
]

log = logging.getLogger(__name__)


#: ``suffix`` → (depth, groups, width_per_group, MMDetection's name).
BACKBONES: dict[str, tuple[int, int, int, str]] = RESNETS

_ZOO_URL = "https://download.openmmlab.com/mmdetection/v2.0/"
#: registered name → (MMDetection 3.x config, box AP, zoo file) of the model-zoo checkpoint it loads.
ZOO: dict[str, tuple[str, float, str]] = {
    "mmdet_faster_rcnn_r50_fpn": (
        "faster_rcnn/faster-rcnn_r50_fpn_2x_coco",
        38.4,
        _ZOO_URL + "faster_rcnn/faster_rcnn_r50_fpn_2x_coco/"
        "faster_rcnn_r50_fpn_2x_coco_bbox_mAP-0.384_20200504_210434-a5d8aa15.pth",
    ),
    "mmdet_faster_rcnn_r101_fpn": (
        "faster_rcnn/faster-rcnn_r101_fpn_2x_coco",
        39.8,
        _ZOO_URL + "faster_rcnn/faster_rcnn_r101_fpn_2x_coco/"
        "faster_rcnn_r101_fpn_2x_coco_bbox_mAP-0.398_20200504_210455-1d2dac9c.pth",
    ),
    "mmdet_faster_rcnn_x101_64x4d_fpn": (
        "faster_rcnn/faster-rcnn_x101-64x4d_fpn_2x_coco",
        41.6,
        _ZOO_URL + "faster_rcnn/faster_rcnn_x101_64x4d_fpn_2x_coco/"
        "faster_rcnn_x101_64x4d_fpn_2x_coco_20200512_161033-5961fa95.pth",
    ),
    "mmdet_fpn_teacher_x101_64x4d": (
        "cascade_rcnn/cascade-mask-rcnn_x101-64x4d_fpn_20e_coco",
        45.6,
        _ZOO_URL + "cascade_rcnn/cascade_mask_rcnn_x101_64x4d_fpn_20e_coco/"
        "cascade_mask_rcnn_x101_64x4d_fpn_20e_coco_20200512_161033-bdb5126a.pth",
    ),
}

#: keyword → (MMDetection's value, what it sets) of the settings a builder accepts (torchvision's keyword names).
SETTINGS: dict[str, tuple[float, str]] = {
    "rpn_pre_nms_top_n_train": (2000, "RPN proposals kept per level before NMS, training (rpn_proposal.nms_pre)"),
    "rpn_pre_nms_top_n_test": (1000, "... at test (test_cfg.rpn.nms_pre)"),
    "rpn_post_nms_top_n_train": (1000, "RPN proposals per image after NMS, training (rpn_proposal.max_per_img)"),
    "rpn_post_nms_top_n_test": (1000, "... at test (test_cfg.rpn.max_per_img)"),
    "rpn_nms_thresh": (0.7, "RPN NMS IoU"),
    "rpn_fg_iou_thresh": (0.7, "RPN assigner pos_iou_thr"),
    "rpn_bg_iou_thresh": (0.3, "RPN assigner neg_iou_thr"),
    "rpn_min_pos_iou": (0.3, "RPN assigner min_pos_iou (low-quality matches)"),
    "rpn_batch_size_per_image": (256, "RPN sampler num"),
    "rpn_positive_fraction": (0.5, "RPN sampler pos_fraction"),
    "box_fg_iou_thresh": (0.5, "RCNN assigner pos_iou_thr"),
    "box_bg_iou_thresh": (0.5, "RCNN assigner neg_iou_thr"),
    "box_min_pos_iou": (0.5, "RCNN assigner min_pos_iou"),
    "box_batch_size_per_image": (512, "RCNN sampler num"),
    "box_positive_fraction": (0.25, "RCNN sampler pos_fraction"),
    "box_score_thresh": (0.05, "test score_thr"),
    "box_nms_thresh": (0.5, "test NMS IoU"),
    "box_detections_per_img": (100, "test max_per_img"),
}


# ---------------------------------------------------------------------------------------------------- sampler
def random_sample(assigned: Tensor, num: int, pos_fraction: float) -> tuple[Tensor, Tensor]:
    """MMDetection's ``RandomSampler``: ``(pos_inds, neg_inds)``, each sorted, from ``assigned`` (N,)
    (:func:`max_iou_assign`). At most ``int(num · pos_fraction)`` positives, negatives fill up to ``num``; a random
    subset is drawn with ``torch.randperm`` on the CPU generator exactly when MMDetection draws one."""

    def choose(candidates: Tensor, expected: int) -> Tensor:
        if candidates.numel() <= expected:
            return candidates
        perm = torch.randperm(candidates.numel())[:expected].to(device=candidates.device)
        return candidates[perm]

    pos = choose(torch.nonzero(assigned > 0, as_tuple=False).view(-1), int(num * pos_fraction)).unique()
    neg = choose(torch.nonzero(assigned == 0, as_tuple=False).view(-1), num - pos.numel()).unique()
    return pos, neg


# ---------------------------------------------------------------------------------------------------- RPN
class MMDetRPN(RegionProposalNetwork):
    """MMDetection's RPN (``RPNHead`` with its test/train settings) in torchvision's ``RegionProposalNetwork``
    interface: ``rpn(images, features, targets)`` → (proposals per image (P_i, 4) in the resized image's coordinates,
    losses ``loss_rpn_cls``/``loss_rpn_bbox`` in training). See the module docstring for what it computes."""

    def __init__(
        self,
        anchor_generator: MMDetAnchorGenerator,
        head: nn.Module,
        *,
        pre_nms_top_n: dict[str, int],
        post_nms_top_n: dict[str, int],
        nms_thresh: float = 0.7,
        fg_iou_thresh: float = 0.7,
        bg_iou_thresh: float = 0.3,
        min_pos_iou: float = 0.3,
        batch_size_per_image: int = 256,
        positive_fraction: float = 0.5,
        min_bbox_size: float = 0.0,
        size_divisible: int = 32,
    ) -> None:
        super().__init__(
            anchor_generator, head, fg_iou_thresh, bg_iou_thresh, batch_size_per_image, positive_fraction,
            pre_nms_top_n, post_nms_top_n, nms_thresh,
        )  # fmt: skip
        self.box_coder = DeltaXYWHCoder()  # type: ignore[assignment]
        self.fg_iou_thresh, self.bg_iou_thresh, self.min_pos_iou = fg_iou_thresh, bg_iou_thresh, min_pos_iou
        self.batch_size_per_image, self.positive_fraction = int(batch_size_per_image), float(positive_fraction)
        self.min_bbox_size = float(min_bbox_size)
        self.size_divisible = int(size_divisible)

    def forward(  # type: ignore[override]
        self, images: ImageList, features: dict[str, Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        feats = list(features.values())
        objectness, deltas = self.head(feats)  # per level (N, A, H, W), (N, 4A, H, W)
        generator: MMDetAnchorGenerator = self.anchor_generator  # type: ignore[assignment]
        anchors = generator.level_anchors([f.shape[-2:] for f in feats], feats[0].device)  # float32 always
        n = len(images.image_sizes)
        scores = [o.detach().float().permute(0, 2, 3, 1).reshape(n, -1) for o in objectness]
        regs = [d.detach().float().permute(0, 2, 3, 1).reshape(n, -1, 4) for d in deltas]
        proposals = [
            self.proposals_of_image([s[i] for s in scores], [r[i] for r in regs], anchors, images.image_sizes[i])
            for i in range(n)
        ]
        losses: dict[str, Tensor] = {}
        if self.training:
            if targets is None:
                raise ValueError("the RPN needs targets in training")
            losses = self.compute_losses(objectness, deltas, anchors, images.image_sizes, targets)
        return proposals, losses

    def proposals_of_image(
        self, logits: list[Tensor], deltas: list[Tensor], anchors: list[Tensor], image_size: Sequence[int]
    ) -> Tensor:
        """(P, 4) proposals of one image from its per-level logits (H·W·A,) and deltas (H·W·A, 4)
        (``RPNHead._predict_by_feat_single`` and ``_bbox_post_process``)."""
        nms_pre, max_per_img = self.pre_nms_top_n(), self.post_nms_top_n()
        kept_scores, kept_deltas, kept_anchors, level_ids = [], [], [], []
        for level, (logit, delta, anchor) in enumerate(zip(logits, deltas, anchors)):
            score = logit.sigmoid()
            if 0 < nms_pre < score.shape[0]:
                ranked, rank_inds = score.sort(descending=True)  # MMDetection sorts (ties as it breaks them)
                top = rank_inds[:nms_pre]
                score, delta, anchor = ranked[:nms_pre], delta[top], anchor[top]
            kept_scores.append(score)
            kept_deltas.append(delta)
            kept_anchors.append(anchor)
            level_ids.append(torch.full((score.shape[0],), level, dtype=torch.long, device=score.device))
        boxes = self.box_coder.decode(torch.cat(kept_anchors), torch.cat(kept_deltas), max_shape=image_size)
        # NMS per level (the levels are batched_nms's groups)
        boxes, _, _ = bbox_post_process(
            boxes, torch.cat(kept_scores), torch.cat(level_ids), self.nms_thresh, max_per_img, self.min_bbox_size
        )
        return boxes

    def compute_losses(
        self,
        objectness: list[Tensor],
        deltas: list[Tensor],
        anchors: list[Tensor],
        image_sizes: Sequence[Sequence[int]],
        targets: list[dict[str, Tensor]],
    ) -> dict[str, Tensor]:
        """``loss_rpn_cls`` and ``loss_rpn_bbox`` (MMDetection's ``AnchorHead.loss_by_feat`` of ``RPNHead``)."""
        grid_sizes = [o.shape[-2:] for o in objectness]
        flat_anchors = torch.cat(anchors)
        device = flat_anchors.device
        cls_targets, cls_weights, box_targets, box_weights = [], [], [], []
        avg_factor = 0
        for image_size, target in zip(image_sizes, targets):
            valid = self.anchor_generator.valid_flags(grid_sizes, image_size, self.size_divisible, device)
            gt = target["boxes"].to(device=device, dtype=torch.float32)
            inside = flat_anchors[valid]
            assigned = max_iou_assign(gt, inside, self.fg_iou_thresh, self.bg_iou_thresh, self.min_pos_iou, True)
            pos, neg = random_sample(assigned, self.batch_size_per_image, self.positive_fraction)
            label = inside.new_zeros(inside.shape[0])
            weight = inside.new_zeros(inside.shape[0])
            box_target = inside.new_zeros(inside.shape[0], 4)
            box_weight = inside.new_zeros(inside.shape[0], 4)
            if pos.numel() > 0:
                box_target[pos] = self.box_coder.encode(inside[pos], gt[assigned[pos] - 1])
                box_weight[pos] = 1.0
                label[pos] = 1.0
                weight[pos] = 1.0
            if neg.numel() > 0:
                weight[neg] = 1.0
            avg_factor += max(pos.numel(), 1) + max(neg.numel(), 1)
            for store, value in ((cls_targets, label), (cls_weights, weight), (box_targets, box_target)):
                full = value.new_zeros((flat_anchors.shape[0], *value.shape[1:]))
                full[valid] = value
                store.append(full)
            full = box_weight.new_zeros(flat_anchors.shape[0], 4)
            full[valid] = box_weight
            box_weights.append(full)
        stacked = [torch.stack(t) for t in (cls_targets, cls_weights, box_targets, box_weights)]
        loss_cls: Tensor | float = 0.0
        loss_box: Tensor | float = 0.0
        start = 0
        for logit, delta, anchor in zip(objectness, deltas, anchors):
            end = start + anchor.shape[0]
            label, weight, box_target, box_weight = (s[:, start:end] for s in stacked)
            pred = logit.float().permute(0, 2, 3, 1).reshape(-1)
            bce = F.binary_cross_entropy_with_logits(pred, label.reshape(-1), reduction="none")
            loss_cls = loss_cls + (bce * weight.reshape(-1)).sum() / (avg_factor + LOSS_EPS)
            reg = delta.float().permute(0, 2, 3, 1).reshape(-1, 4)
            l1 = (reg - box_target.reshape(-1, 4)).abs() * box_weight.reshape(-1, 4)
            loss_box = loss_box + l1.sum() / (avg_factor + LOSS_EPS)
            start = end
        return {"loss_rpn_cls": loss_cls, "loss_rpn_bbox": loss_box}  # type: ignore[dict-item]


# ---------------------------------------------------------------------------------------------------- RoI head
def rois_of(boxes: Sequence[Tensor]) -> Tensor:
    """(R, 5) ``[image index, x1, y1, x2, y2]`` of per-image boxes (MMDetection's ``bbox2roi``)."""
    rois = [torch.cat([b.new_full((b.shape[0], 1), float(i)), b], dim=-1) for i, b in enumerate(boxes)]
    return torch.cat(rois, 0) if rois else torch.zeros(0, 5)


class MMDetRoIAlign(MultiScaleRoIAlign):
    """MMDetection's ``SingleRoIExtractor``: RoIAlign (``aligned=True``, adaptive sampling for ``sampling_ratio`` 0)
    on fixed-stride levels, each RoI on level ``floor(log2(sqrt(w·h) / finest_scale + 1e-6))`` clamped to the
    levels. Called as torchvision's pooler: ``pool(features, boxes, image_shapes)`` → (R, C, 7, 7), R = Σ boxes.

    Args:
        featmap_names: the FPN outputs it reads (``'0'..'3'``: P2–P5; P6 is the RPN's only).
        strides: their strides (4, 8, 16, 32).
        finest_scale: 56.
    """

    def __init__(
        self,
        featmap_names: Sequence[str] = ("0", "1", "2", "3"),
        output_size: int = 7,
        sampling_ratio: int = 0,
        strides: Sequence[int] = (4, 8, 16, 32),
        finest_scale: float = 56.0,
    ) -> None:
        super().__init__(list(featmap_names), output_size, sampling_ratio)
        if len(strides) != len(featmap_names):
            raise ValueError(f"{len(featmap_names)} feature maps for {len(strides)} strides")
        self.strides = tuple(int(s) for s in strides)
        self.finest_scale = float(finest_scale)

    def map_roi_levels(self, rois: Tensor) -> Tensor:
        """(R,) level of each RoI (R, 5)."""
        scale = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
        levels = torch.floor(torch.log2(scale / self.finest_scale + 1e-6))
        return levels.clamp(min=0, max=len(self.strides) - 1).long()

    def forward(  # type: ignore[override]
        self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]] | None = None
    ) -> Tensor:
        feats = [x[name] for name in self.featmap_names]
        rois = rois_of([b.float() for b in boxes]).to(feats[0].device)
        out = feats[0].new_zeros(rois.shape[0], feats[0].shape[1], *self.output_size)
        if rois.shape[0] == 0:
            return out
        levels = self.map_roi_levels(rois)
        for i, (feat, stride) in enumerate(zip(feats, self.strides)):
            inds = (levels == i).nonzero(as_tuple=False).view(-1)
            if inds.numel() > 0:
                pooled = torchvision.ops.roi_align(
                    feat, rois[inds], self.output_size, 1 / stride, self.sampling_ratio, aligned=True
                )
                out[inds] = pooled.to(out.dtype)
        return out


class MMDetRoIHeads(RoIHeads):
    """MMDetection's ``StandardRoIHead`` + ``Shared2FCBBoxHead`` in torchvision's ``RoIHeads`` interface:
    ``roi_heads(features, proposals, image_shapes, targets, original_image_sizes)`` → (detections, losses).

    ``box_roi_pool(features, sampled proposals, image_shapes)``, ``box_head`` and ``box_predictor`` are called
    positionally as torchvision calls them (the detection task's regression-KD hooks read them). Labels are
    torchvision's (0 = background); logits are put in MMDetection's order (background last) for softmax and
    cross-entropy. Detections come back in the input images' coordinates when ``original_image_sizes`` is given
    (scaled before NMS, as MMDetection), else in the resized images'.
    """

    def __init__(
        self,
        box_roi_pool: MMDetRoIAlign,
        box_head: nn.Module,
        box_predictor: FastRCNNPredictor,
        *,
        fg_iou_thresh: float = 0.5,
        bg_iou_thresh: float = 0.5,
        min_pos_iou: float = 0.5,
        batch_size_per_image: int = 512,
        positive_fraction: float = 0.25,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_img: int = 100,
        bbox_reg_stds: Sequence[float] = (0.1, 0.1, 0.2, 0.2),
    ) -> None:
        super().__init__(
            box_roi_pool, box_head, box_predictor, fg_iou_thresh, bg_iou_thresh, batch_size_per_image,
            positive_fraction, None, score_thresh, nms_thresh, detections_per_img,
        )  # fmt: skip
        self.box_coder = DeltaXYWHCoder(stds=bbox_reg_stds)  # type: ignore[assignment]
        self.fg_iou_thresh, self.bg_iou_thresh, self.min_pos_iou = fg_iou_thresh, bg_iou_thresh, min_pos_iou
        self.batch_size_per_image, self.positive_fraction = int(batch_size_per_image), float(positive_fraction)

    @staticmethod
    def mmdet_order(num_classes: int, device: torch.device) -> Tensor:
        """Column order taking background-first logits (R, K) to MMDetection's (foreground 0..K-2, background)."""
        return torch.cat([torch.arange(1, num_classes, device=device), torch.zeros(1, dtype=torch.long, device=device)])

    def sample(self, proposals: list[Tensor], targets: list[dict[str, Tensor]]) -> tuple[list[Tensor], Tensor, Tensor]:
        """The sampled RoIs per image (positives first; the ground truth among the candidates, first), their labels
        (R,) and the regression targets of the positives (P, 4), in RoI order."""
        sampled, labels, box_targets = [], [], []
        for props, target in zip(proposals, targets):
            props = props.detach().float()
            gt = target["boxes"].to(device=props.device, dtype=torch.float32)
            gt_labels = target["labels"].to(props.device)
            assigned = max_iou_assign(gt, props, self.fg_iou_thresh, self.bg_iou_thresh, self.min_pos_iou, False)
            priors = props
            if gt.shape[0] > 0:
                priors = torch.cat([gt, props])
                assigned = torch.cat([torch.arange(1, gt.shape[0] + 1, device=props.device), assigned])
            pos, neg = random_sample(assigned, self.batch_size_per_image, self.positive_fraction)
            sampled.append(torch.cat([priors[pos], priors[neg]]))
            label = torch.zeros(pos.numel() + neg.numel(), dtype=torch.long, device=props.device)
            if pos.numel() > 0:
                matched = assigned[pos] - 1
                label[: pos.numel()] = gt_labels[matched]
                box_targets.append(self.box_coder.encode(priors[pos], gt[matched]))
            labels.append(label)
        device = proposals[0].device if proposals else torch.device("cpu")
        targets_pos = torch.cat(box_targets) if box_targets else torch.zeros(0, 4, device=device)
        return sampled, torch.cat(labels), targets_pos

    def forward(  # type: ignore[override]
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
        original_image_sizes: list[tuple[int, int]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        if self.training:
            if targets is None:
                raise ValueError("the RoI heads need targets in training")
            sampled, labels, box_targets = self.sample(proposals, targets)
            logits, regression = self.box_predictor(self.box_head(self.box_roi_pool(features, sampled, image_shapes)))
            return [], self.compute_losses(logits, regression, labels, box_targets)
        logits, regression = self.box_predictor(self.box_head(self.box_roi_pool(features, proposals, image_shapes)))
        return self.detections(logits, regression, proposals, image_shapes, original_image_sizes), {}

    def compute_losses(
        self, logits: Tensor, regression: Tensor, labels: Tensor, box_targets: Tensor
    ) -> dict[str, Tensor]:
        """``loss_cls`` and ``loss_bbox`` (``BBoxHead.loss``) of logits (R, K), regression (R, 4K), labels
        (R,) and the positives' targets (P, 4)."""
        num_rois, num_classes = logits.shape
        mm_logits = logits.float()[:, self.mmdet_order(num_classes, logits.device)]
        mm_labels = torch.where(labels > 0, labels - 1, torch.full_like(labels, num_classes - 1))
        avg_factor = max(float(num_rois), 1.0)
        loss_cls = F.cross_entropy(mm_logits, mm_labels, reduction="none").sum() / (avg_factor + LOSS_EPS)
        pos = labels > 0
        if bool(pos.any()):
            pred = regression.float().view(num_rois, num_classes, 4)[pos, labels[pos]]
            loss_box = (pred - box_targets).abs().sum() / (num_rois + LOSS_EPS)
        else:
            loss_box = regression[pos].sum()
        return {"loss_cls": loss_cls, "loss_bbox": loss_box}

    def detections(
        self,
        logits: Tensor,
        regression: Tensor,
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        original_image_sizes: list[tuple[int, int]] | None = None,
    ) -> list[dict[str, Tensor]]:
        """``boxes`` (D, 4), ``scores`` (D,), ``labels`` (D,) (1..K-1) per image (``BBoxHead._predict_by_feat_single``
        with ``multiclass_nms``)."""
        num_classes = logits.shape[1]
        scores = F.softmax(logits.float()[:, self.mmdet_order(num_classes, logits.device)], dim=-1)
        counts = [p.shape[0] for p in proposals]
        per_image = zip(proposals, scores.split(counts), regression.float().split(counts))
        results = []
        for i, (rois, score, deltas) in enumerate(per_image):
            n = rois.shape[0]
            fg = num_classes - 1
            if n == 0:
                empty = rois.new_zeros(0)
                results.append({"boxes": rois.new_zeros(0, 4), "scores": empty, "labels": empty.long()})
                continue
            boxes = self.box_coder.decode(
                rois.float().repeat_interleave(fg, dim=0), deltas.view(n, num_classes, 4)[:, 1:].reshape(-1, 4),
                max_shape=image_shapes[i],
            )  # fmt: skip
            if original_image_sizes is not None:
                boxes = rescale_boxes(boxes, image_shapes[i], original_image_sizes[i])
            fg_scores = score[:, :-1].reshape(-1)
            labels = torch.arange(fg, device=score.device).view(1, -1).expand(n, fg).reshape(-1)
            inds = (fg_scores > self.score_thresh).nonzero(as_tuple=False).squeeze(1)
            boxes, fg_scores, labels = boxes[inds], fg_scores[inds], labels[inds]
            keep = batched_nms(boxes, fg_scores, labels, self.nms_thresh)[: self.detections_per_img]
            results.append({"boxes": boxes[keep], "scores": fg_scores[keep], "labels": labels[keep] + 1})
        return results


# ---------------------------------------------------------------------------------------------------- checkpoints
def faster_rcnn_rules() -> list[Rule]:
    """MMDetection's Faster R-CNN names → :class:`MMDetFasterRCNN`'s."""
    return [
        *backbone_neck_rules(4, "maxpool"),
        (r"^rpn_head\.rpn_conv\.(weight|bias)$", r"rpn.head.conv.0.0.\1"),
        (r"^rpn_head\.rpn_cls\.(weight|bias)$", r"rpn.head.cls_logits.\1"),
        (r"^rpn_head\.rpn_reg\.(weight|bias)$", r"rpn.head.bbox_pred.\1"),
        (r"^roi_head\.bbox_head\.shared_fcs\.0\.(weight|bias)$", r"roi_heads.box_head.fc6.\1"),
        (r"^roi_head\.bbox_head\.shared_fcs\.1\.(weight|bias)$", r"roi_heads.box_head.fc7.\1"),
        (r"^roi_head\.bbox_head\.fc_cls\.(weight|bias)$", r"roi_heads.box_predictor.cls_score.\1"),
        (r"^roi_head\.bbox_head\.fc_reg\.(weight|bias)$", r"roi_heads.box_predictor.bbox_pred.\1"),
    ]


def _background_first(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``fc_cls`` rows (K+1: background last) → background first; ``fc_reg`` rows (4K) → 4 zero rows, then the 4K.
    Shapes that do not fit that pattern are left for the strict check to report."""
    cls_w = state.get("roi_head.bbox_head.fc_cls.weight")
    reg_w = state.get("roi_head.bbox_head.fc_reg.weight")
    if cls_w is None or reg_w is None or reg_w.shape[0] != 4 * (cls_w.shape[0] - 1):
        return state
    order = torch.cat([torch.tensor([cls_w.shape[0] - 1]), torch.arange(cls_w.shape[0] - 1)])
    out = dict(state)
    for name in ("weight", "bias"):
        cls_key, reg_key = f"roi_head.bbox_head.fc_cls.{name}", f"roi_head.bbox_head.fc_reg.{name}"
        if cls_key in out:
            out[cls_key] = out[cls_key][order]
        if reg_key in out:
            reg = out[reg_key]
            out[reg_key] = torch.cat([reg.new_zeros((4, *reg.shape[1:])), reg])
    return out


# ---------------------------------------------------------------------------------------------------- models
class MMDetFasterRCNN(FasterRCNN):
    """MMDetection's Faster R-CNN as a torchvision ``FasterRCNN`` (``transform``, ``backbone`` (FPN ``'0'..'3',
    'pool'``), ``rpn`` (:class:`MMDetRPN`), ``roi_heads`` (:class:`MMDetRoIHeads`)): ``model(images, targets)`` →
    loss dict in training, ``model(images)`` → per image ``boxes`` (D, 4) xyxy in the input's coordinates, ``scores``
    (D,), ``labels`` (D,) in eval. Built by :func:`build_faster_rcnn`."""

    def __init__(
        self,
        backbone: nn.Module,
        rpn: MMDetRPN,
        roi_heads: MMDetRoIHeads,
        transform: MMDetTransform,
        *,
        description: str = "Faster R-CNN",
        name: str = "mmdet_faster_rcnn",
    ) -> None:
        GeneralizedRCNN.__init__(self, backbone, rpn, roi_heads, transform)  # FasterRCNN's would build its own heads
        self.description, self.name = description, name

    def forward(  # type: ignore[override]
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        if self.training and targets is None:
            raise ValueError("targets are needed in training mode")
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        image_list, targets = self.transform(images, targets)
        if targets is not None:
            check_target_boxes(targets, self.name)
        features = self.backbone(image_list.tensors)
        proposals, proposal_losses = self.rpn(image_list, features, targets)
        detections, detector_losses = self.roi_heads(
            features, proposals, image_list.image_sizes, targets, original_sizes
        )
        if self.training:
            return {**proposal_losses, **detector_losses}
        return detections

    def convert_foreign_checkpoint(self, obj: Mapping[str, Any], origin: str) -> dict[str, Tensor] | None:
        """This model's state dict from an MMDetection checkpoint (see the module docstring), or ``None`` when
        ``obj`` is none.

        Raises:
            MMDetWeightsError: the file does not fit (keys listed, what the file holds named).
        """
        if not is_mmdet_checkpoint(obj):
            return None
        state, meta = mmdet_state_dict(obj)
        check_style(meta, "pytorch", origin, self.name, state)
        fits = lambda s: describe_mmdet_checkpoint(s, meta)  # noqa: E731
        converted = convert_keys(
            _background_first(fill_num_batches_tracked(dict(state))), faster_rcnn_rules(), self, origin, fits
        )
        log.info("loaded the MMDetection checkpoint %s (%s) into %s", origin, fits(state), self.name)
        return converted


class MMDetFPNTeacher(nn.Module):
    """A ResNet/ResNeXt + Faster R-CNN FPN and nothing else: ``transform`` (:class:`MMDetTransform`) and
    ``backbone`` (FPN ``'0'..'3', 'pool'``), loaded from any MMDetection checkpoint with that backbone and FPN (its
    heads left out). ``model(images)`` → the FPN levels (N, 256, H/s, W/s) of the transformed batch.
    ``fpn_features_only`` tells the detection task that no head exists (see the module docstring)."""

    fpn_features_only = True

    def __init__(
        self, backbone: nn.Module, transform: MMDetTransform, *, style: str = "pytorch", name: str = "mmdet_fpn_teacher"
    ) -> None:
        super().__init__()
        self.transform, self.backbone = transform, backbone
        self.style, self.name = style, name
        self.source = "randomly initialised: no checkpoint loaded"

    def forward(self, images: list[Tensor], targets: Any = None) -> OrderedDict[str, Tensor]:
        image_list, _ = self.transform(images, None)
        return self.backbone(image_list.tensors)

    def convert_foreign_checkpoint(self, obj: Mapping[str, Any], origin: str) -> dict[str, Tensor] | None:
        """The backbone + neck of an MMDetection checkpoint, strictly; its other tensors are left out (logged).

        Raises:
            MMDetWeightsError: the backbone or FPN does not fit (keys listed, what the file holds named).
        """
        if not is_mmdet_checkpoint(obj):
            return None
        state, meta = mmdet_state_dict(obj)
        check_style(meta, self.style, origin, self.name, state)  # type: ignore[arg-type]
        described = describe_mmdet_checkpoint(state, meta)
        converted = convert_backbone_fpn(
            self, fill_num_batches_tracked(dict(state)), origin, 4, "maxpool", lambda _: described, logger=log,
            level=logging.INFO, consequence="this teacher provides FPN features only",
        )  # fmt: skip
        self.source = f"the backbone + FPN of {origin}: {described.split(' → ')[0]}"
        return converted


# ---------------------------------------------------------------------------------------------------- builders
def _zoo_file(label: str) -> str:
    """The zoo checkpoint :data:`ZOO` lists for ``label``, for messages (``""``: none)."""
    config, ap, url = ZOO.get(label, ("", 0.0, ""))
    return f"{config}, box AP {ap}: {url}" if url else ""


def build_faster_rcnn(
    backbone: str,
    num_classes: int = COCO_NUM_CLASSES,
    pretrained: bool = False,
    weights: str | None = None,
    weights_backbone: str | None = None,
    min_size: int | Sequence[int] = 800,
    max_size: int = 1333,
    frozen_stages: int | None = None,
    *,
    label: str | None = None,
    backbone_only: bool = False,
    trainable_layers: int | None = None,
    frozen_bn: bool = True,
    _skip_resize: bool = False,
    **settings: float,
) -> MMDetFasterRCNN | MMDetFPNTeacher:
    """MMDetection's Faster R-CNN on ``backbone`` (``r50``, ``r101``, ``x101_64x4d``; see the module docstring).

    Args:
        num_classes: classes including background 0 (81 for COCO's 80 with ``data.contiguous_labels=true``).
        pretrained: refused: the zoo checkpoints are not downloaded by name (``weights=<file>``; :data:`ZOO`).
        weights: a checkpoint to load (an MMDetection zoo file, or this model's own state dict).
        weights_backbone: ImageNet weights of the backbone (``"IMAGENET1K_V1"`` or a path).
        min_size, max_size: the resize (a tuple ``min_size`` picks one per training image).
        frozen_stages: stem + this many ResNet stages frozen (``None``: MMDetection's 1, or from ``trainable_layers``).
        trainable_layers: torchvision's count of trainable stages (3 = frozen_stages 1), accepted when consistent
            (:func:`~diffkd.models.mmdet.common.frozen_stages_of`).
        frozen_bn: must be true (MMDetection's ``norm_eval=True``: BatchNorm statistics never update).
        backbone_only: build :class:`MMDetFPNTeacher` instead (``mmdet_fpn_teacher_<backbone>``: the backbone +
            FPN of any fitting MMDetection checkpoint, no heads); the head settings are then ignored.
        **settings: :data:`SETTINGS`, by torchvision's names.
    """
    label = label or f"mmdet_faster_rcnn_{backbone}_fpn"
    if backbone not in BACKBONES:
        raise ValueError(f"{label}: unknown backbone {backbone!r}; choose one of {list(BACKBONES)}")
    if backbone_only:
        teacher = build_fpn_teacher(
            backbone, "pytorch", min_size, max_size, label=f"{label} (backbone_only)",
            weights_backbone=weights_backbone, _skip_resize=_skip_resize,
        )  # fmt: skip
        return with_weights(teacher, weights)
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise TypeError(f"{label}: unknown keyword arguments {unknown}; settings are {sorted(SETTINGS)}")
    if pretrained:
        refuse_pretrained(label, _zoo_file(label))
    stages = frozen_stages_of(label, frozen_stages, trainable_layers, frozen_bn)
    if num_classes < 2:
        raise ValueError(f"{label}: num_classes counts background 0 and needs at least one class, got {num_classes}")
    s = {k: v[0] for k, v in SETTINGS.items()} | settings
    depth, groups, width, description = BACKBONES[backbone]
    body = mmdet_resnet(depth, groups, width, "pytorch", stages, weights=weights_backbone)
    fpn = mmdet_fpn(body, 0, "maxpool")
    anchors = MMDetAnchorGenerator(strides=(4, 8, 16, 32, 64), ratios=(0.5, 1.0, 2.0), scales=(8,))
    rpn = MMDetRPN(
        anchors,
        RPNHead(256, anchors.num_anchors_per_location()[0]),  # normal(0, 0.01), bias 0: MMDetection's init
        pre_nms_top_n={"training": int(s["rpn_pre_nms_top_n_train"]), "testing": int(s["rpn_pre_nms_top_n_test"])},
        post_nms_top_n={"training": int(s["rpn_post_nms_top_n_train"]), "testing": int(s["rpn_post_nms_top_n_test"])},
        nms_thresh=s["rpn_nms_thresh"],
        fg_iou_thresh=s["rpn_fg_iou_thresh"],
        bg_iou_thresh=s["rpn_bg_iou_thresh"],
        min_pos_iou=s["rpn_min_pos_iou"],
        batch_size_per_image=int(s["rpn_batch_size_per_image"]),
        positive_fraction=s["rpn_positive_fraction"],
    )
    box_head = TwoMLPHead(256 * 7 * 7, 1024)
    for fc in (box_head.fc6, box_head.fc7):
        nn.init.xavier_uniform_(fc.weight)
        nn.init.zeros_(fc.bias)
    predictor = FastRCNNPredictor(1024, num_classes)
    nn.init.normal_(predictor.cls_score.weight, std=0.01)
    nn.init.zeros_(predictor.cls_score.bias)
    nn.init.normal_(predictor.bbox_pred.weight, std=0.001)
    nn.init.zeros_(predictor.bbox_pred.bias)
    with torch.no_grad():
        predictor.bbox_pred.weight[:4] = 0.0  # background's deltas: never trained, never used
    roi_heads = MMDetRoIHeads(
        MMDetRoIAlign(),
        box_head,
        predictor,
        fg_iou_thresh=s["box_fg_iou_thresh"],
        bg_iou_thresh=s["box_bg_iou_thresh"],
        min_pos_iou=s["box_min_pos_iou"],
        batch_size_per_image=int(s["box_batch_size_per_image"]),
        positive_fraction=s["box_positive_fraction"],
        score_thresh=s["box_score_thresh"],
        nms_thresh=s["box_nms_thresh"],
        detections_per_img=int(s["box_detections_per_img"]),
    )
    transform = mmdet_transform(min_size, max_size, "pytorch", _skip_resize=_skip_resize)
    model = MMDetFasterRCNN(fpn, rpn, roi_heads, transform, description=f"Faster R-CNN {description} FPN", name=label)
    return with_weights(model, weights)


def build_fpn_teacher(
    backbone: str,
    style: Literal["pytorch", "caffe"] = "pytorch",
    min_size: int | Sequence[int] = 800,
    max_size: int = 1333,
    *,
    label: str | None = None,
    pretrained: bool = False,
    num_classes: int | None = None,
    weights_backbone: str | None = None,
    **kwargs: Any,
) -> MMDetFPNTeacher:
    """A backbone + Faster R-CNN FPN that reads the backbone and neck of any MMDetection checkpoint (see the module
    docstring; ``style`` as the file's backbone). ``num_classes`` is accepted and unused (there is no classifier);
    keys of the detection model config that only heads use are accepted too (``trainable_layers``, ``frozen_bn``)."""
    label = label or f"mmdet_fpn_teacher_{backbone}"
    if backbone not in BACKBONES:
        raise ValueError(f"{label}: unknown backbone {backbone!r}; choose one of {list(BACKBONES)}")
    if pretrained:
        refuse_pretrained(label, _zoo_file(label))
    unknown = sorted(set(kwargs) - {"trainable_layers", "frozen_bn", "_skip_resize"})
    if unknown:
        raise TypeError(f"{label}: unknown keyword arguments {unknown}")
    depth, groups, width, _ = BACKBONES[backbone]
    body = mmdet_resnet(depth, groups, width, style, frozen_stages=4, bn_requires_grad=False, weights=weights_backbone)
    transform = mmdet_transform(min_size, max_size, style, _skip_resize=bool(kwargs.get("_skip_resize", False)))
    return MMDetFPNTeacher(mmdet_fpn(body, 0, "maxpool"), transform, style=style, name=label)


def _register(backbone: str) -> None:
    name, teacher = f"mmdet_faster_rcnn_{backbone}_fpn", f"mmdet_fpn_teacher_{backbone}"
    config, ap, url = ZOO[name]
    doc = (
        f"MMDetection's Faster R-CNN {BACKBONES[backbone][3]} FPN ({config}; zoo file {url}, box AP {ap}); see "
        ":func:`build_faster_rcnn`. FPN levels '0', '1', '2', '3', 'pool' (P2–P6), 256 channels."
    )
    register_variant(build_faster_rcnn, name, doc, TAGS, backbone, label=name)
    doc = (
        f"The {BACKBONES[backbone][3]} backbone + Faster R-CNN FPN of any MMDetection checkpoint (FPN features only; "
        "see :func:`build_fpn_teacher`). FPN levels '0', '1', '2', '3', 'pool'."
    )
    register_variant(build_fpn_teacher, teacher, doc, TAGS, backbone, label=teacher)


for _backbone in BACKBONES:
    _register(_backbone)
del _backbone
