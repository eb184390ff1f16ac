"""The box arithmetic every MMDetection-compatible detector shares, computed as MMDetection 3.3 (and mmcv) compute it,
operation for operation, so that equal values tie and round as there:

- :func:`bbox_overlaps`: MMDetection's IoU (the union floored at ``eps``), pairwise or of aligned rows;
- :func:`max_iou_assign`: MMDetection's ``MaxIoUAssigner`` (RetinaNet's, the RPN's and the RoI head's settings);
- :class:`DeltaXYWHCoder`: MMDetection's ``DeltaXYWHBBoxCoder`` (means/stds: RetinaNet and the RPN 0/1, the RoI head
  0/(0.1, 0.1, 0.2, 0.2));
- :func:`batched_nms`: mmcv's class-wise (group-wise) NMS on torchvision's ``nms`` (named difference: mmcv calls its
  compiled kernel, which computes the same IoU without the +1 offset);
- :func:`filter_scores_and_topk`, :func:`rescale_boxes`, :func:`bbox_post_process`: the steps of the dense heads'
  ``predict_by_feat`` (score threshold and ``nms_pre``, ``rescale=True``, ``min_bbox_size`` + NMS + ``max_per_img``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torchvision
from torch import Tensor

__all__ = [
    "DeltaXYWHCoder",
    "batched_nms",
    "bbox_overlaps",
    "bbox_post_process",
    "filter_scores_and_topk",
    "max_iou_assign",
    "rescale_boxes",
]


def bbox_overlaps(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-6, *, is_aligned: bool = False) -> Tensor:
    """MMDetection's ``bbox_overlaps`` (mode ``iou``): IoU of xyxy boxes with the union floored at ``eps``
    (torchvision's ``box_iou`` divides by the bare union); the same operations in the same order, so equal IoUs tie
    exactly as there.

    Args:
        boxes1: (M, 4) xyxy.
        boxes2: (N, 4) xyxy (N = M when ``is_aligned``).
        is_aligned: the IoU of matching rows (FCOS's IoU loss) instead of every pair.

    Returns:
        (M, N) pairwise, or (M,) when ``is_aligned``.
    """
    area1 = (boxes1[..., 2] - boxes1[..., 0]) * (boxes1[..., 3] - boxes1[..., 1])
    area2 = (boxes2[..., 2] - boxes2[..., 0]) * (boxes2[..., 3] - boxes2[..., 1])
    if is_aligned:
        lt = torch.max(boxes1[..., :2], boxes2[..., :2])
        rb = torch.min(boxes1[..., 2:], boxes2[..., 2:])
        wh = (rb - lt).clamp(min=0)
        overlap = wh[..., 0] * wh[..., 1]
        union = area1 + area2 - overlap
    else:
        if boxes1.shape[0] == 0 or boxes2.shape[0] == 0:
            return boxes1.new_zeros(boxes1.shape[0], boxes2.shape[0])
        lt = torch.max(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
        rb = torch.min(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
        wh = (rb - lt).clamp(min=0)
        overlap = wh[..., 0] * wh[..., 1]
        union = area1[..., None] + area2[..., None, :] - overlap
    return overlap / torch.max(union, union.new_tensor([eps]))


def max_iou_assign(
    gt_boxes: Tensor,
    priors: Tensor,
    pos_iou_thr: float = 0.5,
    neg_iou_thr: float = 0.4,
    min_pos_iou: float = 0.0,
    match_low_quality: bool = True,
) -> Tensor:
    """MMDetection's ``MaxIoUAssigner`` (``gt_max_assign_all=True``, no ignored boxes) on :func:`bbox_overlaps`.

    A prior whose best IoU is ``>= pos_iou_thr`` goes to that box, one below ``neg_iou_thr`` is a negative, the rest
    are ignored. Low-quality matching (``match_low_quality``) then gives every prior at a box's best IoU
    (``>= min_pos_iou``) to that box, box by box in order, so a later box takes the priors it ties with an earlier one
    (MMDetection's loop, vectorised). The settings used here: RetinaNet (0.5, 0.4, 0, low-quality matches: the
    defaults), the RPN (0.7, 0.3, 0.3, low-quality matches), the RoI head (0.5, 0.5, 0.5, none).

    Args:
        gt_boxes: (G, 4) xyxy.
        priors: (N, 4) xyxy anchors or proposals.

    Returns:
        (N,) int64: ``-1`` ignored, ``0`` negative, ``i + 1`` assigned to box ``i`` (all ``0`` without boxes).
    """
    overlaps = bbox_overlaps(gt_boxes, priors)  # (G, N)
    num_gts, num_priors = overlaps.shape
    assigned = overlaps.new_full((num_priors,), -1, dtype=torch.long)
    if num_gts == 0 or num_priors == 0:
        assigned[:] = 0
        return assigned
    max_overlaps, argmax_overlaps = overlaps.max(dim=0)
    gt_max_overlaps, _ = overlaps.max(dim=1)
    assigned[(max_overlaps >= 0) & (max_overlaps < neg_iou_thr)] = 0
    pos = max_overlaps >= pos_iou_thr
    assigned[pos] = argmax_overlaps[pos] + 1
    if match_low_quality:
        best = (overlaps == gt_max_overlaps[:, None]) & (gt_max_overlaps[:, None] >= min_pos_iou)
        ids = torch.arange(1, num_gts + 1, device=overlaps.device)[:, None]
        last = (best.long() * ids).max(dim=0).values  # the last box whose best IoU this prior has, or 0
        assigned = torch.where(last > 0, last, assigned)
    return assigned


class DeltaXYWHCoder:
    """MMDetection's ``DeltaXYWHBBoxCoder`` (no +1 in widths; ``log`` ratios clipped at ``|log(wh_ratio_clip)|``;
    ``clip_border=True``: decoded boxes clamped to ``max_shape`` when given).

    Args:
        stds, means: the deltas' normalisation (RetinaNet and the RPN: 1 and 0; the RoI head: 0.1, 0.1, 0.2, 0.2).
        wh_ratio_clip: the smallest/largest width and height ratio a delta may scale a box by (16/1000).
    """

    def __init__(
        self,
        stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
        means: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
        wh_ratio_clip: float = 16 / 1000,
    ) -> None:
        self.stds, self.means = tuple(float(s) for s in stds), tuple(float(m) for m in means)
        self.max_ratio = float(np.abs(np.log(wh_ratio_clip)))

    def encode(self, proposals: Tensor, gt: Tensor) -> Tensor:
        """(N, 4) float32 deltas ``(dx, dy, dw, dh)`` taking ``proposals`` (N, 4) to ``gt`` (N, 4)."""
        proposals, gt = proposals.float(), gt.float()
        px = (proposals[..., 0] + proposals[..., 2]) * 0.5
        py = (proposals[..., 1] + proposals[..., 3]) * 0.5
        pw = proposals[..., 2] - proposals[..., 0]
        ph = proposals[..., 3] - proposals[..., 1]
        gx = (gt[..., 0] + gt[..., 2]) * 0.5
        gy = (gt[..., 1] + gt[..., 3]) * 0.5
        gw = gt[..., 2] - gt[..., 0]
        gh = gt[..., 3] - gt[..., 1]
        deltas = torch.stack([(gx - px) / pw, (gy - py) / ph, torch.log(gw / pw), torch.log(gh / ph)], dim=-1)
        return deltas.sub_(deltas.new_tensor(self.means)[None]).div_(deltas.new_tensor(self.stds)[None])

    def decode(self, rois: Tensor, deltas: Tensor, max_shape: Sequence[int] | None = None) -> Tensor:
        """(N, 4) xyxy boxes: ``deltas`` (N, 4) applied to ``rois`` (N, 4), clamped to ``max_shape`` (H, W) if
        given."""
        if deltas.shape[0] == 0:
            return deltas.new_zeros(0, 4)
        denorm = deltas * deltas.new_tensor(self.stds).view(1, -1) + deltas.new_tensor(self.means).view(1, -1)
        dxy, dwh = denorm[:, :2], denorm[:, 2:]
        pxy = (rois[:, :2] + rois[:, 2:]) * 0.5
        pwh = rois[:, 2:] - rois[:, :2]
        dxy_wh = pwh * dxy
        dwh = dwh.clamp(min=-self.max_ratio, max=self.max_ratio)
        gxy = pxy + dxy_wh
        gwh = pwh * dwh.exp()
        boxes = torch.cat([gxy - (gwh * 0.5), gxy + (gwh * 0.5)], dim=-1)
        if max_shape is not None:
            boxes[..., 0::2].clamp_(min=0, max=max_shape[1])
            boxes[..., 1::2].clamp_(min=0, max=max_shape[0])
        return boxes


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float, split_thr: int = 10000) -> Tensor:
    """mmcv's ``batched_nms`` (NMS within each ``idxs`` group: classes, or the RPN's levels): the kept indices, best
    score first. Below ``split_thr`` boxes the groups are separated by coordinate offsets (``idx · (max coordinate +
    1)``), above it NMS runs group by group (on the offset boxes, as mmcv does).

    Args:
        boxes: (N, 4) xyxy.
        scores: (N,).
        idxs: (N,) the group of each box.
    """
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    max_coordinate = boxes.max()
    offsets = idxs.to(boxes) * (max_coordinate + torch.tensor(1).to(boxes))
    boxes_for_nms = boxes + offsets[:, None]
    if boxes_for_nms.shape[0] < split_thr:
        return torchvision.ops.nms(boxes_for_nms, scores, float(iou_threshold))
    total = torch.zeros_like(scores, dtype=torch.bool)
    for group in torch.unique(idxs):
        mask = (idxs == group).nonzero(as_tuple=False).view(-1)
        total[mask[torchvision.ops.nms(boxes_for_nms[mask], scores[mask], float(iou_threshold))]] = True
    keep = total.nonzero(as_tuple=False).view(-1)
    return keep[scores[keep].sort(descending=True)[1]]


def filter_scores_and_topk(scores: Tensor, score_thr: float, topk: int) -> tuple[Tensor, Tensor, Tensor]:
    """MMDetection's ``filter_scores_and_topk``, op for op (so that ties keep its order): the scores above
    ``score_thr``, the best ``topk`` of them (``nms_pre``).

    Args:
        scores: (N, K) per prior and class.

    Returns:
        ``scores`` (k,) in decreasing order, their ``labels`` (k,) (class columns) and ``keep`` (k,) (prior rows),
        k ≤ ``topk``.
    """
    valid = scores > score_thr
    kept = scores[valid]
    valid_idxs = torch.nonzero(valid)
    num_topk = min(topk, valid_idxs.shape[0])
    kept, order = kept.sort(descending=True)
    keep, labels = valid_idxs[order[:num_topk]].unbind(dim=1)
    return kept[:num_topk], labels, keep


def rescale_boxes(boxes: Tensor, image_size: Sequence[int], original_size: Sequence[int]) -> Tensor:
    """(N, 4) boxes of the resized image ``image_size`` (H, W) in the input image's ``original_size`` (H, W):
    divided by MMDetection's ``scale_factor`` (``new / old`` per axis, in Python floats), as ``rescale=True`` does."""
    (new_h, new_w), (h, w) = image_size, original_size
    return boxes * boxes.new_tensor([1 / (new_w / w), 1 / (new_h / h)]).repeat(2)


def bbox_post_process(
    boxes: Tensor, scores: Tensor, labels: Tensor, iou_threshold: float, max_per_img: int, min_bbox_size: float = 0.0
) -> tuple[Tensor, Tensor, Tensor]:
    """MMDetection's ``_bbox_post_process`` of the dense heads (and the RPN's): boxes not wider and higher than
    ``min_bbox_size`` dropped (a negative size keeps all), :func:`batched_nms` by ``labels``, the best
    ``max_per_img``.

    Args:
        boxes: (N, 4) xyxy.
        scores: (N,).
        labels: (N,) the NMS groups (classes; the RPN's levels).

    Returns:
        ``boxes`` (D, 4), ``scores`` (D,), ``labels`` (D,), best score first.
    """
    if min_bbox_size >= 0:
        widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        valid = (widths > min_bbox_size) & (heights > min_bbox_size)
        if not bool(valid.all()):
            boxes, scores, labels = boxes[valid], scores[valid], labels[valid]
    keep = batched_nms(boxes, scores, labels, iou_threshold)[:max_per_img]
    return boxes[keep], scores[keep], labels[keep]
