"""ImageNet registry entries (torchvision + timm) and the ``tv:`` / ``timm:`` fallbacks, without weights."""

from __future__ import annotations

from urllib.error import URLError

import pytest
import torch
from torch import nn

from diffkd.models import create_model, get_model_entry, list_models
from diffkd.models.imagenet import DISTILL_POINTS, WeightsDownloadError

IMAGENET_MODELS = [
    "tv_resnet18",
    "tv_resnet34",
    "tv_resnet50",
    "tv_resnet101",
    "tv_mobilenet_v2",
    "mobilenetv1_100",
    "mobilenetv2_100",
    "efficientnet_b0",
    "resnet50",
    "swin_tiny_patch4_window7_224",
    "swin_large_patch4_window7_224",
]
CNNS = [n for n in IMAGENET_MODELS if not n.startswith("swin")]

# Parameter counts at 1000 classes (the docstrings quote them rounded).
PARAMS = {
    "tv_resnet18": 11_689_512,
    "tv_resnet34": 21_797_672,
    "tv_resnet50": 25_557_032,
    "tv_resnet101": 44_549_160,
    "tv_mobilenet_v2": 3_504_872,
    "mobilenetv1_100": 4_231_976,
    "mobilenetv2_100": 3_504_872,
    "efficientnet_b0": 5_288_548,
    "resnet50": 25_557_032,
    "swin_tiny_patch4_window7_224": 28_288_354,
    "swin_large_patch4_window7_224": 196_532_476,
}


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _hooked(model: nn.Module, x: torch.Tensor, *modules: str) -> tuple[torch.Tensor, dict[str, tuple[int, ...]]]:
    """Run ``model(x)`` without grad; return the output and the output shape of each named module."""
    shapes: dict[str, tuple[int, ...]] = {}
    handles = [
        model.get_submodule(name).register_forward_hook(
            lambda _m, _i, out, name=name: shapes.__setitem__(name, tuple(out.shape))
        )
        for name in modules
    ]
    with torch.no_grad():
        y = model.eval()(x)
    for h in handles:
        h.remove()
    return y, shapes


def test_all_imagenet_models_registered() -> None:
    assert set(IMAGENET_MODELS) <= set(list_models(tag="imagenet"))
    assert set(DISTILL_POINTS) == set(IMAGENET_MODELS)
    for name in IMAGENET_MODELS:
        entry = get_model_entry(name)
        assert entry.module == "diffkd.models.imagenet"
        assert entry.fn.__doc__ and DISTILL_POINTS[name].feature in entry.fn.__doc__


# Lower bound of each feature point's activation: ReLU/ReLU6 maps are >= 0, SiLU's minimum is -0.2785.
FEATURE_MIN = {name: -0.28 if name == "efficientnet_b0" else 0.0 for name in CNNS}


@pytest.mark.parametrize("name", CNNS)
def test_cnn_logits_and_feature_point(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name)
    assert _n_params(model) == PARAMS[name]
    points = DISTILL_POINTS[name]
    # small real input: (B, 1000) logits, a post-activation feature map
    feats: dict[str, torch.Tensor] = {}
    handle = model.get_submodule(points.feature).register_forward_hook(lambda _m, _i, o: feats.__setitem__("f", o))
    y, _ = _hooked(model, torch.randn(2, 3, 64, 64))
    handle.remove()
    assert y.shape == (2, 1000) and y.dtype == torch.float32 and torch.isfinite(y).all()
    assert feats["f"].shape == (2, points.channels, 2, 2)
    assert feats["f"].min() >= FEATURE_MIN[name]
    # 224²: the documented (B, C, 7, 7) feature map and the logits module (shapes only: meta tensors)
    y, shapes = _hooked(model.to("meta"), torch.empty(1, 3, 224, 224, device="meta"), points.feature, points.logits)
    assert shapes[points.feature] == (1, *points.feature_shape) == (1, points.channels, 7, 7)
    assert shapes[points.logits] == (1, 1000) == tuple(y.shape)


def test_efficientnet_feature_point_is_after_bn_and_act() -> None:
    """timm EfficientNet-family: ``conv_head`` is the pre-BN conv, ``bn2`` = BN + activation (the hooked point)."""
    for name, act in (("efficientnet_b0", nn.SiLU), ("mobilenetv2_100", nn.ReLU6)):
        with torch.device("meta"):
            model = create_model(name)
        assert DISTILL_POINTS[name].feature == "bn2" and isinstance(model.bn2.act, act)
        assert isinstance(model.conv_head, nn.Conv2d)
    with torch.device("meta"):
        mbv1 = create_model("mobilenetv1_100")
    assert isinstance(mbv1.bn2, nn.Identity) and isinstance(mbv1.conv_head, nn.Identity)


def test_swin_tiny_224_channels_last_norm() -> None:
    model = create_model("swin_tiny_patch4_window7_224")
    assert _n_params(model) == PARAMS["swin_tiny_patch4_window7_224"]
    points = DISTILL_POINTS["swin_tiny_patch4_window7_224"]
    y, shapes = _hooked(model, torch.randn(1, 3, 224, 224), points.feature, points.logits)
    assert y.shape == (1, 1000)
    assert shapes["norm"] == (1, 7, 7, 768) and points.layout == "BHWC" and points.channels == 768
    assert shapes["head"] == (1, 1000)


def test_swin_large_on_meta_device() -> None:
    """Swin-L (197M parameters) is built on the meta device: shapes and parameter count, no memory or compute."""
    with torch.device("meta"):
        model = create_model("swin_large_patch4_window7_224")
        assert _n_params(model) == PARAMS["swin_large_patch4_window7_224"]
        y, shapes = _hooked(model, torch.empty(1, 3, 224, 224), "norm", "head")
    assert y.shape == (1, 1000)
    assert shapes["norm"] == (1, 7, 7, 1536) == (1, *DISTILL_POINTS["swin_large_patch4_window7_224"].feature_shape)


@pytest.mark.parametrize("name", ["tv_resnet18", "mobilenetv1_100"])
def test_num_classes(name: str) -> None:
    y, _ = _hooked(create_model(name, num_classes=10), torch.randn(2, 3, 64, 64))
    assert y.shape == (2, 10)


def test_kwargs_reach_the_builder() -> None:
    model = create_model("efficientnet_b0", drop_path_rate=0.2)
    assert model.blocks[-1][-1].drop_path.drop_prob == pytest.approx(0.2 * 15 / 16)
    model = create_model("tv_mobilenet_v2", width_mult=0.5)
    assert _n_params(model) < PARAMS["tv_mobilenet_v2"]


@pytest.mark.parametrize(
    ("name", "n_params"),
    [("tv:resnet18", PARAMS["tv_resnet18"]), ("tv:squeezenet1_0", None), ("timm:resnet18", None)],
)
def test_prefix_fallbacks(name: str, n_params: int | None) -> None:
    entry = get_model_entry(name)
    assert entry.name == name and entry.tags == (name.split(":")[0],)
    model = create_model(name, num_classes=7)
    y, _ = _hooked(model, torch.randn(2, 3, 64, 64))
    assert y.shape == (2, 7)
    if n_params is not None:
        assert _n_params(create_model(name)) == n_params


def test_timm_fallback_with_pretrained_tag_in_name() -> None:
    model = create_model("timm:resnet50.a1_in1k", num_classes=5)  # the tag names weights; not loaded here
    assert model.pretrained_cfg["tag"] == "a1_in1k"
    assert model.fc.out_features == 5


@pytest.mark.parametrize("name", ["tv:not_a_model", "timm:not_a_model", "tv:fasterrcnn_resnet50_fpn"])
def test_prefix_unknown_names(name: str) -> None:
    with pytest.raises(KeyError, match=r"not_a_model|fasterrcnn"):
        get_model_entry(name)


def test_unknown_name_mentions_prefixes() -> None:
    with pytest.raises(KeyError, match=r"tv:<name>") as err:
        get_model_entry("tv_resnet33")
    assert "tv_resnet34" in str(err.value) and "timm:<name>" in str(err.value)


# ------------------------------------------------------------------------------- pretrained (offline)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every weight download fail the way it does without network, whatever this machine can reach."""
    import timm.models._builder as timm_builder
    import torchvision.models._api as tv_api

    def no_url(url: str, *args, **kwargs):
        raise URLError(f"[Errno -2] Name or service not known: {url}")

    def no_hub(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(tv_api, "load_state_dict_from_url", no_url)
    monkeypatch.setattr(timm_builder, "load_pretrained", no_hub)


@pytest.mark.parametrize(
    ("name", "weights", "expected"),
    [
        ("tv_resnet34", None, "ResNet34_Weights.IMAGENET1K_V1"),
        ("tv_resnet50", None, "ResNet50_Weights.IMAGENET1K_V1"),
        ("tv_resnet50", "IMAGENET1K_V2", "ResNet50_Weights.IMAGENET1K_V2"),
        ("tv_mobilenet_v2", None, "MobileNet_V2_Weights.IMAGENET1K_V1"),
        ("tv:resnet18", None, "ResNet18_Weights.IMAGENET1K_V1"),  # DEFAULT
        ("resnet50", None, "resnet50.a1_in1k"),
        ("resnet50", "a2_in1k", "resnet50.a2_in1k"),
        ("swin_large_patch4_window7_224", None, "swin_large_patch4_window7_224.ms_in22k_ft_in1k"),
        ("mobilenetv1_100", None, "mobilenetv1_100.ra4_e3600_r224_in1k"),
        ("timm:resnet50.a1_in1k", None, "resnet50.a1_in1k"),
    ],
)
def test_pretrained_offline_error_names_the_weights(offline, name: str, weights: str | None, expected: str) -> None:
    kwargs = {} if weights is None else {"weights": weights}
    if name.startswith("swin_large"):
        with torch.device("meta"), pytest.raises(WeightsDownloadError) as err:
            create_model(name, pretrained=True, **kwargs)
    else:
        with pytest.raises(WeightsDownloadError) as err:
            create_model(name, pretrained=True, **kwargs)
    msg = str(err.value)
    assert expected in msg and "first use" in msg and "network" in msg
    assert isinstance(err.value, OSError) and err.value.__cause__ is not None


def test_pretrained_unknown_weights() -> None:
    with pytest.raises(ValueError, match="IMAGENET1K_V1"):
        create_model("tv_resnet34", pretrained=True, weights="IMAGENET1K_V9")
    with pytest.raises(ValueError, match="a1_in1k"):
        create_model("resnet50", pretrained=True, weights="nope_in1k")


def test_weights_ignored_without_pretrained() -> None:
    assert create_model("tv_resnet18", weights="IMAGENET1K_V1").fc.out_features == 1000


def test_pretrained_head_resized(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision weights have 1000 classes; another num_classes loads them and re-initialises the classifier."""
    import torchvision.models._api as tv_api

    from diffkd.models.imagenet import build_torchvision

    state = build_torchvision("mobilenet_v2").state_dict()
    monkeypatch.setattr(tv_api, "load_state_dict_from_url", lambda url, *a, **k: state)
    model = create_model("tv_mobilenet_v2", num_classes=10, pretrained=True)
    assert model.classifier[1].out_features == 10
    torch.testing.assert_close(model.features[0][0].weight, state["features.0.0.weight"])
