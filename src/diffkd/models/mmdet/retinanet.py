"""MMDetection's RetinaNet (``retinanet/retinanet_{r50,r101,x101-64x4d}_fpn_2x_coco.py`` of mmdet 3.3) on
torchvision's ``RetinaNet`` class, reading MMDetection's zoo checkpoints key for key.

Registered names (tags ``"detection"``, ``"coco"``, ``"mmdet"``), each
``fn(num_classes=81, weights_backbone=None, min_size=800, max_size=1333, frozen_stages=None, weights=None,
backbone_only=False, **kwargs)``:

* ``mmdet_retinanet_r50_fpn`` — the paper's RetinaNet student (zoo: 37.4 AP, 2×);
* ``mmdet_retinanet_r101_fpn`` — its teacher (38.9 AP, 2×);
* ``mmdet_retinanet_x101_64x4d_fpn`` — ResNeXt-101 64x4d (40.8 AP 2×; the 1× file, 41.0 AP, is FGD's and the
  paper's stronger Table 5 teacher). The zoo files are listed in :data:`ZOO`.

``num_classes`` counts background 0 as our COCO data does (``data.contiguous_labels=true``: labels 1..80 and
background 0, i.e. 81): the head has ``num_classes - 1`` sigmoid outputs per anchor, and our label ``l`` is
MMDetection's class ``l - 1``. The attributes keep torchvision's layout, so the detection task, the taps, DiffKD,
FGD and COCO evaluation work unchanged: ``model.transform`` (:class:`~diffkd.models.mmdet.common.MMDetTransform`),
``model.backbone`` (FPN levels ``'0', '1', '2', 'p6', 'p7'`` = P3–P7, strides 8–128, 256 channels; tap them with
``backbone.fpn:*``), ``model.anchor_generator``, ``model.head`` (``head.classification_head.{conv, cls_logits}``,
``head.regression_head.{conv, bbox_reg}``; ``head.classification_head.cls_logits:*`` taps the raw logits per level).
Training returns ``{"loss_cls", "loss_bbox"}`` (MMDetection's names, weighable by ``model.task_weights``), evaluation
the detections ``[{boxes (K, 4) xyxy in the input image's pixels, scores (K,), labels (K,) in 1..num_classes-1}]``.

What is MMDetection's, number for number (read from mmdet 3.3's configs and code):

* **Backbone, FPN, transform, anchors**: :mod:`diffkd.models.mmdet.common` — pytorch-style ResNet/ResNeXt with
  frozen BatchNorm statistics and frozen stem + stage 1, FPN from C3 with P6 = conv(C5) and P7 = conv(P6) (no ReLU),
  RGB mean/std normalisation and mmcv's resize arithmetic, pad to 32, ``AnchorGenerator(octave_base_scale=4,
  scales_per_octave=3, ratios=[0.5, 1, 2], strides=[8..128])`` in MMDetection's order (per location: ratio-major,
  scale-minor).
* **Head** (``RetinaHead``): 4 stacked 3×3 convs + ReLU per branch, no norm, ``retina_cls``/``retina_reg`` 3×3 with
  MMDetection's channel layout (channel ``a·K + k`` is anchor ``a``, class ``k``; ``a·4 + d`` its delta ``d``, which
  is torchvision's layout too); weights normal(std 0.01), biases 0, the class bias ``-log(99)`` (prior 0.01).
* **Box coder** (``DeltaXYWHBBoxCoder``, means 0, stds 1): deltas of centres / sizes; decoding clamps ``log`` sizes
  to ``±|log(16/1000)|`` and clips to the resized image (``img_shape``).
* **Test** (``test_cfg``): per level the scores ``> 0.05`` (sigmoid of all anchor × class pairs), sorted, the first
  1000 (``nms_pre``); all levels decoded, rescaled to the input image (``rescale=True``: divided by the scale
  factor), boxes with zero width or height dropped (``min_bbox_size=0``), class-wise NMS at IoU 0.5 by MMDetection's
  coordinate offsets (``class · (max coordinate + 1)``), the best 100 (``max_per_img``).
* **Training** (``train_cfg``): per image, the anchors whose centre cell lies inside the image padded to 32
  (MMDetection's ``valid_flags``; ``allowed_border=-1``) are assigned by ``MaxIoUAssigner(pos_iou_thr=0.5,
  neg_iou_thr=0.4, min_pos_iou=0)`` with low-quality matches (``gt_max_assign_all``: every anchor that ties a box's
  best IoU goes to it, later boxes winning) and MMDetection's IoU (union clamped at 1e-6); ``PseudoSampler``: IoU in
  [0.4, 0.5) and invalid anchors weigh 0. ``loss_cls``: sigmoid focal loss (γ 2, α 0.25) on every weighted anchor ×
  class; ``loss_bbox``: L1 on the encoded deltas of the positives; both summed per level and divided by
  ``avg_factor + eps`` with ``avg_factor = Σ_images max(#positives, 1)`` (``SamplingResult.avg_factor``).
* **Checkpoints**: MMDetection v2/v3 files (``{"state_dict", "meta"}``) load through ``load_weights`` /
  ``create_teacher(name, weights=path)`` / ``weights=path``, converted key for key (``backbone.*``, ``neck.*``,
  ``bbox_head.{cls,reg}_convs.N.conv``, ``retina_cls``, ``retina_reg``) and strictly: anything missing, unexpected or
  of another shape is an error listing it and saying what the file is (e.g. "RetinaNet X-101-64x4d FPN, 80 classes →
  mmdet_retinanet_x101_64x4d_fpn"). A file whose ``meta`` config says ``style='caffe'`` is refused (same keys, other
  computation).
* **Backbone-only teachers** (``backbone_only=True``): only ``backbone.*`` and ``neck.*`` of the file are read (any
  zoo detector whose ResNet/ResNeXt + FPN fit this model's: RetinaNet's FPN, C3–C5 with P6 from C5 — e.g. another
  RetinaNet file, FreeAnchor, PISA RetinaNet), the heads keep their initialisation, and a warning says so: such a
  teacher serves ``teacher_runs: backbone`` (FPN DiffKD, FGD) only.
  :func:`~diffkd.models.mmdet.common.convert_backbone_fpn` is the generic function behind it (the FPN teachers of
  :mod:`~diffkd.models.mmdet.faster_rcnn` read their files with it too), for any model whose ``backbone`` is
  :func:`~diffkd.models.mmdet.common.mmdet_fpn`'s.

Named differences (none changes a trained model's numbers beyond float rounding unless said):

* **Resize**: MMDetection resizes the decoded uint8 image with OpenCV and rounds to uint8; the float image is resized
  here (see :mod:`~diffkd.models.mmdet.common`). No difference where no resize happens.
* **Order of rescale and NMS**: identical (rescale, size filter, NMS), but the rescale multiplies by ``1 / s`` with
  ``s = new / old`` from the transform's sizes as MMDetection's ``scale_factor`` does; the boxes can differ from
  MMDetection's by float rounding where a resize happens.
* **NMS beyond 10 000 candidates**: MMDetection's ``batched_nms`` switches to per-class NMS from 10 000 boxes
  (``split_thr``); with ``nms_pre=1000`` on 5 levels there are at most 5 000, so only the offset path is taken
  (:func:`~diffkd.models.mmdet.boxes.batched_nms` has both).
* **Focal loss on GPU**: MMDetection calls mmcv's CUDA ``sigmoid_focal_loss`` there (``log(p)`` of the probability);
  here, as MMDetection on CPU, the logit form (``binary_cross_entropy_with_logits``): equal up to float rounding.
* **Mixed precision**: the losses and the decoding run in float32 on the head's outputs, anchors are float32 (under
  ``bf16-mixed`` MMDetection's AMP keeps its own casts; MMDetection's zoo models train in fp32).
* **Data parallel**: MMDetection's ``AnchorHead`` does not reduce ``avg_factor`` over GPUs (FCOS/ATSS do): each rank
  divides by its own positives and DDP averages the gradients — what happens here too, so nothing differs.
* **ImageNet backbone of X-101-64x4d**: MMDetection initialises it from ``open-mmlab://resnext101_64x4d``
  (``resnext101_64x4d-ee2c6f71.pth``, FB's ResNeXt); ``weights_backbone="IMAGENET1K_V1"`` is torchvision's
  ``resnext101_64x4d`` (a newer recipe, 83.2 % top-1): another starting point. Pass the open-mmlab file's path
  instead to start where MMDetection does (R-50/R-101: ``IMAGENET1K_V1`` *is* ``torchvision://resnet50/101``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.retinanet import RetinaNetHead

from diffkd.models.mmdet.boxes import (
    DeltaXYWHCoder,
    bbox_overlaps,
    bbox_post_process,
    filter_scores_and_topk,
    max_iou_assign,
    rescale_boxes,
)
from diffkd.models.mmdet.common import (
    COCO_NUM_CLASSES,
    LOSS_EPS,
    RESNETS,
    TAGS,
    BackboneFPNOnly,
    MMDetAnchorGenerator,
    MMDetTransform,
    Rule,
    backbone_neck_rules,
    check_style,
    check_target_boxes,
    check_target_labels,
    convert_backbone_fpn,
    convert_keys,
    describe_mmdet_checkpoint,
    frozen_stages_of,
    is_mmdet_checkpoint,
    mmdet_fpn,
    mmdet_resnet,
    mmdet_state_dict,
    mmdet_transform,
    refuse_pretrained,
    sigmoid_focal_loss,
    with_weights,
)
from diffkd.models.variants import register_variant

__all__ = [
    "BACKBONES",
    "ZOO",
    "BackboneFPNOnly",
    "MMDetRetinaNet",
    "bbox_overlaps",
    "build_mmdet_retinanet",
    "convert_backbone_fpn",
    "describe_mmdet_checkpoint",
    "max_iou_assign",
]

log = logging.getLogger(__name__)

_STRIDES = (8, 16, 32, 64, 128)
_ZOO_URL = "https://download.openmmlab.com/mmdetection/v2.0/retinanet"

#: model name → (depth, groups, width_per_group, the zoo's name of the backbone).
BACKBONES: dict[str, tuple[int, int, int, str]] = {f"mmdet_retinanet_{k}_fpn": v for k, v in RESNETS.items()}

#: MMDetection's zoo files of these models: model name → [(schedule, box AP, url)].
ZOO: dict[str, list[tuple[str, float, str]]] = {
    "mmdet_retinanet_r50_fpn": [
        ("2x", 37.4, f"{_ZOO_URL}/retinanet_r50_fpn_2x_coco/retinanet_r50_fpn_2x_coco_20200131-fdb43119.pth"),
    ],
    "mmdet_retinanet_r101_fpn": [
        ("2x", 38.9, f"{_ZOO_URL}/retinanet_r101_fpn_2x_coco/retinanet_r101_fpn_2x_coco_20200131-5560aee8.pth"),
    ],
    "mmdet_retinanet_x101_64x4d_fpn": [
        (
            "1x",
            41.0,
            f"{_ZOO_URL}/retinanet_x101_64x4d_fpn_1x_coco/retinanet_x101_64x4d_fpn_1x_coco_20200130-366f5af1.pth",
        ),
        (
            "2x",
            40.8,
            f"{_ZOO_URL}/retinanet_x101_64x4d_fpn_2x_coco/retinanet_x101_64x4d_fpn_2x_coco_20200131-bca068ab.pth",
        ),
    ],
}


# ---------------------------------------------------------------------------------------------------- the model
class MMDetRetinaNet(RetinaNet):
    """torchvision's ``RetinaNet`` computing what MMDetection's computes (see the module docstring).

    Args:
        backbone: :func:`~diffkd.models.mmdet.common.mmdet_fpn` (``"on_input"``, from C3).
        num_classes: classes including background 0 (the head has ``num_classes - 1`` sigmoid outputs).
        transform: the input transform (:class:`~diffkd.models.mmdet.common.MMDetTransform`).
        name: the registered name (messages).
        description: what the model is, e.g. ``"RetinaNet R-50 FPN"``.
        backbone_only: read only the backbone + FPN of MMDetection checkpoints (see the module docstring).
        score_thresh, nms_thresh, detections_per_img, topk_candidates: MMDetection's ``test_cfg`` ``score_thr``,
            ``nms.iou_threshold``, ``max_per_img``, ``nms_pre``.
        fg_iou_thresh, bg_iou_thresh, min_pos_iou: the assigner's ``pos_iou_thr``, ``neg_iou_thr``, ``min_pos_iou``.
        focal_gamma, focal_alpha: the focal loss's γ and α.
    """

    def __init__(
        self,
        backbone: BackboneWithFPN,
        num_classes: int,
        transform: MMDetTransform,
        name: str = "mmdet_retinanet",
        description: str = "RetinaNet FPN",
        backbone_only: bool = False,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_img: int = 100,
        topk_candidates: int = 1000,
        fg_iou_thresh: float = 0.5,
        bg_iou_thresh: float = 0.4,
        min_pos_iou: float = 0.0,
        focal_gamma: float = 2.0,
        focal_alpha: float = 0.25,
    ) -> None:
        if num_classes < 2:
            raise ValueError(f"{name}: num_classes={num_classes} counts background 0; it needs at least 2")
        anchor_generator = MMDetAnchorGenerator(_STRIDES, (0.5, 1.0, 2.0), octave_base_scale=4, scales_per_octave=3)
        num_anchors = anchor_generator.num_anchors_per_location()[0]
        # torchvision's head initialises as MMDetection's RetinaHead: normal(0.01) weights, zero biases, prior 0.01
        head = RetinaNetHead(backbone.out_channels, num_anchors, num_classes - 1)
        super().__init__(
            backbone,
            num_classes,
            anchor_generator=anchor_generator,
            head=head,
            score_thresh=score_thresh,
            nms_thresh=nms_thresh,
            detections_per_img=detections_per_img,
            fg_iou_thresh=fg_iou_thresh,
            bg_iou_thresh=bg_iou_thresh,
            topk_candidates=topk_candidates,
        )
        self.transform = transform
        self.num_classes = num_classes
        self.name = name
        self.description = description
        self.backbone_only = bool(backbone_only)
        # the detection task refuses what needs the heads of a teacher whose heads were not loaded
        self.fpn_features_only = self.backbone_only
        self.fg_iou_thresh, self.bg_iou_thresh, self.min_pos_iou = fg_iou_thresh, bg_iou_thresh, min_pos_iou
        self.box_coder = DeltaXYWHCoder()  # type: ignore[assignment]  # means 0, stds 1
        self.focal_gamma, self.focal_alpha = focal_gamma, focal_alpha

    @property
    def num_anchors(self) -> int:
        """Anchors per location (9)."""
        return self.anchor_generator.num_anchors_per_location()[0]

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Args:
            images: (3, H_i, W_i) RGB floats in [0, 1].
            targets: in training, per image ``boxes`` (G, 4) xyxy in the image's pixels and ``labels`` (G,) in
                1..num_classes-1.

        Returns:
            Training: ``{"loss_cls", "loss_bbox"}``. Evaluation: per image ``boxes`` (K, 4), ``scores`` (K,),
            ``labels`` (K,), in the input image's pixels, K ≤ ``detections_per_img``.
        """
        if self.training:
            if targets is None:
                raise ValueError(f"{self.name}: targets are needed in training mode")
            for target in targets:
                boxes = target["boxes"]
                if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[-1] != 4:
                    raise ValueError(f"{self.name}: target boxes must be (N, 4) tensors, got {boxes!r:.80}")
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        image_list, targets = self.transform(images, targets)
        if targets is not None:
            check_target_boxes(targets, self.name)
        features = list(self.backbone(image_list.tensors).values())
        head_outputs = self.head(features)
        # anchors in float32 whatever the features' dtype (bf16 anchors would be off by pixels): the generator reads
        # only shapes, dtype and device
        shapes = [f.new_empty((0, 0, *f.shape[-2:]), dtype=torch.float32) for f in features]
        anchors = self.anchor_generator(image_list, shapes)
        level_sizes = [(int(f.shape[-2]), int(f.shape[-1])) for f in features]
        if self.training:
            return self.compute_loss(targets, head_outputs, anchors, list(image_list.image_sizes), level_sizes)
        return self.postprocess_detections(
            head_outputs, anchors, list(image_list.image_sizes), original_sizes, level_sizes
        )

    # ------------------------------------------------------------------ training
    def compute_loss(  # type: ignore[override]
        self,
        targets: list[dict[str, Tensor]],
        head_outputs: dict[str, Tensor],
        anchors: list[Tensor],
        image_sizes: list[tuple[int, int]],
        level_sizes: list[tuple[int, int]],
    ) -> dict[str, Tensor]:
        """MMDetection's ``AnchorHead.loss_by_feat`` for the ``train_cfg`` of RetinaNet.

        Args:
            targets: per image ``boxes`` (G, 4) in the transformed batch's pixels, ``labels`` (G,) in 1..K.
            head_outputs: ``cls_logits`` (N, M, K) and ``bbox_regression`` (N, M, 4), M = Σ H·W·A.
            anchors: per image (M, 4).
            image_sizes: per image the (H, W) inside the padded batch.
            level_sizes: the (H, W) of each FPN level.
        """
        cls_logits = head_outputs["cls_logits"].float()
        bbox_regression = head_outputs["bbox_regression"].float()
        num_images, num_total, num_classes = cls_logits.shape
        device = cls_logits.device
        labels = torch.full((num_images, num_total), num_classes, dtype=torch.int64, device=device)
        label_weights = cls_logits.new_zeros((num_images, num_total))
        bbox_targets = cls_logits.new_zeros((num_images, num_total, 4))
        bbox_weights = cls_logits.new_zeros((num_images, num_total, 4))
        check_target_labels(targets, num_classes, self.name)
        avg_factor = 0
        for i, (target, anchors_i) in enumerate(zip(targets, anchors)):
            valid = self.anchor_generator.valid_flags(level_sizes, image_sizes[i], device=device)
            valid_idx = valid.nonzero().squeeze(1)
            candidates = anchors_i[valid_idx]
            gt_boxes = target["boxes"].to(candidates.dtype)
            gt_labels = target["labels"].to(device)
            assigned = max_iou_assign(gt_boxes, candidates, self.fg_iou_thresh, self.bg_iou_thresh, self.min_pos_iou)
            pos, neg = valid_idx[assigned > 0], valid_idx[assigned == 0]
            matched = assigned[assigned > 0] - 1
            if pos.numel() > 0:
                bbox_targets[i, pos] = self.box_coder.encode(anchors_i[pos], gt_boxes[matched])
                bbox_weights[i, pos] = 1.0
                labels[i, pos] = gt_labels[matched] - 1
                label_weights[i, pos] = 1.0
            label_weights[i, neg] = 1.0
            avg_factor += max(pos.numel(), 1)
        # one-hot over the K classes; background (label K) is all zeros (written in place: F.one_hot's int64
        # (N, M, K + 1) would be 8× the logits' memory)
        onehot = torch.zeros_like(cls_logits)
        image_idx, anchor_idx = (labels < num_classes).nonzero(as_tuple=True)
        onehot[image_idx, anchor_idx, labels[image_idx, anchor_idx]] = 1.0
        counts = [h * w * self.num_anchors for h, w in level_sizes]
        loss_cls = cls_logits.new_zeros(())
        loss_bbox = cls_logits.new_zeros(())
        for logits, onehot_l, weight_l, reg, reg_t, reg_w in zip(
            cls_logits.split(counts, 1),
            onehot.split(counts, 1),
            label_weights.split(counts, 1),
            bbox_regression.split(counts, 1),
            bbox_targets.split(counts, 1),
            bbox_weights.split(counts, 1),
        ):
            focal = sigmoid_focal_loss(logits.reshape(-1, num_classes), onehot_l.reshape(-1, num_classes),
                                       self.focal_gamma, self.focal_alpha)  # fmt: skip
            loss_cls = loss_cls + (focal * weight_l.reshape(-1, 1)).sum() / (avg_factor + LOSS_EPS)
            loss_bbox = loss_bbox + (torch.abs(reg - reg_t) * reg_w).sum() / (avg_factor + LOSS_EPS)
        return {"loss_cls": loss_cls, "loss_bbox": loss_bbox}

    # ------------------------------------------------------------------ evaluation
    def postprocess_detections(  # type: ignore[override]
        self,
        head_outputs: dict[str, Tensor],
        anchors: list[Tensor],
        image_sizes: list[tuple[int, int]],
        original_sizes: list[tuple[int, int]],
        level_sizes: list[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        """MMDetection's ``predict_by_feat`` with ``rescale=True`` (see the module docstring).

        Args:
            head_outputs: ``cls_logits`` (N, M, K) and ``bbox_regression`` (N, M, 4).
            anchors: per image (M, 4).
            image_sizes: per image the resized (H, W) (MMDetection's ``img_shape``).
            original_sizes: per image the input (H, W) (``ori_shape``).
            level_sizes: the (H, W) of each FPN level.

        Returns:
            Per image ``boxes`` (K, 4), ``scores`` (K,), ``labels`` (K,) (MMDetection's class + 1).
        """
        counts = [h * w * self.num_anchors for h, w in level_sizes]
        detections = []
        for i, (image_size, original) in enumerate(zip(image_sizes, original_sizes)):
            logits_levels = head_outputs["cls_logits"][i].detach().float().split(counts)
            deltas_levels = head_outputs["bbox_regression"][i].detach().float().split(counts)
            anchor_levels = anchors[i].split(counts)
            kept_deltas, kept_anchors, kept_scores, kept_classes = [], [], [], []
            for logits, deltas, level_anchors in zip(logits_levels, deltas_levels, anchor_levels):
                scores, classes, anchor_idx = filter_scores_and_topk(
                    logits.sigmoid(), self.score_thresh, self.topk_candidates
                )
                kept_scores.append(scores)
                kept_classes.append(classes)
                kept_deltas.append(deltas[anchor_idx])
                kept_anchors.append(level_anchors[anchor_idx])
            boxes = self.box_coder.decode(torch.cat(kept_anchors), torch.cat(kept_deltas), max_shape=image_size)
            # rescale=True: divided by MMDetection's scale_factor (new / old, per axis); min_bbox_size=0
            boxes, scores, classes = bbox_post_process(
                rescale_boxes(boxes, image_size, original), torch.cat(kept_scores), torch.cat(kept_classes),
                self.nms_thresh, self.detections_per_img,
            )  # fmt: skip
            detections.append({"boxes": boxes, "scores": scores, "labels": classes + 1})
        return detections

    # ------------------------------------------------------------------ MMDetection checkpoints
    def head_rules(self) -> list[Rule]:
        """Renames of MMDetection's ``bbox_head.*`` (RetinaHead) to ``head.*``."""
        return [
            (r"^bbox_head\.cls_convs\.(\d+)\.conv\.(weight|bias)$", r"head.classification_head.conv.\1.0.\2"),
            (r"^bbox_head\.reg_convs\.(\d+)\.conv\.(weight|bias)$", r"head.regression_head.conv.\1.0.\2"),
            (r"^bbox_head\.retina_cls\.(weight|bias)$", r"head.classification_head.cls_logits.\1"),
            (r"^bbox_head\.retina_reg\.(weight|bias)$", r"head.regression_head.bbox_reg.\1"),
        ]

    def convert_foreign_checkpoint(self, obj: Any, origin: str) -> dict[str, Tensor] | None:
        """This model's state dict from a loaded MMDetection v2/v3 checkpoint (``None`` for any other file).

        Raises:
            MMDetWeightsError: the file does not fit (missing, unexpected or other-shaped tensors, listed, with what
                the file holds), or its config says it is a caffe-style model.
        """
        if not is_mmdet_checkpoint(obj):
            return None
        state, meta = mmdet_state_dict(obj)
        check_style(meta, "pytorch", origin, self.name, state)
        fits = lambda s: describe_mmdet_checkpoint(s, meta)  # noqa: E731
        if self.backbone_only:
            return convert_backbone_fpn(
                self, state, origin, 3, "on_input", fits, logger=log, level=logging.WARNING,
                consequence="the model's heads keep their initialisation: its FPN features are the file's "
                "(teacher_runs: backbone), its detections and losses are not a trained detector's",
            )  # fmt: skip
        return convert_keys(state, backbone_neck_rules(3, "on_input") + self.head_rules(), self, origin, fits)


# ---------------------------------------------------------------------------------------------------- builders
def build_mmdet_retinanet(
    name: str,
    num_classes: int = COCO_NUM_CLASSES,
    weights_backbone: str | None = None,
    min_size: int | Sequence[int] = 800,
    max_size: int = 1333,
    frozen_stages: int | None = None,
    weights: str | Path | None = None,
    backbone_only: bool = False,
    pretrained: bool = False,
    trainable_layers: int | None = None,
    frozen_bn: bool = True,
    **kwargs: Any,
) -> MMDetRetinaNet:
    """One of the registered RetinaNets (see the module docstring).

    Args:
        name: a key of :data:`BACKBONES`.
        num_classes: classes including background 0 (81 for COCO's 80).
        weights_backbone: ImageNet weights: ``"IMAGENET1K_V1"`` (torchvision's, downloaded) or a file's path
            (:func:`~diffkd.models.mmdet.common.load_backbone_weights`); ``None``: random.
        min_size, max_size: the test scale ``(max_size, min_size)``; a tuple ``min_size`` picks one per training
            image (MMDetection's ``RandomChoiceResize``).
        frozen_stages: the stem and this many stages take no gradient (MMDetection's ``frozen_stages``, default 1;
            -1: none).
        weights: a checkpoint loaded after building (an MMDetection zoo file, converted, or our own).
        backbone_only: read only the backbone + FPN of MMDetection checkpoints (a teacher of FPN features).
        pretrained: refused — the zoo files are downloads (:data:`ZOO`), passed as ``weights``.
        trainable_layers: torchvision's spelling of ``frozen_stages`` (``4 - trainable_layers``; 3 ↔ 1), accepted
            so that ``conf/model/detection.yaml`` builds these models.
        frozen_bn: must stay ``True`` (MMDetection's ``norm_eval=True``: statistics frozen, affine trained).
        **kwargs: :class:`MMDetRetinaNet`'s test/train settings, and the transform's (``_skip_resize``).
    """
    depth, groups, width, backbone_name = BACKBONES[name]
    if pretrained:
        refuse_pretrained(name, "; ".join(f"{s} {ap} AP: {url}" for s, ap, url in ZOO[name]))
    frozen_stages = frozen_stages_of(name, frozen_stages, trainable_layers, frozen_bn)
    transform_keys = ("_skip_resize", "fixed_size", "size_divisible")
    transform_kwargs = {k: kwargs.pop(k) for k in transform_keys if k in kwargs}
    body = mmdet_resnet(depth, groups, width, "pytorch", frozen_stages, weights=weights_backbone)
    backbone = mmdet_fpn(body, start_level=1, extra="on_input")
    transform = mmdet_transform(min_size, max_size, "pytorch", **transform_kwargs)
    model = MMDetRetinaNet(
        backbone, num_classes, transform, name=name, description=f"RetinaNet {backbone_name} FPN",
        backbone_only=backbone_only, **kwargs,
    )  # fmt: skip
    return with_weights(model, weights)


def _register(name: str) -> None:
    zoo = "; ".join(f"{s}: {ap} AP" for s, ap, _ in ZOO[name])
    doc = (
        f"MMDetection's RetinaNet {BACKBONES[name][3]} FPN (zoo {zoo}); see :func:`build_mmdet_retinanet`. FPN levels "
        "'0', '1', '2', 'p6', 'p7' (P3–P7), 256 channels."
    )
    register_variant(build_mmdet_retinanet, name, doc, TAGS, name)


for _name in BACKBONES:
    _register(_name)
del _name
