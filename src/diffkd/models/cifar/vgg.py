"""VGG with batch norm for CIFAR (``vgg8`` = cfg "S", ``vgg13`` = cfg "B"), state-dict compatible with RepDistiller.

Five conv blocks ``block0``…``block4`` (3×3 conv → BN → ReLU, the last ReLU of each block taken out and applied as
``relu0``…``relu4``), 2×2 max-pools after blocks 0–2 (and after block 3 only for 64×64 inputs, as in the
reference), then global average pooling and ``classifier = Linear(512, num_classes)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from diffkd.models.cifar._common import cifar_entry, init_msra_fan_out

__all__ = ["VGG", "vgg8", "vgg13"]

CFG: dict[str, list[list[int]]] = {
    "A": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "B": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "D": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "E": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
    "S": [[64], [128], [256], [512], [512]],
}


def _make_block(widths: Sequence[int], batch_norm: bool, in_channels: int) -> nn.Sequential:
    """``conv → [BN] → ReLU`` per width, without the final ReLU (so indices match RepDistiller's keys)."""
    layers: list[nn.Module] = []
    for v in widths:
        layers.append(nn.Conv2d(in_channels, v, kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(v))
        layers.append(nn.ReLU())
        in_channels = v
    return nn.Sequential(*layers[:-1])


class VGG(nn.Module):
    """CIFAR VGG. ``forward(x)`` maps (B, in_chans, 32, 32) to logits (B, num_classes).

    Feature maps for a 32×32 input (module path: shape), post-activation; ``blockK`` gives the pre-activation:

    - ``relu0``: (B, 64, 32, 32), ``relu1``: (B, 128, 16, 16), ``relu2``: (B, 256, 8, 8), ``relu3``: (B, 512, 4, 4),
    - ``relu4``: (B, 512, 4, 4) — **the last feature map**, consumed by ``pool4`` (global average pooling).

    State-dict keys match RepDistiller (``block0.0.weight``, ``block0.1.*`` (BN), …, ``classifier.weight``). The
    ReLUs between blocks are modules (the reference uses ``F.relu``) and no ReLU is in-place.
    """

    last_feature_module = "relu4"

    def __init__(
        self,
        cfg: Sequence[Sequence[int]],
        batch_norm: bool = False,
        num_classes: int = 100,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        self.block0 = _make_block(cfg[0], batch_norm, in_chans)
        self.block1 = _make_block(cfg[1], batch_norm, cfg[0][-1])
        self.block2 = _make_block(cfg[2], batch_norm, cfg[1][-1])
        self.block3 = _make_block(cfg[3], batch_norm, cfg[2][-1])
        self.block4 = _make_block(cfg[4], batch_norm, cfg[3][-1])
        self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool3 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool4 = nn.AdaptiveAvgPool2d((1, 1))
        self.relu0, self.relu1, self.relu2, self.relu3, self.relu4 = (nn.ReLU() for _ in range(5))
        self.classifier = nn.Linear(512, num_classes)
        self.num_features = 512
        self.stage_channels = [c[-1] for c in cfg]
        init_msra_fan_out(self, linear_std=0.01)

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_chans, H, W) → logits (B, num_classes). ``pool3`` is applied only when H == 64 (reference)."""
        h = x.shape[2]
        x = self.pool0(self.relu0(self.block0(x)))
        x = self.pool1(self.relu1(self.block1(x)))
        x = self.pool2(self.relu2(self.block2(x)))
        x = self.relu3(self.block3(x))
        if h == 64:
            x = self.pool3(x)
        x = self.relu4(self.block4(x))
        return self.classifier(torch.flatten(self.pool4(x), 1))


@cifar_entry(VGG, CFG["S"], batch_norm=True)
def vgg8() -> None:
    """VGG-8 with BN (cfg "S", 3,965,028 params). Last feature map: ``relu4``, (B, 512, 4, 4)."""


@cifar_entry(VGG, CFG["B"], batch_norm=True, teacher=True)
def vgg13() -> None:
    """VGG-13 with BN (cfg "B", 9,462,180 params). Last feature map: ``relu4``, (B, 512, 4, 4)."""
