"""Object detection with torchvision's detectors (Faster R-CNN, RetinaNet, FCOS): the forward contract and COCO mAP.

Batches are ``(images, targets)``: a list of float images (3, H_i, W_i) in [0, 1] of any sizes and a list of
target dicts (``boxes`` (N, 4) xyxy, ``labels`` (N,), ``iscrowd``/``area`` for evaluation) — what
:class:`~diffkd.data.coco.COCODataModule` yields.

One training step:

- the student runs as torchvision trains it, ``student(images, targets)``, and returns its loss dict
  (``loss_classifier``, ``loss_box_reg``, ``loss_objectness``, ``loss_rpn_box_reg`` for Faster R-CNN;
  ``classification``, ``bbox_regression`` for RetinaNet; ...), each logged as ``train/loss/<name>`` and guarded;
- the teacher sees the *student's* transformed batch — the resized, normalised, padded ``ImageList`` that the
  student's ``transform`` produced (kept by a hook) — so both FPNs see the same pixels (one resize, one
  normalisation) and their levels line up. By default only its backbone + FPN run (``teacher_runs: backbone``);
  ``teacher_runs: heads`` also runs its dense head (RetinaNet/FCOS ``head``, Faster R-CNN ``rpn.head``) for points
  that tap head outputs. Nothing else of the teacher runs: no anchors, no post-processing, no losses.
- distances may declare ``gt_boxes``/``gt_labels`` (the targets in the transformed batch's coordinates, one
  (N, 4) tensor per image) and ``image_sizes`` (the (H, W) of each image inside the padded batch).

Tap the FPN with ``backbone.fpn:*`` (one point per level: ``'0'…'3', 'pool'`` for Faster R-CNN, ``'0', '1', '2',
'p6', 'p7'`` for RetinaNet/FCOS) or a level with ``backbone.fpn:0``; a head module that runs once per level keeps
every call (``head.classification_head.cls_logits:*``).

Validation: COCO box mAP with torchmetrics' ``MeanAveragePrecision`` (faster-coco-eval backend when installed),
logging ``val/map``, ``val/map_50``, ``val/map_75``, ``val/map_small``, ``val/map_medium``, ``val/map_large``.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from torch import Tensor, nn

from diffkd.tasks.base import DistillationModule

__all__ = ["DetectionModule"]

log = logging.getLogger(__name__)

_MAP_KEYS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large")


class _KeepOutput:
    """Forward hook keeping a module's last output in a dict (a class so that the model still pickles)."""

    def __init__(self, store: dict[str, Any], key: str) -> None:
        self.store, self.key = store, key

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> None:
        self.store[self.key] = output


def _dense_head(model: nn.Module) -> nn.Module:
    """The detector's dense head: RetinaNet/FCOS ``head``, Faster R-CNN's ``rpn.head``."""
    if hasattr(model, "rpn"):
        return model.rpn.head
    if hasattr(model, "head"):
        return model.head
    raise TypeError(f"{type(model).__name__} has neither .head nor .rpn.head; use teacher_runs=backbone")


def _check_detector(model: nn.Module, role: str) -> None:
    missing = [name for name in ("transform", "backbone") if not hasattr(model, name)]
    if missing:
        raise TypeError(
            f"the {role} {type(model).__name__} is not a torchvision detector (it has no {', '.join(missing)}); "
            "DetectionModule drives models built like torchvision's FasterRCNN/RetinaNet/FCOS"
        )


class DetectionModule(DistillationModule):
    """Distillation for torchvision detectors.

    Args:
        teacher_runs: ``backbone`` (FPN features only) or ``heads`` (also the dense head, for head taps).
        map_backend: ``faster_coco_eval`` (default when installed) or ``pycocotools``.
        **kwargs: see :class:`~diffkd.tasks.base.DistillationModule` (``task_weights`` weigh the detector's
            named losses, e.g. ``{loss_box_reg: 2.0}``).
    """

    def __init__(
        self,
        *args: Any,
        teacher_runs: Literal["backbone", "heads"] = "backbone",
        map_backend: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if teacher_runs not in ("backbone", "heads"):
            raise ValueError(f"teacher_runs={teacher_runs!r}; choose backbone or heads")
        self.teacher_runs = teacher_runs
        self.map_backend = map_backend
        _check_detector(self.student, "student")
        if self.teacher is not None:
            _check_detector(self.teacher, "teacher")
        self._kept: dict[str, Any] = {}
        self.student.transform.register_forward_hook(_KeepOutput(self._kept, "transform"))

    # ------------------------------------------------------------------ the forward contract
    def student_inputs(self, batch: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        images, targets = batch
        return (list(images), [dict(t) for t in targets]), {}

    def teacher_forward(self, batch: Any) -> Any:
        """The teacher's backbone (+ dense head) on the student's transformed batch."""
        if "transform" not in self._kept:
            raise RuntimeError("the teacher runs after the student: no transformed batch of the student was kept")
        images = self._kept["transform"][0].tensors
        if self._teacher_cast:
            images = images.to(self.teacher_dtype)
        features = self.teacher.backbone(self.to_memory_format(images))
        if self.teacher_runs == "heads":
            levels = list(features.values()) if isinstance(features, dict) else [features]
            return {"features": features, "head": _dense_head(self.teacher)(levels)}
        return features

    def task_losses(self, student_output: Any, batch: Any) -> dict[str, Tensor]:
        if not isinstance(student_output, dict):
            raise TypeError(
                f"the student returned {type(student_output).__name__} in training, not a loss dict: is it a "
                "torchvision detector in train mode?"
            )
        return student_output

    def distill_inputs(self, batch: Any) -> dict[str, Any]:
        image_list, targets = self._kept.get("transform", (None, None))
        if image_list is None or targets is None:
            return {}
        return {
            "gt_boxes": [t["boxes"] for t in targets],
            "gt_labels": [t["labels"] for t in targets],
            "image_sizes": list(image_list.image_sizes),
        }

    # ------------------------------------------------------------------ setup
    def build(self, example: Any) -> None:
        super().build(example)
        from torchmetrics.detection import MeanAveragePrecision

        backend = self.map_backend or _default_backend()
        self.val_map = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend=backend).to(self.device)
        self.test_map = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend=backend).to(self.device)

    # ------------------------------------------------------------------ evaluation
    def _eval_step(self, batch: Any, metric: Any) -> None:
        images, targets = batch
        predictions = self.student(list(images))
        keep = ("boxes", "labels", "iscrowd", "area")
        metric.update(predictions, [{k: t[k] for k in keep if k in t} for t in targets])

    def _log_map(self, metric: Any, prefix: str) -> None:
        result = metric.compute()
        metric.reset()
        self.log(f"{prefix}/map", result["map"].float(), prog_bar=True)
        self.log_dict({f"{prefix}/{k}": result[k].float() for k in _MAP_KEYS if k != "map"})

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, self.val_map)

    def on_validation_epoch_end(self) -> None:
        self._log_map(self.val_map, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, self.test_map)

    def on_test_epoch_end(self) -> None:
        self._log_map(self.test_map, "test")


def _default_backend() -> str:
    try:
        import faster_coco_eval  # noqa: F401
    except ImportError:
        return "pycocotools"
    return "faster_coco_eval"

