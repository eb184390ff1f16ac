"""Segmentation zoo: CIRKD models (paper Table 6) and torchvision DeepLabV3 entries, on CPU without weights.

The key lists below are the compatibility contract with CIRKD commit 05a2753 (github.com/winycg/CIRKD:
``models/base_models/resnetv1b.py``, ``models/base_models/mobilenetv2.py``, ``models/deeplabv3.py``,
``models/deeplabv3_mobile.py``, ``models/pspnet.py``), derived here from those definitions rather than from our
modules: CIRKD's released checkpoints are ``model.state_dict()`` of exactly these modules.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffkd.models import create_model, get_model_entry, list_models
from diffkd.models.imagenet import WeightsDownloadError
from diffkd.models.segmentation import CIRKD_WEIGHTS, CIRKDSegmentationModel

CIRKD = ["cirkd_deeplabv3_resnet101", "cirkd_deeplabv3_resnet18", "cirkd_psp_resnet18", "cirkd_deeplabv3_mobilenetv2"]
TV = ["tv_deeplabv3_resnet50", "tv_deeplabv3_resnet101", "tv_deeplabv3_mobilenet_v3_large"]
FAST = ["cirkd_deeplabv3_resnet18", "cirkd_psp_resnet18", "cirkd_deeplabv3_mobilenetv2"]
SLOW = pytest.mark.slow

# Paper Table 6 / CIRKD's logged "Params: %.2fM" (aux head included), and the exact counts at K=19.
PAPER_PARAMS_M = {
    "cirkd_deeplabv3_resnet101": 61.12,
    "cirkd_deeplabv3_resnet18": 13.61,
    "cirkd_psp_resnet18": 12.92,
    "cirkd_deeplabv3_mobilenetv2": 3.23,
}
PARAMS = {
    "cirkd_deeplabv3_resnet101": 61_118_950,
    "cirkd_deeplabv3_resnet18": 13_607_974,
    "cirkd_psp_resnet18": 12_919_334,
    "cirkd_deeplabv3_mobilenetv2": 3_233_171,
}
PARAMS_NO_AUX_M = {"cirkd_deeplabv3_resnet101": 58.75, "cirkd_deeplabv3_resnet18": 13.46, "cirkd_psp_resnet18": 12.77}

X_SHAPE = (1, 3, 64, 128)  # H != W, stride-8 logits (8, 16)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- CIRKD state-dict key derivation


def _bn(p: str) -> list[str]:
    return [f"{p}.weight", f"{p}.bias", f"{p}.running_mean", f"{p}.running_var", f"{p}.num_batches_tracked"]


def _conv_bn(conv: str, bn: str) -> list[str]:
    return [f"{conv}.weight", *_bn(bn)]


def cirkd_resnet_keys(layers: tuple[int, ...], bottleneck: bool) -> list[str]:
    """``ResNetV1b(deep_stem=True)``: conv1/bn1, conv2/bn2, conv3/bn3 stem; blocks conv{i}/bn{i}; every stage's
    first block has ``downsample.0`` (1×1) / ``downsample.1`` (BN) (layer1 too: the stem ends at 128 channels)."""
    keys = _conv_bn("conv1", "bn1") + _conv_bn("conv2", "bn2") + _conv_bn("conv3", "bn3")
    for li, n in enumerate(layers, 1):
        for b in range(n):
            p = f"layer{li}.{b}"
            for c in range(1, 4 if bottleneck else 3):
                keys += _conv_bn(f"{p}.conv{c}", f"{p}.bn{c}")
            if b == 0:
                keys += _conv_bn(f"{p}.downsample.0", f"{p}.downsample.1")
    return keys


def cirkd_mobilenetv2_keys() -> list[str]:
    """``MobileNetV2().features`` without the final 1×1: ``features.0`` conv_bn, then 17 ``InvertedResidual.conv``
    Sequentials (conv.0/1, conv.3/4 for t=1; conv.0/1, conv.3/4, conv.6/7 otherwise)."""
    keys = _conv_bn("features.0.0", "features.0.1")
    for i in range(1, 18):
        for c in (0, 3) if i == 1 else (0, 3, 6):
            keys += _conv_bn(f"features.{i}.conv.{c}", f"features.{i}.conv.{c + 1}")
    return keys


def cirkd_aspp_keys(p: str) -> list[str]:
    keys = _conv_bn(f"{p}.b0.0", f"{p}.b0.1")
    for b in (1, 2, 3):
        keys += _conv_bn(f"{p}.b{b}.block.0", f"{p}.b{b}.block.1")
    return keys + _conv_bn(f"{p}.b4.gap.1", f"{p}.b4.gap.2") + _conv_bn(f"{p}.project.0", f"{p}.project.1")


def cirkd_fcn_keys(p: str) -> list[str]:
    return [*_conv_bn(f"{p}.block.0", f"{p}.block.1"), f"{p}.block.4.weight", f"{p}.block.4.bias"]


def cirkd_keys(name: str) -> list[str]:
    """The full ``state_dict`` key list of CIRKD's model for registry ``name`` (aux on for ResNets)."""
    if name == "cirkd_deeplabv3_mobilenetv2":
        backbone = ["pretrained.net." + k for k in cirkd_mobilenetv2_keys()]
    else:
        layers, bottleneck = ((3, 4, 23, 3), True) if name.endswith("resnet101") else ((2, 2, 2, 2), False)
        backbone = ["pretrained." + k for k in cirkd_resnet_keys(layers, bottleneck)]
    if name == "cirkd_psp_resnet18":
        head = [k for i in range(1, 5) for k in _conv_bn(f"head.psp.conv{i}.0", f"head.psp.conv{i}.1")]
        head += [*_conv_bn("head.block.0", "head.block.1"), "head.classifier.weight", "head.classifier.bias"]
    else:
        head = cirkd_aspp_keys("head.aspp") + _conv_bn("head.block.0", "head.block.1")
        head += ["head.block.4.weight", "head.block.4.bias"]
    aux = [] if name == "cirkd_deeplabv3_mobilenetv2" else cirkd_fcn_keys("auxlayer")
    return backbone + head + aux


# key totals (backbone, whole model) and sample shapes at K=19
KEY_COUNTS = {
    "cirkd_deeplabv3_resnet101": (636, 688),
    "cirkd_deeplabv3_resnet18": (138, 190),
    "cirkd_psp_resnet18": (138, 178),
    "cirkd_deeplabv3_mobilenetv2": (306, 350),
}
SAMPLE_SHAPES = {
    "cirkd_deeplabv3_resnet101": {
        "pretrained.conv1.weight": (64, 3, 3, 3),
        "pretrained.conv3.weight": (128, 64, 3, 3),
        "pretrained.layer1.0.downsample.0.weight": (256, 128, 1, 1),
        "pretrained.layer3.22.conv2.weight": (256, 256, 3, 3),
        "pretrained.layer4.2.bn3.running_var": (2048,),
        "head.aspp.b0.0.weight": (256, 2048, 1, 1),
        "head.aspp.b3.block.0.weight": (256, 2048, 3, 3),
        "head.aspp.b4.gap.1.weight": (256, 2048, 1, 1),
        "head.aspp.project.0.weight": (256, 1280, 1, 1),
        "head.block.0.weight": (256, 256, 3, 3),
        "head.block.4.weight": (19, 256, 1, 1),
        "auxlayer.block.0.weight": (256, 1024, 3, 3),
        "auxlayer.block.4.bias": (19,),
    },
    "cirkd_deeplabv3_resnet18": {
        "pretrained.layer1.0.downsample.0.weight": (64, 128, 1, 1),
        "pretrained.layer4.1.conv2.weight": (512, 512, 3, 3),
        "head.aspp.b0.0.weight": (128, 512, 1, 1),
        "head.aspp.project.0.weight": (128, 640, 1, 1),
        "head.block.4.weight": (19, 128, 1, 1),
        "auxlayer.block.0.weight": (64, 256, 3, 3),
        "auxlayer.block.4.weight": (19, 64, 1, 1),
    },
    "cirkd_psp_resnet18": {
        "head.psp.conv1.0.weight": (128, 512, 1, 1),
        "head.psp.conv4.1.running_mean": (128,),
        "head.block.0.weight": (128, 1024, 3, 3),
        "head.classifier.weight": (19, 128, 1, 1),
        "auxlayer.block.0.weight": (64, 256, 3, 3),
    },
    "cirkd_deeplabv3_mobilenetv2": {
        "pretrained.net.features.0.0.weight": (32, 3, 3, 3),
        "pretrained.net.features.1.conv.0.weight": (32, 1, 3, 3),
        "pretrained.net.features.17.conv.0.weight": (960, 160, 1, 1),
        "pretrained.net.features.17.conv.6.weight": (320, 960, 1, 1),
        "head.aspp.b0.0.weight": (128, 320, 1, 1),
        "head.block.4.bias": (19,),
    },
}


@pytest.fixture(scope="module")
def built() -> dict[str, nn.Module]:
    """One default (K=19) instance of each CIRKD model, in eval mode."""
    return {name: create_model(name).eval() for name in CIRKD}


# ------------------------------------------------------------------------------------------------ registry


def test_registry_lists_segmentation_models() -> None:
    assert set(CIRKD + TV) <= set(list_models(tag="segmentation"))
    assert list_models("cirkd_*") == sorted(CIRKD)
    for name in CIRKD:
        entry = get_model_entry(name)
        assert "segmentation" in entry.tags
        assert entry.module == "diffkd.models.segmentation.cirkd"
    for name in TV:
        assert {"segmentation", "torchvision"} <= set(get_model_entry(name).tags)
    # segmentation models do not leak into the classification listings
    assert not set(CIRKD + TV) & set(list_models(tag="imagenet"))


# --------------------------------------------------------------------------------------- parameter counts


@pytest.mark.parametrize("name", CIRKD)
def test_param_counts_match_paper_table6(built: dict[str, nn.Module], name: str) -> None:
    n = _n_params(built[name])
    assert n == PARAMS[name]
    assert round(n / 1e6, 2) == PAPER_PARAMS_M[name]


@pytest.mark.parametrize("name", sorted(PARAMS_NO_AUX_M))
def test_param_counts_without_aux(name: str) -> None:
    model = create_model(name, aux=False)
    assert not hasattr(model, "auxlayer")
    assert round(_n_params(model) / 1e6, 2) == PARAMS_NO_AUX_M[name]


# ------------------------------------------------------------------------------------- key-name contract


@pytest.mark.parametrize("name", CIRKD)
def test_state_dict_keys_are_cirkds(built: dict[str, nn.Module], name: str) -> None:
    model = built[name]
    sd = model.state_dict()
    expected = cirkd_keys(name)
    assert list(sd) == expected  # same keys, same order as CIRKD's module definitions
    n_backbone, n_total = KEY_COUNTS[name]
    assert len(sd) == n_total
    assert sum(k.startswith("pretrained.") for k in sd) == n_backbone
    for key, shape in SAMPLE_SHAPES[name].items():
        assert tuple(sd[key].shape) == shape, key


def test_dilation_pattern_is_cirkds(built: dict[str, nn.Module]) -> None:
    """CIRKD ``_make_layer``: the first block of a dilated stage keeps the previous dilation on its first dilated
    conv; MobileNetV2 ``_nostride_dilate``: blocks 7-13 dilation 2 (7 only un-strided), 14-17 dilation 4 (14: 2)."""
    r18 = built["cirkd_deeplabv3_resnet18"].pretrained
    assert [(c.stride[0], c.dilation[0]) for c in (r18.layer3[0].conv1, r18.layer3[0].conv2)] == [(1, 1), (1, 2)]
    assert [(c.stride[0], c.dilation[0]) for c in (r18.layer3[1].conv1, r18.layer3[1].conv2)] == [(1, 2), (1, 2)]
    assert [(c.stride[0], c.dilation[0]) for c in (r18.layer4[0].conv1, r18.layer4[0].conv2)] == [(1, 2), (1, 4)]
    assert [(c.stride[0], c.dilation[0]) for c in (r18.layer4[1].conv1, r18.layer4[1].conv2)] == [(1, 4), (1, 4)]
    r101 = built["cirkd_deeplabv3_resnet101"].pretrained
    assert [(b.conv2.stride[0], b.conv2.dilation[0]) for b in r101.layer3[:2]] == [(1, 1), (1, 2)]
    assert [(b.conv2.stride[0], b.conv2.dilation[0]) for b in r101.layer4] == [(1, 2), (1, 4), (1, 4)]
    feats = built["cirkd_deeplabv3_mobilenetv2"].pretrained.net.features
    dw = {i: feats[i].conv[0 if i == 1 else 3] for i in range(1, 18)}
    assert [(dw[i].stride[0], dw[i].dilation[0], dw[i].padding[0]) for i in (2, 4, 7, 8, 13, 14, 15, 17)] == [
        (2, 1, 1),
        (2, 1, 1),
        (1, 1, 1),
        (1, 2, 2),
        (1, 2, 2),
        (1, 2, 2),
        (1, 4, 4),
        (1, 4, 4),
    ]


# ------------------------------------------------------------------------------------------- forward pass


def _hooked(model: nn.Module, x: torch.Tensor, modules: list[str]) -> tuple[dict, dict[str, torch.Tensor]]:
    """``model(x)`` without grad in eval mode, plus the output of each named module (cloned: ReLUs are inplace)."""
    outs: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(m).register_forward_hook(lambda _m, _i, o, m=m: outs.__setitem__(m, o.detach().clone()))
        for m in modules
    ]
    try:
        with torch.no_grad():
            y = model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return y, outs


def _check_forward(model: nn.Module, name: str) -> None:
    x = torch.randn(X_SHAPE)
    _, _, h, w = X_SHAPE
    modules = [f["module"] for f in model.feature_info] + list(model.logits_modules.values())
    y, outs = _hooked(model, x, modules)
    assert set(y) == set(model.logits_modules)
    s = model.output_stride
    for key, logits in y.items():
        assert tuple(logits.shape) == (1, 19, h // s, w // s), key
        assert torch.isfinite(logits).all()
        raw = outs[model.logits_modules[key]]
        if s > 1:
            assert torch.equal(raw, logits)
        else:  # torchvision upsamples the head's logits to the input size
            up = F.interpolate(raw, (h, w), mode="bilinear", align_corners=model.align_corners)
            torch.testing.assert_close(up, logits)
    assert model.output_fmt == "NCHW"
    assert len(model.feature_info) == 5  # c1..c4 + head feature
    for f in model.feature_info:
        assert set(f) == {"num_chs", "reduction", "module"}
        assert tuple(outs[f["module"]].shape) == (1, f["num_chs"], h // f["reduction"], w // f["reduction"]), f


@pytest.mark.parametrize("name", [*FAST, pytest.param("cirkd_deeplabv3_resnet101", marks=SLOW)])
def test_cirkd_forward_contract(built: dict[str, nn.Module], name: str) -> None:
    model = built[name]
    assert isinstance(model, CIRKDSegmentationModel)
    assert model.output_stride == 8 and model.align_corners is True
    assert model.aux == (name != "cirkd_deeplabv3_mobilenetv2")
    assert model.backbone is model.pretrained
    _check_forward(model, name)


def test_feature_info_values(built: dict[str, nn.Module]) -> None:
    chs = {n: [f["num_chs"] for f in built[n].feature_info] for n in CIRKD}
    assert chs == {
        "cirkd_deeplabv3_resnet101": [256, 512, 1024, 2048, 256],
        "cirkd_deeplabv3_resnet18": [64, 128, 256, 512, 128],
        "cirkd_psp_resnet18": [64, 128, 256, 512, 128],
        "cirkd_deeplabv3_mobilenetv2": [24, 32, 96, 320, 128],
    }
    assert [f["reduction"] for f in built["cirkd_psp_resnet18"].feature_info] == [4, 8, 8, 8, 8]
    assert built["cirkd_deeplabv3_resnet18"].feature_info[-1]["module"] == "head.block.3"
    assert built["cirkd_psp_resnet18"].logits_modules == {"out": "head.classifier", "aux": "auxlayer.block.4"}


@pytest.mark.parametrize("name", ["cirkd_deeplabv3_mobilenetv2", "cirkd_psp_resnet18"])
def test_train_forward_backward_reaches_every_parameter(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=5).train()
    x = torch.randn(2, 3, 48, 64)  # batch 2: BatchNorm after the 1×1 pooled branches needs >1 value per channel
    y = model(x)
    loss = sum(v.float().pow(2).mean() for v in y.values())
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert no_grad == []
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "bn" not in n)


def test_num_classes_and_mobilenet_has_no_aux() -> None:
    model = create_model("cirkd_deeplabv3_resnet18", num_classes=7, aux=False)
    assert model.num_classes == 7 and set(model.logits_modules) == {"out"}
    assert model.state_dict()["head.block.4.weight"].shape[0] == 7
    with pytest.raises(ValueError, match="no aux head"):
        create_model("cirkd_deeplabv3_mobilenetv2", aux=True)


def test_sync_batchnorm_keeps_the_keys(built: dict[str, nn.Module]) -> None:
    model = create_model("cirkd_deeplabv3_resnet18", norm_layer=nn.SyncBatchNorm)
    assert list(model.state_dict()) == list(built["cirkd_deeplabv3_resnet18"].state_dict())
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and all(isinstance(m, nn.SyncBatchNorm) for m in bns)


# ----------------------------------------------------------------------------------------------- weights


@pytest.mark.parametrize("name", CIRKD)
def test_pretrained_true_says_where_cirkd_publishes_weights(name: str) -> None:
    with pytest.raises(WeightsDownloadError) as e:
        create_model(name, pretrained=True)
    msg = str(e.value)
    assert "Google Drive" in msg and CIRKD_WEIGHTS[name].model_url in msg
    assert "pretrained='/path/to/file.pth'" in msg and "backbone_weights=" in msg
    assert "winycg/CIRKD" in msg


def test_pretrained_path_loads_a_cirkd_checkpoint_strictly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    src = create_model("cirkd_psp_resnet18")
    for p in src.parameters():
        p.data.normal_()
    path = tmp_path / "kd_psp_resnet18_citys_best_model.pth"
    torch.save(src.state_dict(), path)  # CIRKD's save_checkpoint: a bare state_dict
    model = create_model("cirkd_psp_resnet18", pretrained=str(path))
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in model.state_dict().items())
    torch.save({k: v for k, v in src.state_dict().items() if not k.startswith("auxlayer")}, path)
    with pytest.raises(RuntimeError, match=r"missing keys \(7\): auxlayer\.block\.0\.weight"):
        create_model("cirkd_psp_resnet18", pretrained=path)


def _imagenet_file(model: CIRKDSegmentationModel, mobilenet: bool) -> dict[str, torch.Tensor]:
    """A CIRKD/CSAIL-format ImageNet backbone file: the backbone keys plus the classifier they drop."""
    target = model.pretrained.net if mobilenet else model.pretrained
    sd = {k: torch.randn_like(v.float()).to(v.dtype) for k, v in target.state_dict().items()}
    if mobilenet:
        sd |= {
            "features.18.0.weight": torch.randn(1280, 320, 1, 1),
            **{f"features.18.1.{s}": torch.ones(1280) for s in ("weight", "bias", "running_mean", "running_var")},
        }
        sd |= {"classifier.1.weight": torch.randn(1000, 1280), "classifier.1.bias": torch.zeros(1000)}
    else:
        sd |= {"fc.weight": torch.randn(1000, 512), "fc.bias": torch.zeros(1000)}
    return sd


@pytest.mark.parametrize("name", ["cirkd_deeplabv3_resnet18", "cirkd_deeplabv3_mobilenetv2"])
def test_backbone_weights_round_trip(tmp_path: Path, name: str) -> None:
    mobilenet = name.endswith("mobilenetv2")
    ref = create_model(name)
    sd = _imagenet_file(ref, mobilenet)
    path = tmp_path / ("mobilenetv2-imagenet.pth" if mobilenet else "resnet18-imagenet.pth")
    torch.save(sd, path)

    # strict by default: the classifier keys are reported, with the flag that drops them
    with pytest.raises(RuntimeError) as e:
        create_model(name, backbone_weights=path)
    msg = str(e.value)
    assert "unexpected keys" in msg and "backbone_drop_classifier=True" in msg
    assert ("classifier.1.weight" if mobilenet else "fc.weight") in msg

    model = create_model(name, backbone_weights=str(path), backbone_drop_classifier=True)
    target = model.pretrained.net if mobilenet else model.pretrained
    assert all(torch.equal(v, sd[k]) for k, v in target.state_dict().items())

    # files from before PyTorch 0.4.1 have no num_batches_tracked; a missing real key is an error naming it
    old = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    model.load_backbone_weights(old, drop_classifier=True)
    del old[next(iter(target.state_dict()))]
    with pytest.raises(RuntimeError, match=r"missing keys \(1\)"):
        model.load_backbone_weights(old, drop_classifier=True)
    model.load_backbone_weights(old, strict=False, drop_classifier=True)


def test_backbone_shape_mismatch_names_file_and_model_shapes() -> None:
    model = create_model("cirkd_deeplabv3_resnet18")
    sd = _imagenet_file(model, mobilenet=False)
    sd["conv1.weight"] = torch.zeros(64, 3, 5, 5)
    with pytest.raises(
        RuntimeError, match=r"shape mismatches \(1\): conv1\.weight: file \(64, 3, 5, 5\) vs model \(64, 3, 3, 3\)"
    ):
        model.load_backbone_weights(sd, drop_classifier=True, strict=False)  # shapes raise even when not strict


def test_backbone_weights_reject_torchvision_resnet() -> None:
    tv = create_model("tv_resnet18").state_dict()  # standard 7×7 stem: not CIRKD's deep-stem backbone
    with pytest.raises(RuntimeError, match="deep-stem"):
        create_model("cirkd_deeplabv3_resnet18").load_backbone_weights(tv, drop_classifier=True)


# ------------------------------------------------------------------------------------------- torchvision


@pytest.mark.parametrize(
    "name",
    [
        "tv_deeplabv3_mobilenet_v3_large",
        pytest.param("tv_deeplabv3_resnet50", marks=SLOW),
        pytest.param("tv_deeplabv3_resnet101", marks=SLOW),
    ],
)
def test_torchvision_deeplabv3_entries(name: str) -> None:
    model = create_model(name)
    assert model.align_corners is False and model.output_stride == 1 and model.aux
    _check_forward(model, name)


def test_torchvision_deeplabv3_options() -> None:
    model = create_model("tv_deeplabv3_mobilenet_v3_large", num_classes=21, aux=False)
    assert model.aux_classifier is None and set(model.logits_modules) == {"out"}
    with_aux = create_model("tv_deeplabv3_mobilenet_v3_large", num_classes=21, aux_loss=True)
    assert _n_params(with_aux) == 11_029_328  # torchvision's documented count
    assert _n_params(with_aux) - _n_params(model) == (40 * 10 * 9 + 2 * 10) + (10 * 21 + 21)  # FCNHead(40, 21)
