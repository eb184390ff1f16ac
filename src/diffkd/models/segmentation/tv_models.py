"""torchvision's DeepLabV3 models under registry names (``tv:<name>`` covers classification models only).

Registered (tags ``"segmentation"``, ``"torchvision"``), each ``fn(num_classes=19, pretrained=False, aux=True,
weights=None, weights_backbone=None, **kwargs)``:

* ``tv_deeplabv3_resnet50``, ``tv_deeplabv3_resnet101`` — standard-stem ResNet dilated to stride 8, ASPP 256
  without CIRKD's Dropout(0.1), aux FCN head on ``layer3``.
* ``tv_deeplabv3_mobilenet_v3_large`` — MobileNetV3-Large dilated to stride 16, aux head on ``features.4``.

These are **not** CIRKD's models (other stem, widths, dropout; see ``cirkd.py``). They return torchvision's
``{"out": (B, K, H, W), "aux": (B, K, H, W)}`` already upsampled to the input size with ``align_corners=False``:
hence ``model.output_stride = 1`` (stride of the returned logits) and ``model.align_corners = False``. The
attributes ``feature_info`` (backbone stages and the head feature), ``output_fmt`` and ``logits_modules`` are set
on the torchvision module as for the CIRKD models.

``pretrained=True`` loads ``weights`` (default ``"DEFAULT"``: COCO subset with the 21 VOC classes, downloaded on
first use); with ``num_classes != 21`` the last 1×1 convs of ``classifier`` and ``aux_classifier`` are replaced by
fresh ones. ``weights_backbone`` (e.g. ``"IMAGENET1K_V1"``) initialises the backbone only, without ``pretrained``;
torchvision's own default would download it, here it is ``None``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from diffkd.models.imagenet import WeightsDownloadError
from diffkd.models.variants import entry_point

__all__ = ["build_torchvision_segmentation"]

_TAGS = ("segmentation", "torchvision")
_CLASSES = 19

# backbone stages (module, channels, reduction) of the IntermediateLayerGetter, then the head feature
_RESNET_FEATURES = [
    ("backbone.layer1", 256, 4),
    ("backbone.layer2", 512, 8),
    ("backbone.layer3", 1024, 8),
    ("backbone.layer4", 2048, 8),
    ("classifier.3", 256, 8),
]
_FEATURES: dict[str, list[tuple[str, int, int]]] = {
    "deeplabv3_resnet50": _RESNET_FEATURES,
    "deeplabv3_resnet101": _RESNET_FEATURES,
    "deeplabv3_mobilenet_v3_large": [
        ("backbone.3", 24, 4),
        ("backbone.6", 40, 8),
        ("backbone.12", 112, 16),
        ("backbone.16", 960, 16),
        ("classifier.3", 256, 16),
    ],
}


def _replace_last_conv(head: nn.Sequential, num_classes: int) -> None:
    old = head[-1]
    head[-1] = nn.Conv2d(old.in_channels, num_classes, 1)


def build_torchvision_segmentation(
    arch: str,
    num_classes: int = _CLASSES,
    pretrained: bool = False,
    aux: bool = True,
    weights: str | None = None,
    weights_backbone: str | None = None,
    *,
    label: str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build the torchvision segmentation model ``arch`` with the CIRKD-model attributes added.

    Args:
        arch: ``deeplabv3_resnet50``, ``deeplabv3_resnet101`` or ``deeplabv3_mobilenet_v3_large``.
        num_classes: K.
        pretrained: load ``weights`` (``"DEFAULT"`` when ``None``); downloads on first use.
        aux: keep the aux FCN head (``aux_loss`` in torchvision).
        weights: member name of the model's weights enum (``"COCO_WITH_VOC_LABELS_V1"``); read only when
            ``pretrained``.
        weights_backbone: backbone weights enum member name (``"IMAGENET1K_V1"``) when not ``pretrained``.
        label: the name shown in error messages.
        **kwargs: passed to the torchvision builder.

    Returns:
        the model; ``forward(x (B, 3, H, W)) -> {"out": (B, K, H, W)[, "aux": (B, K, H, W)]}``.
    """
    import torchvision
    from torchvision.models import segmentation

    label = label or arch
    if arch not in _FEATURES:
        raise KeyError(f"{arch!r} is not one of the wrapped torchvision segmentation models {sorted(_FEATURES)}")
    if "aux_loss" in kwargs:
        aux = bool(kwargs.pop("aux_loss"))
    try:
        if pretrained:
            enum = torchvision.models.get_model_weights(arch)
            choice = weights or "DEFAULT"
            try:
                w = enum.verify(choice)
            except (KeyError, ValueError) as e:
                names = ", ".join(["DEFAULT", *(m.name for m in enum)])
                raise ValueError(f"unknown weights {choice!r} for {label}; {enum.__name__} has: {names}") from e
            where = f"weights {w} from {w.url}"
            # torchvision insists on the weights' 21 classes and the aux head; adapt afterwards
            model = getattr(segmentation, arch)(weights=w, **kwargs)
            if num_classes != len(w.meta["categories"]):
                _replace_last_conv(model.classifier, num_classes)
                if model.aux_classifier is not None:
                    _replace_last_conv(model.aux_classifier, num_classes)
            if not aux:
                model.aux_classifier = None
        else:
            where = f"backbone weights {weights_backbone}"
            model = getattr(segmentation, arch)(
                weights=None, weights_backbone=weights_backbone, num_classes=num_classes, aux_loss=aux, **kwargs
            )
    except OSError as e:
        import torch

        raise WeightsDownloadError(
            f"could not load the {where} for {label}: {str(e).rstrip('.')}. torchvision weights download on first "
            f"use into {torch.hub.get_dir()}/checkpoints ($TORCH_HOME) and need network access once."
        ) from e

    *stages, head = _FEATURES[arch]
    model.feature_info = [{"num_chs": c, "reduction": r, "module": m} for m, c, r in (*stages, head)]
    model.output_stride = 1
    model.align_corners = False
    model.output_fmt = "NCHW"
    model.num_classes = num_classes
    model.aux = model.aux_classifier is not None
    model.logits_modules = {"out": "classifier.4"} | ({"aux": "aux_classifier.4"} if model.aux else {})
    return model


def _tv(arch: str) -> Callable[[Callable[[], object]], Callable[..., nn.Module]]:
    """Turn a docstring-only stub into the entry point of torchvision's ``arch`` (see :mod:`diffkd.models.variants`):
    ``fn(num_classes=19, pretrained=False, aux=True, weights=None, weights_backbone=None, **kwargs) -> nn.Module``."""

    def make(stub: Callable[[], object]) -> Callable[..., nn.Module]:
        name = stub.__name__

        def entry(
            num_classes: int = _CLASSES,
            pretrained: bool = False,
            aux: bool = True,
            weights: str | None = None,
            weights_backbone: str | None = None,
            **kwargs: Any,
        ) -> nn.Module:
            return build_torchvision_segmentation(
                arch, num_classes, pretrained, aux, weights, weights_backbone, label=name, **kwargs
            )

        return entry_point(entry, stub, _TAGS)

    return make


@_tv("deeplabv3_resnet50")
def tv_deeplabv3_resnet50() -> None:
    """torchvision DeepLabV3-ResNet-50 (42.0M with aux at K=21), output upsampled to the input size."""


@_tv("deeplabv3_resnet101")
def tv_deeplabv3_resnet101() -> None:
    """torchvision DeepLabV3-ResNet-101 (61.0M with aux at K=21), output upsampled to the input size."""


@_tv("deeplabv3_mobilenet_v3_large")
def tv_deeplabv3_mobilenet_v3_large() -> None:
    """torchvision DeepLabV3-MobileNetV3-Large (11.0M with aux at K=21; backbone output stride 16), output
    upsampled to the input size."""
