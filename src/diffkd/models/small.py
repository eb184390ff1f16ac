"""Two small CNNs for 28×28 grayscale images (the Fashion-MNIST demo), fast on a laptop CPU.

Both are plain stacks of 3×3 conv → BN → ReLU blocks in ``features`` (stride 2 twice: 28 → 14 → 7), then global
average pooling and one ``Linear`` classifier. The last feature map is the output of the module ``features``:
(B, 64, 7, 7) for the teacher and (B, 48, 7, 7) for the student, so a distiller has to bridge a width gap.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from diffkd.models.variants import entry_point

__all__ = ["ConvBNReLU", "SmallCNN", "demo_cnn_student", "demo_cnn_teacher", "smallcnn_student", "smallcnn_teacher"]


class ConvBNReLU(nn.Sequential):
    """3×3 conv (no bias, padding 1) → BN → ReLU. (B, C_in, H, W) → (B, C_out, H / stride, W / stride)."""

    def __init__(self, in_chans: int, out_chans: int, stride: int = 1) -> None:
        super().__init__(
            OrderedDict(
                conv=nn.Conv2d(in_chans, out_chans, 3, stride=stride, padding=1, bias=False),
                bn=nn.BatchNorm2d(out_chans),
                relu=nn.ReLU(),
            )
        )


class SmallCNN(nn.Module):
    """``features`` (``conv1``…``convN``, each a :class:`ConvBNReLU`) → ``avgpool`` → ``fc``.

    Args:
        channels: output width of each conv block.
        strides: stride of each conv block (two 2s bring 28×28 to 7×7).
        num_classes: classifier width.
        in_chans: input channels (1 for grayscale).

    ``forward`` maps (B, in_chans, 28, 28) to logits (B, num_classes). The last feature map is the output of
    ``features`` (post-activation), of shape (B, channels[-1], 7, 7) for a 28×28 input.
    """

    last_feature_module = "features"

    def __init__(
        self, channels: Sequence[int], strides: Sequence[int], num_classes: int = 10, in_chans: int = 1
    ) -> None:
        super().__init__()
        if len(channels) != len(strides):
            raise ValueError(f"channels and strides differ in length: {len(channels)} != {len(strides)}")
        blocks: OrderedDict[str, nn.Module] = OrderedDict()
        c_in = in_chans
        for i, (c, s) in enumerate(zip(channels, strides), start=1):
            blocks[f"conv{i}"] = ConvBNReLU(c_in, c, s)
            c_in = c
        self.features = nn.Sequential(blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)
        self.num_features = c_in
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_chans, H, W) → logits (B, num_classes)."""
        return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))


def _small(
    channels: Sequence[int], strides: Sequence[int]
) -> Callable[[Callable[[], object]], Callable[..., SmallCNN]]:
    """Turn a docstring-only stub into the ``SmallCNN(channels, strides)`` entry point (see
    :mod:`diffkd.models.variants`): ``fn(num_classes=10, pretrained=False, **kwargs)``, ``in_chans`` 1 by default."""

    def make(stub: Callable[[], object]) -> Callable[..., SmallCNN]:
        name = stub.__name__

        def entry(num_classes: int = 10, pretrained: bool = False, **kwargs: Any) -> SmallCNN:
            if pretrained:
                raise ValueError(f"{name} has no published weights (train it, e.g. with the Fashion-MNIST demo)")
            kwargs.setdefault("in_chans", 1)
            return SmallCNN(channels, strides, num_classes=num_classes, **kwargs)

        return entry_point(entry, stub, ("small",))

    return make


@_small((32, 64, 128, 64), (2, 2, 1, 1))
def smallcnn_teacher() -> None:
    """Demo teacher: widths 32/64/128/64, strides 2/2/1/1 (167k params at 10 classes).

    Last feature map: ``features``, (B, 64, 7, 7) for a 28×28 input.
    """


@_small((16, 32, 48), (2, 2, 1))
def smallcnn_student() -> None:
    """Demo student: widths 16/32/48, strides 2/2/1 (19k params at 10 classes).

    Last feature map: ``features``, (B, 48, 7, 7) for a 28×28 input.
    """


# The embedded demo's pair (conf/experiment/demo.yaml). Both end on a 4×4 map (strides 2·2·2: 28 → 14 → 7 → 4)
# where DiffKD's feature head works: its cost grows with the tapped map's pixels × width², so a narrow, small last
# map keeps the two heads at +13 % of a KD step's FLOPs — the paper's CIFAR pair adds 11 % (BENCHMARKS.md) — where
# tapping smallcnn_teacher's 64 × 7 × 7 map made them cost more than the whole KD step (+115 %).


@_small((32, 64, 128, 32), (2, 2, 1, 2))
def demo_cnn_teacher() -> None:
    """Demo teacher: widths 32/64/128/32, strides 2/2/1/2 (130k params at 10 classes).

    Last feature map: ``features``, (B, 32, 4, 4) for a 28×28 input.
    """


@_small((16, 32, 48, 24), (2, 2, 1, 2))
def demo_cnn_student() -> None:
    """Demo student: widths 16/32/48/24, strides 2/2/1/2 (29k params at 10 classes).

    Last feature map: ``features``, (B, 24, 4, 4) for a 28×28 input: DiffKD's ``trans`` bridges 24 → 32 channels.
    """
