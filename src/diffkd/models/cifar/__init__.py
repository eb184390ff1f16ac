"""The RepDistiller/mdistiller CIFAR-100 model zoo, registered under the tag ``"cifar"``.

State-dict keys equal RepDistiller's, so its ``ckpt_epoch_240.pth`` teachers (mdistiller's ``cifar_teachers.tar``)
load with ``strict=True`` through :func:`diffkd.models.checkpoint.load_weights`. Unlike the reference, ``forward``
returns only the logits; features are taken with forward hooks. Every model class names the module that outputs
its last feature map (the tensor global pooling consumes) in ``last_feature_module``; the docstrings give shapes.
The six models with published teachers also carry the tag ``"cifar_teacher"``.
"""

from diffkd.models.cifar import mobilenetv2, resnet, resnetv2, shufflenetv1, shufflenetv2, vgg, wrn
from diffkd.models.cifar.mobilenetv2 import MobileNetV2, mobile_half
from diffkd.models.cifar.resnet import (
    ResNet,
    resnet8,
    resnet8x4,
    resnet14,
    resnet20,
    resnet32,
    resnet32x4,
    resnet44,
    resnet56,
    resnet110,
)
from diffkd.models.cifar.resnetv2 import ResNet18, ResNet50, ResNetV2
from diffkd.models.cifar.shufflenetv1 import ShuffleNet, ShuffleV1
from diffkd.models.cifar.shufflenetv2 import ShuffleNetV2, ShuffleV2
from diffkd.models.cifar.vgg import VGG, vgg8, vgg13
from diffkd.models.cifar.wrn import WideResNet, wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2

__all__ = [
    "VGG",
    "MobileNetV2",
    "ResNet",
    "ResNet18",
    "ResNet50",
    "ResNetV2",
    "ShuffleNet",
    "ShuffleNetV2",
    "ShuffleV1",
    "ShuffleV2",
    "WideResNet",
    "mobile_half",
    "mobilenetv2",
    "resnet",
    "resnet8",
    "resnet8x4",
    "resnet14",
    "resnet20",
    "resnet32",
    "resnet32x4",
    "resnet44",
    "resnet56",
    "resnet110",
    "resnetv2",
    "shufflenetv1",
    "shufflenetv2",
    "vgg",
    "vgg8",
    "vgg13",
    "wrn",
    "wrn_16_1",
    "wrn_16_2",
    "wrn_40_1",
    "wrn_40_2",
]
