"""Helpers shared by the CIFAR zoo: the entry-point factory, the ``pretrained`` guard and the reference weight
initialisations."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn

from diffkd.models.variants import entry_point

__all__ = ["CIFAR_TEACHERS_HINT", "ShuffleBlock", "check_pretrained", "cifar_entry", "init_msra_fan_out"]

M = TypeVar("M", bound=nn.Module)

CIFAR_TEACHERS_HINT = (
    "mdistiller's CIFAR-100 teachers (RepDistiller's files) are the asset `cifar_teachers.tar` of the GitHub "
    "release `checkpoints` of megvii-research/mdistiller "
    "(https://github.com/megvii-research/mdistiller/releases/tag/checkpoints); it unpacks to "
    "`cifar_teachers/<name>_vanilla/ckpt_epoch_240.pth` (e.g. `resnet32x4_vanilla/ckpt_epoch_240.pth`)."
)


def check_pretrained(name: str, pretrained: bool) -> None:
    """Raise a ``ValueError`` when ``pretrained=True``: CIFAR weights are files, never downloaded by name."""
    if pretrained:
        raise ValueError(
            f"{name}: CIFAR models have no weights to download by name (pretrained=True). Build the model with "
            "pretrained=False and load a checkpoint path, e.g. "
            f"`diffkd.models.checkpoint.load_weights(model, 'cifar_teachers/{name}_vanilla/ckpt_epoch_240.pth')`. "
            + CIFAR_TEACHERS_HINT
        )


def cifar_entry(
    cls: type[M], *args: Any, teacher: bool = False, name: str | None = None, **fixed: Any
) -> Callable[[Callable[[], object]], Callable[..., M]]:
    """Turn a docstring-only stub into the CIFAR entry point ``fn(num_classes=100, pretrained=False, **kwargs)``
    returning ``cls(*args, num_classes=num_classes, **fixed, **kwargs)`` (see :mod:`diffkd.models.variants`).

    Args:
        cls: the model class.
        *args: its positional arguments (depth, widths, ...).
        teacher: also tag ``"cifar_teacher"`` (mdistiller publishes a teacher checkpoint for it).
        name: the registry name when it is not the stub's (``MobileNetV2`` for ``mobile_half``).
        **fixed: keyword arguments every build passes (``batch_norm=True``, ``widen_factor=2``).
    """

    def make(stub: Callable[[], object]) -> Callable[..., M]:
        label = name or stub.__name__

        def entry(num_classes: int = 100, pretrained: bool = False, **kwargs: Any) -> M:
            check_pretrained(label, pretrained)
            return cls(*args, num_classes=num_classes, **fixed, **kwargs)

        entry.__annotations__["return"] = cls.__name__  # the signature names the class it builds
        return entry_point(entry, stub, ("cifar", "cifar_teacher") if teacher else ("cifar",), name=name)

    return make


@torch.no_grad()
def init_msra_fan_out(model: nn.Module, *, linear_zero_bias: bool = False, linear_std: float | None = None) -> None:
    """RepDistiller's init: conv ~ N(0, sqrt(2 / (k·k·C_out))), conv bias 0; BN weight 1, bias 0.

    This is the same draw as ``kaiming_normal_(mode="fan_out", nonlinearity="relu")``. ``Linear`` layers keep
    PyTorch's default unless ``linear_zero_bias`` (bias 0) or ``linear_std`` (weight ~ N(0, std), bias 0) is set.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            m.weight.normal_(0.0, math.sqrt(2.0 / n))
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
            m.weight.fill_(1.0)
            m.bias.zero_()
        elif isinstance(m, nn.Linear):
            if linear_std is not None:
                m.weight.normal_(0.0, linear_std)
            if (linear_zero_bias or linear_std is not None) and m.bias is not None:
                m.bias.zero_()


class ShuffleBlock(nn.Module):
    """Channel shuffle (ShuffleNet V1 and V2): (B, C, H, W) → (B, g, C/g, H, W) → transpose → (B, C, H, W)."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        g = self.groups
        return x.reshape(n, g, c // g, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)
