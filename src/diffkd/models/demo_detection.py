"""Two small FCOS detectors for the embedded detection demo (registered as ``demo_fcos_teacher``/``demo_fcos_student``).

The registry's detectors (ResNet-50/101 FPN at 800×1333) take seconds per image on a CPU; these take milliseconds
on 128×128 canvases. Both are torchvision's :class:`~torchvision.models.detection.FCOS` (the training, losses and
post-processing :class:`~diffkd.tasks.DetectionModule` drives) around a small plain CNN + FPN:

* **body** (``backbone.body``): ``stem`` (stride 2) and ``layer1..layer4`` (stride 2 each, then ``depth - 1``
  stride-1 blocks), 3×3 conv → norm → ReLU blocks; C3, C4, C5 = ``layer2..layer4`` (strides 8, 16, 32).
* **FPN** (``backbone.fpn``): torchvision's ``FeaturePyramidNetwork`` without extra levels, outputs ``'0', '1', '2'``
  = P3–P5 with ``fpn_channels`` channels — 64 in teacher and student, so ``backbone.fpn:*`` pairs level by level
  without an adapter (DiffKD's per-level heads, FitNet's 1×1 convs).
* **Level assignment**: torchvision's FCOS sends a location to the level whose ``[4, 8]`` × anchor size range holds
  its largest box-side distance; with anchor sizes 4/8/16 (half the strides) the ranges are P3 ≤ 32 px, P4 32–64 px,
  P5 > 64 px, which spreads the demo's 6–70 px items over the three levels (anchor sizes equal to the strides, the
  COCO setting, would put nearly all of them on P3).

Teacher: widths 24 / 32, 64, 96, 128, two blocks per stage, 3-conv head. Student: widths 16 / 16, 32, 48, 64, one
block per stage, 2-conv head.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

from diffkd.models.registry import register_model

__all__ = ["TinyBackboneFPN", "build_demo_fcos", "demo_fcos_student", "demo_fcos_teacher"]

_TAGS = ("detection", "demo", "torchvision")
_STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")


def _block(c_in: int, c_out: int, stride: int, norm: Callable[[int], nn.Module]) -> nn.Sequential:
    """3×3 conv (no bias) → norm → ReLU: (B, c_in, H, W) → (B, c_out, H / stride, W / stride)."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), norm(c_out), nn.ReLU(inplace=True))


class TinyBackboneFPN(nn.Module):
    """Plain CNN body + FPN on its stride-8/16/32 maps, as torchvision's ``BackboneWithFPN`` lays them out.

    Args:
        widths: output channels of ``stem, layer1, layer2, layer3, layer4``.
        depth: blocks per ``layer*`` stage (the first strides by 2).
        fpn_channels: channels of every FPN level (``out_channels``, what the detector head reads).
        norm: normalisation layer factory (``nn.BatchNorm2d`` or torchvision's ``FrozenBatchNorm2d``).
        in_chans: input channels (3: the data module's images are RGB).

    ``forward``: (B, in_chans, H, W) → ``OrderedDict('0': (B, F, H/8, W/8), '1': (…, H/16, …), '2': (…, H/32, …))``.
    """

    def __init__(
        self,
        widths: Sequence[int],
        depth: int,
        fpn_channels: int,
        norm: Callable[[int], nn.Module] = nn.BatchNorm2d,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork

        if len(widths) != len(_STAGES) or depth < 1:
            raise ValueError(f"widths must give {len(_STAGES)} channels ({', '.join(_STAGES)}) and depth >= 1")
        stages: OrderedDict[str, nn.Module] = OrderedDict(stem=_block(in_chans, widths[0], 2, norm))
        for i, (c_in, c_out) in enumerate(itertools.pairwise(widths), start=1):
            blocks = [_block(c_in, c_out, 2, norm)] + [_block(c_out, c_out, 1, norm) for _ in range(depth - 1)]
            stages[f"layer{i}"] = nn.Sequential(*blocks)
        self.body = nn.Sequential(stages)
        self.fpn = FeaturePyramidNetwork(list(widths[2:]), fpn_channels)
        self.out_channels = fpn_channels
        for m in self.body.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        """(B, C, H, W) → P3, P4, P5 keyed ``'0', '1', '2'``."""
        features: OrderedDict[str, Tensor] = OrderedDict()
        for name, stage in self.body.named_children():
            x = stage(x)
            if name in ("layer2", "layer3", "layer4"):
                features[str(len(features))] = x
        return self.fpn(features)


def build_demo_fcos(
    widths: Sequence[int],
    depth: int,
    head_convs: int,
    num_classes: int = 11,
    fpn_channels: int = 64,
    min_size: int = 128,
    max_size: int = 128,
    frozen_bn: bool = False,
    trainable_layers: int = 5,
    weights_backbone: str | None = None,
    score_thresh: float = 0.05,
    **kwargs: Any,
) -> nn.Module:
    """torchvision FCOS around :class:`TinyBackboneFPN` (see the module docstring), trained from scratch.

    Args:
        widths, depth, fpn_channels: see :class:`TinyBackboneFPN`.
        head_convs: conv + GroupNorm + ReLU layers in each head branch (torchvision's default is 4).
        num_classes: classes including background 0 (11: the demo's category ids 1..10).
        min_size, max_size: the transform's resize; the canvas side keeps the images as they are.
        frozen_bn: ``FrozenBatchNorm2d`` in the body (only sensible for a loaded backbone).
        trainable_layers: body stages left trainable, counted from ``layer4`` (0–5; 5 = all).
        weights_backbone: must be None (there are no pretrained weights for these bodies); accepted so that
            ``conf/model/detection.yaml``'s keys apply unchanged.
        score_thresh: lowest score kept by the post-processing (COCO AP wants the low-confidence tail too).
        **kwargs: passed to ``FCOS`` (``nms_thresh``, ``detections_per_img``, ``center_sampling_radius``, …).

    Returns:
        The detector: ``model(images, targets)`` → loss dict in training, ``model(images)`` → detections in eval.
    """
    from torchvision.models.detection import FCOS
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.fcos import FCOSHead
    from torchvision.ops import FrozenBatchNorm2d

    if weights_backbone is not None:
        raise ValueError(f"the demo detectors have no pretrained backbones; weights_backbone={weights_backbone!r}")
    if not 0 <= trainable_layers <= len(_STAGES):
        raise ValueError(f"trainable_layers must be in 0..{len(_STAGES)}, got {trainable_layers}")
    norm = FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d
    backbone = TinyBackboneFPN(widths, depth, fpn_channels, norm=norm)
    for name in _STAGES[: len(_STAGES) - trainable_layers]:
        getattr(backbone.body, name).requires_grad_(False)
    anchors = AnchorGenerator(sizes=((4,), (8,), (16,)), aspect_ratios=((1.0,),) * 3)
    head = FCOSHead(fpn_channels, anchors.num_anchors_per_location()[0], num_classes, num_convs=head_convs)
    return FCOS(
        backbone, num_classes, min_size=min_size, max_size=max_size, anchor_generator=anchors, head=head,
        score_thresh=score_thresh, **kwargs,
    )  # fmt: skip


@register_model(tags=_TAGS)
def demo_fcos_teacher(num_classes: int = 11, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Demo teacher: FCOS, body widths 24/32/64/96/128 × 2 blocks, 64-channel FPN P3–P5, 3-conv head."""
    if pretrained:
        raise ValueError("demo_fcos_teacher has no published weights: the detection demo trains it")
    return build_demo_fcos((24, 32, 64, 96, 128), depth=2, head_convs=3, num_classes=num_classes, **kwargs)


@register_model(tags=_TAGS)
def demo_fcos_student(num_classes: int = 11, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Demo student: FCOS, body widths 16/16/32/48/64 × 1 block, 64-channel FPN P3–P5, 2-conv head."""
    if pretrained:
        raise ValueError("demo_fcos_student has no published weights")
    return build_demo_fcos((16, 16, 32, 48, 64), depth=1, head_convs=2, num_classes=num_classes, **kwargs)
