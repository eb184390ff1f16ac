"""CIRKD's dilated segmentation backbones: deep-stem ("v1s") ResNets and MobileNetV2, both at output stride 8.

Module and attribute names follow CIRKD commit 05a2753 (``models/base_models/resnetv1b.py`` and
``models/base_models/mobilenetv2.py``; MasKD's ``segmentation/`` copy is identical), so its checkpoints and the
deep-stem ImageNet backbones it uses (``resnet18-imagenet.pth``, ``resnet101-imagenet.pth``,
``mobilenetv2-imagenet.pth``, originally from CSAILVision/semantic-segmentation-pytorch) load with ``strict=True``.

Why hand-written rather than timm or torchvision:

* timm's ``ResNet(stem_type="deep", stem_width=64)`` (``resnet101s``) has the same layers and the same dilation
  pattern at ``output_stride=8``, but packs the stem into one ``conv1`` Sequential (keys ``conv1.0``, ``conv1.1``,
  ``conv1.3``, ..., ``bn1`` = the third BN) where CIRKD has ``conv1/bn1/conv2/bn2/conv3/bn3``; its ``resnet18d``
  family also uses stem widths 32-32-64 and average-pool downsampling instead of CIRKD's 64-64-128 and strided 1×1.
  Loading CIRKD files would need a key translation in both directions, and the key set would no longer be CIRKD's.
* torchvision's ``BasicBlock`` refuses dilation, and its MobileNetV2 has neither dilation nor CIRKD's key layout
  (``features.N.conv.0.0`` vs ``features.N.conv.0``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from diffkd.models.checkpoint import extract_state_dict, format_mismatches, key_mismatches, read_source

__all__ = [
    "BasicBlockV1b",
    "BottleneckV1b",
    "DilatedMobileNetV2",
    "InvertedResidual",
    "MobileNetV2Features",
    "ResNetV1s",
    "load_imagenet_backbone",
    "resnet18_v1s",
    "resnet101_v1s",
]

NormLayer = Callable[[int], nn.Module]


def _conv3x3(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False)


@torch.no_grad()
def _init_conv_bn(module: nn.Module) -> None:
    """CIRKD's init of both backbones: conv ~ kaiming normal (fan out, ReLU), every BatchNorm (SyncBatchNorm
    too) weight 1, bias 0; in ``module.modules()`` order, so the draws match CIRKD's."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# ------------------------------------------------------------------------------------------------- ResNet


class _BlockV1b(nn.Module):
    """The constructor CIRKD's two ResNet blocks share: ``_layers`` builds the convs and norms (in CIRKD's key
    order), then ``downsample`` (the shortcut projection, or ``None``) is registered last, as CIRKD does."""

    expansion: ClassVar[int]

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        dilation: int = 1,
        first_dilation: int | None = None,
        downsample: nn.Module | None = None,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        self._layers(inplanes, planes, stride, dilation, first_dilation or dilation, norm_layer)
        self.downsample = downsample

    def _layers(
        self, inplanes: int, planes: int, stride: int, dilation: int, first_dilation: int, norm_layer: NormLayer
    ) -> None:
        raise NotImplementedError


class BasicBlockV1b(_BlockV1b):
    """ResNet basic block (3×3 → 3×3) with dilation; CIRKD ``BasicBlockV1b`` keys ``conv1 bn1 conv2 bn2 downsample``.

    ``first_dilation`` is the first conv's dilation (CIRKD's ``dilation`` argument), ``dilation`` the second's
    (CIRKD's ``previous_dilation``): the first block of a dilated stage keeps the previous stage's dilation there.
    """

    expansion: ClassVar[int] = 1

    def _layers(
        self, inplanes: int, planes: int, stride: int, dilation: int, first_dilation: int, norm_layer: NormLayer
    ) -> None:
        self.conv1 = _conv3x3(inplanes, planes, stride, first_dilation)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes, 1, dilation)
        self.bn2 = norm_layer(planes)

    def forward(self, x: Tensor) -> Tensor:
        """(B, inplanes, H, W) → (B, planes, H/stride, W/stride)."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class BottleneckV1b(_BlockV1b):
    """ResNet bottleneck (1×1 → 3×3 → 1×1, stride and dilation on the 3×3); CIRKD ``BottleneckV1b`` keys
    ``conv1 bn1 conv2 bn2 conv3 bn3 downsample``. ``first_dilation`` (if given) replaces ``dilation`` on the 3×3.
    """

    expansion: ClassVar[int] = 4

    def _layers(
        self, inplanes: int, planes: int, stride: int, dilation: int, first_dilation: int, norm_layer: NormLayer
    ) -> None:
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = norm_layer(planes)
        self.conv2 = _conv3x3(planes, planes, stride, first_dilation)
        self.bn2 = norm_layer(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        """(B, inplanes, H, W) → (B, 4·planes, H/stride, W/stride)."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class _ImageNetBackbone(nn.Module):
    """A dilated backbone that loads a CSAIL deep-stem ImageNet file (``imagenet_extra_prefixes``: the file's
    classifier keys it does not have) into ``_imagenet_module()`` (itself unless a subclass says otherwise)."""

    imagenet_extra_prefixes: ClassVar[tuple[str, ...]]

    def _imagenet_module(self) -> nn.Module:
        return self

    def load_imagenet_weights(
        self, source: str | Path | Mapping[str, Any], *, strict: bool = True, drop_classifier: bool = False
    ) -> None:
        """Load a deep-stem ImageNet file into this backbone (``resnet18-imagenet.pth``, ``resnet101-imagenet.pth``;
        ``mobilenetv2-imagenet.pth``, keys ``features.*`` and ``classifier.*``, into ``net``); see
        :func:`load_imagenet_backbone`."""
        load_imagenet_backbone(
            self._imagenet_module(),
            source,
            self.imagenet_extra_prefixes,
            strict=strict,
            drop_classifier=drop_classifier,
        )


class ResNetV1s(_ImageNetBackbone):
    """Deep-stem ResNet (CIRKD ``ResNetV1b(deep_stem=True)``, "v1s"), dilated to output stride 8, without fc.

    Stem: 3×3 conv 3→64 /2, 64→64, 64→128 (each + BN + ReLU), then max-pool /2; ``layer1`` therefore starts
    from 128 channels and always has a 1×1 downsample. With ``dilated=True`` ``layer3`` has stride 1 and
    dilation 2 and ``layer4`` stride 1 and dilation 4 (its first block's first dilated conv uses 2).

    ``forward`` returns ``(c1, c2, c3, c4)``: (B, 64e, H/4, W/4), (B, 128e, H/8, W/8) and (B, 256e, H/8, W/8),
    (B, 512e, H/8, W/8) with e = ``block.expansion`` (1 for ResNet-18, 4 for ResNet-101).
    """

    # ImageNet files carry the classifier the dilated backbone drops.
    imagenet_extra_prefixes: ClassVar[tuple[str, ...]] = ("fc.",)

    def __init__(
        self,
        block: type[BasicBlockV1b | BottleneckV1b],
        layers: Sequence[int],
        dilated: bool = True,
        norm_layer: NormLayer = nn.BatchNorm2d,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        self.inplanes = 128
        self.conv1 = _conv3x3(3, 64, stride=2)
        self.bn1 = norm_layer(64)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(64, 64)
        self.bn2 = norm_layer(64)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = _conv3x3(64, 128)
        self.bn3 = norm_layer(128)
        self.relu3 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        d3, d4 = (2, 4) if dilated else (1, 1)
        s3, s4 = (1, 1) if dilated else (2, 2)
        self.layer1 = self._make_layer(block, 64, layers[0], 1, 1, norm_layer)
        self.layer2 = self._make_layer(block, 128, layers[1], 2, 1, norm_layer)
        self.layer3 = self._make_layer(block, 256, layers[2], s3, d3, norm_layer)
        self.layer4 = self._make_layer(block, 512, layers[3], s4, d4, norm_layer)
        self.output_stride = 8 if dilated else 32
        e = block.expansion
        self.feature_info: list[dict[str, Any]] = [
            {"num_chs": 64 * e, "reduction": 4, "module": "layer1"},
            {"num_chs": 128 * e, "reduction": 8, "module": "layer2"},
            {"num_chs": 256 * e, "reduction": 8 if dilated else 16, "module": "layer3"},
            {"num_chs": 512 * e, "reduction": self.output_stride, "module": "layer4"},
        ]

        _init_conv_bn(self)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BottleneckV1b):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlockV1b):
                    nn.init.zeros_(m.bn2.weight)

    def _make_layer(
        self,
        block: type[BasicBlockV1b | BottleneckV1b],
        planes: int,
        blocks: int,
        stride: int,
        dilation: int,
        norm_layer: NormLayer,
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                norm_layer(planes * block.expansion),
            )
        # The first block's first dilated conv continues the previous stage's dilation (CIRKD: 1 for d=2, 2 for d=4).
        first = max(1, dilation // 2)
        layers = [block(self.inplanes, planes, stride, dilation, first, downsample, norm_layer)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, 1, dilation, None, None, norm_layer) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(B, 3, H, W) → (c1, c2, c3, c4), see the class docstring for shapes."""
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.bn3(self.conv3(x)))
        c1 = self.layer1(self.maxpool(x))
        c2 = self.layer2(c1)
        c3 = self.layer3(c2)
        c4 = self.layer4(c3)
        return c1, c2, c3, c4


def resnet18_v1s(dilated: bool = True, **kwargs: Any) -> ResNetV1s:
    """Deep-stem ResNet-18 (11.33M parameters), output channels 64/128/256/512."""
    return ResNetV1s(BasicBlockV1b, (2, 2, 2, 2), dilated=dilated, **kwargs)


def resnet101_v1s(dilated: bool = True, **kwargs: Any) -> ResNetV1s:
    """Deep-stem ResNet-101 (42.62M parameters), output channels 256/512/1024/2048."""
    return ResNetV1s(BottleneckV1b, (3, 4, 23, 3), dilated=dilated, **kwargs)


# -------------------------------------------------------------------------------------------- MobileNetV2


class InvertedResidual(nn.Module):
    """MobileNetV2 block: [1×1 expand-BN-ReLU6] → 3×3 depthwise-BN-ReLU6 → 1×1 project-BN, all in ``conv``.

    Keys ``conv.0`` … ``conv.7`` (``conv.0`` … ``conv.4`` without expansion), as in CIRKD/CSAIL. The residual is
    used at stride 1 with equal widths (the blocks whose stride dilation removes change width, so have none).
    """

    def __init__(
        self,
        inp: int,
        oup: int,
        stride: int,
        expand_ratio: int,
        dilation: int = 1,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        hidden = round(inp * expand_ratio)
        self.use_res_connect = stride == 1 and inp == oup
        dw = [
            nn.Conv2d(hidden, hidden, 3, stride, dilation, dilation=dilation, groups=hidden, bias=False),
            norm_layer(hidden),
            nn.ReLU6(inplace=True),
        ]
        pw_linear = [nn.Conv2d(hidden, oup, 1, 1, 0, bias=False), norm_layer(oup)]
        if expand_ratio == 1:
            self.conv = nn.Sequential(*dw, *pw_linear)
        else:
            expand = [nn.Conv2d(inp, hidden, 1, 1, 0, bias=False), norm_layer(hidden), nn.ReLU6(inplace=True)]
            self.conv = nn.Sequential(*expand, *dw, *pw_linear)

    def forward(self, x: Tensor) -> Tensor:
        """(B, inp, H, W) → (B, oup, H/s, W/s)."""
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


# t (expansion), c (channels), n (blocks), s (stride of the first block)
_MBV2_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class MobileNetV2Features(nn.Module):
    """MobileNetV2 ×1.0 ``features`` without the final 1×1 320→1280 conv (CIRKD ``MobileNetV2``; key ``features.*``).

    ``output_stride`` 8 or 16 dilates the tail like CIRKD's ``_nostride_dilate``: the block whose stride would
    exceed it gets stride 1 with its depthwise conv at the running dilation, later blocks at the doubled one.
    ``output_stride=32`` is the plain ImageNet network.
    """

    def __init__(self, output_stride: int = 8, norm_layer: NormLayer = nn.BatchNorm2d) -> None:
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        features: list[nn.Module] = [
            nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), norm_layer(32), nn.ReLU6(inplace=True))
        ]
        cin, current_stride, dilation = 32, 2, 1
        for t, c, n, s in _MBV2_SETTING:
            for i in range(n):
                stride = s if i == 0 else 1
                if stride > 1 and current_stride * stride > output_stride:
                    # trade the stride for dilation: this block keeps the running dilation, later ones double it
                    features.append(InvertedResidual(cin, c, 1, t, dilation, norm_layer))
                    dilation *= stride
                else:
                    current_stride *= stride
                    features.append(InvertedResidual(cin, c, stride, t, dilation, norm_layer))
                cin = c
        self.features = nn.Sequential(*features)
        self.out_channels = cin

        _init_conv_bn(self)

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) → (B, 320, H/os, W/os)."""
        return self.features(x)


class DilatedMobileNetV2(_ImageNetBackbone):
    """CIRKD ``MobileNetV2Dilated`` (dilate_scale 8): MobileNetV2 features under ``net`` (keys ``net.features.*``).

    ``forward`` returns ``(c1, c2, c3, c4)`` taken after ``features.3/6/13/17``: (B, 24, H/4, W/4),
    (B, 32, H/8, W/8), (B, 96, H/8, W/8), (B, 320, H/8, W/8).
    """

    # ImageNet files carry the 1×1 320→1280 conv (features.18) and the classifier, both dropped here.
    imagenet_extra_prefixes: ClassVar[tuple[str, ...]] = ("features.18.", "classifier.")
    _taps: ClassVar[tuple[int, ...]] = (3, 6, 13, 17)

    def __init__(self, output_stride: int = 8, norm_layer: NormLayer = nn.BatchNorm2d) -> None:
        super().__init__()
        self.net = MobileNetV2Features(output_stride, norm_layer)
        self.output_stride = output_stride
        channels = (24, 32, 96, 320)
        reductions = tuple(min(r, output_stride) for r in (4, 8, 16, 32))
        self.feature_info: list[dict[str, Any]] = [
            {"num_chs": c, "reduction": r, "module": f"net.features.{i}"}
            for c, r, i in zip(channels, reductions, self._taps)
        ]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(B, 3, H, W) → (c1, c2, c3, c4), see the class docstring for shapes."""
        outs: list[Tensor] = []
        for i, block in enumerate(self.net.features):
            x = block(x)
            if i in self._taps:
                outs.append(x)
        c1, c2, c3, c4 = outs
        return c1, c2, c3, c4

    def _imagenet_module(self) -> nn.Module:
        return self.net


# ---------------------------------------------------------------------------------------- ImageNet weights


def load_imagenet_backbone(
    module: nn.Module,
    source: str | Path | Mapping[str, Any],
    classifier_prefixes: Sequence[str],
    *,
    strict: bool = True,
    drop_classifier: bool = False,
) -> None:
    """Load an ImageNet-pretrained backbone file into ``module`` (CIRKD's ``--pretrained-base``).

    CIRKD silently keeps only the keys the model has; here every key must match unless told otherwise.

    Args:
        module: the backbone (``ResNetV1s``, or ``MobileNetV2Features`` for MobileNetV2).
        source: a path (``.pth``/``.safetensors``, read with ``weights_only=True``) or a loaded dict; a
            ``state_dict``/``model`` container and ``module.`` prefixes are unwrapped.
        classifier_prefixes: keys of the ImageNet classifier that the dilated backbone does not have
            (``fc.`` for ResNets; ``features.18.`` and ``classifier.`` for MobileNetV2).
        strict: every backbone key must be present and every file key used (``num_batches_tracked``, absent from
            files written before PyTorch 0.4.1, may be missing). Shape mismatches always raise.
        drop_classifier: discard the ``classifier_prefixes`` keys instead of counting them as unexpected.

    Raises:
        RuntimeError: the keys do not fit; the message lists missing / unexpected keys and shape mismatches and
            says when passing ``drop_classifier=True`` would be enough.
    """
    origin, obj = read_source(source)
    state = extract_state_dict(obj, origin=origin)
    if drop_classifier:
        state = {k: v for k, v in state.items() if not k.startswith(tuple(classifier_prefixes))}

    own = module.state_dict()
    missing, unexpected, shapes = key_mismatches(own, state, source_word="file")
    if shapes or (strict and (missing or unexpected)):
        msg = f"cannot load the ImageNet backbone {origin} into {type(module).__name__} (strict={strict}):\n"
        msg += format_mismatches(missing, unexpected, shapes)
        if (
            unexpected
            and not missing
            and not shapes
            and all(k.startswith(tuple(classifier_prefixes)) for k in unexpected)
        ):
            msg += (
                f"hint: the unexpected keys are the ImageNet classifier ({', '.join(classifier_prefixes)}), which "
                "the dilated backbone does not have; pass drop_classifier=True (backbone_drop_classifier=True in the "
                "registry entry points) to drop them.\n"
            )
        elif shapes or (missing and unexpected):
            msg += (
                "hint: CIRKD's backbones are the deep-stem (64-64-128) CSAIL ImageNet files, not torchvision's or "
                "timm's ResNet/MobileNetV2 weights.\n"
            )
        raise RuntimeError(msg.rstrip("\n"))
    with torch.no_grad():
        module.load_state_dict(state, strict=strict)
