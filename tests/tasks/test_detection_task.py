"""DetectionModule's regression KD, inheritance, evaluation labels and schedule; the FGD distances.

Detectors are torchvision's at tiny sizes (``min_size`` 64) with few proposals, built from the registry with
random weights; the FGD checks run on small hand-made maps.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from diffkd.distill import Distiller, get_distance
from diffkd.distill.losses.fgd import FGDFeatureMSE, FGDLoss, fgd_attention, fgd_feature_loss, fgd_masks
from diffkd.models import create_model
from diffkd.tasks import DetectionModule
from diffkd.tasks.detection import WarmupMultiStepLR, inherit_neck_and_heads

# small transforms and few proposals: the box head dominates the cost of a Faster R-CNN step otherwise
TINY = {"min_size": 64, "max_size": 96, "num_classes": 4}
FEW = {
    "rpn_pre_nms_top_n_train": 100, "rpn_post_nms_top_n_train": 40, "rpn_pre_nms_top_n_test": 100,
    "rpn_post_nms_top_n_test": 40, "box_batch_size_per_image": 32,
}  # fmt: skip


def detection_batch() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 96, generator=g), torch.rand(3, 80, 64, generator=g)]
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0], [50.0, 10.0, 90.0, 60.0]]), "labels": torch.tensor([1, 2])},
        {"boxes": torch.tensor([[5.0, 20.0, 50.0, 75.0]]), "labels": torch.tensor([3])},
    ]
    return images, targets


def faster_rcnn(seed: int, name: str = "fasterrcnn_resnet50_fpn") -> nn.Module:
    torch.manual_seed(seed)
    return create_model(name, **TINY, **FEW)


def sgd():
    import functools

    return functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9)


# ------------------------------------------------------------------------------------------------ FGD


def test_fgd_masks_by_hand():
    # a 4×6 level over a 32×48 padded batch (stride 8); image 0 is 30×40 before padding, image 1 has no box
    boxes = [torch.tensor([[8.0, 8.0, 24.0, 16.0], [0.0, 0.0, 12.0, 12.0]]), torch.zeros(0, 4)]
    fg, bg = fgd_masks(boxes, (4, 6), [(32.0, 48.0), (32.0, 48.0)])  # the padded frame: x / 8
    # box 0: x 1..3, y 1..2 (floor/ceil, inclusive) → 6 cells; box 1: x 0..2, y 0..2 → 9 cells
    expected = torch.zeros(4, 6)
    expected[0:3, 0:3] = 1 / 9
    expected[1:3, 1:4] = 1 / 6  # the larger weight wins where they overlap
    assert torch.allclose(fg[0], expected)
    n_bg = int((expected == 0).sum())
    assert torch.allclose(bg[0], (expected == 0).float() / n_bg) and bg[0].sum().item() == pytest.approx(1.0)
    assert torch.equal(fg[1], torch.zeros(4, 6)) and torch.allclose(bg[1], torch.full((4, 6), 1 / 24))
    # FGD's frame is the image before padding: box 0 becomes x 8/40·6 = 1.2 → 1 .. 24/40·6 = 3.6 → 4,
    # y 8/30·4 = 1.07 → 1 .. 16/30·4 = 2.13 → 3: 4 × 3 cells
    fg_image, _ = fgd_masks([boxes[0][:1]], (4, 6), [(30.0, 40.0)])
    assert fg_image[0, 1, 1].item() == pytest.approx(1 / 12) and fg_image[0, 3, 4].item() == pytest.approx(1 / 12)
    assert fg_image[0, 3, 5].item() == 0.0


def test_fgd_attention_and_its_temperature():
    feat = torch.zeros(1, 3, 2, 2)
    feat[0, 0, 0, 0] = 2.0
    feat[0, 1] = -1.0  # |F| is what counts
    spatial, channel = fgd_attention(feat, temp=0.5)
    # mean_c |F| = [[1, 1/3], [1/3, 1/3]]; mean_hw |F| = [0.5, 1, 0]
    s_logits = torch.tensor([1.0, 1 / 3, 1 / 3, 1 / 3]) / 0.5
    assert torch.allclose(spatial.flatten(), 4 * torch.softmax(s_logits, 0))
    assert torch.allclose(channel.flatten(), 3 * torch.softmax(torch.tensor([0.5, 1.0, 0.0]) / 0.5, 0))
    assert spatial.sum().item() == pytest.approx(4.0) and channel.sum().item() == pytest.approx(3.0)
    sharp, _ = fgd_attention(feat, temp=0.1)
    flat, _ = fgd_attention(feat, temp=10.0)
    assert sharp.max() > spatial.max() > flat.max() and flat.max().item() == pytest.approx(1.0, abs=0.1)


def _det(shape: tuple[int, ...], phase: float) -> torch.Tensor:
    return torch.sin(torch.arange(math.prod(shape), dtype=torch.float32) * 0.37 + phase).reshape(shape)


def test_fgd_loss_matches_the_published_code():
    """Golden value of yzd-v/FGD's FeatureLoss (c03a6cf, run in float64) on these inputs and parameters."""
    loss = FGDLoss(6, 8, temp=0.8, alpha_fgd=1.6e-3, beta_fgd=8e-4, gamma_fgd=8e-4, lambda_fgd=8e-6)
    with torch.no_grad():
        for i, (_, p) in enumerate(loss.named_parameters()):
            p.copy_(0.3 * _det(tuple(p.shape), i))
    s, t = 2 * _det((2, 6, 5, 7), 0.5), 3 * _det((2, 8, 5, 7), 1.5)
    boxes = [torch.tensor([[3.0, 5.0, 40.0, 30.0], [20.5, 1.0, 60.0, 47.0]]), torch.tensor([[0.0, 0.0, 10.0, 10.0]])]
    value = loss(s, t, gt_boxes=boxes, image_sizes=[(40, 56), (36, 50)])
    assert value.item() == pytest.approx(0.11893574046493029, rel=1e-5)


def test_fgd_feature_terms_vanish_when_student_equals_teacher():
    t = _det((2, 8, 5, 7), 0.3)
    boxes = [torch.tensor([[3.0, 5.0, 20.0, 30.0]]), torch.tensor([[0.0, 0.0, 10.0, 10.0]])]
    spatial, channel = fgd_attention(t, 0.5)
    fg, bg = fgd_masks(boxes, (5, 7), [(40.0, 56.0)] * 2)
    assert [x.item() for x in fgd_feature_loss(t, t, fg, bg, spatial, channel)] == [0.0, 0.0]
    assert FGDFeatureMSE(gamma_fgd=1.0)(t, t, boxes, [(40, 56)] * 2).item() == 0.0
    # the full loss: feature and attention terms are 0; the global term too while the GcBlocks are freshly
    # initialised (their last conv is zero), not once the two blocks differ
    full = FGDLoss(8, 8)
    assert full(t, t, boxes, [(40, 56)] * 2).item() == 0.0
    with torch.no_grad():
        full.global_s.channel_add[-1].bias.fill_(0.1)
    assert full(t, t, boxes, [(40, 56)] * 2).item() > 0.0
    assert FGDFeatureMSE()(t + 0.1, t, boxes, [(40, 56)] * 2).item() > 0.0


def test_fgd_gradients_reach_the_adaptation_layer_and_the_context_blocks():
    loss = FGDLoss(4, 8, temp=0.5, alpha_fgd=1.0, beta_fgd=1.0, gamma_fgd=1.0, lambda_fgd=1.0)
    assert loss.align is not None and loss.align.in_channels == 4
    s = torch.randn(2, 4, 6, 6, requires_grad=True)
    t = torch.randn(2, 8, 6, 6)
    boxes = [torch.tensor([[4.0, 4.0, 20.0, 30.0]]), torch.tensor([[10.0, 0.0, 48.0, 12.0]])]
    loss(s, t, boxes, [(48, 48)] * 2, padded_size=(48, 48)).backward()
    assert loss.align.weight.grad.abs().sum() > 0 and s.grad.abs().sum() > 0
    for side in (loss.global_s, loss.global_t):  # both GcBlocks are trained (the teacher's too)
        assert side.channel_add[-1].weight.grad.abs().sum() > 0
    assert FGDLoss(8, 8).align is None  # equal widths (an FPN): no adapter, as FGD


def test_fgd_box_frames_and_declared_inputs():
    assert get_distance("fgd").needs == ("gt_boxes", "image_sizes") and get_distance("fgd").accepts == ("padded_size",)
    assert get_distance("fgd_mse").needs == ("gt_boxes", "image_sizes")
    t = _det((1, 8, 4, 6), 0.0)
    s = t + 0.5 * _det((1, 8, 4, 6), 2.0)
    boxes = [torch.tensor([[8.0, 8.0, 24.0, 16.0]])]
    image = FGDFeatureMSE(box_frame="image")(s, t, boxes, [(30, 40)])
    padded = FGDFeatureMSE(box_frame="padded")(s, t, boxes, [(30, 40)], padded_size=(32, 48))
    assert image.item() != pytest.approx(padded.item())
    with pytest.raises(ValueError, match="padded_size"):
        FGDFeatureMSE(box_frame="padded")(s, t, boxes, [(30, 40)])
    with pytest.raises(ValueError, match="box_frame"):
        FGDLoss(box_frame="stride")


def test_fgd_points_train_their_own_parameters_per_level():
    """distill=fgd_*: one point per level, each with its own FGD module, whose parameters the optimizer gets."""
    student, teacher = faster_rcnn(0), faster_rcnn(1)
    fgd = {"name": "fgd", "temp": 0.5, "alpha_fgd": 5e-5, "beta_fgd": 2.5e-5, "gamma_fgd": 5e-5, "lambda_fgd": 5e-7}
    points = {f"fpn_{k}": {"student": f"backbone.fpn:{k}", "teacher": f"backbone.fpn:{k}", "distance": fgd}
              for k in ("0", "1")}  # fmt: skip
    module = DetectionModule(student=student, teacher=teacher, distiller=Distiller(points), optimizer=sgd())
    batch = detection_batch()
    module.build(batch)
    names = {n for n, _ in module.trainable_parameters()}
    assert {
        "distiller.distances.fpn_0.global_s.conv_mask.weight",
        "distiller.distances.fpn_1.global_t.channel_add.3.weight",
    } <= names
    assert module.distiller.distances.fpn_0 is not module.distiller.distances.fpn_1
    module.train()
    _, s_feats = module.student_taps.collect(module.student_forward(batch))
    inputs = module.distill_inputs(batch)
    assert inputs["padded_size"] == tuple(module._kept["transform"][0].tensors.shape[-2:])
    terms, _ = module.distiller(s_feats, module.teacher_features(batch), inputs)
    assert set(terms) == {"fpn_0/kd", "fpn_1/kd"} and all(torch.isfinite(v) for v in terms.values())
    sum(terms.values()).backward()
    assert module.distiller.distances.fpn_1.global_s.channel_add[-1].weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------ regression KD


def _reg_module(student: nn.Module, teacher: nn.Module, points: dict | None = None) -> DetectionModule:
    return DetectionModule(student=student, teacher=teacher, distiller=Distiller(points or {}), optimizer=sgd(),
                           regression_kd_weight=1.0)  # fmt: skip


def test_regression_kd_is_zero_for_a_teacher_with_the_students_weights():
    student = faster_rcnn(0)
    module = _reg_module(student, copy.deepcopy(student))
    batch = detection_batch()
    module.build(batch)
    module.train()
    losses = module.task_losses(module.student_forward(batch), batch)  # no point: the teacher runs for reg_kd
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg", "reg_kd"}
    assert losses["reg_kd"].item() == 0.0
    assert module._kept["student_box_regression"].shape == (64, 4 * 4)  # 2 images × 32 sampled RoIs, 4 per class


def test_regression_kd_pulls_the_box_regression_towards_the_teachers():
    student, teacher = faster_rcnn(0), faster_rcnn(1)
    points = {"fpn": {"student": "backbone.fpn:0", "teacher": "backbone.fpn:0", "distance": {"name": "mse"}}}
    module = _reg_module(student, teacher, points)
    batch = detection_batch()
    module.build(batch)
    module.train()
    out, _ = module.student_taps.collect(module.student_forward(batch))
    module.teacher_features(batch)  # the teacher's box head runs here, on the student's proposals
    t_reg = module._kept["teacher_box_regression"]
    assert not t_reg.requires_grad
    reg = module.task_losses(out, batch)["reg_kd"]
    s_reg = module._kept["student_box_regression"]
    assert reg.item() == pytest.approx(torch.nn.functional.smooth_l1_loss(s_reg, t_reg, beta=1.0).item())
    assert reg.item() > 0
    reg.backward()
    assert student.roi_heads.box_predictor.bbox_pred.weight.grad.abs().sum() > 0
    assert student.roi_heads.box_predictor.cls_score.weight.grad is None  # only the regression branch
    assert all(p.grad is None for p in teacher.parameters())


def test_regression_kd_with_a_bfloat16_teacher():
    """The teacher's RoI pooling runs in fp32 (torchvision's roi_align has no bf16 CPU kernel), its head in bf16."""
    points = {"fpn": {"student": "backbone.fpn:0", "teacher": "backbone.fpn:0", "distance": {"name": "mse"}}}
    module = DetectionModule(student=faster_rcnn(0), teacher=faster_rcnn(1), distiller=Distiller(points),
                             optimizer=sgd(), regression_kd_weight=1.0, teacher_dtype="bfloat16")  # fmt: skip
    batch = detection_batch()
    module.build(batch)
    module.train()
    out, _ = module.student_taps.collect(module.student_forward(batch))
    module.teacher_features(batch)  # in inference mode
    assert module._kept["teacher_box_regression"].dtype == torch.bfloat16
    reg = module.task_losses(out, batch)["reg_kd"]
    assert torch.isfinite(reg) and reg.item() > 0
    reg.backward()  # the teacher's values were copied out of inference mode


def test_regression_kd_needs_two_stage_detectors_and_is_off_without_a_teacher():
    torch.manual_seed(0)
    retina = create_model("retinanet_resnet50_fpn", **TINY)
    with pytest.raises(TypeError, match="two-stage"):
        _reg_module(retina, copy.deepcopy(retina))
    module = DetectionModule(student=faster_rcnn(0), teacher=None, distiller=Distiller({}), optimizer=sgd(),
                             regression_kd_weight=1.0)  # fmt: skip
    assert not module.regression_kd  # evaluation builds the student alone


# ------------------------------------------------------------------------------------------------ inheritance


def test_the_student_inherits_the_teachers_neck_and_heads():
    student, teacher = faster_rcnn(0), faster_rcnn(1)
    body_before = {k: v.clone() for k, v in student.state_dict().items() if k.startswith("backbone.body.")}
    module = DetectionModule(student=student, teacher=teacher, distiller=Distiller({}), optimizer=sgd(),
                             inherit_teacher_neck_heads=True)  # fmt: skip
    module.build(detection_batch())
    s, t = student.state_dict(), teacher.state_dict()
    for prefix in ("backbone.fpn.", "rpn.", "roi_heads."):
        keys = [k for k in t if k.startswith(prefix)]
        assert keys and all(torch.equal(s[k], t[k]) for k in keys)
    assert all(torch.equal(s[k], v) for k, v in body_before.items())  # the backbone body stays the student's
    assert not torch.equal(s["backbone.body.layer4.0.conv1.weight"], t["backbone.body.layer4.0.conv1.weight"])
    other = create_model("fasterrcnn_resnet50_fpn", min_size=64, max_size=96, num_classes=7)
    copied = inherit_neck_and_heads(other, teacher)  # other widths: the class-dependent layers are skipped
    assert "roi_heads.box_predictor.cls_score.weight" not in copied and "backbone.fpn.inner_blocks.0.0.weight" in copied


# ------------------------------------------------------------------------------------------------ evaluation


def test_contiguous_labels_map_back_to_category_ids():
    module = DetectionModule(student=faster_rcnn(0), teacher=None, distiller=Distiller({}), optimizer=sgd())
    module._label_to_category = torch.tensor([0, 1, 2, 3, 5, 90])  # labels 1..5 of categories 1, 2, 3, 5, 90
    assert module._to_categories(torch.tensor([5, 1, 4])).tolist() == [90, 1, 5]


def test_warmup_multistep_schedule():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.02)
    sched = WarmupMultiStepLR(opt, milestones=[2, 3], gamma=0.1, warmup_steps=5, warmup_ratio=0.001, steps_per_epoch=4)
    lrs = []
    for _ in range(14):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.02 * 0.001)  # MMDetection's linear warm-up from warmup_ratio × lr
    assert lrs[1] == pytest.approx(0.02 * (1 - 0.8 * 0.999))
    assert lrs[5:8] == pytest.approx([0.02] * 3)  # warm-up over, epoch 1
    assert lrs[8:12] == pytest.approx([0.002] * 4) and lrs[12:] == pytest.approx([0.0002] * 2)  # epochs 2, 3
    with pytest.raises(ValueError, match="steps_per_epoch"):
        WarmupMultiStepLR(opt, milestones=[16, 22])


# ------------------------------------------------------------------------------------------------ compile


@pytest.mark.parametrize("teacher_runs", ["backbone", "heads"])
def test_compile_teacher_compiles_what_the_task_calls(monkeypatch, teacher_runs):
    """model.compile=teacher: the detector's forward never runs for the teacher (its backbone + FPN do, on the
    student's batch), so compiling the detector would compile nothing that runs."""
    compiled = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kw: compiled.append(self))
    student, teacher = faster_rcnn(0), faster_rcnn(1)
    points = {"fpn": {"student": "backbone.fpn:0", "teacher": "backbone.fpn:0", "distance": {"name": "mse"}}}
    module = DetectionModule(student=student, teacher=teacher, distiller=Distiller(points), optimizer=sgd(),
                             compile="teacher", teacher_runs=teacher_runs)  # fmt: skip
    module.build(detection_batch())
    heads = [teacher.rpn.head] if teacher_runs == "heads" else []
    assert compiled == [teacher.backbone, *heads]


def test_input_size_gives_a_dry_run_without_data():
    """model.input_size: the dry run needs no datamodule (two random images with one box each)."""
    points = {"fpn": {"student": "backbone.fpn:0", "teacher": "backbone.fpn:0", "distance": {"name": "mse"}}}
    module = DetectionModule(student=faster_rcnn(0), teacher=faster_rcnn(1), distiller=Distiller(points),
                             optimizer=sgd(), input_size=[3, 64, 80])  # fmt: skip
    state = torch.get_rng_state()
    images, targets = module.example_batch()
    assert torch.equal(torch.get_rng_state(), state)  # no random state consumed
    assert [tuple(i.shape) for i in images] == [(3, 64, 80)] * 2
    assert targets[0]["boxes"].tolist() == [[20.0, 16.0, 60.0, 48.0]] and targets[1]["labels"].tolist() == [1]
    module.setup("fit")  # no trainer, no datamodule: the dry run takes the synthetic batch
    assert module.distiller.points["fpn"].student_shape == module.distiller.points["fpn"].teacher_shape
