"""torchvision detectors and segmenters driven through the distillation module: one real optimizer step each."""

from __future__ import annotations

import functools
import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader
from torchvision.models.detection import fasterrcnn_resnet50_fpn, retinanet_resnet50_fpn
from torchvision.models.segmentation import deeplabv3_resnet50

from diffkd.distill import Distiller
from diffkd.tasks import DetectionModule, SegmentationModule

SMALL = {"min_size": 96, "max_size": 160}
CLS_LOGITS = "head.classification_head.cls_logits:*"  # runs once per FPN level


def detection_batch() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 100, 150, generator=g), torch.rand(3, 120, 90, generator=g)]  # two sizes
    targets = [
        {"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [80.0, 20.0, 140.0, 90.0]]), "labels": torch.tensor([1, 2])},
        {"boxes": torch.tensor([[5.0, 30.0, 70.0, 110.0]]), "labels": torch.tensor([3])},
    ]
    return images, targets


def fit_one_step(module: L.LightningModule, batch) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Build from the batch, then one optimizer step through a real Trainer; (metrics, parameters before)."""
    module.build(batch)
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)  # fmt: skip
    trainer.fit(module, train_dataloaders=DataLoader([batch], batch_size=None))
    assert trainer.global_step == 1
    return {k: float(v) for k, v in trainer.callback_metrics.items()}, before


def changed(module, before, prefix: str) -> bool:
    return any(not torch.equal(p, before[n]) for n, p in module.named_parameters() if n.startswith(prefix))


def sgd():
    return functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9)


def test_faster_rcnn_diffkd_on_every_fpn_level():
    torch.manual_seed(0)
    student = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=4, **SMALL)
    teacher = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=4, **SMALL)
    distiller = Distiller(
        {"fpn": {"student": "backbone.fpn:*", "teacher": "backbone.fpn:*", "head": "diffkd", "weight": 5.0}},
        diffkd={"inference_steps": 2},
    )
    module = DetectionModule(student=student, teacher=teacher, distiller=distiller, optimizer=sgd(),
                             nonfinite_check_every=1)  # fmt: skip
    metrics, before = fit_one_step(module, detection_batch())
    levels = ["0", "1", "2", "3", "pool"]
    assert list(distiller.points) == [f"fpn_{k}" for k in levels]  # P2–P6, 'pool' included
    assert [p.teacher_shape[0] for p in distiller.points.values()] == [256] * 5
    assert set(distiller.heads) == {f"fpn_{k}" for k in levels}  # one head per level (the default)
    for name in ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"):
        assert math.isfinite(metrics[f"train/loss/{name}"])  # the detector's four losses, logged separately
    for k in levels:
        assert math.isfinite(metrics[f"train/loss/fpn_{k}/kd"]) and math.isfinite(metrics[f"train/loss/fpn_{k}/diff"])
    assert math.isfinite(metrics["train/loss"])
    assert changed(module, before, "student.") and changed(module, before, "distiller.heads.fpn_pool.")
    assert not any(p.requires_grad for p in teacher.parameters())


def test_retinanet_keeps_every_call_of_its_per_level_head():
    torch.manual_seed(0)
    student = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=4, **SMALL)
    teacher = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=4, **SMALL)
    distiller = Distiller(
        {
            "fpn": {"student": "backbone.fpn:*", "teacher": "backbone.fpn:*", "head": "diffkd", "shared_head": True},
            "cls": {"student": CLS_LOGITS, "teacher": CLS_LOGITS},
        },
        diffkd={"inference_steps": 1},
    )
    module = DetectionModule(student=student, teacher=teacher, distiller=distiller, optimizer=sgd(),
                             teacher_runs="heads", nonfinite_check_every=1)  # fmt: skip
    metrics, before = fit_one_step(module, detection_batch())
    levels = ["0", "1", "2", "p6", "p7"]
    assert [n for n in distiller.points if n.startswith("fpn_")] == [f"fpn_{k}" for k in levels]
    assert list(distiller.heads) == ["fpn"]  # one head shared by the levels
    calls = [p for n, p in distiller.points.items() if n.startswith("cls_")]
    assert len(calls) == 5  # the head ran once per level: every call is a point
    sizes = [p.student_shape[1:] for p in calls]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 5
    assert calls[0].student_shape[0] == 9 * 4  # anchors × classes
    for name in ("classification", "bbox_regression"):
        assert math.isfinite(metrics[f"train/loss/{name}"])
    assert all(math.isfinite(metrics[f"train/loss/cls_{i}/kd"]) for i in range(5))
    assert changed(module, before, "distiller.heads.fpn.")


def test_deeplabv3_dist_per_pixel_with_ignored_pixels_masked():
    torch.manual_seed(0)
    student = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=21, aux_loss=True)
    teacher = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=21, aux_loss=True)
    distiller = Distiller(
        {"logits": {"student": ":out", "teacher": ":out", "head": "diffkd", "distance": {"name": "dist"}}},
        diffkd={"inference_steps": 1},
    )
    module = SegmentationModule(student=student, teacher=teacher, distiller=distiller, optimizer=sgd(),
                                nonfinite_check_every=1)  # fmt: skip
    images = torch.randn(2, 3, 48, 80)
    labels = torch.randint(0, 21, (2, 48, 80))
    labels[:, :10] = 255  # ignored rows
    seen = {}
    dist = distiller.distances["logits"]
    original = dist.forward

    def spy(s, t, valid_mask=None):
        seen["mask"] = valid_mask
        return original(s, t, valid_mask=valid_mask)

    dist.forward = spy
    metrics, before = fit_one_step(module, (images, labels))
    point = distiller.points["logits"]
    assert point.student_shape == (21, 48, 80) and point.layout_source == ("declared", "declared")  # H ≠ W, NCHW
    assert torch.equal(seen["mask"], labels != 255)
    assert {"train/loss/ce", "train/loss/aux_ce", "train/loss/logits/kd", "train/loss/logits/diff"} <= set(metrics)
    assert all(math.isfinite(v) for k, v in metrics.items() if k.startswith("train/"))
    assert module.task_weights["aux_ce"] == 0.4
    assert changed(module, before, "student.")


@pytest.mark.parametrize("ignored", [False, True])
def test_masked_dist_ignores_the_masked_pixels(ignored):
    from diffkd.method import DIST

    s, t = torch.randn(2, 5, 6, 7), torch.randn(2, 5, 6, 7)
    mask = torch.ones(2, 6, 7, dtype=torch.bool)
    mask[:, :2] = False
    t2 = t.clone()
    t2[:, :, :2] = torch.randn(2, 5, 2, 7) * 10  # teacher changed only where the mask is False
    loss = DIST()(s, t, valid_mask=mask)
    assert torch.allclose(loss, DIST()(s, t2, valid_mask=mask))
    assert not torch.allclose(DIST()(s, t), DIST()(s, t2))
    if ignored:
        full = torch.ones(2, 3, 4, dtype=torch.bool)  # a mask at another size is resized to the map
        assert torch.allclose(DIST()(s, t, valid_mask=full), DIST()(s, t))
