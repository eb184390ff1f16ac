"""MMDetection's Faster R-CNN family (``diffkd.models.mmdet.faster_rcnn``) against MMDetection 3.3 itself.

With the reference extra (``needs_mmdet``), MMDetection's own model from its own config — random weights, non-trivial
BatchNorm statistics, its RPN and box-head outputs scaled to a useful spread (random initialisation gives the R-50's
box head logits in the hundreds, the X-101's below 1) — is converted into ours through its checkpoint layout, and both
compute the FPN levels, the RPN head outputs and proposals, the RoI head outputs on the same RoIs, the detections
(a resized image among them) and, for R-50, the training losses and gradients on a batch of 2 images with boxes. The
samplers draw the same subsets as MMDetection's (same seed, same ``torch.randperm`` calls in the same order): the
batches are built so that they draw (more negatives than asked everywhere, more RPN positives than asked). The default
suite runs R-50 at 320×416; the three models at 800×1088 are ``slow``. ``-s`` prints the largest differences.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from diffkd.models import create_model, create_teacher, list_models
from diffkd.models.checkpoint import load_weights
from diffkd.models.mmdet import EvalBatchNorm2d, MMDetWeightsError
from diffkd.models.mmdet.faster_rcnn import (
    SETTINGS,
    ZOO,
    MMDetFasterRCNN,
    MMDetFPNTeacher,
    MMDetRoIAlign,
    batched_nms,
    bbox_overlaps,
    describe_mmdet_checkpoint,
    max_iou_assign,
    random_sample,
)
from tests.helpers.mmdet_reference import as_checkpoint, build_mmdet_model, needs_mmdet

CONFIGS = {
    "mmdet_faster_rcnn_r50_fpn": "faster_rcnn/faster-rcnn_r50_fpn_2x_coco",
    "mmdet_faster_rcnn_r101_fpn": "faster_rcnn/faster-rcnn_r101_fpn_2x_coco",
    "mmdet_faster_rcnn_x101_64x4d_fpn": "faster_rcnn/faster-rcnn_x101-64x4d_fpn_2x_coco",
}
TEACHERS = ["mmdet_fpn_teacher_r50", "mmdet_fpn_teacher_r101", "mmdet_fpn_teacher_x101_64x4d"]
LEVELS = ["0", "1", "2", "3", "pool"]
LOSSES = ("loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox")
MM_ORDER = torch.cat([torch.arange(1, 81), torch.tensor([0])])  # our background-first logits → MMDetection's


# ------------------------------------------------------------------------------------------------ helpers
def _relative(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def _reference(config: str, seed: int = 0) -> nn.Module:
    """MMDetection's model with its RPN logits/deltas and box-head logits/deltas rescaled to a spread (std ≈ 2 for the
    logits) measured on a random image, so that proposals, scores above 0.05 and NMS all have work to do."""
    model = build_mmdet_model(config, seed)
    generator = torch.Generator().manual_seed(seed + 3)
    x = torch.randn(1, 3, 256, 320, generator=generator)
    rois = torch.tensor([[0, 10.0, 10, 100, 120], [0, 50, 60, 300, 250], [0, 0, 0, 30, 40], [0, 100, 20, 180, 60]])
    head, rpn = model.roi_head.bbox_head, model.rpn_head
    with torch.no_grad():
        feats = model.extract_feat(x)
        cls, reg = rpn(feats)
        rpn.rpn_cls.weight.mul_(2.0 / torch.cat([c.flatten() for c in cls]).std())
        rpn.rpn_reg.weight.mul_(0.2 / torch.cat([r.flatten() for r in reg]).std())
        hidden = model.roi_head.bbox_roi_extractor(feats[:4], rois).flatten(1)
        for fc in head.shared_fcs:
            hidden = torch.relu(fc(hidden))
        head.fc_cls.weight.mul_(2.0 / head.fc_cls(hidden).std())
        head.fc_cls.bias.normal_(0.0, 0.5, generator=generator)
        head.fc_reg.weight.mul_(1.0 / head.fc_reg(hidden).std())
    return model


def _ours(name: str, reference: nn.Module, **kwargs: Any) -> MMDetFasterRCNN:
    model = create_model(name, **kwargs)
    load_weights(model, as_checkpoint(reference))
    return model.eval()


def _samples(image_list: Any, originals: list[tuple[int, int]], targets: list[dict[str, Tensor]] | None = None):
    """MMDetection's data samples of our transformed batch: its metas (``scale_factor`` = new / old sizes,
    ``pad_shape`` each image padded to 32) and the targets (labels 0..79) in the transformed coordinates."""
    from mmdet.structures import DetDataSample
    from mmengine.structures import InstanceData

    batch = tuple(image_list.tensors.shape[-2:])
    samples = []
    for i, ((h, w), (oh, ow)) in enumerate(zip(image_list.image_sizes, originals)):
        meta = {"img_shape": (h, w), "ori_shape": (oh, ow), "scale_factor": (w / ow, h / oh),
                "pad_shape": (math.ceil(h / 32) * 32, math.ceil(w / 32) * 32), "batch_input_shape": batch}  # fmt: skip
        sample = DetDataSample(metainfo=meta)
        if targets is not None:
            sample.gt_instances = InstanceData(bboxes=targets[i]["boxes"], labels=targets[i]["labels"] - 1)
        samples.append(sample)
    return samples


def _compare_inference(ours: MMDetFasterRCNN, reference: nn.Module, images: list[Tensor]) -> dict[str, float]:
    """FPN levels, RPN head outputs, proposals, RoI head outputs on MMDetection's proposals and detections of
    ``images``: the largest differences, asserted."""
    diffs: dict[str, float] = {}
    originals = [(int(i.shape[-2]), int(i.shape[-1])) for i in images]
    with torch.no_grad():
        image_list, _ = ours.transform(images)
        x = image_list.tensors
        samples = _samples(image_list, originals)
        features = ours.backbone(x)
        assert list(features) == LEVELS
        reference_features = reference.extract_feat(x)
        diffs["fpn_rel"] = max(_relative(a, b) for a, b in zip(features.values(), reference_features))
        logits, deltas = ours.rpn.head(list(features.values()))
        reference_logits, reference_deltas = reference.rpn_head(reference_features)
        diffs["rpn_cls_rel"] = max(_relative(a, b) for a, b in zip(logits, reference_logits))
        diffs["rpn_reg_rel"] = max(_relative(a, b) for a, b in zip(deltas, reference_deltas))
        proposals, _ = ours.rpn(image_list, features)
        reference_proposals = reference.rpn_head.predict(reference_features, samples, rescale=False)
        for mine, theirs in zip(proposals, reference_proposals):
            assert mine.shape == theirs.bboxes.shape and mine.shape[0] > 0, (mine.shape, theirs.bboxes.shape)
        diffs["proposals_abs"] = max(float((a - b.bboxes).abs().max()) for a, b in zip(proposals, reference_proposals))
        diffs["proposals"] = float(sum(len(p) for p in proposals))
        rois = [p.bboxes for p in reference_proposals]
        roi = ours.roi_heads
        cls, reg = roi.box_predictor(roi.box_head(roi.box_roi_pool(features, rois, image_list.image_sizes)))
        reference_cls, reference_reg = reference.roi_head.forward(reference_features, reference_proposals, samples)
        diffs["roi_cls_rel"] = _relative(cls[:, MM_ORDER], reference_cls)
        diffs["roi_reg_rel"] = _relative(reg[:, 4:], reference_reg)
        assert torch.equal(reg[:, :4], torch.zeros_like(reg[:, :4]))  # background's deltas: zero rows
        detections = ours(images)
        expected = [s.pred_instances for s in reference.predict(x, samples, rescale=True)]
    for mine, theirs in zip(detections, expected):
        assert len(theirs.bboxes) > 0, "the spread head should give detections"
        assert len(mine["boxes"]) == len(theirs.bboxes)
        assert torch.equal(mine["labels"], theirs.labels + 1)
    diffs["boxes_abs"] = max(float((a["boxes"] - b.bboxes).abs().max()) for a, b in zip(detections, expected))
    diffs["scores_abs"] = max(float((a["scores"] - b.scores).abs().max()) for a, b in zip(detections, expected))
    diffs["detections"] = float(sum(len(d["boxes"]) for d in detections))
    assert diffs["fpn_rel"] <= 1e-4 and diffs["rpn_cls_rel"] <= 1e-5 and diffs["rpn_reg_rel"] <= 1e-5, diffs
    assert diffs["proposals_abs"] <= 1e-3 and diffs["roi_cls_rel"] <= 1e-5 and diffs["roi_reg_rel"] <= 1e-5, diffs
    assert diffs["boxes_abs"] <= 1e-3 and diffs["scores_abs"] <= 1e-5, diffs
    return diffs


def _boxes(n: int, height: int, width: int, generator: torch.Generator) -> Tensor:
    xy = torch.rand(n, 2, generator=generator) * torch.tensor([width * 0.6, height * 0.6])
    wh = (0.15 + torch.rand(n, 2, generator=generator) * 0.4) * torch.tensor([width, height])
    return torch.cat([xy, (xy + wh).minimum(torch.tensor([width - 1.0, height - 1.0]))], 1)


def _training_batch(first: tuple[int, int], second: tuple[int, int]) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """Two images (the second smaller: its anchors beyond its own padded size are invalid, it is resized), 60 boxes
    on the first (more RPN positives than the sampler takes), 5 on the second, labels 1..80."""
    generator = torch.Generator().manual_seed(3)
    images = [torch.rand(3, *first, generator=generator), torch.rand(3, *second, generator=generator)]
    targets = [
        {"boxes": _boxes(n, *size, generator), "labels": torch.randint(1, 81, (n,), generator=generator)}
        for n, size in ((60, first), (5, second))
    ]
    return images, targets


def _compare_training(
    ours: MMDetFasterRCNN, reference: nn.Module, images: list[Tensor], targets: list[dict[str, Tensor]]
) -> dict[str, float]:
    """Training losses and gradients of both on the same batch and seed; the RPN's NMS at IoU 1 (both models) keeps
    up to 1000 proposals per image, so that the RoI sampler draws its negatives as well."""
    diffs: dict[str, float] = {}
    originals = [(int(i.shape[-2]), int(i.shape[-1])) for i in images]
    rpn_nms = reference.train_cfg.rpn_proposal.nms.iou_threshold, ours.rpn.nms_thresh
    reference.train_cfg.rpn_proposal.nms.iou_threshold = ours.rpn.nms_thresh = 1.0
    draws: list[int] = []
    randperm = torch.randperm

    def counting_randperm(n: int, *args: Any, **kwargs: Any) -> Tensor:
        draws.append(int(n))
        return randperm(n, *args, **kwargs)

    try:
        ours.train()
        reference.train()
        with torch.no_grad():
            image_list, transformed = ours.transform(images, [dict(t) for t in targets])
        samples = _samples(image_list, originals, transformed)
        torch.manual_seed(11)
        expected = reference.loss(image_list.tensors, samples)
        torch.manual_seed(11)
        torch.randperm = counting_randperm
        losses = ours(images, [dict(t) for t in targets])
    finally:
        torch.randperm = randperm
        reference.train_cfg.rpn_proposal.nms.iou_threshold, ours.rpn.nms_thresh = rpn_nms
        ours.eval()
        reference.eval()
    # RPN: the first image's positives, both images' negatives; RoI head: both images' negatives (+ positives)
    assert len(draws) >= 5, draws
    diffs["sampler_draws"] = float(len(draws))
    assert list(losses) == list(LOSSES)
    for name in LOSSES:
        value = sum(expected[name]) if isinstance(expected[name], list) else expected[name]
        diffs[f"{name}_rel"] = _relative(losses[name].detach(), value.detach())
        diffs[name] = float(value.detach())
    ours.zero_grad()
    reference.zero_grad()
    sum(losses.values()).backward()
    sum(sum(v) if isinstance(v, list) else v for k, v in expected.items() if "loss" in k).backward()
    pairs = {
        "rpn.head.conv.0.0.weight": reference.rpn_head.rpn_conv.weight,
        "rpn.head.cls_logits.weight": reference.rpn_head.rpn_cls.weight,
        "roi_heads.box_head.fc6.weight": reference.roi_head.bbox_head.shared_fcs[0].weight,
        "backbone.fpn.layer_blocks.0.0.weight": reference.neck.fpn_convs[0].conv.weight,
        "backbone.body.layer4.2.conv3.weight": reference.backbone.layer4[2].conv3.weight,
    }
    named = dict(ours.named_parameters())
    diffs["grad_rel"] = max(_relative(named[k].grad, p.grad) for k, p in pairs.items())
    cls_grad = ours.roi_heads.box_predictor.cls_score.weight.grad[MM_ORDER]
    diffs["grad_rel"] = max(diffs["grad_rel"], _relative(cls_grad, reference.roi_head.bbox_head.fc_cls.weight.grad))
    reg_grad = ours.roi_heads.box_predictor.bbox_pred.weight.grad
    assert torch.equal(reg_grad[:4], torch.zeros_like(reg_grad[:4]))
    diffs["grad_rel"] = max(diffs["grad_rel"], _relative(reg_grad[4:], reference.roi_head.bbox_head.fc_reg.weight.grad))
    ours.zero_grad()
    reference.zero_grad()
    assert all(diffs[f"{n}_rel"] <= 1e-5 for n in LOSSES) and diffs["grad_rel"] <= 1e-4, diffs
    return diffs


# ------------------------------------------------------------------------------------------------ no reference
def test_the_registry_lists_the_family():
    names = set(list_models(tag="mmdet"))
    assert {*CONFIGS, *TEACHERS} <= names
    assert {*CONFIGS, *TEACHERS} <= set(list_models(tag="detection")) & set(list_models(tag="coco"))
    assert set(ZOO) >= set(CONFIGS) and ZOO["mmdet_fpn_teacher_x101_64x4d"][1] == 45.6


@pytest.mark.parametrize("name", list(CONFIGS))
def test_entry_builds_mmdetections_layout(name):
    with torch.device("meta"):
        model = create_model(name, min_size=64, max_size=96)
        features = model.backbone(torch.zeros(1, 3, 256, 384))
    assert isinstance(model, MMDetFasterRCNN) and isinstance(model.roi_heads.box_roi_pool, MMDetRoIAlign)
    assert list(features) == LEVELS and [384 // f.shape[-1] for f in features.values()] == [4, 8, 16, 32, 64]
    assert model.roi_heads.box_predictor.cls_score.out_features == 81
    assert model.roi_heads.box_predictor.bbox_pred.out_features == 81 * 4
    assert model.transform.min_size == (64,) and model.transform.max_size == 96
    body = model.backbone.body
    assert all(isinstance(m, EvalBatchNorm2d) for m in body.modules() if isinstance(m, nn.BatchNorm2d))
    assert not any(p.requires_grad for p in [*body.conv1.parameters(), *body.layer1.parameters()])
    assert all(p.requires_grad for p in body.layer2.parameters())
    if "x101" in name:
        assert body.layer1[0].conv2.groups == 64 and body.layer1[0].conv2.out_channels == 256
    # MMDetection's train (rpn_proposal) and test settings
    assert model.rpn.pre_nms_top_n() == 2000 and model.rpn.post_nms_top_n() == 1000 and model.rpn.nms_thresh == 0.7
    model.eval()
    assert model.rpn.pre_nms_top_n() == 1000 and model.rpn.post_nms_top_n() == 1000
    roi = model.roi_heads
    assert (roi.score_thresh, roi.nms_thresh, roi.detections_per_img) == (0.05, 0.5, 100)


def test_build_options():
    with torch.device("meta"):
        model = create_model(
            "mmdet_faster_rcnn_r50_fpn", num_classes=6, frozen_stages=2, trainable_layers=2, box_detections_per_img=7
        )
        assert model.roi_heads.detections_per_img == 7 and model.roi_heads.box_predictor.cls_score.out_features == 6
        assert not any(p.requires_grad for p in model.backbone.body.layer2.parameters())
        teacher = create_model("mmdet_faster_rcnn_x101_64x4d_fpn", backbone_only=True)
    assert isinstance(teacher, MMDetFPNTeacher) and not hasattr(teacher, "roi_heads")
    with pytest.raises(ValueError, match="means frozen_stages=1, but frozen_stages=2"):
        create_model("mmdet_faster_rcnn_r50_fpn", frozen_stages=2, trainable_layers=3)
    with pytest.raises(ValueError, match="norm_eval=True"):
        create_model("mmdet_faster_rcnn_r50_fpn", frozen_bn=False)
    with pytest.raises(ValueError, match=r"faster_rcnn_r101_fpn_2x_coco_bbox_mAP-0\.398.*weights=<file>"):
        create_model("mmdet_faster_rcnn_r101_fpn", pretrained=True)
    with pytest.raises(TypeError, match="rpn_pre_nms_top_n_test"):
        create_model("mmdet_faster_rcnn_r50_fpn", rpn_nms=0.5)
    assert SETTINGS["rpn_pre_nms_top_n_train"][0] == 2000 and SETTINGS["box_batch_size_per_image"][0] == 512


def test_max_iou_assigner_as_mmdetection_writes_it():
    """The vectorised low-quality matching equals MMDetection's loop (a later box overrides an earlier one)."""
    generator = torch.Generator().manual_seed(0)
    gt = _boxes(6, 100, 120, generator)
    gt = torch.cat([gt, gt[:1]])  # a duplicate: the later one wins its anchors
    anchors = _boxes(500, 100, 120, generator)
    overlaps = bbox_overlaps(gt, anchors)
    expected = torch.full((500,), -1, dtype=torch.long)
    best, argbest = overlaps.max(0)
    expected[(best >= 0) & (best < 0.3)] = 0
    expected[best >= 0.7] = argbest[best >= 0.7] + 1
    for i in range(len(gt)):
        if overlaps[i].max() >= 0.3:
            expected[overlaps[i] == overlaps[i].max()] = i + 1
    assert torch.equal(max_iou_assign(gt, anchors, 0.7, 0.3, 0.3, True), expected)
    assert int((expected == len(gt)).sum()) > 0 and int((expected == 1).sum()) == 0
    assert torch.equal(max_iou_assign(gt[:0], anchors, 0.7, 0.3, 0.3, True), torch.zeros(500, dtype=torch.long))
    pos, neg = random_sample(expected, 16, 0.25)
    assert len(pos) <= 4 and len(pos) + len(neg) == 16 and torch.equal(pos, pos.sort()[0])


def test_batched_nms_splits_by_group_above_its_threshold():
    generator = torch.Generator().manual_seed(1)
    boxes, scores = _boxes(300, 200, 200, generator), torch.rand(300, generator=generator)
    groups = torch.randint(0, 5, (300,), generator=generator)
    offset = batched_nms(boxes, scores, groups, 0.5)
    split = batched_nms(boxes, scores, groups, 0.5, split_thr=10)
    assert torch.equal(offset, split) and 0 < len(offset) < 300


def test_a_teacher_with_fpn_features_only_is_refused_where_heads_are_needed(tmp_path):
    from diffkd.train import build_module
    from tests.conftest import compose_config, tiny_overrides

    base = [
        "experiment=coco_frcnn_r101_r50", *tiny_overrides(tmp_path, tmp_path), "model.teacher.weights=null",
        "model.student.name=mmdet_faster_rcnn_r50_fpn", "model.teacher.name=mmdet_fpn_teacher_r50",
        "model.student.weights_backbone=null",
    ]  # fmt: skip
    with torch.device("meta"):
        with pytest.raises(ValueError, match="provides FPN features only") as err:
            build_module(compose_config([*base, "model.regression_kd_weight=1"]), 6)
        assert "regression_kd_weight=1.0" in str(err.value) and "model.regression_kd_weight=0" in str(err.value)
        with pytest.raises(ValueError, match=r"teacher_runs=heads \(it runs the teacher's dense head\)"):
            build_module(compose_config([*base, "model.regression_kd_weight=0", "model.teacher_runs=heads"]), 6)
        module = build_module(compose_config([*base, "model.regression_kd_weight=0"]), 6)
    assert isinstance(module.teacher, MMDetFPNTeacher)


# ------------------------------------------------------------------------------------------------ MMDetection
@pytest.fixture(scope="module")
def r50_pair() -> tuple[MMDetFasterRCNN, nn.Module]:
    pytest.importorskip("mmdet")
    reference = _reference(CONFIGS["mmdet_faster_rcnn_r50_fpn"])
    return _ours("mmdet_faster_rcnn_r50_fpn", reference, min_size=320, max_size=416), reference


@needs_mmdet
def test_r50_computes_what_mmdetection_computes(r50_pair):
    ours, reference = r50_pair
    generator = torch.Generator().manual_seed(0)
    # the first at the model's scale, the second resized (×1.04: 200×400 → 208×416, padded 224 in a 320 batch)
    images = [torch.rand(3, 320, 416, generator=generator), torch.rand(3, 200, 400, generator=generator)]
    print("\nR-50 at 320×416 (+ a resized 200×400):", _compare_inference(ours, reference, images))


@needs_mmdet
def test_r50_training_losses_and_gradients_are_mmdetections(r50_pair):
    ours, reference = r50_pair
    images, targets = _training_batch((320, 416), (200, 400))
    print("\nR-50 training at 320×416:", _compare_training(ours, reference, images, targets))


@pytest.mark.slow
@needs_mmdet
@pytest.mark.parametrize("name", list(CONFIGS))
def test_each_model_computes_what_mmdetection_computes_at_800x1088(name):
    reference = _reference(CONFIGS[name])
    ours = _ours(name, reference)
    image = torch.rand(3, 800, 1088, generator=torch.Generator().manual_seed(0))
    print(f"\n{name} at 800×1088:", _compare_inference(ours, reference, [image]))
    if name == "mmdet_faster_rcnn_r50_fpn":
        images, targets = _training_batch((800, 1088), (600, 900))
        print(f"{name} training at 800×1088:", _compare_training(ours, reference, images, targets))


@needs_mmdet
def test_an_mmdetection_checkpoint_loads_as_teacher_and_student(r50_pair, tmp_path):
    _, reference = r50_pair
    path = tmp_path / "faster_rcnn_r50_fpn_2x_coco.pth"
    torch.save(as_checkpoint(reference), path)
    teacher = create_teacher("mmdet_faster_rcnn_r50_fpn", weights=str(path), min_size=320, max_size=416)
    student = create_model("mmdet_faster_rcnn_r50_fpn", weights=str(path), min_size=320, max_size=416)
    state = reference.state_dict()
    for model in (teacher, student):
        assert torch.equal(model.rpn.head.conv[0][0].weight, state["rpn_head.rpn_conv.weight"])
        assert torch.equal(model.roi_heads.box_head.fc7.bias, state["roi_head.bbox_head.shared_fcs.1.bias"])
        predictor = model.roi_heads.box_predictor
        assert torch.equal(predictor.cls_score.weight[0], state["roi_head.bbox_head.fc_cls.weight"][80])
        assert torch.equal(predictor.cls_score.bias[1:], state["roi_head.bbox_head.fc_cls.bias"][:80])
        assert torch.equal(predictor.bbox_pred.weight[4:], state["roi_head.bbox_head.fc_reg.weight"])
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    # an older (v2) file: no num_batches_tracked, the config text in its meta
    v2 = {"state_dict": {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")},
          "meta": {"mmdet_version": "2.0.0", "config": "model = dict(backbone=dict(style='pytorch'))"}}  # fmt: skip
    load_weights(create_model("mmdet_faster_rcnn_r50_fpn", min_size=320, max_size=416), v2)


@needs_mmdet
def test_a_wrong_file_is_refused_saying_what_it_is(r50_pair):
    _, reference = r50_pair
    checkpoint = as_checkpoint(reference)
    with torch.device("meta"):
        model = create_model("mmdet_faster_rcnn_r101_fpn")
    with pytest.raises(MMDetWeightsError) as err:
        load_weights(model, checkpoint)
    message = str(err.value)
    assert "the file holds: Faster R-CNN R-50 FPN, 80 classes → mmdet_faster_rcnn_r50_fpn" in message
    assert "missing (" in message and "backbone.body.layer3.6.conv1.weight" in message
    with torch.device("meta"):
        model = create_model("mmdet_faster_rcnn_r50_fpn", num_classes=6)
    with pytest.raises(MMDetWeightsError, match=r"roi_heads.box_predictor.cls_score.weight: file \(81, 1024\)"):
        load_weights(model, checkpoint)
    caffe = {"state_dict": checkpoint["state_dict"], "meta": {"config": "backbone=dict(style='caffe')"}}
    with torch.device("meta"), pytest.raises(MMDetWeightsError, match="caffe-style backbone") as err:
        load_weights(create_model("mmdet_faster_rcnn_r50_fpn"), caffe)
    assert "R-50 caffe FPN, 80 classes → its FPN features only: mmdet_fpn_teacher_r50, style=caffe" in str(err.value)
    teacher = create_model("mmdet_fpn_teacher_r50", style="caffe")
    load_weights(teacher, caffe)
    assert teacher.transform.bgr and tuple(teacher.transform.image_std) == (1.0, 1.0, 1.0)
    assert teacher.backbone.body.layer2[0].conv1.stride == (2, 2)  # caffe style: the stride on the first 1×1


def _cascade_teacher(config: str, teacher_name: str, tmp_path: Any, caplog: Any, size: tuple[int, int]) -> None:
    """MMDetection's Cascade Mask R-CNN file → the FPN teacher: the same FPN levels as MMDetection's, its heads left
    out with a log line; the Faster R-CNN entry refuses it naming what it is."""
    reference = build_mmdet_model(config)
    path = tmp_path / "cascade.pth"
    torch.save(as_checkpoint(reference), path)
    with caplog.at_level(logging.INFO, logger="diffkd.models.mmdet.faster_rcnn"):
        teacher = create_teacher(teacher_name, weights=str(path), min_size=size[0], max_size=size[1])
    assert "left out" in caplog.text and "roi_head, rpn_head" in caplog.text and "FPN features only" in caplog.text
    assert "Cascade Mask R-CNN" in teacher.source
    image = torch.rand(3, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = teacher([image])
        expected = reference.extract_feat(teacher.transform([image])[0].tensors)
    difference = max(_relative(a, b) for a, b in zip(features.values(), expected))
    print(f"\n{teacher_name} from {config}: FPN max relative difference {difference}")
    assert list(features) == LEVELS and difference <= 1e-4
    full = teacher_name.replace("mmdet_fpn_teacher_", "mmdet_faster_rcnn_") + "_fpn"
    with torch.device("meta"):
        model = create_model(full)
    with pytest.raises(MMDetWeightsError) as err:
        load_weights(model, as_checkpoint(reference))
    described = describe_mmdet_checkpoint(as_checkpoint(reference)["state_dict"])
    assert described.startswith("Cascade Mask R-CNN") and f"its FPN features only: {teacher_name}" in described
    assert described in str(err.value) and "roi_head.bbox_head.0." in str(err.value)


@needs_mmdet
def test_the_fpn_teacher_reads_a_cascade_mask_rcnn_r50(tmp_path, caplog):
    _cascade_teacher("cascade_rcnn/cascade-mask-rcnn_r50_fpn_20e_coco", "mmdet_fpn_teacher_r50", tmp_path, caplog,
                     (320, 416))  # fmt: skip


@pytest.mark.slow
@needs_mmdet
def test_the_fpn_teacher_reads_the_papers_cascade_mask_rcnn_x101_64x4d(tmp_path, caplog):
    _cascade_teacher("cascade_rcnn/cascade-mask-rcnn_x101-64x4d_fpn_20e_coco", "mmdet_fpn_teacher_x101_64x4d",
                     tmp_path, caplog, (800, 1088))  # fmt: skip


# ------------------------------------------------------------------------------------------------ training runs
def _run(tmp_path: Any, teacher: str, *extra: str) -> tuple[dict[str, float], dict[str, Any]]:
    """Two DiffKD steps and a validation of the R-50 student on a COCO folder (the fake COCO: 5 categories), from
    ``teacher`` (random weights), at 64 px with few proposals."""
    from diffkd.train import train
    from tests.conftest import compose_config, tiny_overrides
    from tests.helpers.fake_coco import write_fake_coco

    coco = write_fake_coco(tmp_path / "data" / "coco")
    sizes = [f"model.{s}.{k}={v}" for s in ("student", "teacher") for k, v in (("min_size", 64), ("max_size", 96))]
    few = [f"+model.student.{k}={v}"
           for k, v in (("rpn_pre_nms_top_n_train", 100), ("rpn_post_nms_top_n_train", 40),
                        ("rpn_pre_nms_top_n_test", 100), ("rpn_post_nms_top_n_test", 40),
                        ("box_batch_size_per_image", 32))]  # fmt: skip
    cfg = compose_config([
        "experiment=coco_frcnn_r101_r50", *tiny_overrides(tmp_path, tmp_path / "data"), f"data.root={coco.root}",
        "data.batch_size=2", "data.val_batch_size=2", "data.contiguous_labels=true", "data.multiscale=false",
        "model.student.name=mmdet_faster_rcnn_r50_fpn", f"model.teacher.name={teacher}",
        "model.student.weights_backbone=null", "model.teacher.weights=null", *sizes, *few, "distill=diffkd_det",
        "distill.diffkd.inference_steps=1", "test=false", "~callbacks.model_checkpoint",
        "trainer.enable_checkpointing=false", "++trainer.enable_model_summary=false", *extra,
    ])  # fmt: skip
    return train(cfg)


def test_diffkd_and_regression_kd_train_and_validate_the_r50_student_on_a_coco_folder(tmp_path):
    extra = [f"+model.teacher.{k}={v}" for k, v in (("rpn_pre_nms_top_n_test", 100), ("rpn_post_nms_top_n_test", 40))]
    metrics, objs = _run(tmp_path, "mmdet_faster_rcnn_r50_fpn", "model.regression_kd_weight=1", *extra)
    module = objs["module"]
    assert objs["trainer"].global_step == 2
    assert isinstance(module.student, MMDetFasterRCNN) and isinstance(module.teacher, MMDetFasterRCNN)
    assert module.student.roi_heads.box_predictor.cls_score.out_features == 6  # 5 fake categories + background
    assert list(module.distiller.points) == [f"fpn_{k}" for k in LEVELS]
    for name in (*LOSSES, "reg_kd", *(f"fpn_{k}/{t}" for k in LEVELS for t in ("kd", "diff"))):
        assert math.isfinite(metrics[f"train/loss/{name}"]), name
    assert metrics["train/loss/reg_kd"] > 0
    assert "val/map" in metrics and math.isfinite(metrics["val/map"])


def test_diffkd_from_an_fpn_teacher_trains_the_r50_student(tmp_path):
    metrics, objs = _run(tmp_path, "mmdet_fpn_teacher_r50", "model.regression_kd_weight=0")
    assert isinstance(objs["module"].teacher, MMDetFPNTeacher) and objs["trainer"].global_step == 2
    for name in (*LOSSES, *(f"fpn_{k}/kd" for k in LEVELS)):
        assert math.isfinite(metrics[f"train/loss/{name}"]), name
    assert "train/loss/reg_kd" not in metrics and "val/map" in metrics
