"""The CIRKD Cityscapes zoo (teacher DeepLabV3-R101; students DeepLabV3-R18, PSPNet-R18, DeepLabV3-MBV2).

The DiffKD paper's segmentation (Table 6) uses CIRKD's models (github.com/winycg/CIRKD, commit 05a2753; MasKD's
``segmentation/`` is a copy). These modules reproduce them key for key, so CIRKD's released checkpoints load with
``strict=True`` (``pretrained="/path/deeplabv3_resnet101_citys_best_model.pth"``) and the deep-stem ImageNet files
load into the backbone (``backbone_weights="/path/resnet18-imagenet.pth"``). Parameter counts (aux head included,
as in the paper): 61.12M / 13.61M / 12.92M / 3.23M.

Registered names (tag ``"segmentation"``), each ``fn(num_classes=19, pretrained=False, aux=..., backbone_weights=None,
backbone_drop_classifier=False, norm_layer=nn.BatchNorm2d)``:

* ``cirkd_deeplabv3_resnet101`` — ASPP width 256, aux FCN head on c3 (CIRKD ``deeplabv3`` + ``resnet101``).
* ``cirkd_deeplabv3_resnet18`` — ASPP width 128, aux head (``deeplabv3`` + ``resnet18``).
* ``cirkd_psp_resnet18`` — PSP width 128, aux head (``psp`` + ``resnet18``).
* ``cirkd_deeplabv3_mobilenetv2`` — dilated MobileNetV2, ASPP width 128, no aux head (``deeplab_mobile``).

``model(images (B, 3, H, W))`` returns ``{"out": (B, K, H/8, W/8)}`` plus ``"aux": (B, K, H/8, W/8)`` when the aux
head is on. Logits are **not** upsampled: CIRKD computes its losses on them after a bilinear resize to the label
size with ``align_corners=True`` (``model.align_corners``, ``model.output_stride``); the 0.4 aux weight is the
task's. ``model.feature_info`` lists the backbone stages c1..c4 and the pre-classifier head feature (timm style:
``num_chs``, ``reduction``, ``module``), ``model.logits_modules`` the modules whose outputs are the logits.

Input normalisation in CIRKD is BGR minus the per-channel mean (104.007, 116.669, 122.679), without std: the data
pipeline's business, not the model's.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from torch import Tensor, nn

from diffkd.models.checkpoint import load_weights
from diffkd.models.imagenet import WeightsDownloadError
from diffkd.models.segmentation.backbones import (
    DilatedMobileNetV2,
    NormLayer,
    ResNetV1s,
    resnet18_v1s,
    resnet101_v1s,
)
from diffkd.models.segmentation.heads import DeepLabHead, FCNHead, PSPHead
from diffkd.models.variants import entry_point

__all__ = ["CIRKD_WEIGHTS", "CIRKDSegmentationModel", "CIRKDWeights", "DeepLabV3", "PSPNet"]

CITYSCAPES_CLASSES = 19
_TAGS = ("segmentation", "cirkd")
_CIRKD_README = "https://github.com/winycg/CIRKD/tree/05a2753 (README, 'Performance on Cityscapes')"


class CIRKDSegmentationModel(nn.Module):
    """Backbone ``pretrained`` + ``head`` (+ ``auxlayer`` on c3): CIRKD's ``SegBaseModel`` layout.

    Attributes:
        num_classes: K.
        aux: whether ``auxlayer`` exists (and ``forward`` returns ``"aux"``).
        output_stride: stride of the returned logits relative to the input (8).
        align_corners: how to resize the logits to the label size (``True``, as CIRKD does).
        output_fmt: ``"NCHW"`` for every feature and output.
        feature_info: backbone stages c1..c4, then the head feature before the classifier.
        logits_modules: ``{"out": module path, "aux": module path}`` producing the logits.
    """

    align_corners: ClassVar[bool] = True
    output_fmt: ClassVar[str] = "NCHW"
    _head_feature: ClassVar[str]
    _head_logits: ClassVar[str]

    def __init__(self, backbone: ResNetV1s | DilatedMobileNetV2, head: nn.Module, auxlayer: nn.Module | None) -> None:
        super().__init__()
        self.pretrained = backbone
        self.head = head
        if auxlayer is not None:
            self.auxlayer = auxlayer
        self.aux = auxlayer is not None
        self.output_stride = backbone.output_stride

    def _describe(self, num_classes: int, head_channels: int) -> None:
        self.num_classes = num_classes
        self.feature_info: list[dict[str, Any]] = [
            {**f, "module": f"pretrained.{f['module']}"} for f in self.pretrained.feature_info
        ]
        self.feature_info.append(
            {"num_chs": head_channels, "reduction": self.output_stride, "module": self._head_feature}
        )
        self.logits_modules: dict[str, str] = {"out": self._head_logits}
        if self.aux:
            self.logits_modules["aux"] = "auxlayer.block.4"

    @property
    def backbone(self) -> ResNetV1s | DilatedMobileNetV2:
        """The backbone (registered as ``pretrained``, CIRKD's attribute name)."""
        return self.pretrained

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """images (B, 3, H, W) → ``{"out": (B, K, H/8, W/8)[, "aux": (B, K, H/8, W/8)]}``, not upsampled."""
        _, _, c3, c4 = self.pretrained(x)
        out = {"out": self.head(c4)}
        if self.aux:
            out["aux"] = self.auxlayer(c3)
        return out

    def load_backbone_weights(
        self, source: str | os.PathLike | Mapping[str, Any], *, strict: bool = True, drop_classifier: bool = False
    ) -> None:
        """Load a deep-stem ImageNet backbone file (CIRKD ``--pretrained-base``) into ``pretrained``.

        Strict by default; ``drop_classifier=True`` discards the file's ImageNet classifier keys (``fc.*``;
        ``features.18.*`` and ``classifier.*`` for MobileNetV2), which CIRKD's key filter drops silently.
        """
        self.pretrained.load_imagenet_weights(source, strict=strict, drop_classifier=drop_classifier)


class _HeadOnC4(CIRKDSegmentationModel):
    """A CIRKD model whose ``_head_cls(c4, K, head_channels, norm_layer=...)`` sits on c4, with CIRKD's FCN aux head
    (``auxlayer``) on c3 when ``aux``. ``backbone`` is a dilated backbone whose ``feature_info`` gives c3 and c4."""

    _head_cls: ClassVar[type[DeepLabHead | PSPHead]]

    def __init__(
        self,
        backbone: ResNetV1s | DilatedMobileNetV2,
        num_classes: int = CITYSCAPES_CLASSES,
        head_channels: int = 128,
        aux: bool = True,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        c3, c4 = backbone.feature_info[2]["num_chs"], backbone.feature_info[3]["num_chs"]
        head = self._head_cls(c4, num_classes, head_channels, norm_layer=norm_layer)
        super().__init__(backbone, head, FCNHead(c3, num_classes, norm_layer) if aux else None)
        self._describe(num_classes, head_channels)


class DeepLabV3(_HeadOnC4):
    """DeepLabV3 (CIRKD ``models/deeplabv3.py`` / ``deeplabv3_mobile.py``): ASPP head on c4, FCN aux head on c3.

    Keys: ``pretrained.*``, ``head.aspp.{b0..b4,project}.*``, ``head.block.{0,1,4}.*``, ``auxlayer.block.{0,1,4}.*``.
    Head feature ``head.block.3`` → (B, head_channels, H/8, W/8) (CIRKD's ``x_feat_after_aspp``).
    """

    _head_cls = DeepLabHead
    _head_feature = "head.block.3"
    _head_logits = "head.block.4"


class PSPNet(_HeadOnC4):
    """PSPNet (CIRKD ``models/pspnet.py``): pyramid pooling head on c4, FCN aux head on c3.

    Keys: ``pretrained.*``, ``head.psp.conv{1..4}.{0,1}.*``, ``head.block.{0,1}.*``, ``head.classifier.*``,
    ``auxlayer.block.{0,1,4}.*``. Head feature ``head.block`` → (B, head_channels, H/8, W/8).
    """

    _head_cls = PSPHead
    _head_feature = "head.block"
    _head_logits = "head.classifier"


# ------------------------------------------------------------------------------------------------ weights


@dataclass(frozen=True)
class CIRKDWeights:
    """Where CIRKD publishes a model's weights (Google Drive only: nothing downloads automatically).

    Attributes:
        model: the Cityscapes checkpoint, described.
        model_url: its Google Drive page.
        backbone: the deep-stem ImageNet backbone file name.
        backbone_url: its Google Drive page.
    """

    model: str
    model_url: str
    backbone: str
    backbone_url: str


def _drive(file_id: str) -> str:
    return f"https://drive.google.com/file/d/{file_id}/view"


CIRKD_WEIGHTS: dict[str, CIRKDWeights] = {
    "cirkd_deeplabv3_resnet101": CIRKDWeights(
        "deeplabv3_resnet101_citys_best_model.pth (the teacher, val mIoU 78.07)",
        _drive("1zUdhYPYCDCclWU3Wo7GbbTlM8ibQ_UC1"),
        "resnet101-imagenet.pth",
        _drive("1V8-E4wm2VMsfnNiczSIDoSM7JJBMARkP"),
    ),
    "cirkd_deeplabv3_resnet18": CIRKDWeights(
        "the CIRKD-distilled student, val mIoU 76.38 (train_cirkd.py saves kd_deeplabv3_resnet18_citys_best_model.pth)",
        _drive("1ebP28XJWJNDbU9OmnfT7x2JJWHWaDFMi"),
        "resnet18-imagenet.pth",
        _drive("1_i0n3ZePtQuh66uQIftiSwN7QAUlFb8_"),
    ),
    "cirkd_psp_resnet18": CIRKDWeights(
        "the CIRKD-distilled student, val mIoU 74.73 (train_cirkd.py saves kd_psp_resnet18_citys_best_model.pth)",
        _drive("1zfpWVfzOpeVG7_WjeQPGB0rDl_XQX8ZG"),
        "resnet18-imagenet.pth",
        _drive("1_i0n3ZePtQuh66uQIftiSwN7QAUlFb8_"),
    ),
    "cirkd_deeplabv3_mobilenetv2": CIRKDWeights(
        "the CIRKD-distilled student, val mIoU 75.42 "
        "(train_cirkd.py saves kd_deeplab_mobile_mobilenetv2_citys_best_model.pth)",
        _drive("1iw8GXxj612C_nRtBdS72kgIZ5nYOU1Ys"),
        "mobilenetv2-imagenet.pth",
        _drive("12EDZjDSCuIpxPv-dkk1vrxA7ka0b0Yjv"),
    ),
}
"""Registry name → CIRKD's published Cityscapes checkpoint and deep-stem ImageNet backbone (README @05a2753)."""


def _no_download(name: str) -> WeightsDownloadError:
    w = CIRKD_WEIGHTS[name]
    return WeightsDownloadError(
        f"{name}: pretrained=True cannot fetch weights. CIRKD publishes them only on Google Drive ({_CIRKD_README}): "
        f"{w.model} at {w.model_url}. Download the file and pass its local path, pretrained='/path/to/file.pth' "
        "(or create_teacher(name, weights='/path/to/file.pth')). For an ImageNet-initialised model instead, pass "
        f"backbone_weights='/path/to/{w.backbone}' (from {w.backbone_url}) with backbone_drop_classifier=True."
    )


def _cirkd(
    arch: type[DeepLabV3 | PSPNet], backbone: Callable[[NormLayer], nn.Module], width: int, *, has_aux: bool = True
) -> Callable[[Callable[[], object]], Callable[..., CIRKDSegmentationModel]]:
    """Turn a docstring-only stub into the CIRKD entry point ``arch(backbone(norm_layer), K, width, aux, norm_layer)``
    (see :mod:`diffkd.models.variants`); ``has_aux=False`` makes ``aux`` default to ``False`` and refuse ``True``."""

    def make(stub: Callable[[], object]) -> Callable[..., CIRKDSegmentationModel]:
        name = stub.__name__

        def entry(
            num_classes: int = CITYSCAPES_CLASSES,
            pretrained: bool | str | os.PathLike = False,
            aux: bool = has_aux,
            backbone_weights: str | os.PathLike | None = None,
            backbone_drop_classifier: bool = False,
            norm_layer: NormLayer = nn.BatchNorm2d,
        ) -> CIRKDSegmentationModel:
            if aux and not has_aux:
                raise ValueError(f"{name} has no aux head in CIRKD (its checkpoints have no auxlayer); use aux=False")
            if pretrained is True:
                raise _no_download(name)
            model = arch(backbone(norm_layer), num_classes, width, aux, norm_layer)
            if backbone_weights is not None:
                model.load_backbone_weights(backbone_weights, drop_classifier=backbone_drop_classifier)
            if pretrained and not isinstance(pretrained, bool):
                # a whole-model checkpoint overrides the backbone weights; strict, CIRKD files are bare state dicts
                load_weights(model, Path(pretrained))
            return model

        entry.__annotations__["return"] = arch.__name__  # the signature names the class it builds
        return entry_point(entry, stub, _TAGS)

    return make


# ------------------------------------------------------------------------------------------------ entries


@_cirkd(DeepLabV3, lambda norm_layer: resnet101_v1s(norm_layer=norm_layer), 256)
def cirkd_deeplabv3_resnet101() -> None:
    """CIRKD DeepLabV3-ResNet-101 (61.12M with aux; the paper's teacher, 78.07 val mIoU): deep-stem dilated
    ResNet-101, ASPP width 256, aux FCN head on c3 (1024 → 256 → K).

    Args:
        num_classes: K (Cityscapes 19).
        pretrained: a local CIRKD checkpoint path (``deeplabv3_resnet101_citys_best_model.pth``) loaded strictly;
            ``True`` raises :class:`WeightsDownloadError` saying where CIRKD publishes it (Google Drive).
        aux: build the aux head (CIRKD's released teacher has it).
        backbone_weights: a deep-stem ImageNet file (``resnet101-imagenet.pth``) loaded into ``pretrained``.
        backbone_drop_classifier: drop that file's ``fc.*`` keys instead of failing on them.
        norm_layer: normalisation layer class (``nn.SyncBatchNorm`` for multi-GPU, as CIRKD trains).
    """


@_cirkd(DeepLabV3, lambda norm_layer: resnet18_v1s(norm_layer=norm_layer), 128)
def cirkd_deeplabv3_resnet18() -> None:
    """CIRKD DeepLabV3-ResNet-18 (13.61M with aux, 13.46M without): deep-stem dilated ResNet-18, ASPP width 128,
    aux FCN head on c3 (256 → 64 → K). Arguments as :func:`cirkd_deeplabv3_resnet101`
    (ImageNet file ``resnet18-imagenet.pth``)."""


@_cirkd(PSPNet, lambda norm_layer: resnet18_v1s(norm_layer=norm_layer), 128)
def cirkd_psp_resnet18() -> None:
    """CIRKD PSPNet-ResNet-18 (12.92M with aux, 12.77M without): deep-stem dilated ResNet-18, pyramid pooling
    (bins 1/2/3/6, 512 → 128 each), 3×3 1024 → 128, aux FCN head on c3. Arguments as
    :func:`cirkd_deeplabv3_resnet101` (ImageNet file ``resnet18-imagenet.pth``)."""


@_cirkd(DeepLabV3, lambda norm_layer: DilatedMobileNetV2(8, norm_layer), 128, has_aux=False)
def cirkd_deeplabv3_mobilenetv2() -> None:
    """CIRKD DeepLabV3-MobileNetV2 (3.23M): MobileNetV2 features dilated to stride 8 (320 channels), ASPP width
    128, no aux head (CIRKD has none for MobileNetV2; ``aux=True`` raises). Arguments as
    :func:`cirkd_deeplabv3_resnet101` (ImageNet file ``mobilenetv2-imagenet.pth``, whose ``features.18.*`` and
    ``classifier.*`` keys ``backbone_drop_classifier=True`` drops)."""
