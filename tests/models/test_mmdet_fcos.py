"""MMDetection's FCOS (caffe R-50/R-101, FPN, GN head; ``diffkd.models.mmdet.fcos``) against MMDetection 3.3 itself.

With the reference extra (``needs_mmdet``): MMDetection's own model of the zoo config, random weights with
non-trivial BatchNorm statistics, GroupNorm affines, level scales and classifier biases, converted into ours, gives
the same FPN levels, head outputs, detections (its ``predict``, ``rescale=True``) and training losses (its
``loss``). The default suite runs R-50 on small images; R-101 and the 800×1088 image are ``slow``. Without it:
the settings, the Detectron caffe backbone file, the points, the assignment, the loss edge cases, and a DiffKD run
on a COCO folder in the real format.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from diffkd.models import create_model, create_teacher
from diffkd.models.mmdet import MMDetWeightsError
from diffkd.models.mmdet.common import CAFFE_MEAN_BGR, EvalBatchNorm2d, mmdet_resnet
from diffkd.models.mmdet.fcos import REGRESS_RANGES, MMDetFCOS, MMDetPointGenerator, fcos_targets
from tests.helpers.mmdet_reference import as_checkpoint, build_mmdet_model, import_mmdet, needs_mmdet

CONFIGS = {
    "mmdet_fcos_r50_caffe_fpn_gn": "fcos/fcos_r50-caffe_fpn_gn-head_ms-640-800-2x_coco",
    "mmdet_fcos_r101_caffe_fpn_gn": "fcos/fcos_r101-caffe_fpn_gn-head_ms-640-800-2x_coco",
}
R50, R101 = CONFIGS
HEAD_KEYS = ("cls_logits", "bbox_regression", "bbox_ctrness")
LEVELS = ["0", "1", "2", "p6", "p7"]
NAMES = {"classification": "loss_cls", "bbox_regression": "loss_bbox", "bbox_ctrness": "loss_centerness"}
"""Our loss names → MMDetection's."""


# ------------------------------------------------------------------------------------------------ the reference
def _reference(config: str, seed: int = 0) -> torch.nn.Module:
    """MMDetection's model with GroupNorm affines, level scales and classifier biases off their initial values (the
    biases raised so that scores pass the 0.05 threshold and NMS has work)."""
    import_mmdet()
    import mmcv.ops

    # mmcv's batched_nms looks `nms` up in its own module, which the harness leaves compiled: use its torchvision NMS
    sys.modules["mmcv.ops.nms"].nms = mmcv.ops.nms
    ref = build_mmdet_model(config, seed)
    generator = torch.Generator().manual_seed(seed + 7)
    head = ref.bbox_head
    with torch.no_grad():
        for module in head.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.copy_(torch.rand(module.num_channels, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(module.num_channels, generator=generator) * 0.1)
        for i, scale in enumerate(head.scales):
            scale.scale.fill_(0.6 + 0.2 * i)
        head.conv_cls.bias.add_(torch.randn(head.num_classes, generator=generator) + 2.0)
    return ref


def _ours(ref: torch.nn.Module, name: str, min_size: int) -> MMDetFCOS:
    model = create_model(name, min_size=min_size, max_size=1333)
    model.load_state_dict(model.convert_foreign_checkpoint(as_checkpoint(ref), "the reference"))
    return model.eval()


def _images(height: int, width: int, seed: int = 0) -> list[torch.Tensor]:
    """Two RGB images in [0, 1] at whole grey levels: (height, width) and 32 px narrower (padded in the batch)."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (2, 3, height, width), generator=generator, dtype=torch.uint8)
    return [pixels[0].float() / 255, pixels[1, :, :, : width - 32].float() / 255]


def _samples(images: list[torch.Tensor], boxes: list[torch.Tensor] | None = None) -> list:
    """MMDetection's data samples of images its pipeline did not resize; ``boxes``: per image (G, 5) x1, y1, x2, y2,
    MMDetection's label."""
    from mmdet.structures import DetDataSample
    from mmengine.structures import InstanceData

    samples = []
    for i, image in enumerate(images):
        h, w = image.shape[-2:]
        sample = DetDataSample(metainfo={"img_shape": (h, w), "ori_shape": (h, w), "scale_factor": (1.0, 1.0)})
        if boxes is not None:
            sample.gt_instances = InstanceData(bboxes=boxes[i][:, :4].clone(), labels=boxes[i][:, 4].long())
        samples.append(sample)
    return samples


def _mmdet_batch(ref: torch.nn.Module, images: list[torch.Tensor], samples: list, training: bool) -> dict[str, Any]:
    """MMDetection's data preprocessor on the images as its pipeline loads them (uint8, BGR)."""
    inputs = [(image * 255).round().to(torch.uint8).flip(0) for image in images]
    return ref.data_preprocessor({"inputs": inputs, "data_samples": samples}, training)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max().clamp(min=1e-12))


def _compare_detections(ref_results: list, ours: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    worst = {"boxes": 0.0, "scores": 0.0}
    for result, mine in zip(ref_results, ours):
        r = result.pred_instances
        assert len(r.bboxes) == len(mine["boxes"]) > 0
        assert torch.equal(r.labels + 1, mine["labels"])
        torch.testing.assert_close(mine["boxes"], r.bboxes, rtol=0, atol=1e-3)
        torch.testing.assert_close(mine["scores"], r.scores, rtol=1e-5, atol=1e-6)
        worst["boxes"] = max(worst["boxes"], float((r.bboxes - mine["boxes"]).abs().max()))
        worst["scores"] = max(worst["scores"], float((r.scores - mine["scores"]).abs().max()))
    return worst


def _check_features_and_head(ref: torch.nn.Module, ours: MMDetFCOS, images: list[torch.Tensor]) -> dict[str, float]:
    """FPN levels and head outputs on the same batch; MMDetection's preprocessing equals our transform's."""
    batch = _mmdet_batch(ref, images, _samples(images), False)
    with torch.no_grad():
        image_list, _ = ours.transform(images)
        torch.testing.assert_close(image_list.tensors, batch["inputs"], rtol=0, atol=1e-4)
        ref_levels = ref.extract_feat(batch["inputs"])
        levels = ours.backbone(batch["inputs"])
        assert list(levels) == LEVELS
        worst = {}
        for i, (a, b) in enumerate(zip(ref_levels, levels.values())):
            assert a.shape == b.shape
            worst[f"fpn_{i}"] = _relative(a, b)
        ref_head = ref.bbox_head(ref_levels)
        head = ours.head(list(levels.values()))
        for key, ref_outputs in zip(HEAD_KEYS, ref_head):
            worst[key] = max(_relative(a, b) for a, b in zip(ref_outputs, head[key]))
    assert max(worst.values()) <= 1e-4, worst
    return worst


def _report(what: str, worst: dict[str, float]) -> None:
    print(f"\n{what}: " + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()))


@pytest.fixture(scope="module")
def r50_pair() -> tuple[torch.nn.Module, MMDetFCOS]:
    ref = _reference(CONFIGS[R50])
    return ref, _ours(ref, R50, 256)


# ------------------------------------------------------------------------------------------------ R-50, small images
@needs_mmdet
def test_r50_fpn_and_head_outputs_equal_mmdetection(r50_pair):
    ref, ours = r50_pair
    _report("R-50 256×352 relative", _check_features_and_head(ref, ours, _images(256, 352)))


@needs_mmdet
def test_r50_detections_equal_mmdetection_predict(r50_pair):
    ref, ours = r50_pair
    images = _images(256, 352, seed=1)
    batch = _mmdet_batch(ref, images, _samples(images), False)
    with torch.no_grad():
        expected = ref.predict(batch["inputs"], batch["data_samples"], rescale=True)
        _report("R-50 256×352 detections", _compare_detections(expected, ours(images)))


@needs_mmdet
def test_r50_detections_are_scaled_back_as_mmdetection_rescales(r50_pair):
    # an input of 160×210 is resized to 256×336 (scale factors 1.6 and 1.6): MMDetection gets our resized batch
    # (its own resize is OpenCV's on uint8) with its Resize's metainfo
    ref, ours = r50_pair
    image = _images(160, 242, seed=2)[1]
    with torch.no_grad():
        image_list, _ = ours.transform([image])
        (new_h, new_w) = image_list.image_sizes[0]
        assert (new_h, new_w) == (256, 336)
        scale = (new_w / 210, new_h / 160)
        from mmdet.structures import DetDataSample

        meta = {"img_shape": (new_h, new_w), "ori_shape": (160, 210), "scale_factor": scale}
        expected = ref.predict(image_list.tensors, [DetDataSample(metainfo=meta)], rescale=True)
        mine = ours([image])
    assert float(mine[0]["boxes"][:, 2].max()) <= 210 and float(mine[0]["boxes"][:, 3].max()) <= 160
    _report("R-50 rescaled detections", _compare_detections(expected, mine))


@needs_mmdet
def test_r50_training_losses_equal_mmdetection_loss(r50_pair):
    ref, ours = r50_pair
    images = _images(256, 352, seed=3)
    boxes = [
        torch.tensor([[10.0, 20, 200, 180, 3], [50, 60, 90, 250, 7], [0, 0, 351, 255, 0], [100, 100, 140, 130, 79]]),
        torch.tensor([[30.0, 5, 310, 250, 12], [200, 150, 215, 170, 79]]),
    ]
    batch = _mmdet_batch(ref, images, _samples(images, boxes), True)
    targets = [{"boxes": b[:, :4].clone(), "labels": b[:, 4].long() + 1} for b in boxes]
    ref.train()
    ours.train()
    try:
        expected = ref.loss(batch["inputs"], batch["data_samples"])
        losses = ours(images, targets)
    finally:
        ref.eval()
        ours.eval()
    assert set(losses) == set(NAMES)
    worst = {}
    for mine, theirs in NAMES.items():
        assert losses[mine].requires_grad
        torch.testing.assert_close(losses[mine], expected[theirs], rtol=1e-5, atol=1e-7)
        worst[mine] = abs(float(losses[mine].detach() - expected[theirs].detach())) / abs(float(expected[theirs]))
    _report("R-50 losses relative", worst)


# ------------------------------------------------------------------------------------------------ checkpoints
@needs_mmdet
def test_a_saved_mmdetection_checkpoint_loads_as_teacher(r50_pair, tmp_path):
    ref, ours = r50_pair
    path = tmp_path / "fcos_r50_caffe_fpn_gn-head_mstrain_640-800_2x_coco.pth"
    torch.save(as_checkpoint(ref), path)
    teacher = create_teacher(R50, weights=str(path))
    own = ours.state_dict()
    assert all(torch.equal(v, own[k]) for k, v in teacher.state_dict().items())


@needs_mmdet
def test_v2_checkpoints_with_the_old_fcos_head_names_load(r50_pair, tmp_path):
    # MMDetection < 2.3 named the predictors fcos_cls/fcos_reg/fcos_centerness (its loader still renames them)
    ref, ours = r50_pair
    ckpt = as_checkpoint(ref)
    ckpt["state_dict"] = {k.replace("bbox_head.conv_", "bbox_head.fcos_"): v for k, v in ckpt["state_dict"].items()}
    converted = ours.convert_foreign_checkpoint(ckpt, "an old file")
    assert torch.equal(converted["head.cls_logits.weight"], ref.bbox_head.conv_cls.weight)


@needs_mmdet
def test_a_checkpoint_of_another_model_is_named(r50_pair):
    ref, ours = r50_pair
    state = as_checkpoint(ref)["state_dict"]
    deeper = dict(state)  # an R-101: layer3 has 23 blocks
    for block in range(6, 23):
        deeper.update({k.replace("layer3.5.", f"layer3.{block}."): v for k, v in state.items() if "layer3.5." in k})
    with pytest.raises(MMDetWeightsError) as err:
        ours.convert_foreign_checkpoint({"state_dict": deeper, "meta": {}}, "'r101.pth'")
    message = str(err.value)
    assert "unexpected" in message and "backbone.body.layer3.6." in message
    assert "FCOS R-101 FPN GN-head, 80 classes → mmdet_fcos_r101_caffe_fpn_gn" in message

    retina = {k.replace("conv_cls", "retina_cls").replace("conv_reg", "retina_reg"): v for k, v in state.items()}
    retina = {k: v for k, v in retina.items() if "centerness" not in k}
    with pytest.raises(MMDetWeightsError, match=r"RetinaNet R-50 FPN, 80 classes → no model here reads it"):
        ours.convert_foreign_checkpoint({"state_dict": retina}, "'retina.pth'")


@needs_mmdet
def test_normbbox_centeronreg_checkpoints_are_refused(r50_pair):
    ref, ours = r50_pair
    ckpt = as_checkpoint(ref)
    ckpt["meta"]["config"] = "model = dict(bbox_head=dict(type='FCOSHead', norm_on_bbox=True, centerness_on_reg=True))"
    with pytest.raises(MMDetWeightsError, match="norm_on_bbox and centerness_on_reg=True"):
        ours.convert_foreign_checkpoint(ckpt, "'normbbox.pth'")
    assert ours.convert_foreign_checkpoint({"model": ours.state_dict()}, "a diffkd file") is None


@needs_mmdet
def test_a_pytorch_style_fcos_checkpoint_is_refused(r50_pair):
    ref, ours = r50_pair
    ckpt = as_checkpoint(ref)
    ckpt["meta"]["config"] = "model = dict(backbone=dict(type='ResNet', depth=50, style='pytorch'))"
    with pytest.raises(MMDetWeightsError, match=r"trained a pytorch-style backbone .* is caffe-style"):
        ours.convert_foreign_checkpoint(ckpt, "'fcos_pytorch.pth'")
    ckpt["meta"]["config"] = "model = dict(backbone=dict(type='ResNet', depth=50, style='caffe'))"
    assert ours.convert_foreign_checkpoint(ckpt, "'fcos_caffe.pth'") is not None


# ------------------------------------------------------------------------------------------------ slow: R-101, 800×1088
@needs_mmdet
@pytest.mark.slow
@pytest.mark.parametrize("name", [R50, R101])
def test_800x1088_features_head_and_detections_equal_mmdetection(name):
    ref = _reference(CONFIGS[name], seed=11)
    ours = _ours(ref, name, 800)
    image = [_images(800, 1120, seed=4)[1]]  # 800×1088: no resize (MMDetection's test scale 1333×800)
    _report(f"{name} 800×1088 relative", _check_features_and_head(ref, ours, image))
    batch = _mmdet_batch(ref, image, _samples(image), False)
    with torch.no_grad():
        expected = ref.predict(batch["inputs"], batch["data_samples"], rescale=True)
        _report(f"{name} 800×1088 detections", _compare_detections(expected, ours(image)))


@needs_mmdet
@pytest.mark.slow
def test_r101_training_losses_with_an_image_without_boxes_equal_mmdetection():
    ref = _reference(CONFIGS[R101], seed=12)
    ours = _ours(ref, R101, 256)
    images = _images(256, 352, seed=5)
    boxes = [torch.tensor([[10.0, 20, 300, 240, 5], [60, 40, 100, 90, 1]]), torch.zeros(0, 5)]
    batch = _mmdet_batch(ref, images, _samples(images, boxes), True)
    ref.train()
    ours.train()
    expected = ref.loss(batch["inputs"], batch["data_samples"])
    losses = ours(images, [{"boxes": b[:, :4].clone(), "labels": b[:, 4].long() + 1} for b in boxes])
    assert float(losses["bbox_regression"].detach()) > 0
    for mine, theirs in NAMES.items():
        torch.testing.assert_close(losses[mine], expected[theirs], rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------------ without the reference
def test_entries_have_mmdetections_settings():
    with torch.device("meta"):
        model = create_model(R50)
        levels = model.backbone(torch.zeros(1, 3, 256, 384))
    assert list(levels) == LEVELS and [384 // f.shape[-1] for f in levels.values()] == [8, 16, 32, 64, 128]
    assert model.transform.min_size == (640, 800) and model.transform.max_size == 1333
    assert model.transform.bgr and tuple(model.transform.image_mean) == CAFFE_MEAN_BGR
    assert model.transform.image_std == [1.0, 1.0, 1.0]
    head = model.head
    assert head.cls_logits.out_channels == 80 and head.num_classes == 80
    assert all(layer.conv.bias is None and layer.gn.num_groups == 32 for layer in [*head.cls_convs, *head.reg_convs])
    assert len(head.cls_convs) == len(head.reg_convs) == 4 and len(head.scales) == 5
    body = model.backbone.body
    assert body.layer2[0].conv1.stride == (2, 2) and body.layer2[0].conv2.stride == (1, 1)  # caffe style
    assert all(not p.requires_grad for m in body.modules() if isinstance(m, EvalBatchNorm2d) for p in m.parameters())
    assert not any(p.requires_grad for n, p in body.named_parameters() if n.startswith(("conv1", "layer1")))
    assert body.layer2[0].conv1.weight.requires_grad
    assert (model.score_thresh, model.nms_thresh, model.detections_per_img, model.topk_candidates) == (
        0.05, 0.5, 100, 1000,
    )  # fmt: skip
    with torch.device("meta"):
        deeper = create_model(R101, num_classes=6, trainable_layers=3, min_size=64)
        from_config = create_model(R50, min_size=OmegaConf.create({"sizes": [640, 800]}).sizes)
    assert len(deeper.backbone.body.layer3) == 23 and deeper.head.cls_logits.out_channels == 5
    assert deeper.transform.min_size == (64,) and from_config.transform.min_size == (640, 800)


def test_head_initialisation_is_mmdetections():
    model = create_model(R50)
    head = model.head
    assert float(head.cls_logits.bias[0]) == pytest.approx(-math.log(99))
    assert float(head.bbox_reg.weight.std()) == pytest.approx(0.01, rel=0.1)
    assert float(head.cls_convs[0].conv.weight.std()) == pytest.approx(0.01, rel=0.05)
    assert all(float(s.scale) == 1.0 for s in head.scales)
    assert torch.equal(head.bbox_ctrness.bias, torch.zeros(1))


def test_unsupported_options_are_refused():
    with pytest.raises(ValueError, match="freezes BatchNorm"):
        create_model(R50, frozen_bn=False)
    with pytest.raises(ValueError, match="no weights of its own"):
        create_model(R50, pretrained=True)
    with pytest.raises(ValueError, match="disagree; set one of them"):
        create_model(R50, frozen_stages=-1, trainable_layers=3)
    with torch.device("meta"):
        body = create_model(R50, trainable_layers=5).backbone.body
    assert body.conv1.weight.requires_grad and not body.bn1.weight.requires_grad


def _detectron_caffe_file(path: Path, depth: int) -> dict[str, torch.Tensor]:
    """A file in the layout of MMDetection's ``detectron2pytorch.py`` (the ``resnet{50,101}_caffe`` files):
    ``{"state_dict": ...}`` with torchvision's names, no ``fc``/``num_batches_tracked``, BatchNorm as mean 0 / var 1
    around Detectron's affine."""
    body = mmdet_resnet(depth, style="caffe")
    state = {}
    for key, value in body.state_dict().items():
        if key.startswith("fc.") or key.endswith("num_batches_tracked"):
            continue
        if key.endswith("running_mean"):
            value = torch.zeros_like(value)
        elif key.endswith("running_var"):
            value = torch.ones_like(value)
        else:
            value = torch.randn_like(value)
        state[key] = value
    torch.save({"state_dict": state}, path)
    return state


def test_the_detectron_caffe_backbone_file_loads_and_torchvision_weights_are_refused(tmp_path):
    path = tmp_path / "resnet50_caffe-788b5fa3.pth"
    state = _detectron_caffe_file(path, 50)
    model = create_model(R50, weights_backbone=str(path))
    own = model.backbone.body.state_dict()
    assert all(torch.equal(own[k], v) for k, v in state.items() if k in own)
    assert all(k in own for k in state)
    with pytest.raises(ValueError, match=r"caffe-style R-50.*resnet50_caffe-788b5fa3\.pth"):
        create_model(R50, weights_backbone="IMAGENET1K_V1")
    with pytest.raises(ValueError, match=r"resnet101_caffe-3ad79236\.pth"):
        create_model(R101, weights_backbone="DEFAULT")
    with pytest.raises(MMDetWeightsError, match="depth-101"):
        create_model(R101, weights_backbone=str(path))


def test_points_sit_at_cell_centres():
    points = MMDetPointGenerator((8, 16)).grid_points([(2, 3), (1, 2)])
    assert points[0].tolist() == [[4, 4], [12, 4], [20, 4], [4, 12], [12, 12], [20, 12]]
    assert points[1].tolist() == [[8, 8], [24, 8]]


def test_assignment_takes_the_smallest_box_in_range():
    points = torch.tensor([[50.0, 50.0], [20.0, 20.0], [150.0, 150.0], [0.0, 50.0]])
    ranges = torch.tensor([[-1.0, 64.0], [64.0, 128.0], [-1.0, 64.0], [-1.0, 64.0]])
    boxes = torch.tensor([[0.0, 0.0, 100.0, 100.0], [30.0, 30.0, 70.0, 80.0], [140.0, 100.0, 300.0, 300.0]])
    labels, targets = fcos_targets(points, ranges, boxes, torch.tensor([0, 1, 2]), background=80)
    # point 0: inside the 100² box and the 40×50 one, both in range: the smaller; point 1: its largest distance to
    # the 100² box, 80, is in 64..128; point 2: 150 to the third box, out of range; point 3: on the first box's edge
    assert labels.tolist() == [1, 0, 80, 80]
    assert targets[0].tolist() == [20.0, 20.0, 20.0, 30.0] and targets[1].tolist() == [20.0, 20.0, 80.0, 80.0]
    assert len(REGRESS_RANGES) == 5


@pytest.fixture(scope="module")
def small_model() -> MMDetFCOS:
    torch.manual_seed(0)
    return create_model(R50, num_classes=6, min_size=96, max_size=128)


def test_training_without_boxes_gives_zero_box_losses(small_model):
    images = [torch.rand(3, 96, 128), torch.rand(3, 96, 112)]
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    small_model.train()
    losses = small_model(images, [dict(empty), dict(empty)])
    assert math.isfinite(float(losses["classification"])) and float(losses["classification"]) > 0
    assert float(losses["bbox_regression"]) == 0.0 and float(losses["bbox_ctrness"]) == 0.0
    losses["classification"].backward()
    assert small_model.head.cls_logits.weight.grad is not None
    small_model.zero_grad()


def test_labels_outside_the_contiguous_space_are_an_error(small_model):
    target = {"boxes": torch.tensor([[10.0, 10.0, 60.0, 60.0]]), "labels": torch.tensor([7])}
    small_model.train()
    with pytest.raises(ValueError, match="contiguous_labels=true"):
        small_model([torch.rand(3, 96, 128)], [target])


def test_eval_returns_detections_in_input_coordinates(small_model):
    small_model.eval()
    with torch.no_grad():
        out = small_model([torch.rand(3, 48, 64), torch.rand(3, 60, 50)])
    assert [set(o) for o in out] == [{"boxes", "scores", "labels"}] * 2
    for o, (h, w) in zip(out, [(48, 64), (60, 50)]):
        assert len(o["boxes"]) <= 100 and bool((o["labels"] >= 1).all() and (o["labels"] <= 5).all())
        if len(o["boxes"]):
            assert float(o["boxes"][:, 2].max()) <= w and float(o["boxes"][:, 3].max()) <= h


def test_taps_address_the_head_per_level(small_model):
    from diffkd.distill.taps import dry_run

    run = dry_run(small_model, [torch.rand(3, 96, 128)], ["head.cls_logits", "head", "backbone.fpn"])
    logits, per_call = run.value("head.cls_logits")
    assert per_call and [tuple(t.shape[-2:]) for t in logits] == [(12, 16), (6, 8), (3, 4), (2, 2), (1, 1)]
    head, _ = run.value("head")
    assert set(head) == set(HEAD_KEYS) and all(len(v) == 5 for v in head.values())
    assert torch.equal(head["cls_logits"][0], logits[0])


# ------------------------------------------------------------------------------------------------ training with DiffKD
def test_diffkd_trains_and_validates_the_r50_student_from_an_r101_teacher(tmp_path):
    from diffkd.train import train
    from tests.conftest import compose_config, tiny_overrides
    from tests.helpers.fake_coco import write_fake_coco

    write_fake_coco(tmp_path / "data" / "coco")
    sizes = [f"model.{s}.{k}={v}" for s in ("student", "teacher") for k, v in (("min_size", 64), ("max_size", 96))]
    cfg = compose_config([
        "experiment=coco_fcos_r101_r50", *tiny_overrides(tmp_path, tmp_path / "data"),
        "data.batch_size=2", "data.val_batch_size=2", "data.contiguous_labels=true",
        f"model.student.name={R50}", f"model.teacher.name={R101}", "model.student.weights_backbone=null",
        "model.teacher.weights=null", *sizes, "optim=sgd_det_2x_fcos", "distill.diffkd.inference_steps=1",
        "test=false", "~callbacks.model_checkpoint", "trainer.enable_checkpointing=false",
        "++trainer.enable_model_summary=false",
    ])  # fmt: skip
    metrics, objs = train(cfg)
    module, trainer = objs["module"], objs["trainer"]
    assert trainer.global_step == 2 and isinstance(module.student, MMDetFCOS)
    assert module.student.head.num_classes == 5  # the fake COCO's 5 categories, contiguous
    assert list(module.distiller.points) == [f"fpn_{k}" for k in LEVELS]
    for name in [*NAMES, *(f"fpn_{k}/{t}" for k in LEVELS for t in ("kd", "diff"))]:
        assert math.isfinite(metrics[f"train/loss/{name}"]), name
    assert float(metrics["train/loss/bbox_regression"]) > 0  # the fake boxes got positive points
    assert "val/map" in metrics and -1.0 <= float(metrics["val/map"]) <= 1.0
