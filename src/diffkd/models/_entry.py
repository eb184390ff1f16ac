"""Registered entry points written as one builder per family plus one docstring-only ``def`` per name.

A family (the torchvision or timm classifiers, the CIRKD or torchvision segmenters, the CIFAR zoo, the demo CNNs)
shares one signature and one body; only the architecture and the docstring differ per name. Each family writes its
body once, in a factory, and each name is a decorated stub that contributes its name and docstring::

    @_tv("resnet18")
    def tv_resnet18() -> None:
        \"\"\"torchvision ResNet-18 ...\"\"\"

The decorator returns the family's entry point (the real signature, e.g. ``fn(num_classes=1000, pretrained=False,
weights=None, **kwargs) -> nn.Module``) under the stub's name, docstring and module, registered as by
:func:`~diffkd.models.registry.register_model`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from diffkd.models.registry import register_model

__all__ = ["entry_point"]

F = TypeVar("F", bound=Callable)


def entry_point(impl: F, stub: Callable[[], object], tags: tuple[str, ...], *, name: str | None = None) -> F:
    """Give ``impl`` ``stub``'s name, docstring and module and register it under ``name`` (default: that name,
    as :func:`~diffkd.models.registry.register_model`); returns ``impl``."""
    impl.__name__ = stub.__name__
    impl.__qualname__ = stub.__qualname__
    impl.__module__ = stub.__module__
    impl.__doc__ = stub.__doc__
    return register_model(impl, name=name, tags=tags)
