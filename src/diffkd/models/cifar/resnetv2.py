"""Four-stage ResNets for CIFAR (``ResNet18``, ``ResNet50``), state-dict compatible with RepDistiller/mdistiller.

These are ImageNet-width ResNets (64/128/256/512 planes) with a 3×3 stride-1 stem and no max-pool, so that a 32×32
input ends at 4×4. (RepDistiller calls the file ``resnetv2.py``; the blocks are ordinary post-activation blocks.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from diffkd.models.cifar._common import cifar_entry, init_msra_fan_out

__all__ = ["BasicBlockV2", "BottleneckV2", "ResNet18", "ResNet50", "ResNetV2"]


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Sequential:
    """Identity (an empty ``Sequential``) or 1×1 conv + BN when the shape changes."""
    if stride == 1 and in_planes == out_planes:
        return nn.Sequential()
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(out_planes)
    )


class BasicBlockV2(nn.Module):
    """``conv1 → bn1 → relu → conv2 → bn2`` + ``shortcut``, then ``out_relu``. (B, C_in, H, W) → (B, C, H/s, W/s)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_planes, self.expansion * planes, stride)
        self.relu = nn.ReLU()
        self.out_relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.out_relu(out + self.shortcut(x))


class BottleneckV2(nn.Module):
    """1×1 → 3×3 (stride) → 1×1 (×4) bottleneck + ``shortcut``, then ``out_relu``."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, self.expansion * planes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(self.expansion * planes)
        self.shortcut = _shortcut(in_planes, self.expansion * planes, stride)
        self.relu1 = nn.ReLU()
        self.relu2 = nn.ReLU()
        self.out_relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.out_relu(out + self.shortcut(x))


class ResNetV2(nn.Module):
    """Four-stage CIFAR ResNet. ``forward(x)`` maps (B, in_chans, 32, 32) to logits (B, num_classes).

    Feature maps for a 32×32 input (module path: shape), with ``e`` = block expansion (1 for ResNet18, 4 for
    ResNet50):

    - ``relu``: (B, 64, 32, 32) (stem), ``layer1``: (B, 64e, 32, 32), ``layer2``: (B, 128e, 16, 16),
      ``layer3``: (B, 256e, 8, 8),
    - ``layer4``: (B, 512e, 4, 4) — **the last feature map** (post-activation), consumed by ``avgpool``.

    State-dict keys match RepDistiller (``conv1.weight``, ``bn1.*``, ``layer1.0.shortcut.0.weight``, …,
    ``linear.weight``). The ReLUs are modules (not ``F.relu``) and blocks return one tensor; ``forward`` returns
    only the logits.
    """

    last_feature_module = "layer4"

    def __init__(
        self,
        block: type[BasicBlockV2 | BottleneckV2],
        num_blocks: Sequence[int],
        num_classes: int = 100,
        zero_init_residual: bool = False,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_chans, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.layer1 = self._make_layer(block, 64, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(block, 128, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(block, 256, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(block, 512, num_blocks[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(512 * block.expansion, num_classes)
        self.num_features = 512 * block.expansion
        self.stage_channels = [64 * block.expansion * 2**i for i in range(4)]
        init_msra_fan_out(self)
        if zero_init_residual:  # each residual branch starts at zero (Goyal et al. 2017)
            for m in self.modules():
                if isinstance(m, BottleneckV2):
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlockV2):
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(
        self, block: type[BasicBlockV2 | BottleneckV2], planes: int, num_blocks: int, stride: int
    ) -> nn.Sequential:
        layers: list[nn.Module] = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_chans, H, W) → logits (B, num_classes)."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(torch.flatten(self.avgpool(out), 1))


@cifar_entry(ResNetV2, BasicBlockV2, [2, 2, 2, 2])
def ResNet18() -> None:
    """CIFAR ResNet-18 ([2, 2, 2, 2] basic blocks, 11,220,132 params). Last feature map: ``layer4``, (B, 512, 4, 4)."""


@cifar_entry(ResNetV2, BottleneckV2, [3, 4, 6, 3], teacher=True)
def ResNet50() -> None:
    """CIFAR ResNet-50 ([3, 4, 6, 3] bottlenecks, 23,705,252 params). Last feature map: ``layer4``, (B, 2048, 4, 4)."""
