"""CIFAR ResNets (He et al. 2016, §4.2), state-dict compatible with RepDistiller/mdistiller.

``resnet{depth}`` has depth = 6n + 2: a 3×3 stem (stride 1), three stages of n basic blocks with strides 1/2/2,
then global average pooling and ``fc``. ``resnet8x4``/``resnet32x4`` use four times wider stages.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from diffkd.models.cifar._common import cifar_entry, init_msra_fan_out

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "resnet8",
    "resnet8x4",
    "resnet14",
    "resnet20",
    "resnet32",
    "resnet32x4",
    "resnet44",
    "resnet56",
    "resnet110",
]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3×3 convolution, padding 1, no bias."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """``conv1 → bn1 → relu → conv2 → bn2`` + shortcut, then ``out_relu``. (B, C_in, H, W) → (B, C, H/s, W/s).

    The final activation is the module ``out_relu`` (the reference uses ``F.relu``): a forward hook on it sees
    the pre-activation sum as its input and the block output as its output.
    """

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride
        self.out_relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        residual = x if self.downsample is None else self.downsample(x)
        return self.out_relu(out + residual)


class Bottleneck(nn.Module):
    """1×1 → 3×3 (stride) → 1×1 (×4 channels) bottleneck with shortcut, then ``out_relu``."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU()
        self.downsample = downsample
        self.stride = stride
        self.out_relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        residual = x if self.downsample is None else self.downsample(x)
        return self.out_relu(out + residual)


class ResNet(nn.Module):
    """CIFAR ResNet. ``forward(x)`` maps (B, in_chans, 32, 32) to logits (B, num_classes).

    Feature maps for a 32×32 input (module path: shape), with ``num_filters = [c0, c1, c2, c3]``:

    - ``relu``: (B, c0, 32, 32) (stem), ``layer1``: (B, c1, 32, 32), ``layer2``: (B, c2, 16, 16),
    - ``layer3``: (B, c3, 8, 8) — **the last feature map** (post-activation), consumed by ``avgpool``.
      ``layer3.<n-1>.out_relu``'s *input* is its pre-activation.

    State-dict keys match RepDistiller (``conv1.weight``, ``bn1.*``, ``layer1.0.conv1.weight``, …,
    ``layer2.0.downsample.0.weight``, ``fc.weight``). Differences from the reference, none of which changes the keys
    or the function on 32×32 inputs: blocks return one tensor (no ``(out, preact)`` tuples), the ReLUs are not
    in-place, and ``avgpool`` is ``AdaptiveAvgPool2d(1)`` instead of ``AvgPool2d(8)``.
    """

    last_feature_module = "layer3"

    def __init__(
        self,
        depth: int,
        num_filters: Sequence[int],
        block_name: str = "basicblock",
        num_classes: int = 100,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        block: type[BasicBlock | Bottleneck]
        if block_name.lower() == "basicblock":
            if (depth - 2) % 6 != 0:
                raise ValueError(f"with BasicBlock, depth must be 6n+2 (20, 32, 44, 56, 110, ...), got {depth}")
            n, block = (depth - 2) // 6, BasicBlock
        elif block_name.lower() == "bottleneck":
            if (depth - 2) % 9 != 0:
                raise ValueError(f"with Bottleneck, depth must be 9n+2 (20, 29, 47, 56, 110, ...), got {depth}")
            n, block = (depth - 2) // 9, Bottleneck
        else:
            raise ValueError(f"block_name must be 'basicblock' or 'bottleneck', got {block_name!r}")

        self.inplanes = num_filters[0]
        self.conv1 = nn.Conv2d(in_chans, num_filters[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.relu = nn.ReLU()
        self.layer1 = self._make_layer(block, num_filters[1], n)
        self.layer2 = self._make_layer(block, num_filters[2], n, stride=2)
        self.layer3 = self._make_layer(block, num_filters[3], n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(num_filters[3] * block.expansion, num_classes)
        self.num_features = num_filters[3] * block.expansion
        self.stage_channels = list(num_filters)
        init_msra_fan_out(self)

    def _make_layer(
        self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int, stride: int = 1
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers: list[nn.Module] = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_chans, H, W) → logits (B, num_classes)."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


_SMALL = (16, 16, 32, 64)
_X4 = (32, 64, 128, 256)


@cifar_entry(ResNet, 8, _SMALL, "basicblock")
def resnet8() -> None:
    """ResNet-8 (1 block per stage, 83,892 params). Last feature map: ``layer3``, (B, 64, 8, 8)."""


@cifar_entry(ResNet, 14, _SMALL, "basicblock")
def resnet14() -> None:
    """ResNet-14 (2 blocks per stage, 181,108 params). Last feature map: ``layer3``, (B, 64, 8, 8)."""


@cifar_entry(ResNet, 20, _SMALL, "basicblock")
def resnet20() -> None:
    """ResNet-20 (3 blocks per stage, 278,324 params). Last feature map: ``layer3``, (B, 64, 8, 8)."""


@cifar_entry(ResNet, 32, _SMALL, "basicblock")
def resnet32() -> None:
    """ResNet-32 (5 blocks per stage, 472,756 params). Last feature map: ``layer3``, (B, 64, 8, 8)."""


@cifar_entry(ResNet, 44, _SMALL, "basicblock")
def resnet44() -> None:
    """ResNet-44 (7 blocks per stage, 667,188 params). Last feature map: ``layer3``, (B, 64, 8, 8)."""


@cifar_entry(ResNet, 56, _SMALL, "basicblock", teacher=True)
def resnet56() -> None:
    """ResNet-56 (9 blocks per stage, 861,620 params). Last feature map: ``layer3``, (B, 64, 8, 8)."""


@cifar_entry(ResNet, 110, _SMALL, "basicblock", teacher=True)
def resnet110() -> None:
    """ResNet-110 (18 blocks per stage, 1,736,564 params). Last feature map: ``layer3``, (B, 64, 8, 8)."""


@cifar_entry(ResNet, 8, _X4, "basicblock")
def resnet8x4() -> None:
    """ResNet-8×4 (widths 32/64/128/256, 1,233,540 params). Last feature map: ``layer3``, (B, 256, 8, 8)."""


@cifar_entry(ResNet, 32, _X4, "basicblock", teacher=True)
def resnet32x4() -> None:
    """ResNet-32×4 (widths 32/64/128/256, 7,433,860 params). Last feature map: ``layer3``, (B, 256, 8, 8)."""
