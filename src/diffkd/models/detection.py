"""torchvision's COCO detectors (Faster R-CNN, RetinaNet, FCOS) on ResNet-50/101 and ResNeXt-101 FPN backbones.

Registered names (tags ``"detection"``, ``"coco"``, ``"torchvision"``), ``<detector>_<backbone>_fpn``:

* ``fasterrcnn_resnet50_fpn``, ``fasterrcnn_resnet101_fpn``, ``fasterrcnn_resnext101_64x4d_fpn``;
* ``retinanet_resnet50_fpn``, ``retinanet_resnet101_fpn``, ``retinanet_resnext101_64x4d_fpn``;
* ``fcos_resnet50_fpn``, ``fcos_resnet101_fpn``, ``fcos_resnext101_64x4d_fpn``;
* ``retinanet_resnet50_fpn_v2``: torchvision's own v2 RetinaNet (GroupNorm heads, P6 from C5, GIoU box loss), whose
  COCO weights (``pretrained=True``: box AP 41.5) make a teacher that needs no training (``coco_retina_r50v2_r50``).

Every entry point is ``fn(num_classes=91, pretrained=False, weights=None, weights_backbone=None, min_size=800,
max_size=1333, trainable_layers=3, frozen_bn=True, **kwargs)``; ``**kwargs`` go to torchvision's ``FasterRCNN``,
``RetinaNet`` or ``FCOS`` (``box_detections_per_img``, ``score_thresh``, ``_skip_resize`` for the data module's
``multiscale``, ...). What they build (torchvision 0.29, ``models/detection``):

* **Backbone + FPN** by ``resnet_fpn_backbone``: Faster R-CNN returns ``layer1..layer4`` with the
  ``LastLevelMaxPool`` extra block — FPN outputs ``'0', '1', '2', '3', 'pool'`` = P2–P6, strides 4–64;
  RetinaNet and FCOS return ``layer2..layer4`` with ``LastLevelP6P7`` — ``'0', '1', '2', 'p6', 'p7'`` = P3–P7,
  strides 8–128. 256 channels each. Tap them all with ``backbone.fpn:*``.
* **P6 of RetinaNet** (``p6_input``): ``"p5"`` (default) is torchvision's ``retinanet_resnet50_fpn`` (v1) and its
  FCOS, P6 = conv(P5); ``"c5"`` is MMDetection's RetinaNet neck (``add_extra_convs='on_input'``, the neck of the
  paper's RetinaNet runs and of torchvision's v2), P6 = conv(C5). torchvision's P7 = conv(ReLU(P6)) either way
  (MMDetection's RetinaNet has no ReLU there: a gap this option does not close).
* **Normalisation and frozen stages**: ``FrozenBatchNorm2d`` everywhere and the stem + ``layer1`` frozen
  (``trainable_layers=3``) — torchvision's setting for a pretrained backbone and MMDetection's
  (``frozen_stages=1``, ``norm_eval=True``). torchvision switches to trainable ``BatchNorm2d`` and 5 trainable
  layers when no pretrained weights are given; here the setting does not depend on the weights (deliberately: a
  teacher built without ImageNet weights then has the same state-dict keys as the student checkpoint it loads).
  ``frozen_bn=False, trainable_layers=5`` trains from scratch.
* **Transform**: ``GeneralizedRCNNTransform(min_size, max_size)`` resizes the shorter side to ``min_size`` (≤
  ``max_size`` for the longer one), normalises with ImageNet mean/std and pads to a multiple of 32. Predictions
  come back in the input images' coordinates.

Weights:

* ``weights_backbone``: ImageNet weights of the backbone, a torchvision enum member name (``"IMAGENET1K_V1"``:
  ResNet-50 76.13 / ResNet-101 77.37 — the ``torchvision://resnet50/101`` files MMDetection initialises from —
  and ResNeXt-101 64x4d 83.25); ``None`` (default) initialises randomly. Downloaded on first use into
  ``torch.hub.get_dir()``; offline, a failed download raises :class:`~diffkd.models.imagenet.WeightsDownloadError`.
* ``pretrained=True``: torchvision's COCO weights (``weights``, default ``"COCO_V1"``), which exist for the
  ResNet-50 models only (box AP 37.0 / 36.4 / 39.2); they need ``num_classes=91`` and, for RetinaNet,
  ``p6_input="p5"``. There are no R101/X101 COCO weights in torchvision: train a teacher
  (``experiment=coco_teacher_*``) or load any checkpoint with ``create_teacher(name, weights=path)`` (a Lightning
  ``.ckpt`` of a diffkd run included).

ResNeXt-101 **64x4d** rather than 32x8d: the stronger teachers of FGD and MasKD are MMDetection's
``retinanet_x101_64x4d_fpn`` / ``reppoints_..._x101_64x4d``, and torchvision has the 64x4d ImageNet weights (the
paper's Cascade Mask R-CNN X101-32x4d-DCN teacher has no torchvision counterpart: no cascade, no DCN).
"""

from __future__ import annotations

from typing import Any, Literal

from torch import nn

from diffkd.models.imagenet import WeightsDownloadError
from diffkd.models.registry import register_model
from diffkd.models.variants import register_variant

__all__ = ["BACKBONES", "DETECTORS", "FPN_LEVELS", "build_detector"]

_TAGS = ("detection", "coco", "torchvision")
_COCO_CLASSES = 91  # torchvision's COCO label space: background 0 + category ids 1..90

DETECTORS: tuple[str, ...] = ("fasterrcnn", "retinanet", "fcos")
BACKBONES: dict[str, str] = {"resnet50": "R-50", "resnet101": "R-101", "resnext101_64x4d": "X-101-64x4d"}
FPN_LEVELS: dict[str, tuple[str, ...]] = {
    "fasterrcnn": ("0", "1", "2", "3", "pool"),  # P2–P6
    "retinanet": ("0", "1", "2", "p6", "p7"),  # P3–P7
    "fcos": ("0", "1", "2", "p6", "p7"),
}
"""Keys of ``model.backbone(x)`` (= the FPN's outputs) per detector."""


def _backbone_weights(backbone: str, name: str | None, label: str) -> Any:
    if name is None:
        return None
    import torchvision

    enum = torchvision.models.get_model_weights(backbone)
    try:
        return enum.verify(name)
    except (KeyError, ValueError) as err:
        names = ", ".join(["DEFAULT", *(m.name for m in enum)])
        raise ValueError(f"unknown weights_backbone {name!r} for {label}; {enum.__name__} has: {names}") from err


def _download_error(weights: Any, label: str, err: OSError) -> WeightsDownloadError:
    import torch

    return WeightsDownloadError(
        f"could not load the weights {weights} for {label} from {weights.url}: {str(err).rstrip('.')}. torchvision "
        f"weights download on first use into {torch.hub.get_dir()}/checkpoints (set $TORCH_HOME to move it) and "
        f"need network access once; run once where there is a network, or copy {weights.url.rsplit('/', 1)[-1]} "
        "into that folder."
    )


def _coco_weights(arch: str, weights: str | None, num_classes: int, label: str) -> Any:
    """torchvision's COCO weights enum member of ``arch`` (default ``"COCO_V1"``), for 91 classes only."""
    import torchvision

    if num_classes != _COCO_CLASSES:
        raise ValueError(f"{label}: the COCO weights have {_COCO_CLASSES} classes, num_classes={num_classes}")
    enum = torchvision.models.get_model_weights(arch)
    try:
        return enum.verify(weights or "COCO_V1")
    except (KeyError, ValueError) as err:
        raise ValueError(f"unknown weights {weights!r} for {label}; {enum.__name__} has: COCO_V1, DEFAULT") from err


def _pretrained_coco(
    detector: str, backbone: str, weights: str | None, num_classes: int, p6_input: str, label: str, **kwargs: Any
) -> nn.Module:
    """torchvision's own builder with its COCO weights (ResNet-50 only)."""
    import torchvision

    if backbone != "resnet50":
        raise ValueError(
            f"{label}: torchvision has no COCO weights for {BACKBONES[backbone]} detectors (only ResNet-50); train "
            "a teacher (experiment=coco_teacher_*) or pass a checkpoint: create_teacher(name, weights=<file>)"
        )
    if detector == "retinanet" and p6_input != "p5":
        raise ValueError(f"{label}: torchvision's COCO RetinaNet computes P6 from P5; use p6_input='p5'")
    arch = f"{detector}_resnet50_fpn"
    w = _coco_weights(arch, weights, num_classes, label)
    try:
        return torchvision.models.get_model(arch, weights=w, weights_backbone=None, num_classes=num_classes, **kwargs)
    except OSError as err:
        raise _download_error(w, label, err) from err


def build_detector(
    detector: Literal["fasterrcnn", "retinanet", "fcos"],
    backbone: str,
    num_classes: int = _COCO_CLASSES,
    pretrained: bool = False,
    weights: str | None = None,
    weights_backbone: str | None = None,
    min_size: int | tuple[int, ...] = 800,
    max_size: int = 1333,
    trainable_layers: int = 3,
    frozen_bn: bool = True,
    p6_input: Literal["p5", "c5"] = "p5",
    *,
    label: str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """One of torchvision's detectors on a ResNet/ResNeXt FPN backbone (see the module docstring).

    Args:
        detector: ``fasterrcnn``, ``retinanet`` or ``fcos``.
        backbone: ``resnet50``, ``resnet101`` or ``resnext101_64x4d``.
        num_classes: classes including background 0 (91: COCO's category ids; a contiguous label space: K + 1).
        pretrained: torchvision's COCO weights (ResNet-50 only).
        weights: the COCO weights' enum member (default ``"COCO_V1"``); read only with ``pretrained``.
        weights_backbone: ImageNet weights of the backbone (``"IMAGENET1K_V1"``), or ``None``.
        min_size, max_size: the transform's resize (a tuple ``min_size`` picks one at random in training).
        trainable_layers: backbone stages left trainable, counted from ``layer4`` (0–5).
        frozen_bn: ``FrozenBatchNorm2d`` in the backbone (else ``BatchNorm2d``).
        p6_input: RetinaNet's P6 from ``p5`` (torchvision v1) or ``c5`` (MMDetection); FCOS always uses P5.
        label: the name shown in error messages.
        **kwargs: passed to ``FasterRCNN``/``RetinaNet``/``FCOS``.

    Returns:
        The detector: ``model(images, targets)`` → loss dict in training, ``model(images)`` → detections in eval.
    """
    from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops import FrozenBatchNorm2d
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

    label = label or f"{detector}_{backbone}_fpn"
    if detector not in DETECTORS:
        raise ValueError(f"{label}: unknown detector {detector!r}; choose one of {list(DETECTORS)}")
    if backbone not in BACKBONES:
        raise ValueError(f"{label}: unknown backbone {backbone!r}; choose one of {list(BACKBONES)}")
    if p6_input not in ("p5", "c5"):
        raise ValueError(f"{label}: p6_input={p6_input!r}; choose p5 or c5")
    if detector == "fcos" and p6_input != "p5":
        raise ValueError(f"{label}: FCOS computes P6 from P5 (MMDetection's 'on_output' as torchvision); p6_input=p5")
    kwargs = {"min_size": min_size, "max_size": max_size, **kwargs}
    if pretrained:
        if not frozen_bn:
            raise ValueError(f"{label}: torchvision's COCO weights come with FrozenBatchNorm2d; keep frozen_bn=true")
        return _pretrained_coco(
            detector, backbone, weights, num_classes, p6_input, label,
            trainable_backbone_layers=trainable_layers, **kwargs,
        )  # fmt: skip

    if detector == "fasterrcnn":
        returned, extra = [1, 2, 3, 4], LastLevelMaxPool()
    else:
        c5 = detector == "retinanet" and p6_input == "c5"
        returned, extra = [2, 3, 4], LastLevelP6P7(2048 if c5 else 256, 256)
    w = _backbone_weights(backbone, weights_backbone, label)
    norm = FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d
    try:
        body = resnet_fpn_backbone(
            backbone_name=backbone, weights=w, norm_layer=norm, trainable_layers=trainable_layers,
            returned_layers=returned, extra_blocks=extra,
        )  # fmt: skip
    except OSError as err:
        raise _download_error(w, label, err) from err
    cls = {"fasterrcnn": FasterRCNN, "retinanet": RetinaNet, "fcos": FCOS}[detector]
    return cls(body, num_classes=num_classes, **kwargs)


def _register(detector: str, backbone: str) -> None:
    name = f"{detector}_{backbone}_fpn"
    levels = ", ".join(repr(k) for k in FPN_LEVELS[detector])
    doc = (
        f"torchvision {detector} on a {BACKBONES[backbone]} FPN (see :func:`build_detector`); FPN levels "
        f"{levels}, 256 channels."
    )
    register_variant(build_detector, name, doc, _TAGS, detector, backbone, label=name)


for _detector in DETECTORS:
    for _backbone in BACKBONES:
        _register(_detector, _backbone)
del _detector, _backbone


@register_model(tags=_TAGS)
def retinanet_resnet50_fpn_v2(
    num_classes: int = _COCO_CLASSES,
    pretrained: bool = False,
    weights: str | None = None,
    weights_backbone: str | None = None,
    min_size: int | tuple[int, ...] = 800,
    max_size: int = 1333,
    trainable_layers: int = 3,
    **kwargs: Any,
) -> nn.Module:
    """torchvision's ``retinanet_resnet50_fpn_v2`` (the improvements it takes from the ATSS paper: GroupNorm in the
    heads, P6/P7 from C5, GIoU loss); FPN levels '0', '1', '2', 'p6', 'p7' = P3–P7, 256 channels, like the v1
    student's.

    ``pretrained=True`` loads its COCO weights (``weights``, default ``"COCO_V1"``: box AP 41.5), for which
    ``num_classes`` must be 91. Without any weights torchvision trains all 5 stages with plain BatchNorm (its rule for
    an untrained backbone); ``trainable_layers`` applies only with weights.
    """
    import torchvision

    label = "retinanet_resnet50_fpn_v2"
    w = _coco_weights(label, weights, num_classes, label) if pretrained else None
    wb = None if pretrained else _backbone_weights("resnet50", weights_backbone, label)
    if w is not None or wb is not None:
        kwargs["trainable_backbone_layers"] = trainable_layers
    try:
        return torchvision.models.get_model(
            label, weights=w, weights_backbone=wb, num_classes=num_classes, min_size=min_size, max_size=max_size,
            **kwargs,
        )  # fmt: skip
    except OSError as err:
        raise _download_error(w or wb, label, err) from err
