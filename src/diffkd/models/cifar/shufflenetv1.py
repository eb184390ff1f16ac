"""ShuffleNet V1 for CIFAR (RepDistiller's ``ShuffleV1``: groups 3, stages 240/480/960), state-dict compatible.

A 1×1 stem conv to 24 channels (stride 1), three stages of grouped-conv bottlenecks (the first of each with stride 2
and an average-pooled shortcut that is concatenated), then global average pooling and ``linear``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from diffkd.models.cifar._common import ShuffleBlock, cifar_entry

__all__ = ["Bottleneck", "ShuffleBlock", "ShuffleNet", "ShuffleV1"]


class Bottleneck(nn.Module):
    """Grouped 1×1 → shuffle → depthwise 3×3 (stride) → grouped 1×1, then add (stride 1) or concat (stride 2).

    The final activation is the module ``out_relu`` (its input is the pre-activation). With stride 2 the output
    has ``out_planes + in_planes`` channels.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int) -> None:
        super().__init__()
        self.stride = stride
        mid_planes = int(out_planes / 4)
        g = 1 if in_planes == 24 else groups
        self.conv1 = nn.Conv2d(in_planes, mid_planes, kernel_size=1, groups=g, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_planes)
        self.shuffle1 = ShuffleBlock(groups=g)
        self.conv2 = nn.Conv2d(
            mid_planes, mid_planes, kernel_size=3, stride=stride, padding=1, groups=mid_planes, bias=False
        )
        self.bn2 = nn.BatchNorm2d(mid_planes)
        self.conv3 = nn.Conv2d(mid_planes, out_planes, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential()
        if stride == 2:
            self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1))
        self.relu1 = nn.ReLU()
        self.relu2 = nn.ReLU()
        self.out_relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.shuffle1(self.relu1(self.bn1(self.conv1(x))))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        preact = torch.cat([out, res], 1) if self.stride == 2 else out + res
        return self.out_relu(preact)


class ShuffleNet(nn.Module):
    """CIFAR ShuffleNet V1. ``forward(x)`` maps (B, in_chans, 32, 32) to logits (B, num_classes).

    Feature maps for a 32×32 input with ``out_planes = [240, 480, 960]`` (module path: shape):

    - ``relu``: (B, 24, 32, 32) (stem), ``layer1``: (B, 240, 16, 16), ``layer2``: (B, 480, 8, 8),
    - ``layer3``: (B, 960, 4, 4) — **the last feature map** (post-activation), consumed by ``avgpool``.

    State-dict keys match RepDistiller (``conv1.weight``, ``bn1.*``, ``layer1.0.conv1.weight``, …,
    ``linear.weight``). Weights keep PyTorch's default init, as in the reference.
    """

    last_feature_module = "layer3"

    def __init__(
        self,
        out_planes: Sequence[int] = (240, 480, 960),
        num_blocks: Sequence[int] = (4, 8, 4),
        groups: int = 3,
        num_classes: int = 100,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu = nn.ReLU()
        self.in_planes = 24
        self.layer1 = self._make_layer(out_planes[0], num_blocks[0], groups)
        self.layer2 = self._make_layer(out_planes[1], num_blocks[1], groups)
        self.layer3 = self._make_layer(out_planes[2], num_blocks[2], groups)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(out_planes[2], num_classes)
        self.num_features = out_planes[2]
        self.stage_channels = [24, *out_planes]

    def _make_layer(self, out_planes: int, num_blocks: int, groups: int) -> nn.Sequential:
        layers: list[nn.Module] = []
        for i in range(num_blocks):
            cat_planes = self.in_planes if i == 0 else 0  # the stride-2 block concatenates its shortcut
            layers.append(Bottleneck(self.in_planes, out_planes - cat_planes, 2 if i == 0 else 1, groups))
            self.in_planes = out_planes
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_chans, H, W) → logits (B, num_classes)."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(torch.flatten(self.avgpool(out), 1))


@cifar_entry(ShuffleNet, (240, 480, 960), (4, 8, 4), 3)
def ShuffleV1() -> None:
    """ShuffleNet V1 (groups 3, 949,258 params). Last feature map: ``layer3``, (B, 960, 4, 4)."""
