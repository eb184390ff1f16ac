"""Object detection with torchvision's detectors (Faster R-CNN, RetinaNet, FCOS): the forward contract and COCO mAP.

Batches are ``(images, targets)``: a list of float images (3, H_i, W_i) in [0, 1] of any sizes and a list of
target dicts (``boxes`` (N, 4) xyxy, ``labels`` (N,), ``iscrowd``/``area`` for evaluation) — what
:class:`~diffkd.data.coco.COCODataModule` yields.

One training step:

- the student runs as torchvision trains it, ``student(images, targets)``, and returns its loss dict
  (``loss_classifier``, ``loss_box_reg``, ``loss_objectness``, ``loss_rpn_box_reg`` for Faster R-CNN;
  ``classification``, ``bbox_regression`` (+ ``bbox_ctrness`` for FCOS) for RetinaNet/FCOS), each logged as
  ``train/loss/<name>`` and guarded;
- the teacher sees the *student's* transformed batch — the resized, normalised, padded ``ImageList`` that the
  student's ``transform`` produced (kept by a hook) — so both FPNs see the same pixels (one resize, one
  normalisation) and their levels line up. By default only its backbone + FPN run (``teacher_runs: backbone``);
  ``teacher_runs: heads`` also runs its dense head (RetinaNet/FCOS ``head``, Faster R-CNN ``rpn.head``) for points
  that tap head outputs. Nothing else of the teacher runs (no anchors, no post-processing, no losses), except the
  box head for the regression KD below.
- distances may declare ``gt_boxes``/``gt_labels`` (the targets in the transformed batch's coordinates, one
  (N, 4) tensor per image), ``image_sizes`` (the (H, W) of each image inside the padded batch) and
  ``padded_size`` (the (H, W) of the padded batch tensor).

**Regression KD** (``regression_kd_weight`` > 0; Faster R-CNN only; the paper: weight 1). The paper trains Faster
R-CNN students with "a regression KD loss" it does not define; we follow MasKD (same first author and settings;
``hunto/MasKD`` ``mmrazor/configs/distill/maskd/fpn_r101-fpn_r50_coco.py``, ``loss_kd_roi_reg_head``): the teacher's
RoI box head evaluates the **student's** sampled proposals and a SmoothL1 (β = 1, mean over all elements) pulls the
student's box regression (``box_predictor.bbox_pred``, (R, 4·num_classes)) to the teacher's. A forward pre-hook on
the student's ``roi_heads.box_roi_pool`` keeps the proposals and image shapes of the training forward, a forward
hook on its ``roi_heads.box_predictor`` the regression; the teacher's ``box_roi_pool`` (on its FPN features of the
same batch) + ``box_head`` + ``box_predictor`` run under no_grad. The term is returned **with the task losses** as
``reg_kd`` (already weighted), so the base module logs it (``train/loss/reg_kd``) and guards it; like the detector's
losses it is therefore scaled by ``distill.task_weight`` (1 in every detection config; a warning otherwise).
torchvision's ``bbox_pred`` has 4 columns per label *including background and COCO's 11 unused ids* (364 for 91
labels, MMDetection's ``fc_reg`` 320 for 80 classes), so the mean runs over more, mostly constant, columns: at equal
weight the gradient per used column is 320/364 of MMDetection's (``data.contiguous_labels=true`` gives 324 columns).

**Inheriting the teacher's neck and heads** (``inherit_teacher_neck_heads``): at setup every teacher weight outside
the backbone body (``backbone.body.*``) — the FPN and all heads — is copied into the student where names and shapes
match (FGD's ``init_student=True`` in all its configs; MasKD does it for RetinaNet only; the DiffKD paper does not
say: off by default).

Validation: COCO box mAP with torchmetrics' ``MeanAveragePrecision`` (faster-coco-eval backend when installed) on the
student's detections, which torchvision's post-processing returns in the original image coordinates; targets carry
``iscrowd`` and the json's ``area`` (COCO's small/medium/large split uses it). Logged every validation:
``val/map`` (AP), ``val/map_50``, ``val/map_75``, ``val/map_small``, ``val/map_medium``, ``val/map_large`` and
``val/map_best`` (the best ``val/map`` so far; checkpoint callbacks monitor ``val/map``). With the data module's
``contiguous_labels`` the labels of predictions and targets are mapped back to COCO category ids first.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric

from diffkd.optim.schedulers import WarmupMultiStepLR
from diffkd.tasks.base import DistillationModule

__all__ = ["DetectionModule", "WarmupMultiStepLR", "inherit_neck_and_heads"]  # the scheduler: diffkd.optim

log = logging.getLogger(__name__)

_MAP_KEYS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large")
_REG_KD = "reg_kd"


class _KeepOutput:
    """Forward hook keeping a module's last output in a dict (a class so that the model still pickles)."""

    def __init__(self, store: dict[str, Any], key: str) -> None:
        self.store, self.key = store, key

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> None:
        self.store[self.key] = output


class _KeepTrainingProposals:
    """Forward pre-hook on ``roi_heads.box_roi_pool``: the sampled proposals and image shapes of a training call."""

    def __init__(self, store: dict[str, Any]) -> None:
        self.store = store

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if module.training:
            self.store["proposals"] = (args[1], args[2])


class _KeepTrainingBoxRegression:
    """Forward hook on ``roi_heads.box_predictor``: its box regression (R, 4·num_classes) in a training call."""

    def __init__(self, store: dict[str, Any]) -> None:
        self.store = store

    def __call__(self, module: nn.Module, inputs: Any, output: tuple[Tensor, Tensor]) -> None:
        if module.training:
            self.store["student_box_regression"] = output[1]


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


def _check_teacher_heads(teacher: nn.Module | None, teacher_runs: str, regression_kd_weight: float) -> None:
    """A teacher that provides FPN features only (``fpn_features_only``, e.g. ``mmdet_fpn_teacher_*`` read from a
    zoo checkpoint whose heads are not loaded) cannot serve what needs its heads."""
    if teacher is None or not getattr(teacher, "fpn_features_only", False):
        return
    needs = []
    if regression_kd_weight > 0:
        needs.append(f"regression_kd_weight={regression_kd_weight} (the regression KD runs the teacher's RoI box head)")
    if teacher_runs == "heads":
        needs.append("teacher_runs=heads (it runs the teacher's dense head)")
    if needs:
        raise ValueError(
            f"the teacher {type(teacher).__name__} provides FPN features only "
            f"({getattr(teacher, 'source', 'no heads')}), but {' and '.join(needs)} needs its heads: set "
            "model.regression_kd_weight=0 and model.teacher_runs=backbone, or use a full detector as the teacher"
        )


def _check_box_head(model: nn.Module, role: str) -> None:
    roi = getattr(model, "roi_heads", None)
    if roi is None or not all(hasattr(roi, n) for n in ("box_roi_pool", "box_head", "box_predictor")):
        raise TypeError(
            f"regression_kd_weight > 0 needs two-stage detectors (Faster R-CNN's roi_heads.box_roi_pool/box_head/"
            f"box_predictor); the {role} {type(model).__name__} has none. Set model.regression_kd_weight=0"
        )


def inherit_neck_and_heads(student: nn.Module, teacher: nn.Module) -> list[str]:
    """Copy every teacher tensor outside ``backbone.body`` (FPN + heads) into the student where names and shapes
    match (FGD's ``init_student``); returns the copied names.

    Raises:
        ValueError: nothing could be copied (other detectors, or other widths everywhere).
    """
    t_state, s_state = teacher.state_dict(), student.state_dict()
    outside = {k: v for k, v in t_state.items() if not k.startswith("backbone.body.")}
    fitting = {k: v for k, v in outside.items() if k in s_state and s_state[k].shape == v.shape}
    if not fitting:
        raise ValueError(
            f"inherit_teacher_neck_heads: no teacher weight outside backbone.body fits the student "
            f"({type(teacher).__name__} → {type(student).__name__}); use the same detector type"
        )
    student.load_state_dict(fitting, strict=False)
    skipped = sorted(set(outside) - set(fitting))
    log.info("the student inherits %d neck/head tensors of the teacher", len(fitting))
    if skipped:
        log.warning(
            "inherit_teacher_neck_heads: %d teacher tensors do not fit the student and keep the student's "
            "initialisation (e.g. %s; another num_classes?)",
            len(skipped),
            skipped[:4],
        )
    return sorted(fitting)


class DetectionModule(DistillationModule):
    """Distillation for torchvision detectors (see the module docstring).

    Args:
        teacher_runs: ``backbone`` (FPN features only) or ``heads`` (also the dense head, for head taps).
        map_backend: ``faster_coco_eval`` (default when installed) or ``pycocotools``.
        regression_kd_weight: weight of the RoI box-regression KD (Faster R-CNN; 0 = off; the paper: 1).
        inherit_teacher_neck_heads: copy the teacher's FPN and heads into the student at setup.
        **kwargs: see :class:`~diffkd.tasks.base.DistillationModule` (``task_weights`` weigh the detector's
            named losses, e.g. ``{loss_box_reg: 2.0}``).
    """

    best_metric = "map"

    def __init__(
        self,
        *args: Any,
        teacher_runs: Literal["backbone", "heads"] = "backbone",
        map_backend: str | None = None,
        regression_kd_weight: float = 0.0,
        inherit_teacher_neck_heads: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if teacher_runs not in ("backbone", "heads"):
            raise ValueError(f"teacher_runs={teacher_runs!r}; choose backbone or heads")
        if regression_kd_weight < 0:
            raise ValueError(f"regression_kd_weight must be >= 0, got {regression_kd_weight}")
        self.teacher_runs = teacher_runs
        self.map_backend = map_backend
        self.regression_kd_weight = float(regression_kd_weight)
        self.inherit_teacher_neck_heads = bool(inherit_teacher_neck_heads)
        _check_detector(self.student, "student")
        if self.teacher is not None:
            _check_detector(self.teacher, "teacher")
        _check_teacher_heads(self.teacher, teacher_runs, self.regression_kd_weight)
        self._kept: dict[str, Any] = {}
        self._label_to_category: Tensor | None = None
        self.student.transform.register_forward_hook(_KeepOutput(self._kept, "transform"))
        if self.regression_kd:
            _check_box_head(self.student, "student")
            _check_box_head(self.teacher, "teacher")
            roi = self.student.roi_heads
            roi.box_roi_pool.register_forward_pre_hook(_KeepTrainingProposals(self._kept))
            roi.box_predictor.register_forward_hook(_KeepTrainingBoxRegression(self._kept))
            if self.distiller.task_weight != 1.0:
                log.warning(
                    "reg_kd counts with the task losses, so distill.task_weight=%s scales it too",
                    self.distiller.task_weight,
                )

    @property
    def regression_kd(self) -> bool:
        """Whether the regression KD runs (a positive weight and a teacher; evaluation builds none)."""
        return self.regression_kd_weight > 0 and self.teacher is not None

    # ------------------------------------------------------------------ the forward contract
    def student_inputs(self, batch: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        for key in ("proposals", "student_box_regression", "teacher_box_regression"):
            self._kept.pop(key, None)  # nothing of an earlier step may reach this one's regression KD
        images, targets = batch
        return (list(images), [dict(t) for t in targets]), {}

    def synthetic_batch(self, input_size: tuple[int, ...]) -> Any:
        """Two random (C, H, W) images in [0, 1], each with one box of label 1 in its middle (a training-mode
        detector needs targets): ``model.input_size`` for a dry run without a datamodule."""
        _, height, width = input_size
        box = torch.tensor([[width / 4, height / 4, 3 * width / 4, 3 * height / 4]], dtype=torch.float32)
        images = [torch.rand(*input_size) for _ in range(2)]
        targets = [{"boxes": box.clone(), "labels": torch.ones(1, dtype=torch.int64), "image_id": i} for i in range(2)]
        return images, targets

    def teacher_forward(self, batch: Any) -> Any:
        """The teacher's backbone (+ dense head, + box head on the student's proposals) on the student's
        transformed batch."""
        if "transform" not in self._kept:
            raise RuntimeError("the teacher runs after the student: no transformed batch of the student was kept")
        images = self._kept["transform"][0].tensors
        if self._teacher_cast:
            images = images.to(self.teacher_dtype)
        features = self.teacher.backbone(self.to_memory_format(images))
        if self.regression_kd and "proposals" in self._kept:
            self._kept["teacher_box_regression"] = self._teacher_box_regression(features)
        if self.teacher_runs == "heads":
            levels = list(features.values()) if isinstance(features, dict) else [features]
            return {"features": features, "head": _dense_head(self.teacher)(levels)}
        return features

    def teacher_compile_targets(self) -> list[nn.Module]:
        """The teacher's backbone + FPN (what :meth:`teacher_forward` calls), and its dense head when the teacher runs
        its heads; compiling the detector itself would compile a forward this task never calls."""
        if self.teacher is None:
            return []
        return [self.teacher.backbone, *([_dense_head(self.teacher)] if self.teacher_runs == "heads" else [])]

    def _teacher_box_regression(self, features: dict[str, Tensor]) -> Tensor:
        """(R, 4·num_classes): the teacher's box head on the student's sampled proposals."""
        proposals, image_shapes = self._kept["proposals"]
        dtype = next(iter(features.values())).dtype
        roi = self.teacher.roi_heads
        # torchvision's roi_align has no bfloat16 kernel: pool in fp32 (as its autocast rule does), head in the
        # teacher's dtype
        pooled = roi.box_roi_pool({k: v.float() for k, v in features.items()}, proposals, image_shapes)
        return roi.box_predictor(roi.box_head(pooled.to(dtype)))[1]

    def task_losses(self, student_output: Any, batch: Any) -> dict[str, Tensor]:
        if not isinstance(student_output, dict):
            raise TypeError(
                f"the student returned {type(student_output).__name__} in training, not a loss dict: is it a "
                "torchvision detector in train mode?"
            )
        if not self.regression_kd:
            return student_output
        return {**student_output, _REG_KD: self.regression_kd_loss(batch)}

    def regression_kd_loss(self, batch: Any) -> Tensor:
        """``regression_kd_weight · SmoothL1_β=1(student box regression, teacher box regression)`` of this step."""
        student = self._kept.get("student_box_regression")
        if student is None or "proposals" not in self._kept:
            raise RuntimeError(
                "regression KD: the student's roi_heads did not run in training mode in this step (no sampled "
                "proposals were kept)"
            )
        if "teacher_box_regression" not in self._kept:  # no distillation point: the teacher has not run yet
            with torch.no_grad():
                self.teacher_forward(batch)
        teacher = self._kept["teacher_box_regression"].float()
        if teacher.is_inference():  # from a teacher run in inference mode: it must be savable for backward
            teacher = teacher.clone()
        if teacher.shape != student.shape:
            raise ValueError(
                f"regression KD: the teacher's box regression is {tuple(teacher.shape)} and the student's "
                f"{tuple(student.shape)}; both detectors need the same num_classes"
            )
        return self.regression_kd_weight * F.smooth_l1_loss(student.float(), teacher, beta=1.0)

    def distill_inputs(self, batch: Any) -> dict[str, Any]:
        image_list, targets = self._kept.get("transform", (None, None))
        if image_list is None or targets is None:
            return {}
        return {
            "gt_boxes": [t["boxes"] for t in targets],
            "gt_labels": [t["labels"] for t in targets],
            "image_sizes": list(image_list.image_sizes),
            "padded_size": tuple(image_list.tensors.shape[-2:]),
        }

    # ------------------------------------------------------------------ setup
    def build(self, example: Any) -> None:
        if self.inherit_teacher_neck_heads and self.teacher is not None:
            inherit_neck_and_heads(self.student, self.teacher)
        super().build(example)
        dm = self.datamodule()
        if dm is not None and getattr(dm, "contiguous_labels", False):
            mapping = dm.label_to_category
            lookup = torch.arange(max(mapping) + 1)
            for label, category in mapping.items():
                lookup[label] = category
            self._label_to_category = lookup

    # ------------------------------------------------------------------ evaluation
    def _to_categories(self, labels: Tensor) -> Tensor:
        lookup = self._label_to_category
        if lookup is None:
            return labels
        lookup = lookup.to(labels.device)
        inside = labels < len(lookup)
        return torch.where(inside, lookup[labels.clamp(max=len(lookup) - 1)], labels)

    def metrics(self) -> dict[str, Metric]:
        from torchmetrics.detection import MeanAveragePrecision

        backend = self.map_backend or _default_backend()
        return {"map": MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend=backend)}

    def update_metrics(self, metrics: Mapping[str, Metric], batch: Any) -> None:
        images, targets = batch
        predictions = self.student(list(images))
        keep = ("boxes", "labels", "iscrowd", "area")
        truth = [{k: t[k] for k in keep if k in t} for t in targets]
        if self._label_to_category is not None:
            predictions = [{**p, "labels": self._to_categories(p["labels"])} for p in predictions]
            truth = [{**t, "labels": self._to_categories(t["labels"])} for t in truth]
        metrics["map"].update(predictions, truth)

    def compute_metrics(self, metrics: Mapping[str, Metric]) -> dict[str, Tensor]:
        result = metrics["map"].compute()
        return {k: result[k].float() for k in _MAP_KEYS}

    def watched_outputs(self) -> dict[str, nn.Module]:
        """The backbone (+ FPN) and the heads: a detector's predictions cannot show NaN/inf (scores below the
        threshold are dropped, boxes clipped), the raw outputs can."""
        student = self.student
        watched = {"backbone": student.backbone}
        if hasattr(student, "rpn"):
            watched["rpn.head"] = student.rpn.head
        elif hasattr(student, "head"):
            watched["head"] = student.head
        predictor = getattr(getattr(student, "roi_heads", None), "box_predictor", None)
        if predictor is not None:
            watched["roi_heads.box_predictor"] = predictor
        return watched

    def probe_forward(self, batch: Any) -> None:
        self.student(list(batch[0]))


def _default_backend() -> str:
    try:
        import faster_coco_eval  # noqa: F401
    except ImportError:
        return "pycocotools"
    return "faster_coco_eval"
