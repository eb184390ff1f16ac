"""The parts every MMDetection-compatible detector shares: its ResNet/ResNeXt, its FPN, its input transform, its
anchors, and the backbone + neck half of reading an MMDetection checkpoint — with what every family's loader does
alike: the config's backbone style (:func:`file_style`, :func:`check_style`), what a file holds and which model here
reads it (:func:`describe_mmdet_checkpoint`), and a detector's backbone + FPN alone (:func:`convert_backbone_fpn`).
The box arithmetic is :mod:`diffkd.models.mmdet.boxes`.

Built from torchvision's detection classes so that the detection task, the taps (``backbone.fpn:*``), FPN DiffKD,
FGD, exact resume and COCO evaluation work unchanged; every number that differs from torchvision's defaults is set
as MMDetection 3.3's configs and code set it (``../shared/docs/detection-segmentation.md`` §9):

- **Backbone** (:func:`mmdet_resnet`): torchvision's ResNet/ResNeXt; ``style="pytorch"`` keeps the stride on the
  3×3 convolution of each bottleneck, ``style="caffe"`` moves it to the first 1×1 (MMDetection's ``style='caffe'``).
  Every BatchNorm is an :class:`EvalBatchNorm2d` (``norm_eval=True``: statistics never update; the affine
  parameters train unless ``bn_requires_grad=False``, the caffe configs' ``requires_grad=False``), the stem and
  ``layer1`` are frozen (``frozen_stages=1``).
- **FPN** (:func:`mmdet_fpn`): torchvision's ``FeaturePyramidNetwork`` with MMDetection's extra levels —
  ``"maxpool"`` (Faster R-CNN: P6 = max-pool(P5)), ``"on_input"`` (RetinaNet: P6 = conv(C5), P7 = conv(P6), no ReLU)
  and ``"on_output"`` with ``relu_before_extra=True`` (FCOS: P6 = conv(P5), P7 = conv(ReLU(P6))); Xavier-uniform
  initialisation as MMDetection's ``FPN``.
- **Transform** (:class:`MMDetTransform`): inputs keep torchvision's convention (RGB in [0, 1]); the model scales
  them to 0..255, flips to BGR for caffe models, normalises with the config's mean/std, resizes as mmcv's
  ``imrescale`` (scale factor ``min(max_size / long, min_size / short)``, sizes ``int(x·s + 0.5)``) and pads to a
  multiple of 32 with zeros. Named difference: MMDetection resizes the decoded uint8 image with OpenCV and rounds
  it to uint8 before normalising; here the float image is resized (bilinear, half-pixel centres, as OpenCV's
  ``INTER_LINEAR``): the two differ by at most half a grey level per pixel where a resize happens.
- **Anchors** (:class:`MMDetAnchorGenerator`): MMDetection's ``AnchorGenerator`` — float sizes, no rounding,
  centre offset 0, fixed strides (torchvision rounds base anchors to integers, truncates RetinaNet's octave sizes
  to ``int`` and derives strides from the padded image size).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool

__all__ = [
    "CAFFE_MEAN_BGR",
    "CAFFE_STD",
    "COCO_NUM_CLASSES",
    "LOSS_EPS",
    "PYTORCH_MEAN_RGB",
    "PYTORCH_STD_RGB",
    "RESNETS",
    "TAGS",
    "BackboneFPNOnly",
    "EvalBatchNorm2d",
    "ExtraConvLevels",
    "MMDetAnchorGenerator",
    "MMDetTransform",
    "MMDetWeightsError",
    "backbone_neck_rules",
    "check_style",
    "check_target_boxes",
    "check_target_labels",
    "config_text",
    "convert_backbone_fpn",
    "convert_keys",
    "describe_mmdet_checkpoint",
    "file_style",
    "fill_num_batches_tracked",
    "fpn_description",
    "frozen_stages_of",
    "is_mmdet_checkpoint",
    "is_weights_file",
    "load_backbone_weights",
    "mmdet_fpn",
    "mmdet_resnet",
    "mmdet_state_dict",
    "mmdet_transform",
    "refuse_pretrained",
    "resnet_description",
    "sigmoid_focal_loss",
    "with_weights",
]

#: MMDetection's ``data_preprocessor`` of the pytorch-style models (0..255 RGB).
PYTORCH_MEAN_RGB = (123.675, 116.28, 103.53)
PYTORCH_STD_RGB = (58.395, 57.12, 57.375)
#: ... and of the caffe-style ones (0..255 BGR, std 1).
CAFFE_MEAN_BGR = (102.9801, 115.9465, 122.7717)
CAFFE_STD = (1.0, 1.0, 1.0)

Style = Literal["pytorch", "caffe"]
ModelT = TypeVar("ModelT", bound=nn.Module)

log = logging.getLogger(__name__)

#: The ResNets/ResNeXts of the registered models: suffix of the names (``mmdet_<family>_<suffix>_fpn``) → (depth,
#: groups, width_per_group, MMDetection's name).
RESNETS: dict[str, tuple[int, int, int, str]] = {
    "r50": (50, 1, 64, "R-50"),
    "r101": (101, 1, 64, "R-101"),
    "x101_64x4d": (101, 64, 4, "X-101-64x4d"),
}
#: COCO's 80 classes + background 0, as our data gives them (``data.contiguous_labels=true``).
COCO_NUM_CLASSES = 81
#: The registry tags of every model here.
TAGS = ("detection", "coco", "mmdet")
#: MMDetection's ``weight_reduce_loss``: ``loss.sum() / (avg_factor + eps)``.
LOSS_EPS = torch.finfo(torch.float32).eps

#: ``depth`` → the torchvision builder (``groups``/``width_per_group`` make ResNeXt).
_DEPTHS = {50: "resnet50", 101: "resnet101"}


class MMDetWeightsError(RuntimeError):
    """An MMDetection checkpoint (or ImageNet backbone file) that does not fit the model it is loaded into."""


# ---------------------------------------------------------------------------------------------------- backbone
class EvalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm that always normalises with its running statistics and never updates them (MMDetection's
    ``norm_eval=True``); its weight and bias train unless their ``requires_grad`` is off. Same state-dict keys as
    ``BatchNorm2d`` (``num_batches_tracked`` included), so MMDetection's checkpoints load key for key."""

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


def mmdet_resnet(
    depth: int = 50,
    groups: int = 1,
    width_per_group: int = 64,
    style: Style = "pytorch",
    frozen_stages: int = 1,
    bn_requires_grad: bool = True,
    weights: str | None = None,
) -> nn.Module:
    """MMDetection's ``ResNet``/``ResNeXt`` as a torchvision ``ResNet`` (no classifier used; randomly initialised,
    then ``weights`` loaded by :func:`load_backbone_weights` when given).

    Args:
        depth: 50 or 101.
        groups, width_per_group: ResNeXt's cardinality and base width (64, 4 for X-101-64x4d).
        style: ``"pytorch"`` (stride on the 3×3) or ``"caffe"`` (stride on the first 1×1).
        frozen_stages: the stem and this many stages take no gradient (MMDetection's ``frozen_stages``; -1: none).
        bn_requires_grad: whether BatchNorm's weight and bias train (statistics are frozen either way).
        weights: ImageNet weights (:func:`load_backbone_weights`' ``source``); ``None``: random.
    """
    import torchvision

    if depth not in _DEPTHS:
        raise ValueError(f"depth={depth}: MMDetection-compatible ResNets here are {sorted(_DEPTHS)}")
    if style not in ("pytorch", "caffe"):
        raise ValueError(f"style={style!r}; choose pytorch or caffe")
    model = torchvision.models.resnet.ResNet(
        torchvision.models.resnet.Bottleneck,
        {50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}[depth],
        groups=groups,
        width_per_group=width_per_group,
        norm_layer=EvalBatchNorm2d,
    )
    if style == "caffe":
        for name in ("layer2", "layer3", "layer4"):
            first = getattr(model, name)[0]
            first.conv1.stride, first.conv2.stride = first.conv2.stride, (1, 1)
    for module in model.modules():
        if isinstance(module, EvalBatchNorm2d):
            module.requires_grad_(bn_requires_grad)
    frozen = ["conv1", "bn1", *(f"layer{i}" for i in range(1, frozen_stages + 1))] if frozen_stages >= 0 else []
    for name in frozen:
        getattr(model, name).requires_grad_(False)
    if weights is not None:
        load_backbone_weights(model, weights, depth, groups)
    return model


def is_weights_file(source: str) -> bool:
    """Whether a ``weights_backbone`` names a file (a checkpoint suffix, or an existing path; ``~`` expanded) rather
    than torchvision weights (``"IMAGENET1K_V1"``)."""
    return Path(source).suffix in (".pth", ".pt", ".pkl", ".safetensors") or Path(source).expanduser().exists()


def load_backbone_weights(body: nn.Module, source: str, depth: int, groups: int = 1) -> None:
    """ImageNet weights into :func:`mmdet_resnet`'s ``body`` as MMDetection initialises it.

    Args:
        source: a torchvision weights name (``"IMAGENET1K_V1"``: MMDetection's ``torchvision://resnet50``/
            ``resnet101``, and ResNeXt-101 64x4d's ``IMAGENET1K_V1``), downloaded on first use; or the path of a
            backbone file in torchvision's names — the Detectron caffe ResNets of the FCOS caffe-style configs
            (``open-mmlab://detectron/resnet50_caffe`` = ``resnet50_caffe-788b5fa3.pth``, ``resnet101_caffe`` =
            ``resnet101_caffe-3ad79236.pth``, under ``download.openmmlab.com/pretrain/third_party/``). A classifier
            (``fc.*``) in the file is left out; anything else that does not fit is an error listing it.
    """
    import torchvision

    from diffkd.models.checkpoint import extract_state_dict, read_checkpoint

    if is_weights_file(source):
        state = extract_state_dict(read_checkpoint(str(Path(source).expanduser())), origin=f"'{source}'")
        origin = f"'{source}'"
    else:
        arch = {(50, 1): "resnet50", (101, 1): "resnet101", (101, 64): "resnext101_64x4d"}.get((depth, groups))
        if arch is None:
            raise ValueError(f"no torchvision ImageNet weights for depth {depth}, groups {groups}")
        weights = torchvision.models.get_model_weights(arch).verify(source)
        state = weights.get_state_dict(progress=False)
        origin = f"torchvision's {arch} {weights.name}"
    state = {k.removeprefix("backbone."): v for k, v in state.items() if not k.startswith("fc.")}
    own = body.state_dict()
    missing = [k for k in own if k not in state and not k.startswith("fc.") and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise MMDetWeightsError(
            f"the ImageNet backbone {origin} does not fit a depth-{depth} (groups {groups}) ResNet: missing "
            f"{missing[:5]}, unexpected {unexpected[:5]}, other shapes {shapes[:5]}"
        )
    body.load_state_dict(state, strict=False)


# ---------------------------------------------------------------------------------------------------- FPN
class ExtraConvLevels(ExtraFPNBlock):
    """P6 and P7 (``p6``, ``p7``) by 3×3 stride-2 convolutions, MMDetection's ``add_extra_convs``.

    Args:
        in_channels: channels of the source of P6 (C5's for ``"on_input"``, the FPN's for ``"on_output"``).
        out_channels: the FPN's channels.
        source: ``"on_input"`` (P6 from C5, RetinaNet) or ``"on_output"`` (P6 from P5, FCOS).
        relu_before_extra: ReLU before each extra conv after the first (MMDetection's ``relu_before_extra_convs``;
            FCOS: True).
        num_extra: how many levels (2: P6, P7).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        source: Literal["on_input", "on_output"] = "on_input",
        relu_before_extra: bool = False,
        num_extra: int = 2,
    ) -> None:
        super().__init__()
        if source not in ("on_input", "on_output"):
            raise ValueError(f"source={source!r}; choose on_input or on_output")
        self.source = source
        self.relu_before_extra = relu_before_extra
        self.convs = nn.ModuleList(
            nn.Conv2d(in_channels if i == 0 else out_channels, out_channels, 3, stride=2, padding=1)
            for i in range(num_extra)
        )
        for conv in self.convs:
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, results: list[Tensor], x: list[Tensor], names: list[str]) -> tuple[list[Tensor], list[str]]:
        inp = x[-1] if self.source == "on_input" else results[-1]
        for i, conv in enumerate(self.convs):
            if self.relu_before_extra and i > 0:  # MMDetection's FPN: never before P6 (its source is taken as is)
                inp = F.relu(inp)
            inp = conv(inp)
            results.append(inp)
            names.append(f"p{6 + i}")
        return results, names


def mmdet_fpn(
    body: nn.Module,
    start_level: int,
    extra: Literal["maxpool", "on_input", "on_output"],
    relu_before_extra: bool = False,
    out_channels: int = 256,
) -> BackboneWithFPN:
    """``body`` (:func:`mmdet_resnet`) + MMDetection's FPN from ``layer{start_level + 1}`` on, as a torchvision
    ``BackboneWithFPN`` (``model.backbone``; outputs ``'0'``, ``'1'``, ... and ``'pool'`` or ``'p6'``, ``'p7'``).

    Args:
        start_level: the first ResNet stage used, 0-based (0: C2, Faster R-CNN; 1: C3, RetinaNet and FCOS).
        extra: ``"maxpool"`` (P6 = max-pool(P5), MMDetection's ``num_outs=5`` without extra convs),
            ``"on_input"`` or ``"on_output"`` (:class:`ExtraConvLevels`).
        relu_before_extra: see :class:`ExtraConvLevels`.
    """
    stages = list(range(start_level + 1, 5))
    widths = [body.inplanes // 8 * 2 ** (i - 1) for i in stages]  # 256, 512, 1024, 2048
    if extra == "maxpool":
        extra_block: ExtraFPNBlock = LastLevelMaxPool()
    else:
        source_channels = widths[-1] if extra == "on_input" else out_channels
        extra_block = ExtraConvLevels(source_channels, out_channels, extra, relu_before_extra)
    backbone = BackboneWithFPN(
        body, {f"layer{i}": str(k) for k, i in enumerate(stages)}, widths, out_channels, extra_blocks=extra_block
    )
    for blocks in (backbone.fpn.inner_blocks, backbone.fpn.layer_blocks):
        for block in blocks:
            conv = block[0]
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)
    return backbone


# ---------------------------------------------------------------------------------------------------- transform
class MMDetTransform(GeneralizedRCNNTransform):
    """torchvision's detection transform with MMDetection's arithmetic (see the module docstring).

    Args:
        min_size: the short-edge scale (a tuple: one is chosen per training image, MMDetection's
            ``RandomChoiceResize`` of ``(max_size, s)`` scales).
        max_size: the long-edge limit (1333).
        mean, std: per channel, in 0..255 units and in the model's channel order.
        bgr: the model reads BGR (caffe-style backbones).
        size_divisible: pad to a multiple of this (32).
    """

    def __init__(
        self,
        min_size: int | Sequence[int],
        max_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        bgr: bool = False,
        size_divisible: int = 32,
        **kwargs: Any,
    ) -> None:
        super().__init__(min_size, max_size, list(mean), list(std), size_divisible=size_divisible, **kwargs)
        self.bgr = bool(bgr)

    def normalize(self, image: Tensor) -> Tensor:
        if not image.is_floating_point():
            raise TypeError(f"images must be floating point in [0, 1] (RGB), got {image.dtype}")
        if image.shape[0] != 3:
            raise ValueError(f"MMDetection's detectors read 3-channel images, got {tuple(image.shape)}")
        x = image * 255.0
        if self.bgr:
            x = x.flip(0)
        mean = torch.as_tensor(self.image_mean, dtype=x.dtype, device=x.device)
        std = torch.as_tensor(self.image_std, dtype=x.dtype, device=x.device)
        return (x - mean[:, None, None]) / std[:, None, None]

    @staticmethod
    def rescaled_size(height: int, width: int, short: int, long: int) -> tuple[int, int]:
        """mmcv's ``rescale_size`` for the scale ``(long, short)``: ``(new_height, new_width)``."""
        factor = min(long / max(height, width), short / min(height, width))
        return int(height * factor + 0.5), int(width * factor + 0.5)

    def resize(self, image: Tensor, target: dict[str, Tensor] | None = None) -> tuple[Tensor, Any]:
        h, w = image.shape[-2:]
        if self.training:
            if self._skip_resize:
                return image, target
            # one scale draws nothing: the detectors' samplers replay MMDetection's torch draws, which its data
            # pipeline does not precede with one (its scale choice uses numpy)
            size = self.min_size[0] if len(self.min_size) == 1 else self.torch_choice(self.min_size)
        else:
            size = self.min_size[-1]
        new_h, new_w = self.rescaled_size(int(h), int(w), int(size), int(self.max_size))
        if (new_h, new_w) != (h, w):
            image = F.interpolate(image[None], size=(new_h, new_w), mode="bilinear", align_corners=False)[0]
        if target is not None and "boxes" in target:
            scale = torch.tensor([new_w / w, new_h / h, new_w / w, new_h / h], dtype=torch.float32)
            target["boxes"] = target["boxes"] * scale.to(target["boxes"].device, target["boxes"].dtype)
        return image, target


def mmdet_transform(
    min_size: int | Sequence[int], max_size: int, style: Style = "pytorch", **kwargs: Any
) -> MMDetTransform:
    """The :class:`MMDetTransform` of a ``style`` backbone: RGB with ImageNet's mean/std (``"pytorch"``) or BGR minus
    the Detectron mean, std 1 (``"caffe"``). ``min_size``: one short edge, or several (one per training image; a
    config's list arrives as an omegaconf ``ListConfig``, which torchvision's transform would take for one size).
    ``**kwargs``: the transform's (``_skip_resize``, ``size_divisible``, ...)."""
    sizes = (int(min_size),) if isinstance(min_size, int) else tuple(int(s) for s in min_size)
    if style == "caffe":
        return MMDetTransform(sizes, int(max_size), CAFFE_MEAN_BGR, CAFFE_STD, bgr=True, **kwargs)
    return MMDetTransform(sizes, int(max_size), PYTORCH_MEAN_RGB, PYTORCH_STD_RGB, **kwargs)


# ---------------------------------------------------------------------------------------------------- anchors
class MMDetAnchorGenerator(AnchorGenerator):
    """MMDetection's ``AnchorGenerator`` in torchvision's interface (see the module docstring).

    Args:
        strides: one per level (8, 16, ... or 4, 8, ...).
        ratios: height / width ratios (0.5, 1, 2).
        scales: anchor scales relative to the stride (Faster R-CNN: ``(8,)``); or
        octave_base_scale, scales_per_octave: RetinaNet's ``4 · 2^(i / 3)``, i < 3.
    """

    def __init__(
        self,
        strides: Sequence[int],
        ratios: Sequence[float] = (0.5, 1.0, 2.0),
        scales: Sequence[float] | None = None,
        octave_base_scale: float | None = None,
        scales_per_octave: int | None = None,
    ) -> None:
        if scales is None:
            if octave_base_scale is None or scales_per_octave is None:
                raise ValueError("give scales, or octave_base_scale and scales_per_octave")
            scales = [octave_base_scale * 2 ** (i / scales_per_octave) for i in range(scales_per_octave)]
        self.strides = tuple(int(s) for s in strides)
        sizes = tuple(tuple(float(s) * stride for s in scales) for stride in self.strides)
        super().__init__(sizes, tuple(tuple(float(r) for r in ratios) for _ in self.strides))

    def generate_anchors(
        self,
        scales: list[float],
        aspect_ratios: list[float],
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> Tensor:
        scales_t = torch.as_tensor(scales, dtype=dtype, device=device)
        ratios_t = torch.as_tensor(aspect_ratios, dtype=dtype, device=device)
        h_ratios = torch.sqrt(ratios_t)
        w_ratios = 1 / h_ratios
        ws = (w_ratios[:, None] * scales_t[None, :]).view(-1)
        hs = (h_ratios[:, None] * scales_t[None, :]).view(-1)
        return torch.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], dim=1)  # not rounded

    def valid_flags(
        self,
        grid_sizes: Sequence[Sequence[int]],
        image_size: Sequence[int],
        size_divisible: int = 32,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """MMDetection's ``valid_flags`` of one image: (Σ H·W·A,) bool, the anchors whose cell lies inside the image
        ``image_size`` (H, W) padded to a multiple of ``size_divisible`` (its own ``pad_shape``, not the batch's), for
        feature maps of ``grid_sizes`` (H_l, W_l), in :meth:`forward`'s order."""
        pad_h = math.ceil(int(image_size[0]) / size_divisible) * size_divisible
        pad_w = math.ceil(int(image_size[1]) / size_divisible) * size_divisible
        flags = []
        for (feat_h, feat_w), stride, a in zip(grid_sizes, self.strides, self.num_anchors_per_location()):
            valid_h, valid_w = min(math.ceil(pad_h / stride), int(feat_h)), min(math.ceil(pad_w / stride), int(feat_w))
            inside = (torch.arange(int(feat_h), device=device) < valid_h)[:, None] & (
                torch.arange(int(feat_w), device=device) < valid_w
            )[None, :]
            flags.append(inside.reshape(-1, 1).expand(-1, a).reshape(-1))
        return torch.cat(flags)

    def level_anchors(
        self,
        grid_sizes: Sequence[Sequence[int]],
        device: torch.device | str,
        dtype: torch.dtype = torch.float32,
    ) -> list[Tensor]:
        """Anchors per level of size (H_l, W_l): (H_l·W_l·A, 4) each, MMDetection's order (per location: ratio-major,
        scale-minor)."""
        if len(grid_sizes) != len(self.strides):
            raise ValueError(f"{len(grid_sizes)} feature maps for {len(self.strides)} anchor strides")
        strides = [[torch.tensor(s, device=device), torch.tensor(s, device=device)] for s in self.strides]
        self.set_cell_anchors(dtype, device)
        return self.grid_anchors([[int(h), int(w)] for h, w in grid_sizes], strides)

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        f = feature_maps[0]
        joined = torch.cat(self.level_anchors([m.shape[-2:] for m in feature_maps], f.device, f.dtype))
        return [joined for _ in image_list.image_sizes]


# ---------------------------------------------------------------------------------------------------- training
def check_target_boxes(targets: Sequence[Mapping[str, Tensor]], name: str) -> None:
    """Refuse a target box without a positive width and height (MMDetection's encoders would divide by zero).

    Raises:
        ValueError: naming the first such box and its target.
    """
    for index, target in enumerate(targets):
        boxes = target["boxes"]
        degenerate = (boxes[:, 2:] <= boxes[:, :2]).any(dim=1)
        if bool(degenerate.any()):
            box = boxes[degenerate][0].tolist()
            raise ValueError(f"{name}: all boxes need a positive width and height; target {index} has {box}")


def check_target_labels(targets: Sequence[Mapping[str, Tensor]], num_classes: int, name: str) -> None:
    """Refuse target labels outside the foreground classes ``1..num_classes`` (0 is background).

    Raises:
        ValueError: naming the labels and the target, and the data setting that gives contiguous labels.
    """
    for index, target in enumerate(targets):
        labels = target["labels"]
        if labels.numel() and not bool(((labels >= 1) & (labels <= num_classes)).all()):
            raise ValueError(
                f"{name}: target labels must lie in 1..{num_classes} (0 is background; num_classes={num_classes + 1}), "
                f"got {sorted(set(labels.tolist()))[:10]} in target {index}: use data.contiguous_labels=true, or set "
                "num_classes to the data's label count"
            )


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, gamma: float = 2.0, alpha: float = 0.25) -> Tensor:
    """Element-wise sigmoid focal loss as MMDetection's ``py_sigmoid_focal_loss`` writes it (same shapes in and out;
    ``targets`` one-hot floats). Named difference: on the GPU MMDetection calls mmcv's CUDA kernel of the same
    formula (``log(p)`` of the probability); this is its CPU path (the logit form): equal up to float rounding."""
    p = logits.sigmoid()
    pt = (1 - p) * targets + p * (1 - targets)
    focal_weight = (alpha * targets + (1 - alpha) * (1 - targets)) * pt.pow(gamma)
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none") * focal_weight


# ---------------------------------------------------------------------------------------------------- builders
def with_weights(model: ModelT, weights: str | Path | None) -> ModelT:
    """``model`` after loading ``weights`` with :func:`~diffkd.models.checkpoint.load_weights` (an MMDetection zoo
    file, converted, or the model's own state dict); ``None``: ``model`` as built."""
    if weights is not None:
        from diffkd.models.checkpoint import load_weights

        load_weights(model, weights)
    return model


def refuse_pretrained(label: str, zoo: str = "") -> None:
    """``pretrained=True`` downloads nothing: MMDetection's weights are zoo files (``zoo`` names them), passed as
    ``weights=<file>``.

    Raises:
        ValueError: always.
    """
    files = f" ({zoo})" if zoo else ""
    raise ValueError(
        f"{label}: pretrained=True downloads nothing (the registry has no weights of its own); MMDetection's weights "
        f"are zoo files{files}: download one and pass it as weights=<file> (a teacher: model.teacher.weights=<file>)"
    )


def frozen_stages_of(
    label: str, frozen_stages: int | None, trainable_layers: int | None = None, frozen_bn: bool = True
) -> int:
    """MMDetection's ``frozen_stages`` from a builder's arguments: ``frozen_stages`` itself (``None``: 1, the configs'
    value), or torchvision's spelling ``trainable_layers`` (``frozen_stages = 4 - trainable_layers``; 3 ↔ 1, 5 ↔ -1),
    accepted so that the detection model config (``conf/model/detection.yaml``) builds these models.

    Args:
        label: the model's name, for messages.
        frozen_bn: must stay true (MMDetection's ``norm_eval=True``).

    Raises:
        ValueError: ``frozen_bn`` false, both given and disagreeing, or out of range (-1..4; 0..5).
    """
    if not frozen_bn:
        raise ValueError(
            f"{label}: MMDetection freezes BatchNorm statistics (norm_eval=True); frozen_bn=false has no MMDetection "
            "counterpart here"
        )
    if trainable_layers is not None:
        if not 0 <= int(trainable_layers) <= 5:
            raise ValueError(f"{label}: trainable_layers must be 0..5, got {trainable_layers}")
        implied = 4 - int(trainable_layers)
        if frozen_stages is not None and int(frozen_stages) != implied:
            raise ValueError(
                f"{label}: trainable_layers={trainable_layers} means frozen_stages={implied}, but frozen_stages="
                f"{frozen_stages}: they disagree; set one of them (MMDetection's configs: frozen_stages=1, i.e. "
                "trainable_layers=3)"
            )
        frozen_stages = implied
    frozen_stages = 1 if frozen_stages is None else int(frozen_stages)
    if not -1 <= frozen_stages <= 4:
        raise ValueError(f"{label}: frozen_stages={frozen_stages}; choose -1..4")
    return frozen_stages


# ---------------------------------------------------------------------------------------------------- checkpoints
def mmdet_state_dict(obj: Mapping[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(state_dict, meta)`` of a loaded MMDetection v2/v3 checkpoint (``{"state_dict", "meta"}``, or a bare state
    dict with MMDetection's top-level names)."""
    state = obj.get("state_dict", obj)
    if not isinstance(state, Mapping) or not state:
        raise MMDetWeightsError("not an MMDetection checkpoint: no 'state_dict'")
    meta = obj.get("meta") if isinstance(obj.get("meta"), Mapping) else {}
    return {str(k).removeprefix("module."): v for k, v in state.items()}, dict(meta or {})


def is_mmdet_checkpoint(obj: Any) -> bool:
    """Whether a loaded checkpoint has MMDetection's layout (``backbone.*`` + ``neck.*`` + a head)."""
    if not isinstance(obj, Mapping):
        return False
    state = obj.get("state_dict", obj)
    if not isinstance(state, Mapping):
        return False
    tops = {str(k).removeprefix("module.").split(".", 1)[0] for k in state}
    return "backbone" in tops and "neck" in tops and bool(tops & {"bbox_head", "rpn_head", "roi_head"})


Rule = tuple[str, str]
"""``(regex on the MMDetection key, replacement)``: the first rule that matches renames a key."""


def backbone_neck_rules(num_inputs: int, extra: Literal["maxpool", "on_input", "on_output"]) -> list[Rule]:
    """Renames from MMDetection's ``backbone.*``/``neck.*`` to :func:`mmdet_fpn`'s ``backbone.body.*``/
    ``backbone.fpn.*`` (``num_inputs``: the FPN's input levels; its extra convs are ``neck.fpn_convs.<n>`` for
    ``n >= num_inputs``)."""
    rules: list[Rule] = [
        (r"^backbone\.(.*)$", r"backbone.body.\1"),
        (r"^neck\.lateral_convs\.(\d+)\.conv\.(weight|bias)$", r"backbone.fpn.inner_blocks.\1.0.\2"),
    ]
    for i in range(num_inputs):
        rules.append((rf"^neck\.fpn_convs\.{i}\.conv\.(weight|bias)$", rf"backbone.fpn.layer_blocks.{i}.0.\1"))
    if extra != "maxpool":
        for j in range(2):
            source = rf"^neck\.fpn_convs\.{num_inputs + j}\.conv\.(weight|bias)$"
            rules.append((source, rf"backbone.fpn.extra_blocks.convs.{j}.\1"))
    return rules


def convert_keys(
    state: Mapping[str, Tensor],
    rules: Sequence[Rule],
    model: nn.Module,
    origin: str,
    fits: Callable[[Mapping[str, Tensor]], str] | None = None,
) -> dict[str, Tensor]:
    """Rename ``state`` by ``rules`` and check it against ``model`` strictly.

    Raises:
        MMDetWeightsError: keys no rule renames, model keys left unfilled, or shapes that differ — listed, with
            what the file is (``fits(state)``, e.g. "RetinaNet R-101 FPN, 80 classes → mmdet_retinanet_r101_fpn").
    """
    compiled = [(re.compile(p), r) for p, r in rules]
    out: dict[str, Tensor] = {}
    unmatched = []
    for key, value in state.items():
        for pattern, repl in compiled:
            if pattern.match(key):
                out[pattern.sub(repl, key)] = value
                break
        else:
            unmatched.append(key)
    own = model.state_dict()
    missing = [k for k in own if k not in out]
    unexpected = unmatched + [k for k in out if k not in own]
    shapes = [
        f"{k}: file {tuple(out[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in out and out[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        lines = [f"cannot load the MMDetection checkpoint {origin} into {type(model).__name__}:"]
        for what, names in (("missing", missing), ("unexpected (MMDetection names)", unexpected), ("shapes", shapes)):
            if names:
                lines.append(f"  {what} ({len(names)}): {', '.join(names[:8])}{' …' if len(names) > 8 else ''}")
        if fits is not None:
            lines.append(f"  the file holds: {fits(state)}")
        raise MMDetWeightsError("\n".join(lines))
    return out


def resnet_description(state: Mapping[str, Tensor]) -> str:
    """``"R-50"``, ``"R-101"``, ``"X-101-64x4d"`` ... read from the backbone's keys and shapes."""
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"backbone\.layer3\.(\d+)\.", k))}
    depth = {6: 50, 23: 101, 36: 152}.get(len(blocks), f"?({len(blocks)} blocks in layer3)")
    conv2 = state.get("backbone.layer1.0.conv2.weight")
    if conv2 is not None and conv2.shape[1] != conv2.shape[0]:
        groups = conv2.shape[0] // conv2.shape[1]
        return f"X-{depth}-{groups}x{conv2.shape[0] // groups}d"
    return f"R-{depth}"


def config_text(meta: Mapping[str, Any]) -> str:
    """The config a checkpoint was trained with, as text (v2 ``meta["config"]``, v3 ``meta["cfg"]``; ``""``: none)."""
    for key in ("config", "cfg"):
        value = meta.get(key)
        if value:
            return value if isinstance(value, str) else str(value)
    return ""


def file_style(meta: Mapping[str, Any]) -> Style | None:
    """``"caffe"``/``"pytorch"`` where a checkpoint's config says which backbone style it trained (its first
    ``style=...``, or ``'style': ...`` of a dict's text); ``None`` where it does not say."""
    found = re.search(r"""['"]?\bstyle['"]?\s*[=:]\s*['"](caffe|pytorch)['"]""", config_text(meta))
    return found.group(1) if found else None  # type: ignore[return-value]


def check_style(meta: Mapping[str, Any], style: Style, origin: str, name: str, state: Mapping[str, Tensor]) -> None:
    """Refuse a checkpoint whose config trained the other backbone style: it has this model's keys but computes
    something else (the stride on the first 1×1 or on the 3×3 convolution; BGR with std 1 or RGB with ImageNet's).

    Raises:
        MMDetWeightsError: saying what the file holds (:func:`describe_mmdet_checkpoint`).
    """
    found = file_style(meta)
    if found is not None and found != style:
        raise MMDetWeightsError(
            f"the MMDetection checkpoint {origin} trained a {found}-style backbone (its config sets "
            f"style='{found}'), {name} is {style}-style (where the stride sits, the input normalisation): the file "
            f"holds {describe_mmdet_checkpoint(state, meta)}"
        )


def fill_num_batches_tracked(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``state`` (changed in place) with BatchNorm's ``num_batches_tracked``, absent from some files, filled with 0."""
    for key in [k for k in state if k.endswith(".running_mean")]:
        state.setdefault(key.removesuffix("running_mean") + "num_batches_tracked", torch.tensor(0))
    return state


def fpn_description(state: Mapping[str, Tensor]) -> tuple[str, Literal["maxpool", "on_input", "on_output"] | None]:
    """MMDetection's FPN in a state dict: its text (e.g. ``"FPN C3–C5 with 2 extra convs, P6 from C5
    (RetinaNet's)"``) and the :func:`mmdet_fpn` ``extra`` that builds it (``None``: none of the FPNs here)."""
    lateral = sorted(int(m.group(1)) for k in state if (m := re.match(r"neck\.lateral_convs\.(\d+)\.conv\.weight$", k)))
    outputs = sorted(int(m.group(1)) for k in state if (m := re.match(r"neck\.fpn_convs\.(\d+)\.conv\.weight$", k)))
    if not lateral:
        return "no FPN (neck.lateral_convs)", None
    first_in = int(state[f"neck.lateral_convs.{lateral[0]}.conv.weight"].shape[1])
    start = {256: 2, 512: 3, 1024: 4}.get(first_in)
    inputs = f"C{start}–C{start + len(lateral) - 1}" if start else f"{len(lateral)} inputs from {first_in} channels"
    extra = [i for i in outputs if i >= len(lateral)]
    if not extra:
        fits = start == 2 and len(lateral) == len(outputs) == 4
        return f"FPN {inputs}, no extra convs (a max-pooled P6 at most: Faster R-CNN's)", "maxpool" if fits else None
    source = int(state[f"neck.fpn_convs.{extra[0]}.conv.weight"].shape[1])
    on_input = source != int(state[f"neck.lateral_convs.{lateral[0]}.conv.weight"].shape[0])
    where = "from C5 (RetinaNet's)" if on_input else "from P5 (FCOS's, ATSS's, ...)"
    kind: Literal["on_input", "on_output"] = "on_input" if on_input else "on_output"
    fits = start == 3 and len(lateral) == 3 and len(extra) == 2
    return f"FPN {inputs} with {len(extra)} extra convs, P6 {where}", kind if fits else None


def _detector(state: Mapping[str, Tensor]) -> tuple[str, int | None, str]:
    """The detector of an MMDetection state dict, its classes (without background; ``None``: unknown) and what its
    head is where the family has variants (FCOS: ``" GN-head"`` or ``" head without GroupNorm"``)."""
    has = lambda prefix: any(k.startswith(prefix) for k in state)  # noqa: E731
    mask = has("roi_head.mask_head")
    for prefix, family in (
        ("roi_head.bbox_head.0.", "Cascade Mask R-CNN" if mask else "Cascade R-CNN"),
        ("roi_head.bbox_head.", "Mask R-CNN" if mask else "Faster R-CNN"),
    ):
        if has(prefix):
            cls = state.get(f"{prefix}fc_cls.weight")
            return family, None if cls is None else int(cls.shape[0]) - 1, ""
    if "bbox_head.retina_cls.weight" in state and "bbox_head.retina_reg.weight" in state:
        anchors = max(1, int(state["bbox_head.retina_reg.weight"].shape[0]) // 4)
        return "RetinaNet", int(state["bbox_head.retina_cls.weight"].shape[0]) // anchors, ""
    for name in ("conv", "fcos"):  # MMDetection < 2.3 named FCOS's predictors fcos_*
        if f"bbox_head.{name}_centerness.weight" in state and f"bbox_head.{name}_cls.weight" in state:
            gn = any(k.startswith("bbox_head.cls_convs.") and ".gn." in k for k in state)
            classes = int(state[f"bbox_head.{name}_cls.weight"].shape[0])
            return "FCOS", classes, " GN-head" if gn else " head without GroupNorm"
    heads = sorted({k.split(".", 1)[0] for k in state} - {"backbone", "neck", "data_preprocessor"})
    dense = sorted({k.split(".")[1] for k in state if k.startswith("bbox_head.") and k.count(".") >= 2})
    listed = [f"bbox_head: {', '.join(dense)}" if h == "bbox_head" and dense else h for h in heads]
    return f"a detector ({'; '.join(listed) or 'no head'}) on", None, ""


#: The registered detectors by the file they read whole: family (+ head) → (the FPN's ``extra``, the backbone
#: style, the name with the backbone's suffix, the suffixes registered).
_MODELS: dict[str, tuple[str, Style, str, Sequence[str]]] = {
    "RetinaNet": ("on_input", "pytorch", "mmdet_retinanet_{}_fpn", tuple(RESNETS)),
    "Faster R-CNN": ("maxpool", "pytorch", "mmdet_faster_rcnn_{}_fpn", tuple(RESNETS)),
    "FCOS GN-head": ("on_output", "caffe", "mmdet_fcos_{}_caffe_fpn_gn", ("r50", "r101")),
}


def describe_mmdet_checkpoint(state: Mapping[str, Tensor], meta: Mapping[str, Any] | None = None) -> str:
    """What an MMDetection state dict holds — the detector, its backbone (and style, where its config ``meta`` says
    caffe), its classes — the registered model here that reads it, and its FPN, e.g. ``"RetinaNet X-101-64x4d FPN,
    80 classes → mmdet_retinanet_x101_64x4d_fpn; FPN C3–C5 with 2 extra convs, P6 from C5 (RetinaNet's)"``.

    The model: the whole detector's where family, backbone, style and FPN fit one (``mmdet_retinanet_*``,
    ``mmdet_faster_rcnn_*``, ``mmdet_fcos_*``, with ``num_classes`` where the classes are not COCO's 80); else the one
    that reads its backbone + FPN only (``mmdet_fpn_teacher_*`` for a Faster R-CNN FPN, e.g. a Cascade Mask R-CNN's;
    ``mmdet_retinanet_*(backbone_only=True)`` for RetinaNet's); else none.
    """
    family, classes, head = _detector(state)
    style = file_style(meta or {})
    if "backbone.layer1.0.conv2.weight" in state and any(k.startswith("backbone.layer3.") for k in state):
        backbone = resnet_description(state)
    else:
        backbone = "a backbone other than ResNet/ResNeXt"
    neck, extra = fpn_description(state)
    suffix = next((k for k, v in RESNETS.items() if v[3] == backbone), None)
    text = f"{family} {backbone}{' caffe' if style == 'caffe' else ''} FPN{head}"
    if classes is not None:
        text += f", {classes} classes"
    fit, why = _MODELS.get(family + head), ""
    if fit is not None and extra == fit[0] and suffix in fit[3]:
        model = fit[2].format(suffix)
        if style not in (None, fit[1]):
            why = f" ({model} is {fit[1]}-style, the file {style}-style)"
        else:
            if classes is not None and classes != COCO_NUM_CLASSES - 1:
                model += f"(num_classes={classes + 1})"
            return f"{text} → {model}; {neck}"
    if extra == "maxpool" and suffix:
        teacher = f"mmdet_fpn_teacher_{suffix}{', style=caffe' if style == 'caffe' else ''}"
    elif extra == "on_input" and style != "caffe" and suffix:
        teacher = f"mmdet_retinanet_{suffix}_fpn(backbone_only=True)"
    else:
        return f"{text} → no model here reads it{why}; {neck}"
    return f"{text} → its FPN features only: {teacher} (teacher_runs: backbone, no regression KD); {neck}"


class BackboneFPNOnly(nn.Module):
    """A detector's ``backbone`` alone, so that its keys (``backbone.*``) are checked strictly by themselves."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone


def convert_backbone_fpn(
    model: nn.Module,
    state: Mapping[str, Tensor],
    origin: str,
    num_inputs: int,
    extra: Literal["maxpool", "on_input", "on_output"],
    fits: Callable[[Mapping[str, Tensor]], str] | None = describe_mmdet_checkpoint,
    *,
    logger: logging.Logger = log,
    level: int = logging.WARNING,
    consequence: str = "the model's heads keep their initialisation",
) -> dict[str, Tensor]:
    """``model``'s full state dict with the ``backbone.*`` + ``neck.*`` tensors of an MMDetection checkpoint in
    ``model.backbone`` (:func:`mmdet_fpn`) and every other tensor (the heads) as the model has it; the heads left out
    are logged.

    Any zoo detector with a ResNet/ResNeXt + FPN that fit ``model.backbone`` can serve this way (a teacher whose FPN
    levels are distilled, ``teacher_runs: backbone``): RetinaNet's ``backbone_only=True`` and the FPN teachers
    (``mmdet_fpn_teacher_*``, whose model is the backbone alone) read their files with it.

    Args:
        state: the file's state dict (MMDetection's names).
        origin: the file, for messages.
        num_inputs, extra: the FPN's input levels and extra levels (see :func:`backbone_neck_rules`).
        fits: ``fits(state)`` says what the file is in the error and the log line.
        logger, level, consequence: where the log line goes, at which level, and what it says follows.

    Raises:
        MMDetWeightsError: the file's backbone or FPN does not fit ``model.backbone`` (listed).
    """
    picked = {k: v for k, v in state.items() if k.startswith(("backbone.", "neck."))}
    if not picked:
        raise MMDetWeightsError(f"the MMDetection checkpoint {origin} has no backbone.* / neck.* tensors")
    described = fits(state) if fits is not None else ""  # the whole file, heads included
    describe = None if fits is None else (lambda _: described)
    converted = convert_keys(picked, backbone_neck_rules(num_inputs, extra), BackboneFPNOnly(model.backbone), origin,
                             describe)  # fmt: skip
    full = dict(model.state_dict())
    full.update(converted)
    left = sorted({k.split(".", 1)[0] for k in state} - {"backbone", "neck"})
    logger.log(
        level,
        "%s: loaded only the backbone + FPN of %s (%s); left out %d tensors of its heads (%s): %s",
        getattr(model, "name", type(model).__name__), origin, described.split(" → ")[0], len(state) - len(picked),
        ", ".join(left) or "none", consequence,
    )  # fmt: skip
    return full
