"""Two small semantic segmenters for the segmentation demo (64 × 64 grey scenes of Fashion-MNIST items, 11 classes).

Both are a stride-4 stem (two 3×3 conv blocks of stride 2), a few 3×3 "context" blocks with growing dilation at
1/4 resolution, and a 1×1 classifier: ``forward`` returns ``{"out": logits (B, K, H/4, W/4)}``, which the
segmentation task resizes to the labels (bilinear, ``align_corners=False``). The dilations give every output cell
a receptive field wider than an item (about 60 px at 64 × 64), so that it can tell a shirt from a coat, which a
cell's own 4 × 4 pixels cannot. The student is narrower and shallower than the teacher.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from diffkd.models.registry import register_model

__all__ = ["DemoSegmenter", "demo_seg_student", "demo_seg_teacher"]


def _block(in_chans: int, out_chans: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    """3×3 conv (no bias) → BN → ReLU: (B, C_in, H, W) → (B, C_out, H / stride, W / stride)."""
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(in_chans, out_chans, 3, stride, padding=dilation, dilation=dilation, bias=False),
            bn=nn.BatchNorm2d(out_chans),
            relu=nn.ReLU(inplace=True),
        )
    )


class DemoSegmenter(nn.Module):
    """``stem`` (two stride-2 blocks) → ``context`` (dilated blocks) → ``classifier`` (1×1 conv).

    Args:
        stem_channels: widths of the two stride-2 blocks.
        context_channels: width of each context block.
        dilations: dilation of each context block (one per block).
        num_classes: K, logits per pixel.
        in_chans: input channels (1: grey).

    ``forward``: (B, in_chans, H, W) → ``{"out": (B, K, H/4, W/4)}``; the context features (the classifier's input)
    are the output of the module ``context``.
    """

    align_corners = False
    output_fmt = "NCHW"

    def __init__(
        self,
        stem_channels: Sequence[int],
        context_channels: int,
        dilations: Sequence[int],
        num_classes: int = 11,
        in_chans: int = 1,
    ) -> None:
        super().__init__()
        if len(stem_channels) != 2:
            raise ValueError(f"stem_channels needs two widths (two stride-2 blocks), got {list(stem_channels)}")
        c1, c2 = (int(c) for c in stem_channels)
        self.stem = nn.Sequential(OrderedDict(conv1=_block(in_chans, c1, 2), conv2=_block(c1, c2, 2)))
        blocks: OrderedDict[str, nn.Module] = OrderedDict()
        c_in = c2
        for i, d in enumerate(dilations, start=1):
            blocks[f"block{i}"] = _block(c_in, int(context_channels), dilation=int(d))
            c_in = int(context_channels)
        self.context = nn.Sequential(blocks)
        self.classifier = nn.Conv2d(c_in, num_classes, 1)
        self.num_classes = num_classes
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """(B, in_chans, H, W) → ``{"out": logits (B, K, H/4, W/4)}``."""
        return {"out": self.classifier(self.context(self.stem(x)))}


def _no_pretrained(name: str, pretrained: bool) -> None:
    if pretrained:
        raise ValueError(f"{name} has no published weights: the segmentation demo trains it (pretrained=false)")


@register_model(tags=("demo", "segmentation"))
def demo_seg_teacher(num_classes: int = 11, pretrained: bool = False, **kwargs: Any) -> DemoSegmenter:
    """Demo teacher: stem 32/64, four context blocks of 96 (dilations 1, 2, 4, 8); 0.32M parameters at 11 classes."""
    _no_pretrained("demo_seg_teacher", pretrained)
    return DemoSegmenter((32, 64), 96, (1, 2, 4, 8), num_classes=num_classes, **kwargs)


@register_model(tags=("demo", "segmentation"))
def demo_seg_student(num_classes: int = 11, pretrained: bool = False, **kwargs: Any) -> DemoSegmenter:
    """Demo student: stem 16/32, three context blocks of 48 (dilations 1, 2, 4); 61k parameters at 11 classes."""
    _no_pretrained("demo_seg_student", pretrained)
    return DemoSegmenter((16, 32), 48, (1, 2, 4), num_classes=num_classes, **kwargs)
