"""Semantic segmentation: per-pixel cross-entropy with an ignore label (+ the auxiliary head), dataset mIoU.

Batches are ``(images (B, 3, H, W), labels (B, H, W) int64)`` with ``ignore_index`` (255) at unlabelled pixels —
what :class:`~diffkd.data.cityscapes.CityscapesDataModule` yields. Students and teachers return
``{"out": logits, "aux": logits}`` (torchvision's segmenters, CIRKD's zoo) or a bare logits tensor. Logits may be
at a lower resolution than the labels (CIRKD: 1/8): the losses and metrics resize them to the label size,
bilinearly, with the model's ``align_corners`` (CIRKD: True; torchvision: False).

Distances may declare ``labels`` and ``valid_mask`` ((B, H, W) bool, False at ignored pixels; a per-pixel distance
resizes it to the tapped map, nearest-neighbour): DIST on ``:out`` with the 255 pixels masked out is
``distance: {name: dist}`` on ``student: ":out"``.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassJaccardIndex

from diffkd.tasks.base import DistillationModule

__all__ = ["SegmentationModule"]


def _outputs(output: Any) -> dict[str, Tensor]:
    if isinstance(output, Tensor):
        return {"out": output}
    if isinstance(output, dict) and "out" in output:
        return output
    raise TypeError(f"a segmenter returns logits or a dict with 'out' (and 'aux'), got {type(output).__name__}")


class SegmentationModule(DistillationModule):
    """Distillation for semantic segmentation.

    Args:
        num_classes: K; ``None`` reads it from the student's ``out`` logits in the dry run.
        ignore_index: the label of pixels that count nowhere.
        aux_weight: weight of the auxiliary head's cross-entropy (``aux_ce``; CIRKD/PSPNet: 0.4), unless
            ``task_weights`` names it.
        align_corners: for resizing logits to the labels; ``None`` reads the student's ``align_corners`` attribute
            (False when it has none).
        **kwargs: see :class:`~diffkd.tasks.base.DistillationModule`.

    Logs ``train/loss/ce`` (and ``train/loss/aux_ce``), ``val/miou`` (dataset-level: intersections and unions
    summed over the whole split, then averaged over classes), ``val/loss`` and per-class IoU
    ``val/iou/<class index>``.
    """

    def __init__(
        self,
        *args: Any,
        num_classes: int | None = None,
        ignore_index: int = 255,
        aux_weight: float = 0.4,
        align_corners: bool | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.num_classes = num_classes
        self.ignore_index = int(ignore_index)
        self.task_weights.setdefault("aux_ce", float(aux_weight))
        if align_corners is None:
            align_corners = bool(getattr(self.student, "align_corners", False))
        self.align_corners = align_corners

    # ------------------------------------------------------------------ the forward contract
    def student_inputs(self, batch: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        return (images,), {}

    def distill_inputs(self, batch: Any) -> dict[str, Any]:
        if not isinstance(batch, (tuple, list)):
            return {}
        labels = batch[1]
        return {"labels": labels, "valid_mask": labels != self.ignore_index}

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
        if self.num_classes is None:
            self.num_classes = int(_outputs(student_output)["out"].shape[1])

    def build(self, example: Any) -> None:
        super().build(example)
        k = self.num_classes
        assert k is not None
        for split in ("val", "test"):
            metrics = {
                "miou": MulticlassJaccardIndex(k, ignore_index=self.ignore_index, average="macro"),
                "iou": MulticlassJaccardIndex(k, ignore_index=self.ignore_index, average="none"),
                "loss": MeanMetric(),
            }
            for name, metric in metrics.items():
                setattr(self, f"{split}_{name}", metric.to(self.device))

    # ------------------------------------------------------------------ evaluation
    def _eval_step(self, batch: Any, split: str) -> None:
        images, labels = batch
        logits = self.upsample(_outputs(self.student(self.to_memory_format(images)))["out"], labels.shape[-2:])
        getattr(self, f"{split}_loss")(F.cross_entropy(logits.float(), labels, ignore_index=self.ignore_index))
        prediction = logits.argmax(dim=1)
        getattr(self, f"{split}_miou").update(prediction, labels)
        getattr(self, f"{split}_iou").update(prediction, labels)

    def _log_epoch(self, split: str) -> None:
        self.log(f"{split}/miou", getattr(self, f"{split}_miou").compute(), prog_bar=True)
        self.log(f"{split}/loss", getattr(self, f"{split}_loss").compute())
        per_class = getattr(self, f"{split}_iou").compute()
        self.log_dict({f"{split}/iou/{i}": v for i, v in enumerate(per_class)})
        for name in ("miou", "iou", "loss"):
            getattr(self, f"{split}_{name}").reset()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")
