"""Semantic segmentation: per-pixel cross-entropy with an ignore label (+ the auxiliary head), dataset mIoU.

Batches are ``(images (B, 3, H, W), labels (B, H, W) int64)`` with ``ignore_index`` (255) at unlabelled pixels —
what :class:`~diffkd.data.cityscapes.CityscapesDataModule` yields. Students and teachers return
``{"out": logits, "aux": logits}`` (torchvision's segmenters, CIRKD's zoo) or a bare logits tensor. Logits may be
at a lower resolution than the labels (CIRKD: 1/8): the losses and metrics resize them to the label size,
bilinearly, with the model's ``align_corners`` (CIRKD: True; torchvision: False).

Distillation: distances may declare ``labels`` and ``valid_mask`` ((B, H, W) bool, False at ignored pixels; a
per-pixel distance resizes it to the tapped map, nearest-neighbour): DIST on ``:out`` with the 255 pixels masked out
is ``distance: {name: dist}`` on ``student: ":out"``. ``distill_valid_mask=False`` withholds the mask, so every
pixel counts (what DIST_KD's and CIRKD's segmentation losses do).

Evaluation follows CIRKD's ``eval.py`` (winycg/CIRKD @05a2753): full-resolution images, logits resized to the label
size, argmax, a confusion matrix accumulated over the whole split (ignored pixels removed), per-class
IoU = TP / (TP + FP + FN). Options: horizontal-flip and multi-scale evaluation (``flip_eval``, ``eval_scales``,
averaging logits as CIRKD does or probabilities). The mean over classes is the Cityscapes convention
(cityscapesScripts ``evalPixelLevelSemanticLabeling``: a class absent from both prediction and ground truth has no
IoU (NaN) and is left out of the mean; torchmetrics' ``average="macro"`` gives it weight 0, the same); CIRKD's
``SegmentationMetric`` instead counts such a class as IoU 0 (``absent_classes="zero"``). On the full Cityscapes val
split every class occurs, so both give the same number.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MeanMetric, Metric
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from diffkd.tasks.base import DistillationModule

__all__ = ["SegmentationModule", "format_iou_table", "mean_iou"]

log = logging.getLogger(__name__)

AbsentClasses = Literal["exclude", "zero"]
EvalAverage = Literal["logits", "softmax"]


def _outputs(output: Any) -> dict[str, Tensor]:
    if isinstance(output, Tensor):
        return {"out": output}
    if isinstance(output, dict) and "out" in output:
        return output
    raise TypeError(f"a segmenter returns logits or a dict with 'out' (and 'aux'), got {type(output).__name__}")


def mean_iou(per_class: Tensor, absent_classes: AbsentClasses = "exclude") -> Tensor:
    """The mean of per-class IoUs (K,) holding NaN for classes absent from both prediction and ground truth.

    ``"exclude"``: the mean over the classes that have an IoU (Cityscapes' ``getScoreAverage``; NaN when none
    has); ``"zero"``: the mean over all K classes with absent ones as 0 (CIRKD's ``SegmentationMetric``).
    """
    if absent_classes == "zero":
        return torch.nan_to_num(per_class, nan=0.0).mean()
    return per_class.nanmean()


def format_iou_table(
    per_class: Sequence[float], class_names: Sequence[str], miou: float, title: str = "", pixel_acc: float | None = None
) -> str:
    """A per-class IoU table in percent (CIRKD's and the paper's unit), absent classes as ``n/a``.

    Args:
        per_class: IoU of each class in [0, 1], NaN for a class absent from prediction and ground truth.
        class_names: one name per class.
        miou: the mean reported below the classes, in [0, 1].
        title: the first line (e.g. ``"val, step 800"``).
        pixel_acc: the pixel accuracy in [0, 1], printed under the mean when given.
    """
    if len(per_class) != len(class_names):
        raise ValueError(f"{len(per_class)} IoUs but {len(class_names)} class names")
    width = max([len("class"), len("mIoU"), *(len(n) for n in class_names)])
    lines = [title] if title else []
    lines.append(f"{'class':<{width}}  {'IoU':>6}")
    lines.append("-" * (width + 8))
    for name, iou in zip(class_names, per_class):
        value = "n/a" if math.isnan(iou) else f"{100.0 * iou:.2f}"
        lines.append(f"{name:<{width}}  {value:>6}")
    lines.append("-" * (width + 8))
    lines.append(f"{'mIoU':<{width}}  {100.0 * miou:>6.2f}")
    if pixel_acc is not None:
        lines.append(f"{'pixAcc':<{width}}  {100.0 * pixel_acc:>6.2f}")
    return "\n".join(lines)


class SegmentationModule(DistillationModule):
    """Distillation for semantic segmentation.

    Args:
        num_classes: K; ``None`` reads it from the student's ``out`` logits in the dry run.
        ignore_index: the label of pixels that count nowhere.
        aux_weight: weight of the auxiliary head's cross-entropy (``aux_ce``; CIRKD/PSPNet: 0.4), unless
            ``task_weights`` names it; set in the dry run when the student has an aux head.
        align_corners: for resizing logits to the labels (and images for ``eval_scales``); ``None`` reads the
            student's ``align_corners`` attribute (False when it has none).
        flip_eval: evaluate each image and its horizontal flip and average the two (CIRKD ``eval.py --flip-eval``;
            off by default: the paper's numbers are single-scale).
        eval_scales: input scales of the evaluation, each resized back to the label size and averaged (CIRKD
            ``--scales``; default ``[1.0]``, full resolution only).
        eval_average: what the flips/scales average — ``"logits"`` (CIRKD ``eval.py``: the resized logits) or
            ``"softmax"`` (the class probabilities).
        absent_classes: a class absent from both prediction and ground truth is left out of the mean
            (``"exclude"``, Cityscapes' convention) or counted as IoU 0 (``"zero"``, CIRKD's arithmetic).
        class_names: names for the per-class table; ``None`` takes the datamodule's ``class_names`` (else
            indices).
        iou_table: print the per-class IoU table after every validation and test epoch (rank zero only).
        distill_valid_mask: hand distances the ``valid_mask`` (False at ``ignore_index``); False: every pixel
            counts in every distance.
        **kwargs: see :class:`~diffkd.tasks.base.DistillationModule`.

    Logs ``train/loss/ce`` (and ``train/loss/aux_ce``), ``val/miou`` (dataset-level: the confusion matrix summed
    over the whole split, then per-class IoU averaged over classes), ``val/miou_best`` (the best ``val/miou`` so
    far), ``val/pixel_acc``, ``val/loss`` (cross-entropy of the evaluated prediction at the label size) and the
    per-class IoU ``val/iou/<class index>`` of every class present; the same under ``test/`` (no ``_best``).
    """

    best_metric = "miou"

    def __init__(
        self,
        *args: Any,
        num_classes: int | None = None,
        ignore_index: int = 255,
        aux_weight: float = 0.4,
        align_corners: bool | None = None,
        flip_eval: bool = False,
        eval_scales: Sequence[float] = (1.0,),
        eval_average: EvalAverage = "logits",
        absent_classes: AbsentClasses = "exclude",
        class_names: Sequence[str] | None = None,
        iou_table: bool = True,
        distill_valid_mask: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if eval_average not in ("logits", "softmax"):
            raise ValueError(f"model.eval_average must be 'logits' or 'softmax', got {eval_average!r}")
        if absent_classes not in ("exclude", "zero"):
            raise ValueError(f"model.absent_classes must be 'exclude' or 'zero', got {absent_classes!r}")
        scales = tuple(float(s) for s in eval_scales)
        if not scales or min(scales) <= 0:
            raise ValueError(f"model.eval_scales must be a non-empty list of positive scales, got {eval_scales!r}")
        self.num_classes = num_classes
        self.ignore_index = int(ignore_index)
        self.aux_weight = float(aux_weight)
        if align_corners is None:
            align_corners = bool(getattr(self.student, "align_corners", False))
        self.align_corners = align_corners
        self.flip_eval = bool(flip_eval)
        self.eval_scales = scales
        self.eval_average: EvalAverage = eval_average
        self.absent_classes: AbsentClasses = absent_classes
        self.class_names = tuple(class_names) if class_names is not None else None
        self.iou_table = bool(iou_table)
        self.distill_valid_mask = bool(distill_valid_mask)

    # ------------------------------------------------------------------ the forward contract
    def student_inputs(self, batch: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        return (images,), {}

    def distill_inputs(self, batch: Any) -> dict[str, Any]:
        if not isinstance(batch, (tuple, list)):
            return {}
        labels = batch[1]
        inputs: dict[str, Any] = {"labels": labels}
        if self.distill_valid_mask:
            inputs["valid_mask"] = labels != self.ignore_index
        return inputs

    def synthetic_batch(self, input_size: tuple[int, ...]) -> Any:
        _, height, width = input_size
        return torch.randn(2, *input_size), torch.zeros(2, height, width, dtype=torch.long)

    def upsample(self, logits: Tensor, size: tuple[int, int]) -> Tensor:
        """Logits (B, K, h, w) at the label size (B, K, H, W)."""
        if tuple(logits.shape[-2:]) == tuple(size):
            return logits
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=self.align_corners)

    def task_losses(self, student_output: Any, batch: Any) -> dict[str, Tensor]:
        labels = batch[1]
        outputs = _outputs(student_output)
        size = tuple(labels.shape[-2:])
        out = self.upsample(outputs["out"], size).float()
        losses = {"ce": F.cross_entropy(out, labels, ignore_index=self.ignore_index)}
        if outputs.get("aux") is not None:
            aux = self.upsample(outputs["aux"], size).float()
            losses["aux_ce"] = F.cross_entropy(aux, labels, ignore_index=self.ignore_index)
        return losses

    # ------------------------------------------------------------------ setup
    def on_dry_run(self, student_output: Any) -> None:
        outputs = _outputs(student_output)
        if self.num_classes is None:
            self.num_classes = int(outputs["out"].shape[1])
        if outputs.get("aux") is not None:  # a student without an aux head (MobileNetV2) has no aux_ce to weigh
            self.task_weights.setdefault("aux_ce", self.aux_weight)

    def build(self, example: Any) -> None:
        super().build(example)
        k = self.num_classes
        assert k is not None
        if self.class_names is None:
            names = getattr(self.datamodule(), "class_names", None)
            if names is not None and len(names) == k:
                self.class_names = tuple(names)
            elif names is not None:
                log.warning("the datamodule names %d classes but the model predicts %d: IoUs by index", len(names), k)
        if self.class_names is not None and len(self.class_names) != k:
            raise ValueError(f"model.class_names has {len(self.class_names)} names for {k} classes")

    # ------------------------------------------------------------------ evaluation
    def predict(self, images: Tensor, size: tuple[int, int]) -> Tensor:
        """The evaluated scores (B, K, H, W) at the label size ``size``: the student's ``out`` logits resized to it,
        averaged over ``eval_scales`` and (``flip_eval``) horizontal flips — logits or probabilities, as
        ``eval_average`` says. Its argmax is the prediction."""
        total: Tensor | None = None
        views = 0
        for scale in self.eval_scales:
            x = images
            if scale != 1.0:
                x = F.interpolate(images, scale_factor=scale, mode="bilinear", align_corners=self.align_corners)
            for flipped in (False, True) if self.flip_eval else (False,):
                view = x.flip(-1) if flipped else x
                logits = self.upsample(_outputs(self.student(self.to_memory_format(view)))["out"], size).float()
                if flipped:
                    logits = logits.flip(-1)
                scores = logits.softmax(dim=1) if self.eval_average == "softmax" else logits
                total = scores if total is None else total + scores
                views += 1
        assert total is not None
        return total / views if views > 1 else total

    def metrics(self) -> dict[str, Metric]:
        k = self.num_classes
        assert k is not None
        return {
            # NaN marks a class absent from prediction and ground truth, so mean_iou can leave it out
            "iou": MulticlassJaccardIndex(
                k, ignore_index=self.ignore_index, average="none", zero_division=float("nan")
            ),
            "pixel_acc": MulticlassAccuracy(k, ignore_index=self.ignore_index, average="micro"),
            "loss": MeanMetric(),
        }

    def update_metrics(self, metrics: Mapping[str, Metric], batch: Any) -> None:
        images, labels = batch
        scores = self.predict(images, tuple(labels.shape[-2:]))
        if self.eval_average == "softmax":
            loss = F.nll_loss(scores.clamp_min(1e-12).log(), labels, ignore_index=self.ignore_index)
        else:
            loss = F.cross_entropy(scores, labels, ignore_index=self.ignore_index)
        metrics["loss"].update(loss)
        prediction = scores.argmax(dim=1)
        metrics["iou"].update(prediction, labels)
        metrics["pixel_acc"].update(prediction, labels)

    def compute_metrics(self, metrics: Mapping[str, Metric]) -> dict[str, Tensor]:
        per_class = metrics["iou"].compute()  # synchronised across processes
        values = {
            "miou": mean_iou(per_class, self.absent_classes),
            "pixel_acc": metrics["pixel_acc"].compute(),
            "loss": metrics["loss"].compute(),
        }
        values.update({f"iou/{i}": per_class[i] for i, v in enumerate(per_class.tolist()) if not math.isnan(v)})
        return values

    def report_metrics(self, split: str, metrics: Mapping[str, Metric], values: Mapping[str, Tensor]) -> None:
        """The per-class IoU table (``iou_table``), rank zero only."""
        if not self.iou_table:
            return
        per_class = metrics["iou"].compute().tolist()  # the cached value: no second synchronisation
        names = self.class_names or tuple(str(i) for i in range(len(per_class)))
        where = f"{split}, step {self.global_step}" if self._trainer is not None else split
        self.print(format_iou_table(per_class, names, float(values["miou"]), where, float(values["pixel_acc"])))
