"""Registered entry points built by a family factory (``diffkd.models.variants``) look and act like hand-written ones:
each module attribute is the registered function, under its own name, module and docstring, with the family's
signature and defaults, and the errors name the registered model."""

from __future__ import annotations

import importlib
import inspect

import pytest

from diffkd.models import list_models
from diffkd.models.registry import get_model_entry

# family: (modules, parameters in order, defaults that differ per family)
FAMILIES: dict[str, tuple[tuple[str, ...], tuple[str, ...], dict[str, object]]] = {
    "cifar": (
        tuple(
            f"diffkd.models.cifar.{m}"
            for m in ("resnet", "resnetv2", "wrn", "vgg", "shufflenetv1", "shufflenetv2", "mobilenetv2")
        ),
        ("num_classes", "pretrained", "kwargs"),
        {"num_classes": 100, "pretrained": False},
    ),
    "small": (("diffkd.models.small",), ("num_classes", "pretrained", "kwargs"), {"num_classes": 10}),
    "imagenet": (
        ("diffkd.models.imagenet",),
        ("num_classes", "pretrained", "weights", "kwargs"),
        {"num_classes": 1000, "weights": None},
    ),
    "cirkd": (
        ("diffkd.models.segmentation.cirkd",),
        ("num_classes", "pretrained", "aux", "backbone_weights", "backbone_drop_classifier", "norm_layer"),
        {"num_classes": 19, "backbone_weights": None},
    ),
    "torchvision": (
        ("diffkd.models.segmentation.tv_models",),
        ("num_classes", "pretrained", "aux", "weights", "weights_backbone", "kwargs"),
        {"num_classes": 19, "aux": True},
    ),
}
# registered under another name than the function's
ALIASES = {"MobileNetV2": "mobile_half"}


def _entries(tag: str, modules: tuple[str, ...]) -> list[str]:
    names = [n for n in list_models(tag=tag) if get_model_entry(n).module in modules]
    assert names, f"no entries tagged {tag!r} in {modules}"
    return names


@pytest.mark.parametrize("tag", sorted(FAMILIES))
def test_entries_look_hand_written(tag: str) -> None:
    modules, params, defaults = FAMILIES[tag]
    for name in _entries(tag, modules):
        fn = get_model_entry(name).fn
        fn_name = ALIASES.get(name, name)
        module = importlib.import_module(fn.__module__)
        assert fn.__name__ == fn.__qualname__ == fn_name, name
        assert fn.__module__ in modules and getattr(module, fn_name) is fn, name
        assert fn.__doc__ and fn.__doc__.strip(), name
        sig = inspect.signature(fn)
        assert tuple(sig.parameters) == params, name
        for p, value in defaults.items():
            assert sig.parameters[p].default == value, (name, p)
        assert sig.return_annotation not in (inspect.Signature.empty, "None"), name


def test_cifar_errors_name_the_registered_model() -> None:
    with pytest.raises(ValueError, match=r"^MobileNetV2: .*cifar_teachers/MobileNetV2_vanilla"):
        get_model_entry("MobileNetV2").fn(pretrained=True)
    with pytest.raises(ValueError, match=r"^vgg13: "):
        get_model_entry("vgg13").fn(pretrained=True)


def test_cifar_teacher_tags_follow_the_published_checkpoints() -> None:
    assert set(list_models(tag="cifar_teacher")) == {
        "resnet56",
        "resnet110",
        "resnet32x4",
        "wrn_40_2",
        "vgg13",
        "ResNet50",
    }


def test_family_defaults_per_entry() -> None:
    cirkd = inspect.signature(get_model_entry("cirkd_deeplabv3_mobilenetv2").fn)
    assert cirkd.parameters["aux"].default is False
    assert inspect.signature(get_model_entry("cirkd_psp_resnet18").fn).parameters["aux"].default is True
    with pytest.raises(ValueError, match="no aux head"):
        get_model_entry("cirkd_deeplabv3_mobilenetv2").fn(aux=True)
    with pytest.raises(ValueError, match=r"^smallcnn_student has no published weights"):
        get_model_entry("smallcnn_student").fn(pretrained=True)
