"""One builder, many registered names: :func:`register_variant` publishes a builder with its leading arguments bound
(a backbone, a detector), as timm's ``_create_model`` + one small function per variant, without re-typing the
builder's signature in each variant."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from diffkd.models.registry import register_model

__all__ = ["register_variant"]


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
