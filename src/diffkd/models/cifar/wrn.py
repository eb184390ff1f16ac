"""Wide ResNets for CIFAR (Zagoruyko & Komodakis 2016), state-dict compatible with RepDistiller/mdistiller.

``wrn_{depth}_{k}`` has depth = 6n + 4: a 3×3 stem conv, three stages of n pre-activation basic blocks with
widths ``[16k, 32k, 64k]`` and strides 1/2/2, then ``bn1 → relu → global average pool → fc``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffkd.models.cifar._common import cifar_entry, init_msra_fan_out

__all__ = ["BasicBlock", "NetworkBlock", "WideResNet", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2"]


class BasicBlock(nn.Module):
    """Pre-activation block: ``bn1 → relu1 → conv1 → bn2 → relu2 → conv2`` plus the (1×1 conv) shortcut.

    When the width changes, the shortcut ``convShortcut`` is applied to the *activated* input, as in the reference.
    (B, C_in, H, W) → (B, C_out, H / stride, W / stride); the output is not activated.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes
        self.convShortcut: nn.Conv2d | None = (
            None
            if self.equal_in_out
            else nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        act = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(act)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        return shortcut + out


class NetworkBlock(nn.Module):
    """One stage: ``layer`` = ``nb_layers`` :class:`BasicBlock` s, the first with ``stride``."""

    def __init__(self, nb_layers: int, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *(
                BasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate)
                for i in range(nb_layers)
            )
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-k for 32×32 inputs. ``forward(x)`` maps (B, in_chans, 32, 32) to logits (B, num_classes).

    Feature maps for a 32×32 input (module path: shape), with ``C = [16, 16k, 32k, 64k]``:

    - ``conv1``: (B, 16, 32, 32), ``block1``: (B, 16k, 32, 32), ``block2``: (B, 32k, 16, 16),
      ``block3``: (B, 64k, 8, 8) (not activated; ``bn1`` gives its pre-activation),
    - ``relu``: (B, 64k, 8, 8) — **the last feature map** (post-activation), consumed by ``avgpool``.

    State-dict keys match RepDistiller (``conv1.weight``, ``block1.layer.0.bn1.weight``, …, ``bn1.*``,
    ``fc.weight``). Differences from the reference, none of which changes the keys or the function on 32×32
    inputs: the ReLUs are not in-place (so that forward hooks see unmodified tensors), the pooling is global
    (``AdaptiveAvgPool2d(1)`` instead of ``avg_pool2d(·, 8)``), and ``forward`` returns only the logits.
    """

    last_feature_module = "relu"

    def __init__(
        self,
        depth: int,
        num_classes: int = 100,
        widen_factor: int = 1,
        drop_rate: float = 0.0,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_chans, channels[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, channels[0], channels[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, channels[1], channels[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, channels[2], channels[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels[3], num_classes)
        self.num_features = channels[3]
        self.stage_channels = channels
        init_msra_fan_out(self, linear_zero_bias=True)

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_chans, H, W) → logits (B, num_classes)."""
        out = self.conv1(x)
        out = self.block3(self.block2(self.block1(out)))
        out = self.relu(self.bn1(out))
        return self.fc(torch.flatten(self.avgpool(out), 1))


@cifar_entry(WideResNet, 40, widen_factor=2, teacher=True)
def wrn_40_2() -> None:
    """WRN-40-2 (2,255,156 params at 100 classes). Last feature map: ``relu``, (B, 128, 8, 8)."""


@cifar_entry(WideResNet, 40, widen_factor=1)
def wrn_40_1() -> None:
    """WRN-40-1 (569,780 params at 100 classes). Last feature map: ``relu``, (B, 64, 8, 8)."""


@cifar_entry(WideResNet, 16, widen_factor=2)
def wrn_16_2() -> None:
    """WRN-16-2 (703,284 params at 100 classes). Last feature map: ``relu``, (B, 128, 8, 8)."""


@cifar_entry(WideResNet, 16, widen_factor=1)
def wrn_16_1() -> None:
    """WRN-16-1 (180,916 params at 100 classes). Last feature map: ``relu``, (B, 64, 8, 8)."""
