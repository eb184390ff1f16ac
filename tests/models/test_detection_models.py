"""The COCO detector entries: torchvision's architectures, FPN levels, frozen stages, weights and teacher loading.

Most checks build on the meta device (no memory, no initialisation cost); nothing is downloaded.
"""

from __future__ import annotations

import inspect
import urllib.error

import pytest
import torch
import torchvision
from torchvision.ops import FrozenBatchNorm2d

from diffkd.models import create_model, create_teacher, get_model_entry, list_models
from diffkd.models.detection import BACKBONES, DETECTORS, FPN_LEVELS
from diffkd.models.imagenet import WeightsDownloadError

NAMES = [f"{d}_{b}_fpn" for d in DETECTORS for b in BACKBONES]
STRIDES = {"fasterrcnn": (4, 8, 16, 32, 64), "retinanet": (8, 16, 32, 64, 128), "fcos": (8, 16, 32, 64, 128)}


def test_the_registry_lists_three_detectors_on_three_backbones():
    demos = set(list_models(tag="demo"))  # the detection demo's small pair
    mmdet = set(list_models(tag="mmdet"))  # MMDetection's models (tests/models/test_mmdet_*.py)
    extra = {"retinanet_resnet50_fpn_v2"}  # torchvision's own v2 builder (its COCO weights: a ready teacher)
    assert sorted(n for n in list_models(tag="detection") if n not in demos | mmdet | extra) == sorted(NAMES)
    assert mmdet and all(n.startswith("mmdet_") for n in mmdet)
    assert extra <= set(list_models(tag="detection"))
    assert "resnext101_64x4d" in BACKBONES


@pytest.mark.parametrize("name", NAMES)
def test_entry_builds_with_its_fpn_levels_and_frozen_stages(name):
    detector = name.split("_")[0]
    with torch.device("meta"):
        model = create_model(name, min_size=64, max_size=96)
        features = model.backbone(torch.zeros(1, 3, 256, 384))
    assert list(features) == list(FPN_LEVELS[detector])
    assert [f.shape[1] for f in features.values()] == [256] * 5
    assert [384 // f.shape[-1] for f in features.values()] == list(STRIDES[detector])
    assert model.transform.min_size == (64,) and model.transform.max_size == 96
    assert isinstance(model.backbone.body.bn1, FrozenBatchNorm2d)
    trainable = {n.split(".")[0] for n, p in model.backbone.body.named_parameters() if p.requires_grad}
    assert trainable == {"layer2", "layer3", "layer4"}  # stem + layer1 frozen (trainable_layers=3)


@pytest.mark.parametrize("detector", DETECTORS)
def test_resnet50_entries_are_torchvisions_models(detector):
    name = f"{detector}_resnet50_fpn"
    with torch.device("meta"):
        ours = create_model(name)
        theirs = torchvision.models.get_model(name, weights=None, weights_backbone=None)
    assert (
        sum(p.numel() for p in ours.parameters())
        == torchvision.models.get_model_weights(name).COCO_V1.meta["num_params"]
    )
    # the same tensors except that torchvision's randomly initialised backbone has trainable BatchNorm
    ours_keys = set(ours.state_dict())
    theirs_keys = {k for k in theirs.state_dict() if not k.endswith("num_batches_tracked")}
    assert ours_keys == theirs_keys


def test_resnext_backbone_is_64x4d():
    with torch.device("meta"):
        model = create_model("retinanet_resnext101_64x4d_fpn")
    # FrozenBatchNorm2d keeps its affine weights as buffers: count them with the parameters
    state = model.backbone.body.state_dict()
    body = sum(v.numel() for k, v in state.items() if not k.endswith(("running_mean", "running_var")))
    meta = torchvision.models.ResNeXt101_64X4D_Weights.IMAGENET1K_V1.meta["num_params"]
    assert body == meta - (2048 * 1000 + 1000)  # the classifier is not part of the body
    assert model.backbone.body.layer1[0].conv2.groups == 64


def test_options_p6_input_trainable_layers_and_norm():
    with torch.device("meta"):
        c5 = create_model("retinanet_resnet50_fpn", p6_input="c5")
        p5 = create_model("retinanet_resnet50_fpn")
        scratch = create_model("fcos_resnet50_fpn", frozen_bn=False, trainable_layers=5)
    assert c5.backbone.fpn.extra_blocks.p6.in_channels == 2048 and not c5.backbone.fpn.extra_blocks.use_P5
    assert p5.backbone.fpn.extra_blocks.p6.in_channels == 256 and p5.backbone.fpn.extra_blocks.use_P5
    assert isinstance(scratch.backbone.body.bn1, torch.nn.BatchNorm2d)
    assert all(p.requires_grad for p in scratch.backbone.body.parameters())
    with pytest.raises(ValueError, match="P5"):
        create_model("fcos_resnet50_fpn", p6_input="c5")


def test_weights_errors_name_the_problem_without_a_download(monkeypatch):
    with pytest.raises(ValueError, match="no COCO weights"):
        create_model("fasterrcnn_resnet101_fpn", pretrained=True)
    with pytest.raises(ValueError, match="91 classes"):
        create_model("fcos_resnet50_fpn", pretrained=True, num_classes=5)
    with pytest.raises(ValueError, match="IMAGENET1K_V1"):
        create_model("fcos_resnet50_fpn", weights_backbone="IMAGENET1K_V9")

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsDownloadError, match=r"resnet50-0676ba61\.pth"), torch.device("meta"):
        create_model("fasterrcnn_resnet50_fpn", weights_backbone="IMAGENET1K_V1")
    with pytest.raises(WeightsDownloadError, match="retinanet_resnet50_fpn_coco"), torch.device("meta"):
        create_model("retinanet_resnet50_fpn", pretrained=True)


def test_a_teacher_loads_a_diffkd_checkpoint(tmp_path):
    torch.manual_seed(0)
    trained = create_model("fcos_resnet50_fpn", num_classes=3, min_size=64, max_size=96)
    state = trained.state_dict()
    # a teacher-training run (distill=none) holds only student.* weights: unwrapped automatically
    torch.save({"state_dict": {f"student.{k}": v for k, v in state.items()}, "epoch": 3}, tmp_path / "teacher.ckpt")
    teacher = create_teacher("fcos_resnet50_fpn", num_classes=3, weights=tmp_path / "teacher.ckpt", min_size=64)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in state.items())
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    # a distillation run's checkpoint: key="student" picks the student out of student.*/teacher.*/distiller.*
    mixed = {f"student.{k}": v for k, v in state.items()}
    mixed.update({"teacher.head.x": torch.zeros(1), "distiller.heads.fpn_0.w": torch.zeros(1)})
    torch.save({"state_dict": mixed}, tmp_path / "distilled.ckpt")
    again = create_teacher("fcos_resnet50_fpn", num_classes=3, weights=tmp_path / "distilled.ckpt", key="student")
    assert torch.equal(
        again.head.classification_head.cls_logits.weight, trained.head.classification_head.cls_logits.weight
    )


# one registered variant per builder: its module and the leading parameters positional callers rely on
VARIANTS = {
    "fasterrcnn_resnet50_fpn": ("detection", ["num_classes", "pretrained", "weights", "weights_backbone"]),
    "mmdet_faster_rcnn_r50_fpn": (
        "mmdet.faster_rcnn",
        ["num_classes", "pretrained", "weights", "weights_backbone", "min_size", "max_size", "frozen_stages"],
    ),
    "mmdet_fpn_teacher_r50": ("mmdet.faster_rcnn", ["style", "min_size", "max_size"]),
    "mmdet_retinanet_r50_fpn": (
        "mmdet.retinanet",
        ["num_classes", "weights_backbone", "min_size", "max_size", "frozen_stages", "weights", "backbone_only"],
    ),
    "mmdet_fcos_r50_caffe_fpn_gn": (
        "mmdet.fcos",
        ["num_classes", "weights_backbone", "min_size", "max_size", "frozen_stages"],
    ),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_a_registered_variant_has_its_builders_signature_less_the_bound_arguments(name):
    module, leading = VARIANTS[name]
    entry = get_model_entry(name)
    params = inspect.signature(entry.fn).parameters
    assert list(params)[: len(leading)] == leading
    assert not {"label", "backbone", "detector", "depth", "name"} & set(params)
    assert entry.fn.__name__ == name and entry.module == f"diffkd.models.{module}"
    assert entry.fn.__doc__ and "see :func:`build" in entry.fn.__doc__


def test_a_variant_passes_positional_arguments_on_and_names_itself_in_errors():
    # both checks fail before anything is built
    with pytest.raises(ValueError, match=r"^retinanet_resnet101_fpn: p6_input='p7'"):
        get_model_entry("retinanet_resnet101_fpn").fn(91, False, None, None, 800, 1333, 3, True, "p7")
    with pytest.raises(ValueError, match=r"^mmdet_fcos_r101_caffe_fpn_gn: weights_backbone='IMAGENET1K_V1'"):
        get_model_entry("mmdet_fcos_r101_caffe_fpn_gn").fn(81, "IMAGENET1K_V1")
    with pytest.raises(TypeError, match="label"):
        get_model_entry("mmdet_faster_rcnn_r50_fpn").fn(label="mine")
