"""MMDetection's RetinaNet family (``diffkd.models.mmdet.retinanet``) against MMDetection 3.3 itself.

With the reference extra (``needs_mmdet``), MMDetection's own model from its own config — random weights, non-trivial
BatchNorm statistics, a classification head spread out so that scores pass the 0.05 threshold — is converted into
ours through its checkpoint layout, and both compute the FPN levels, the head outputs, the anchors, the detections
and (R-50) the training losses and gradients on the same inputs. The default suite runs R-50 at 320×416; the three
models at 800×1088 are ``slow``. ``-s`` prints the largest differences.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from diffkd.models import create_model, create_teacher, list_models
from diffkd.models.checkpoint import load_weights
from diffkd.models.mmdet import MMDetWeightsError
from diffkd.models.mmdet.retinanet import (
    BACKBONES,
    ZOO,
    MMDetRetinaNet,
    bbox_overlaps,
    describe_mmdet_checkpoint,
    max_iou_assign,
)
from tests.helpers.mmdet_reference import as_checkpoint, build_mmdet_model, needs_mmdet

NAMES = list(BACKBONES)
CONFIGS = {
    "mmdet_retinanet_r50_fpn": "retinanet/retinanet_r50_fpn_2x_coco",
    "mmdet_retinanet_r101_fpn": "retinanet/retinanet_r101_fpn_2x_coco",
    "mmdet_retinanet_x101_64x4d_fpn": "retinanet/retinanet_x101-64x4d_fpn_2x_coco",
}
LEVELS = ["0", "1", "2", "p6", "p7"]


# ------------------------------------------------------------------------------------------------ helpers
def _reference(config: str, seed: int = 0) -> nn.Module:
    """MMDetection's model, its residual branches damped and its classification/regression outputs spread (random
    init gives scores ≈ 0.01 < 0.05, i.e. no detections) so that the detections compare thousands of candidates."""
    model = build_mmdet_model(config, seed)
    generator = torch.Generator().manual_seed(seed + 7)
    head = model.bbox_head
    with torch.no_grad():
        # random statistics on every BatchNorm grow the residual stream block by block (R-101's 23-block stage
        # reaches 1e7 and saturates every score): damp each residual branch's last BatchNorm
        for name, module in model.backbone.named_modules():
            if name.endswith(".bn3"):
                module.weight.mul_(0.2)
                module.bias.mul_(0.2)
        for conv in [*head.cls_convs, *head.reg_convs]:
            conv.conv.weight.normal_(0.0, 0.03, generator=generator)
        head.retina_cls.weight.normal_(0.0, 0.02, generator=generator)
        head.retina_cls.bias.normal_(-3.0, 1.0, generator=generator)
        head.retina_reg.weight.normal_(0.0, 0.01, generator=generator)
        head.retina_reg.bias.normal_(0.0, 0.1, generator=generator)
    return model


def _ours(name: str, reference: nn.Module, **kwargs: Any) -> MMDetRetinaNet:
    model = create_model(name, **kwargs)
    load_weights(model, as_checkpoint(reference))
    return model.eval()


def _sample(height: int, width: int, pad: tuple[int, int] | None = None, batch: tuple[int, int] | None = None):
    from mmdet.structures import DetDataSample

    pad = pad or (math.ceil(height / 32) * 32, math.ceil(width / 32) * 32)
    meta = {"img_shape": (height, width), "ori_shape": (height, width), "scale_factor": (1.0, 1.0),
            "pad_shape": pad, "batch_input_shape": batch or pad}  # fmt: skip
    return DetDataSample(metainfo=meta)


def _relative(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def _compare_inference(ours: MMDetRetinaNet, reference: nn.Module, image: Tensor) -> dict[str, float]:
    """FPN levels, head outputs, anchors and detections of ``image`` (no resize at ours' scale): the largest
    differences, asserted."""
    diffs: dict[str, float] = {}
    with torch.no_grad():
        image_list, _ = ours.transform([image])
        assert tuple(image_list.image_sizes[0]) == tuple(image.shape[-2:])  # no resize happened
        x = image_list.tensors
        features = ours.backbone(x)
        assert list(features) == LEVELS
        reference_features = reference.extract_feat(x)
        diffs["fpn_rel"] = max(_relative(a, b) for a, b in zip(features.values(), reference_features))
        head = ours.head(list(features.values()))
        cls_scores, bbox_preds = reference.bbox_head(reference_features)
        k = cls_scores[0].shape[1] // 9
        cls_ref = torch.cat([c.permute(0, 2, 3, 1).reshape(1, -1, k) for c in cls_scores], 1)
        reg_ref = torch.cat([r.permute(0, 2, 3, 1).reshape(1, -1, 4) for r in bbox_preds], 1)
        diffs["cls_rel"] = _relative(head["cls_logits"], cls_ref)
        diffs["reg_rel"] = _relative(head["bbox_regression"], reg_ref)
        shapes = [f.shape[-2:] for f in reference_features]
        anchors = ours.anchor_generator(image_list, list(features.values()))[0]
        priors = torch.cat(reference.bbox_head.prior_generator.grid_priors(shapes, device="cpu"))
        diffs["anchors_abs"] = float((anchors - priors).abs().max())
        detections = ours([image])[0]
        h, w = image.shape[-2:]
        expected = reference.predict(x, [_sample(h, w)], rescale=True)[0].pred_instances
    assert len(expected.bboxes) == 100, "the spread head should give a full set of detections"
    assert len(detections["boxes"]) == len(expected.bboxes)
    assert torch.equal(detections["labels"], expected.labels + 1)
    diffs["boxes_abs"] = float((detections["boxes"] - expected.bboxes).abs().max())
    diffs["scores_abs"] = float((detections["scores"] - expected.scores).abs().max())
    assert diffs["fpn_rel"] <= 1e-4 and diffs["cls_rel"] <= 1e-4 and diffs["reg_rel"] <= 1e-4, diffs
    assert diffs["anchors_abs"] == 0.0, diffs
    assert diffs["boxes_abs"] <= 1e-3 and diffs["scores_abs"] <= 1e-5, diffs
    return diffs


def _training_batch() -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """Three images of different sizes (the anchors beyond an image's own padded size are invalid), boxes of
    several sizes and classes (one covering its image), labels 1..80, and an image without boxes."""
    generator = torch.Generator().manual_seed(3)
    sizes = [(320, 416), (288, 384), (256, 320)]
    images = [torch.rand(3, h, w, generator=generator) for h, w in sizes]
    targets = [
        {"boxes": torch.tensor([[10.0, 20.0, 200.0, 180.0], [150.0, 40.0, 400.0, 300.0], [5.0, 5.0, 30.0, 25.0]]),
         "labels": torch.tensor([1, 17, 80])},
        {"boxes": torch.tensor([[100.0, 100.0, 140.0, 130.0], [0.0, 0.0, 383.0, 287.0], [300.0, 10.0, 309.0, 17.0]]),
         "labels": torch.tensor([3, 3, 42])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]  # fmt: skip
    return images, targets


# ------------------------------------------------------------------------------------------------ registry, build
def test_the_registry_lists_the_three_retinanets():
    assert set(NAMES) == {"mmdet_retinanet_r50_fpn", "mmdet_retinanet_r101_fpn", "mmdet_retinanet_x101_64x4d_fpn"}
    assert set(NAMES) <= set(list_models(tag="mmdet")) & set(list_models(tag="detection"))
    assert set(NAMES) <= set(list_models(tag="coco"))
    assert set(ZOO) == set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_entry_builds_mmdetections_layout(name):
    with torch.device("meta"):
        model = create_model(name, min_size=64, max_size=96)
        features = model.backbone(torch.zeros(1, 3, 256, 384))
    assert isinstance(model, MMDetRetinaNet) and model.num_classes == 81
    assert list(features) == LEVELS and [f.shape[1] for f in features.values()] == [256] * 5
    assert [384 // f.shape[-1] for f in features.values()] == [8, 16, 32, 64, 128]
    assert model.head.classification_head.cls_logits.out_channels == 9 * 80
    assert model.head.regression_head.bbox_reg.out_channels == 9 * 4
    assert model.transform.min_size == (64,) and model.transform.max_size == 96
    assert (model.detections_per_img, model.topk_candidates, model.score_thresh, model.nms_thresh) == (
        100, 1000, 0.05, 0.5)  # fmt: skip
    body = model.backbone.body
    frozen = [n for n, p in body.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith(("conv1", "bn1", "layer1.")) for n in frozen)
    assert all(p.requires_grad for n, p in body.named_parameters() if n.startswith(("layer2", "layer3", "layer4")))
    groups = body.layer1[0].conv2.groups
    assert groups == (64 if "x101" in name else 1)


def test_build_options():
    with torch.device("meta"):
        # conf/model/detection.yaml's torchvision spelling: trainable_layers 3 = frozen_stages 1
        model = create_model("mmdet_retinanet_r50_fpn", num_classes=6, trainable_layers=5, frozen_bn=True)
        assert all(p.requires_grad for p in model.backbone.body.parameters())
        assert model.head.classification_head.cls_logits.out_channels == 9 * 5
        frozen = create_model("mmdet_retinanet_r50_fpn", frozen_stages=4)
        assert not any(p.requires_grad for n, p in frozen.backbone.body.named_parameters() if not n.startswith("fc"))
        with pytest.raises(ValueError, match="disagree"):
            create_model("mmdet_retinanet_r50_fpn", frozen_stages=1, trainable_layers=5)
        with pytest.raises(ValueError, match="norm_eval"):
            create_model("mmdet_retinanet_r50_fpn", frozen_bn=False)
        with pytest.raises(ValueError, match=re.escape("retinanet_r50_fpn_2x_coco_20200131-fdb43119.pth")):
            create_model("mmdet_retinanet_r50_fpn", pretrained=True)
        with pytest.raises(ValueError, match="background"):
            create_model("mmdet_retinanet_r50_fpn", num_classes=1)


def test_imagenet_backbone_from_a_file(tmp_path):
    source = create_model("mmdet_retinanet_r50_fpn")
    path = tmp_path / "resnet50.pth"
    torch.save({k: v.clone() for k, v in source.backbone.body.state_dict().items()}, path)
    model = create_model("mmdet_retinanet_r50_fpn", weights_backbone=str(path))
    assert torch.equal(model.backbone.body.layer3[2].conv2.weight, source.backbone.body.layer3[2].conv2.weight)


def test_training_checks_labels_and_keeps_float32_under_autocast():
    model = create_model("mmdet_retinanet_r50_fpn", num_classes=3, min_size=64, max_size=96).train()
    images = [torch.rand(3, 64, 80)]
    target = {"boxes": torch.tensor([[8.0, 8.0, 40.0, 50.0]]), "labels": torch.tensor([2])}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(images, [dict(target)])
    assert all(v.dtype == torch.float32 and math.isfinite(float(v)) for v in losses.values()), losses
    with pytest.raises(ValueError, match=r"labels must lie in 1\.\.2"):
        model(images, [{**target, "labels": torch.tensor([3])}])
    with pytest.raises(ValueError, match="positive width and height"):
        model(images, [{**target, "boxes": torch.tensor([[8.0, 8.0, 8.0, 50.0]])}])


# ------------------------------------------------------------------------------------------------ assigner, boxes
def test_max_iou_assigner_as_mmdetection_writes_it():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 9.0], [20.0, 20.0, 30.0, 30.0],
                            [40.0, 40.0, 50.0, 50.0], [0.0, 0.0, 10.0, 6.0]])  # fmt: skip
    gt = torch.tensor([[0.0, 0.0, 10.0, 9.0], [22.0, 22.0, 40.0, 40.0]])
    assigned = max_iou_assign(gt, anchors)
    # anchor 0: IoU 0.9 with box 0; anchor 1: 1.0; anchor 2: low quality (box 1's best, IoU 0.18); anchor 3: 0;
    # anchor 4: IoU 0.667 with box 0 (positive, ≥ 0.5)
    assert assigned.tolist() == [1, 1, 2, 0, 1]
    # IoU in [0.4, 0.5) is ignored (-1); no boxes: all negative
    assert max_iou_assign(torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.tensor([[0.0, 0.0, 10.0, 4.5],
                          [0.0, 0.0, 10.0, 10.0]])).tolist() == [-1, 1]  # fmt: skip
    assert max_iou_assign(torch.zeros(0, 4), anchors).tolist() == [0] * 5
    # a box whose best IoU (0.3, low quality) two anchors tie takes both (gt_max_assign_all)
    tied = max_iou_assign(torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.tensor([[0.0, 0.0, 3.0, 10.0],
                          [7.0, 0.0, 10.0, 10.0], [20.0, 0.0, 30.0, 10.0]]))  # fmt: skip
    assert tied.tolist() == [1, 1, 0]
    # low-quality matches go box by box: the later of two identical boxes takes the anchor both match best
    twins = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0]])
    assert max_iou_assign(twins, anchors[:2]).tolist() == [2, 1]
    assert torch.allclose(bbox_overlaps(gt, anchors)[0, :2], torch.tensor([0.9, 1.0]))


# ------------------------------------------------------------------------------------------------ MMDetection
@pytest.fixture(scope="module")
def r50_pair() -> tuple[MMDetRetinaNet, nn.Module]:
    reference = _reference(CONFIGS["mmdet_retinanet_r50_fpn"])
    return _ours("mmdet_retinanet_r50_fpn", reference, min_size=320, max_size=1333), reference


@needs_mmdet
def test_r50_computes_what_mmdetection_computes(r50_pair):
    ours, reference = r50_pair
    image = torch.rand(3, 320, 416, generator=torch.Generator().manual_seed(11))
    diffs = _compare_inference(ours, reference, image)
    print("mmdet_retinanet_r50_fpn 320x416:", diffs)


@needs_mmdet
def test_r50_rescales_its_detections_as_mmdetection(r50_pair):
    """A 240×312 image is resized to 320×416 (mmcv's rescale arithmetic); the detections come back divided by
    MMDetection's scale factor, in the input's pixels. A head at its prior (scores ≈ 0.01) detects nothing."""
    ours, reference = r50_pair
    image = torch.rand(3, 240, 312, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        image_list, _ = ours.transform([image])
        assert tuple(image_list.image_sizes[0]) == (320, 416)
        detections = ours([image])[0]
        sample = _sample(320, 416)
        sample.set_metainfo({"ori_shape": (240, 312), "scale_factor": (416 / 312, 320 / 240)})
        expected = reference.predict(image_list.tensors, [sample], rescale=True)[0].pred_instances
    assert len(expected.bboxes) == 100 and torch.equal(detections["labels"], expected.labels + 1)
    boxes_abs = float((detections["boxes"] - expected.bboxes).abs().max())
    print("mmdet_retinanet_r50_fpn 240x312 → 320x416, boxes:", boxes_abs)
    assert boxes_abs <= 1e-3 and torch.allclose(detections["scores"], expected.scores, rtol=0, atol=1e-5)
    assert float(detections["boxes"][:, 2].max()) <= 312 and float(detections["boxes"][:, 3].max()) <= 240
    prior = create_model("mmdet_retinanet_r50_fpn", min_size=320).eval()
    with torch.no_grad():
        empty = prior([image])[0]
    assert empty["boxes"].shape == (0, 4) and empty["scores"].shape == (0,) and empty["labels"].dtype == torch.int64


@needs_mmdet
def test_r50_training_losses_and_gradients_are_mmdetections(r50_pair):
    from mmengine.structures import InstanceData

    ours, reference = r50_pair
    images, targets = _training_batch()
    ours.transform._skip_resize = True  # the images are the training scale: compare the losses, not a resize
    try:
        ours.train()
        image_list, _ = ours.transform([i.clone() for i in images], [dict(t) for t in targets])
        ours.zero_grad()
        losses = ours(images, [dict(t) for t in targets])
        sum(losses.values()).backward()
    finally:
        ours.transform._skip_resize = False
        ours.eval()
    assert set(losses) == {"loss_cls", "loss_bbox"}
    x = image_list.tensors
    samples = []
    for (h, w), target in zip(image_list.image_sizes, targets):
        sample = _sample(h, w, batch=tuple(x.shape[-2:]))
        sample.gt_instances = InstanceData(bboxes=target["boxes"], labels=target["labels"] - 1)
        samples.append(sample)
    reference.train()
    try:
        reference.zero_grad()
        expected = {k: sum(v) for k, v in reference.loss(x, samples).items()}
        sum(expected.values()).backward()
    finally:
        reference.eval()
    diffs = {k: float((losses[k] - expected[k]).detach().abs() / expected[k].detach().abs()) for k in expected}
    pairs = {
        "cls_logits": (ours.head.classification_head.cls_logits.weight, reference.bbox_head.retina_cls.weight),
        "bbox_reg": (ours.head.regression_head.bbox_reg.weight, reference.bbox_head.retina_reg.weight),
        "fpn_p6": (ours.backbone.fpn.extra_blocks.convs[0].weight, reference.neck.fpn_convs[3].conv.weight),
        "layer2": (ours.backbone.body.layer2[0].conv2.weight, reference.backbone.layer2[0].conv2.weight),
    }
    for key, (a, b) in pairs.items():
        diffs[f"grad_{key}"] = _relative(a.grad, b.grad)
    print(
        "mmdet_retinanet_r50_fpn losses/gradients (relative):",
        diffs,
        {k: float(v.detach()) for k, v in expected.items()},
    )
    assert all(v <= 1e-5 for k, v in diffs.items() if k.startswith("loss")), diffs
    assert all(v <= 1e-4 for k, v in diffs.items() if k.startswith("grad")), diffs
    assert ours.backbone.body.layer1[0].conv1.weight.grad is None  # frozen stage


@needs_mmdet
@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_each_model_computes_what_mmdetection_computes_at_800x1088(name):
    reference = _reference(CONFIGS[name], seed=1)
    ours = _ours(name, reference)
    image = torch.rand(3, 800, 1088, generator=torch.Generator().manual_seed(2))
    diffs = _compare_inference(ours, reference, image)
    print(f"{name} 800x1088:", diffs)


# ------------------------------------------------------------------------------------------------ checkpoints
@needs_mmdet
def test_an_mmdetection_checkpoint_loads_as_teacher_and_by_load_weights(r50_pair, tmp_path):
    _, reference = r50_pair
    path = tmp_path / "retinanet_r50_fpn_2x_coco.pth"
    torch.save(as_checkpoint(reference), path)
    teacher = create_teacher("mmdet_retinanet_r50_fpn", weights=str(path))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    expected = reference.state_dict()
    assert torch.equal(teacher.head.classification_head.cls_logits.bias, expected["bbox_head.retina_cls.bias"])
    assert torch.equal(teacher.head.regression_head.conv[3][0].weight, expected["bbox_head.reg_convs.3.conv.weight"])
    assert torch.equal(teacher.backbone.fpn.extra_blocks.convs[1].weight, expected["neck.fpn_convs.4.conv.weight"])
    assert torch.equal(teacher.backbone.body.layer4[2].bn3.running_var, expected["backbone.layer4.2.bn3.running_var"])
    student = create_model("mmdet_retinanet_r50_fpn", weights=str(path))  # a student's initial weights
    assert torch.equal(student.backbone.fpn.inner_blocks[0][0].weight, expected["neck.lateral_convs.0.conv.weight"])
    # our own checkpoints still load as they are
    ours_path = tmp_path / "ours.pth"
    torch.save(teacher.state_dict(), ours_path)
    again = create_model("mmdet_retinanet_r50_fpn")
    load_weights(again, str(ours_path))
    weight = again.head.classification_head.cls_logits.weight
    assert torch.equal(weight, teacher.head.classification_head.cls_logits.weight)


@needs_mmdet
def test_a_wrong_file_is_refused_saying_what_it_is(r50_pair, tmp_path):
    _, reference = r50_pair
    path = tmp_path / "r50.pth"
    torch.save(as_checkpoint(reference), path)
    with torch.device("meta"):
        r101 = create_model("mmdet_retinanet_r101_fpn")
        with pytest.raises(MMDetWeightsError) as err:
            load_weights(r101, str(path))
    message = str(err.value)
    assert "missing (" in message and "backbone.body.layer3.6.conv1.weight" in message
    assert "RetinaNet R-50 FPN, 80 classes → mmdet_retinanet_r50_fpn" in message
    # other classes: named with the num_classes that takes it
    with torch.device("meta"), pytest.raises(MMDetWeightsError, match=r"(?s)shapes .*→ mmdet_retinanet_r50_fpn"):
        load_weights(create_model("mmdet_retinanet_r50_fpn", num_classes=21), str(path))
    # a caffe-style file has the same keys and computes something else
    caffe = as_checkpoint(reference)
    caffe["meta"]["config"] = "model = dict(backbone=dict(type='ResNet', depth=50, style='caffe'))"
    with torch.device("meta"), pytest.raises(MMDetWeightsError, match="caffe-style"):
        load_weights(create_model("mmdet_retinanet_r50_fpn"), caffe)


@needs_mmdet
def test_backbone_only_reads_the_backbone_and_fpn_of_any_fitting_file(r50_pair, caplog):
    _, reference = r50_pair
    checkpoint = as_checkpoint(reference)
    # another detector with RetinaNet's neck: other head keys (here: renamed) are not read
    state = checkpoint["state_dict"]
    other = {(k.replace("bbox_head.", "bbox_head.other_") if k.startswith("bbox_head.") else k): v
             for k, v in state.items()}  # fmt: skip
    model = create_model("mmdet_retinanet_r50_fpn", backbone_only=True, num_classes=21)
    head_before = model.head.classification_head.cls_logits.weight.clone()
    with caplog.at_level(logging.WARNING, logger="diffkd.models.mmdet.retinanet"):
        load_weights(model, {"state_dict": other, "meta": {}})
    assert torch.equal(model.backbone.body.layer3[5].conv2.weight, state["backbone.layer3.5.conv2.weight"])
    assert torch.equal(model.backbone.fpn.layer_blocks[2][0].bias, state["neck.fpn_convs.2.conv.bias"])
    assert torch.equal(model.head.classification_head.cls_logits.weight, head_before)
    assert "loaded only the backbone + FPN" in caplog.text and "bbox_head" in caplog.text
    # Faster R-CNN's FPN (C2–C5, no extra convs) is not RetinaNet's: refused, saying so
    faster = build_mmdet_model("faster_rcnn/faster-rcnn_r50_fpn_2x_coco")
    with torch.device("meta"):
        model = create_model("mmdet_retinanet_r50_fpn", backbone_only=True)
        with pytest.raises(MMDetWeightsError) as err:
            load_weights(model, as_checkpoint(faster))
    message = str(err.value)
    assert "Faster R-CNN R-50 FPN, 80 classes" in message and "FPN C2–C5, no extra convs" in message
    assert "backbone.fpn.extra_blocks.convs.0.weight" in message
    assert "Faster R-CNN" in describe_mmdet_checkpoint(as_checkpoint(faster)["state_dict"])


# ------------------------------------------------------------------------------------------------ a training run
def test_diffkd_trains_and_validates_the_r50_student_on_a_coco_folder(tmp_path):
    from diffkd.train import train
    from tests.conftest import compose_config, tiny_overrides
    from tests.helpers.fake_coco import write_fake_coco

    coco = write_fake_coco(tmp_path / "data" / "coco")
    sizes = [f"model.{s}.{k}={v}" for s in ("student", "teacher") for k, v in (("min_size", 64), ("max_size", 96))]
    cfg = compose_config([
        "experiment=coco_retina_r101_r50", *tiny_overrides(tmp_path, tmp_path / "data"), f"data.root={coco.root}",
        "data.batch_size=2", "data.val_batch_size=2", "data.contiguous_labels=true", "data.multiscale=false",
        "model.student.name=mmdet_retinanet_r50_fpn", "model.teacher.name=mmdet_retinanet_r101_fpn",
        "model.student.weights_backbone=null", "model.teacher.weights=null", *sizes, "distill=diffkd_det",
        "distill.diffkd.inference_steps=1", "test=false", "~callbacks.model_checkpoint",
        "trainer.enable_checkpointing=false", "++trainer.enable_model_summary=false",
    ])  # fmt: skip
    metrics, objs = train(cfg)
    module = objs["module"]
    assert objs["trainer"].global_step == 2
    assert isinstance(module.student, MMDetRetinaNet) and isinstance(module.teacher, MMDetRetinaNet)
    assert module.student.num_classes == 6  # the fake COCO's 5 categories + background
    for name in ("loss_cls", "loss_bbox", *(f"fpn_{k}/kd" for k in LEVELS)):
        assert math.isfinite(metrics[f"train/loss/{name}"]), name
    assert "val/map" in metrics and math.isfinite(metrics["val/map"])


def test_a_backbone_only_teacher_is_refused_where_its_heads_are_needed():
    from diffkd.distill import Distiller
    from diffkd.tasks import DetectionModule

    with torch.device("meta"):
        student = create_model("mmdet_retinanet_r50_fpn", min_size=64, max_size=96)
        teacher = create_model("mmdet_retinanet_r50_fpn", min_size=64, max_size=96, backbone_only=True)
    with pytest.raises(ValueError, match=r"provides FPN features only .* teacher_runs=heads"):
        DetectionModule(student, Distiller(), teacher=teacher, teacher_runs="heads")
