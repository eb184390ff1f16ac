"""CIRKD's segmentation heads: DeepLabV3 (ASPP), PSPNet (pyramid pooling) and the auxiliary FCN head.

Module names follow CIRKD commit 05a2753 (``models/deeplabv3.py``, ``models/deeplabv3_mobile.py``,
``models/pspnet.py``), so the state-dict keys are ``head.aspp.b0.0.weight``, ``head.aspp.b1.block.0.weight``,
``head.aspp.b4.gap.1.weight``, ``head.aspp.project.0.weight``, ``head.block.4.bias``, ``head.psp.conv1.0.weight``,
``head.classifier.weight``, ``auxlayer.block.4.weight``, ... Bilinear resizes use ``align_corners=True`` as there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ASPP", "ASPPConv", "ASPPPooling", "DeepLabHead", "FCNHead", "PSPHead", "PyramidPooling"]

NormLayer = Callable[[int], nn.Module]


def _conv_bn_relu(cin: int, cout: int, norm_layer: NormLayer, kernel: int = 1, dilation: int = 1) -> list[nn.Module]:
    pad = dilation * (kernel // 2)
    return [nn.Conv2d(cin, cout, kernel, padding=pad, dilation=dilation, bias=False), norm_layer(cout), nn.ReLU(True)]


class ASPPConv(nn.Module):
    """3×3 atrous conv + BN + ReLU in ``block`` (CIRKD ``_ASPPConv``): (B, cin, h, w) → (B, cout, h, w)."""

    def __init__(self, cin: int, cout: int, rate: int, norm_layer: NormLayer = nn.BatchNorm2d) -> None:
        super().__init__()
        self.block = nn.Sequential(*_conv_bn_relu(cin, cout, norm_layer, 3, rate))

    def forward(self, x: Tensor) -> Tensor:
        """(B, cin, h, w) → (B, cout, h, w)."""
        return self.block(x)


class ASPPPooling(nn.Module):
    """Image pooling branch in ``gap`` (CIRKD ``_AsppPooling``): GAP → 1×1 + BN + ReLU → bilinear back to h×w."""

    def __init__(self, cin: int, cout: int, norm_layer: NormLayer = nn.BatchNorm2d) -> None:
        super().__init__()
        self.gap = nn.Sequential(nn.AdaptiveAvgPool2d(1), *_conv_bn_relu(cin, cout, norm_layer))

    def forward(self, x: Tensor) -> Tensor:
        """(B, cin, h, w) → (B, cout, h, w)."""
        return F.interpolate(self.gap(x), x.shape[-2:], mode="bilinear", align_corners=True)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (CIRKD ``_ASPP``): 1×1 ``b0``, 3×3 at ``rates`` ``b1..b3``, pooling ``b4``,
    concatenated and projected by 1×1 + BN + ReLU + Dropout(0.5) (``project``)."""

    def __init__(
        self, cin: int, cout: int, rates: Sequence[int] = (12, 24, 36), norm_layer: NormLayer = nn.BatchNorm2d
    ) -> None:
        super().__init__()
        r1, r2, r3 = rates
        self.b0 = nn.Sequential(*_conv_bn_relu(cin, cout, norm_layer))
        self.b1 = ASPPConv(cin, cout, r1, norm_layer)
        self.b2 = ASPPConv(cin, cout, r2, norm_layer)
        self.b3 = ASPPConv(cin, cout, r3, norm_layer)
        self.b4 = ASPPPooling(cin, cout, norm_layer)
        self.project = nn.Sequential(*_conv_bn_relu(5 * cout, cout, norm_layer), nn.Dropout(0.5))

    def forward(self, x: Tensor) -> Tensor:
        """(B, cin, h, w) → (B, cout, h, w)."""
        return self.project(torch.cat([self.b0(x), self.b1(x), self.b2(x), self.b3(x), self.b4(x)], dim=1))


class DeepLabHead(nn.Module):
    """DeepLabV3 head (CIRKD ``_DeepLabHead``): ``aspp`` then ``block`` = 3×3 conv + BN + ReLU + Dropout(0.1)
    + 1×1 classifier (``block.4``).

    CIRKD's width is 128 for ResNet-18 and MobileNetV2 and 256 for ResNet-101. The pre-classifier feature
    (CIRKD's ``x_feat_after_aspp``) is the output of ``block.3``.
    """

    def __init__(
        self,
        cin: int,
        num_classes: int,
        channels: int,
        rates: Sequence[int] = (12, 24, 36),
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        self.aspp = ASPP(cin, channels, rates, norm_layer)
        self.block = nn.Sequential(
            *_conv_bn_relu(channels, channels, norm_layer, 3), nn.Dropout(0.1), nn.Conv2d(channels, num_classes, 1)
        )

    def forward(self, x: Tensor) -> Tensor:
        """(B, cin, h, w) → logits (B, num_classes, h, w)."""
        return self.block(self.aspp(x))


class PyramidPooling(nn.Module):
    """PSP pyramid pooling (CIRKD ``_PyramidPooling``): bins 1, 2, 3, 6, each 1×1 cin→cin/4 + BN + ReLU
    (``conv1..conv4``), upsampled and concatenated with the input: (B, cin, h, w) → (B, 2·cin, h, w)."""

    def __init__(self, cin: int, norm_layer: NormLayer = nn.BatchNorm2d, bins: Sequence[int] = (1, 2, 3, 6)) -> None:
        super().__init__()
        self.bins = tuple(bins)
        cout = cin // 4
        self.conv1 = nn.Sequential(*_conv_bn_relu(cin, cout, norm_layer))
        self.conv2 = nn.Sequential(*_conv_bn_relu(cin, cout, norm_layer))
        self.conv3 = nn.Sequential(*_conv_bn_relu(cin, cout, norm_layer))
        self.conv4 = nn.Sequential(*_conv_bn_relu(cin, cout, norm_layer))

    def forward(self, x: Tensor) -> Tensor:
        """(B, cin, h, w) → (B, 2·cin, h, w)."""
        size = x.shape[-2:]
        feats = [x]
        for bin_size, conv in zip(self.bins, (self.conv1, self.conv2, self.conv3, self.conv4)):
            pooled = conv(F.adaptive_avg_pool2d(x, bin_size))
            feats.append(F.interpolate(pooled, size, mode="bilinear", align_corners=True))
        return torch.cat(feats, dim=1)


class PSPHead(nn.Module):
    """PSPNet head (CIRKD ``_PSPHead``): ``psp`` → ``block`` (3×3 2·cin→channels + BN + ReLU + Dropout(0.1))
    → ``classifier`` (1×1). CIRKD's width is 128 for ResNet-18 (512 for 2048-channel backbones)."""

    def __init__(self, cin: int, num_classes: int, channels: int, norm_layer: NormLayer = nn.BatchNorm2d) -> None:
        super().__init__()
        self.psp = PyramidPooling(cin, norm_layer)
        self.block = nn.Sequential(*_conv_bn_relu(2 * cin, channels, norm_layer, 3), nn.Dropout(0.1))
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        """(B, cin, h, w) → logits (B, num_classes, h, w)."""
        return self.classifier(self.block(self.psp(x)))


class FCNHead(nn.Module):
    """Auxiliary FCN head (CIRKD ``_FCNHead``) in ``block``: 3×3 cin→cin/4 + BN + ReLU + Dropout(0.1) + 1×1."""

    def __init__(self, cin: int, num_classes: int, norm_layer: NormLayer = nn.BatchNorm2d) -> None:
        super().__init__()
        mid = cin // 4
        self.block = nn.Sequential(
            *_conv_bn_relu(cin, mid, norm_layer, 3), nn.Dropout(0.1), nn.Conv2d(mid, num_classes, 1)
        )

    def forward(self, x: Tensor) -> Tensor:
        """(B, cin, h, w) → logits (B, num_classes, h, w)."""
        return self.block(x)
