"""One builder, many registered names — the two ways a model family registers its variants without re-typing the
builder's signature in each:

- :func:`register_variant` publishes a builder with its leading arguments bound (a backbone, a detector), as timm's
  ``_create_model`` + one small function per variant (the torchvision and MMDetection detectors);
- :func:`entry_point` gives one family body (a factory's closure: the ``pretrained`` guard, timm's default weights
  tag, CIRKD's aux-head guard) a docstring-only stub's name, docstring and module, so each name is written as::

    @_tv("resnet18")
    def tv_resnet18() -> None:
        \"\"\"torchvision ResNet-18 ...\"\"\"

  (the ImageNet classifiers, the CIRKD and torchvision segmenters, the CIFAR zoo, the demo CNNs).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from diffkd.models.registry import register_model

__all__ = ["entry_point", "register_variant"]

F = TypeVar("F", bound=Callable)


def register_variant(
    build: Callable[..., nn.Module],
    name: str,
    doc: str,
    tags: tuple[str, ...],
    /,
    *bound: Any,
    **bound_kwargs: Any,
) -> Callable[..., nn.Module]:
    """Register ``build(*bound, *args, **bound_kwargs, **kwargs)`` as the model ``name``.

    The registered function has ``build``'s signature less the bound parameters (its defaults, annotations and
    order, so positional calls keep working), ``doc`` as its docstring and ``build``'s module as its own.

    Args:
        build: the family's builder.
        name: the registry name (also the function's ``__name__``).
        doc: the variant's docstring.
        tags: the registry tags.
        *bound: ``build``'s first positional arguments (e.g. the backbone).
        **bound_kwargs: ``build``'s keyword arguments fixed for this variant (e.g. ``label=name``); passing one of
            them again is a ``TypeError``, as for any repeated keyword.

    Returns:
        The registered function.
    """

    def fn(*args: Any, **kwargs: Any) -> nn.Module:
        return build(*bound, *args, **bound_kwargs, **kwargs)

    signature = inspect.signature(build)
    params = [p for p in list(signature.parameters.values())[len(bound) :] if p.name not in bound_kwargs]
    fn.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = doc
    fn.__module__ = build.__module__
    return register_model(fn, name=name, tags=tags)


def entry_point(impl: F, stub: Callable[[], object], tags: tuple[str, ...], *, name: str | None = None) -> F:
    """Give ``impl`` ``stub``'s name, docstring and module and register it under ``name`` (default: that name,
    as :func:`~diffkd.models.registry.register_model`); returns ``impl``."""
    impl.__name__ = stub.__name__
    impl.__qualname__ = stub.__qualname__
    impl.__module__ = stub.__module__
    impl.__doc__ = stub.__doc__
    return register_model(impl, name=name, tags=tags)
