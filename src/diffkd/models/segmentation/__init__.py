"""Semantic segmentation models: the CIRKD Cityscapes zoo (the DiffKD paper's Table 6) and torchvision's DeepLabV3.

Importing this package registers ``cirkd_deeplabv3_resnet101``, ``cirkd_deeplabv3_resnet18``, ``cirkd_psp_resnet18``,
``cirkd_deeplabv3_mobilenetv2`` (:mod:`.cirkd`) and ``tv_deeplabv3_resnet50``, ``tv_deeplabv3_resnet101``,
``tv_deeplabv3_mobilenet_v3_large`` (:mod:`.tv_models`), all tagged ``"segmentation"``.

Every model returns a dict of logits ``{"out": (B, K, h, w)[, "aux": (B, K, h, w)]}`` and carries
``output_stride`` (stride of those logits: 8 for CIRKD, 1 for torchvision, which upsamples), ``align_corners``
(how to resize them to the labels), ``output_fmt`` ("NCHW"), ``feature_info`` and ``logits_modules``.
"""

from diffkd.models.segmentation.backbones import DilatedMobileNetV2, ResNetV1s, load_imagenet_backbone
from diffkd.models.segmentation.cirkd import CIRKD_WEIGHTS, CIRKDSegmentationModel, DeepLabV3, PSPNet
from diffkd.models.segmentation.tv_models import build_torchvision_segmentation

__all__ = [
    "CIRKD_WEIGHTS",
    "CIRKDSegmentationModel",
    "DeepLabV3",
    "DilatedMobileNetV2",
    "PSPNet",
    "ResNetV1s",
    "build_torchvision_segmentation",
    "load_imagenet_backbone",
]
