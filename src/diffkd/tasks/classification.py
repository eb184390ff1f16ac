"""Image classification: cross-entropy (hard, label-smoothed or soft Mixup targets), top-1/top-5 accuracy."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MeanMetric, Metric
from torchmetrics.classification import MulticlassAccuracy

from diffkd.data.protocol import ClassificationData, require_protocol
from diffkd.tasks.base import DistillationModule

__all__ = ["ClassificationModule"]


def _images(batch: Any) -> Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def _targets(batch: Any) -> Tensor | None:
    return batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None


class ClassificationModule(DistillationModule):
    """Distillation for classification. Batches are ``(images (B, C, H, W), targets (B,) or (B, K))``.

    Args:
        num_classes: K; ``None`` reads it from the student's output in the dry run.
        label_smoothing: ε of label-smoothed cross-entropy for hard targets; 0 takes the datamodule's
            ``loss_label_smoothing`` (ImageNet ``data.label_smoothing``, recipes B2/B3).
        **kwargs: see :class:`~diffkd.tasks.base.DistillationModule`.

    The task loss is ``{"ce": ...}`` (logged ``train/loss/ce``); distances get ``labels`` (hard (B,) or soft
    (B, K) targets). Logs ``train/loss`` and its terms, ``train/acc``, ``val/loss``, ``val/acc``,
    ``val/acc_top5``, ``val/acc_best`` (the best ``val/acc`` so far) and the ``test/*`` equivalents.
    """

    best_metric = "acc"

    def __init__(self, *args: Any, num_classes: int | None = None, label_smoothing: float = 0.0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self._batch_transform: Any = None

    # ------------------------------------------------------------------ the forward contract
    def student_inputs(self, batch: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (_images(batch),), {}

    def distill_inputs(self, batch: Any) -> dict[str, Any]:
        return {"labels": _targets(batch)}

    def synthetic_batch(self, input_size: tuple[int, ...]) -> Any:
        return torch.randn(2, *input_size), torch.zeros(2, dtype=torch.long)

    def prepare_batch(self, batch: Any) -> Any:
        if self._batch_transform is None:
            return batch
        x, y = batch
        return self._batch_transform(x, y)

    def task_losses(self, student_output: Tensor, batch: Any) -> dict[str, Tensor]:
        target = batch[1]
        logits = student_output.float()
        if target.dim() == 2:  # soft targets (Mixup/CutMix, smoothing already folded in)
            return {"ce": torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()}
        return {"ce": F.cross_entropy(logits, target, label_smoothing=self.label_smoothing)}

    # ------------------------------------------------------------------ setup
    def on_dry_run(self, student_output: Any) -> None:
        if self.num_classes is None:
            self.num_classes = int(student_output.shape[-1])

    def build(self, example: Any) -> None:
        super().build(example)
        k = self.num_classes
        assert k is not None
        # validate_args=False: the argument checks read tensors on the host, a sync per training step
        self.train_acc = MulticlassAccuracy(k, average="micro", validate_args=False).to(self.device)
        dm = self.datamodule()
        if dm is not None:
            require_protocol(dm, ClassificationData, "classification")
            self._batch_transform = dm.batch_transform()
            data_smoothing = float(dm.loss_label_smoothing or 0.0)
            if not self.label_smoothing and data_smoothing:  # the recipe's ε (0 with Mixup: it is in the targets)
                self.label_smoothing = data_smoothing

    def training_step_extra(self, student_output: Tensor, batch: Any) -> None:
        target = batch[1]
        hard = target.argmax(dim=1) if target.dim() == 2 else target
        self.train_acc(student_output.detach(), hard)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)

    # ------------------------------------------------------------------ evaluation
    def metrics(self) -> dict[str, Metric]:
        k = self.num_classes
        assert k is not None
        return {
            "loss": MeanMetric(),
            "acc": MulticlassAccuracy(k, average="micro"),
            "acc_top5": MulticlassAccuracy(k, top_k=min(5, k), average="micro"),
        }

    def update_metrics(self, metrics: Mapping[str, Metric], batch: Any) -> None:
        x, y = batch
        logits = self.student(self.to_memory_format(x))
        metrics["loss"].update(F.cross_entropy(logits.float(), y))
        metrics["acc"].update(logits, y)
        metrics["acc_top5"].update(logits, y)
