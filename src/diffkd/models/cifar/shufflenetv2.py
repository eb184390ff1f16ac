"""ShuffleNet V2 for CIFAR (RepDistiller's ``ShuffleV2`` = net size 1), state-dict compatible.

A 1×1 stem conv to 24 channels (stride 1), three stages (a stride-2 ``DownBlock`` then 3/7/3 split-and-shuffle
``BasicBlock`` s) with widths 116/232/464, a 1×1 conv to 1024 channels, global average pooling and ``linear``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from diffkd.models.cifar._common import ShuffleBlock, cifar_entry

__all__ = ["CONFIGS", "BasicBlock", "DownBlock", "ShuffleNetV2", "ShuffleV2"]

CONFIGS: dict[float, dict[str, tuple[int, ...]]] = {
    0.2: {"out_channels": (40, 80, 160, 512), "num_blocks": (3, 3, 3)},
    0.3: {"out_channels": (40, 80, 160, 512), "num_blocks": (3, 7, 3)},
    0.5: {"out_channels": (48, 96, 192, 1024), "num_blocks": (3, 7, 3)},
    1: {"out_channels": (116, 232, 464, 1024), "num_blocks": (3, 7, 3)},
    1.5: {"out_channels": (176, 352, 704, 1024), "num_blocks": (3, 7, 3)},
    2: {"out_channels": (224, 488, 976, 2048), "num_blocks": (3, 7, 3)},
}


class SplitBlock(nn.Module):
    """Split the channels at ``ratio``: (B, C, H, W) → ((B, rC, H, W), (B, C − rC, H, W))."""

    def __init__(self, ratio: float) -> None:
        super().__init__()
        self.ratio = ratio

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        c = int(x.size(1) * self.ratio)
        return x[:, :c], x[:, c:]


class BasicBlock(nn.Module):
    """Split; 1×1 → depthwise 3×3 → 1×1 on the second half; concat with the first half; shuffle. Shape-preserving."""

    def __init__(self, in_channels: int, split_ratio: float = 0.5) -> None:
        super().__init__()
        self.split = SplitBlock(split_ratio)
        c = int(in_channels * split_ratio)
        self.conv1 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, kernel_size=3, stride=1, padding=1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.shuffle = ShuffleBlock(groups=2)
        self.relu1 = nn.ReLU()
        self.relu3 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = self.split(x)
        out = self.relu1(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        out = self.relu3(self.bn3(self.conv3(out)))
        return self.shuffle(torch.cat([x1, out], 1))


class DownBlock(nn.Module):
    """Stride-2 block: two branches of ``out_channels // 2`` each, concatenated and shuffled. Halves H and W."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        # left branch
        self.conv1 = nn.Conv2d(
            in_channels, in_channels, kernel_size=3, stride=2, padding=1, groups=in_channels, bias=False
        )
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        # right branch
        self.conv3 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, kernel_size=3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, kernel_size=1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.shuffle = ShuffleBlock(groups=2)
        self.relu2 = nn.ReLU()
        self.relu3 = nn.ReLU()
        self.relu5 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out1 = self.relu2(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        out2 = self.relu3(self.bn3(self.conv3(x)))
        out2 = self.relu5(self.bn5(self.conv5(self.bn4(self.conv4(out2)))))
        return self.shuffle(torch.cat([out1, out2], 1))


class ShuffleNetV2(nn.Module):
    """CIFAR ShuffleNet V2. ``forward(x)`` maps (B, in_chans, 32, 32) to logits (B, num_classes).

    Feature maps for a 32×32 input at net size 1 (module path: shape):

    - ``relu0``: (B, 24, 32, 32) (stem), ``layer1``: (B, 116, 16, 16), ``layer2``: (B, 232, 8, 8),
      ``layer3``: (B, 464, 4, 4),
    - ``relu``: (B, 1024, 4, 4) — **the last feature map**, ``relu(bn2(conv2(layer3)))``, consumed by ``avgpool``.

    State-dict keys match RepDistiller (``conv1.weight``, ``bn1.*``, ``layer1.0.conv1.weight`` (DownBlock), …,
    ``conv2.weight``, ``bn2.*``, ``linear.weight``). Weights keep PyTorch's default init, as in the reference.
    """

    last_feature_module = "relu"

    def __init__(self, net_size: float = 1, num_classes: int = 100, in_chans: int = 3) -> None:
        super().__init__()
        out_channels = CONFIGS[net_size]["out_channels"]
        num_blocks = CONFIGS[net_size]["num_blocks"]
        self.conv1 = nn.Conv2d(in_chans, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu0 = nn.ReLU()
        self.in_channels = 24
        self.layer1 = self._make_layer(out_channels[0], num_blocks[0])
        self.layer2 = self._make_layer(out_channels[1], num_blocks[1])
        self.layer3 = self._make_layer(out_channels[2], num_blocks[2])
        self.conv2 = nn.Conv2d(out_channels[2], out_channels[3], kernel_size=1, stride=1, padding=0, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(out_channels[3], num_classes)
        self.num_features = out_channels[3]
        self.stage_channels = [24, *out_channels[:3]]

    def _make_layer(self, out_channels: int, num_blocks: int) -> nn.Sequential:
        layers: list[nn.Module] = [DownBlock(self.in_channels, out_channels)]
        layers += [BasicBlock(out_channels) for _ in range(num_blocks)]
        self.in_channels = out_channels
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_chans, H, W) → logits (B, num_classes)."""
        out = self.relu0(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.linear(torch.flatten(self.avgpool(out), 1))


@cifar_entry(ShuffleNetV2, net_size=1)
def ShuffleV2() -> None:
    """ShuffleNet V2 (net size 1, 1,355,528 params). Last feature map: ``relu``, (B, 1024, 4, 4)."""
