"""Building a teacher: a registry model plus its weights, loaded strictly."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from diffkd.models.checkpoint import load_weights
from diffkd.models.registry import create_model

__all__ = ["create_teacher"]


def create_teacher(
    name: str,
    num_classes: int | None = None,
    weights: str | Path | None = None,
    pretrained: bool = False,
    key: str | None = None,
    **kwargs,
) -> nn.Module:
    """``create_model(name, ...)`` with weights from ``weights`` (a checkpoint file) or the registry
    (``pretrained=True``), frozen (``requires_grad=False``) and in eval mode.

    A teacher without either is allowed (tests, smoke runs) but logged as untrained by the caller.
    ``key`` selects the model inside a Lightning checkpoint (``"student"`` for a teacher trained with
    ``distill=none``, the default there).
    """
    model = create_model(name, num_classes=num_classes, pretrained=pretrained, **kwargs)
    if weights is not None:
        load_weights(model, weights, key=key)
    return model.requires_grad_(False).eval()
