"""MobileNetV2 for CIFAR (RepDistiller's ``mobile_half``: expansion 6, width 0.5), state-dict compatible.

The stem conv has stride 2 (32 → 16), the inverted-residual stages are the standard ones, and the head is a 1×1
conv to 1280 channels, global average pooling and ``classifier = Sequential(Linear(1280, num_classes))``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from diffkd.models.cifar._common import cifar_entry, init_msra_fan_out

__all__ = ["InvertedResidual", "MobileNetV2", "mobile_half"]


def conv_bn(inp: int, oup: int, stride: int) -> nn.Sequential:
    """3×3 conv → BN → ReLU."""
    return nn.Sequential(nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup), nn.ReLU())


def conv_1x1_bn(inp: int, oup: int) -> nn.Sequential:
    """1×1 conv → BN → ReLU."""
    return nn.Sequential(nn.Conv2d(inp, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup), nn.ReLU())


class InvertedResidual(nn.Module):
    """Pointwise expand → depthwise 3×3 (stride) → pointwise-linear, in ``conv`` (indices 0–7 as in RepDistiller).

    Adds the input when ``stride == 1`` and the width is unchanged. (B, inp, H, W) → (B, oup, H/s, W/s).
    """

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        hidden = inp * expand_ratio
        self.stride = stride
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """CIFAR MobileNetV2. ``forward(x)`` maps (B, in_chans, 32, 32) to logits (B, num_classes).

    Feature maps for a 32×32 input at width 0.5 (module path: shape):

    - ``conv1``: (B, 16, 16, 16), ``blocks.1``: (B, 12, 16, 16), ``blocks.2``: (B, 16, 8, 8),
      ``blocks.4``: (B, 48, 4, 4), ``blocks.6``: (B, 160, 2, 2) (the block outputs are linear, not activated),
    - ``conv2``: (B, 1280, 2, 2) — **the last feature map** (post-activation), consumed by ``avgpool``.

    State-dict keys match RepDistiller (``conv1.0.weight``, ``blocks.0.0.conv.0.weight``, …, ``conv2.0.weight``,
    ``classifier.0.weight``). Differences from the reference: no ``print`` in the constructor, no in-place ReLUs,
    ``avgpool`` is global (``AdaptiveAvgPool2d(1)``, the same as ``AvgPool2d(2)`` on 32×32), logits only.
    """

    last_feature_module = "conv2"

    def __init__(self, T: int = 6, num_classes: int = 100, width_mult: float = 0.5, in_chans: int = 3) -> None:
        super().__init__()
        settings = [  # expansion t, channels c, repeats n, first stride s
            [1, 16, 1, 1],
            [T, 24, 2, 1],
            [T, 32, 3, 2],
            [T, 64, 4, 2],
            [T, 96, 3, 1],
            [T, 160, 3, 2],
            [T, 320, 1, 1],
        ]
        input_channel = int(32 * width_mult)
        self.conv1 = conv_bn(in_chans, input_channel, 2)
        self.blocks = nn.ModuleList()
        for t, c, n, s in settings:
            output_channel = int(c * width_mult)
            layers: list[nn.Module] = []
            for stride in [s] + [1] * (n - 1):
                layers.append(InvertedResidual(input_channel, output_channel, stride, t))
                input_channel = output_channel
            self.blocks.append(nn.Sequential(*layers))
        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = conv_1x1_bn(input_channel, self.last_channel)
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, num_classes))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.num_features = self.last_channel
        self.stage_channels = [int(c * width_mult) for c in (32, 24, 32, 96, 320)]
        init_msra_fan_out(self, linear_std=0.01)

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_chans, H, W) → logits (B, num_classes)."""
        out = self.conv1(x)
        for block in self.blocks:
            out = block(out)
        out = self.conv2(out)
        return self.classifier(torch.flatten(self.avgpool(out), 1))


@cifar_entry(MobileNetV2, T=6, width_mult=0.5, name="MobileNetV2")
def mobile_half() -> None:
    """MobileNetV2 (T=6, width 0.5; 812,836 params), registered as ``MobileNetV2``.

    Last feature map: ``conv2``, (B, 1280, 2, 2).
    """
