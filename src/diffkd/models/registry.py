"""A timm-style model registry: ``@register_model`` entry points and one ``create_model`` factory.

Every model the library can build — the CIFAR zoo, torchvision and timm ImageNet models, the small demo nets —
registers a function here. An entry point is a plain function ``fn(num_classes=..., pretrained=False, **kwargs)``
returning an ``nn.Module`` whose ``forward`` returns the logits tensor (B, num_classes).

The registry imports none of its models (timm's way): each model family registers itself when imported, and the
package ``diffkd.models`` imports every family, so anything that reads the registry through ``diffkd.models`` sees
them all. A new family is a module with ``@register_model`` functions, imported in ``diffkd/models/__init__.py``.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

__all__ = [
    "ModelEntry",
    "create_model",
    "get_model_entry",
    "list_models",
    "register_model",
    "register_model_prefix",
]


@dataclass(frozen=True)
class ModelEntry:
    """What the registry knows about one model name."""

    name: str
    fn: Callable[..., nn.Module]
    module: str
    tags: tuple[str, ...] = field(default_factory=tuple)


_REGISTRY: dict[str, ModelEntry] = {}
# "<prefix>:<name>" fallbacks (``tv:``, ``timm:``): prefix -> resolver(name) -> entry point (KeyError if unknown).
_PREFIXES: dict[str, Callable[[str], Callable[..., nn.Module]]] = {}


def register_model(fn: Callable[..., nn.Module] | None = None, *, name: str | None = None, tags: tuple[str, ...] = ()):
    """Register ``fn`` under ``name`` (default: the function's name). Usable bare or with arguments.

    >>> @register_model(tags=("cifar",))
    ... def my_net(num_classes: int = 100, **kwargs): ...
    """

    def wrap(f: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or f.__name__
        if key in _REGISTRY and _REGISTRY[key].fn is not f:
            raise ValueError(f"model name {key!r} is already registered by {_REGISTRY[key].module}")
        _REGISTRY[key] = ModelEntry(key, f, f.__module__, tuple(tags))
        return f

    return wrap(fn) if fn is not None else wrap


def register_model_prefix(prefix: str, resolve: Callable[[str], Callable[..., nn.Module]]) -> None:
    """Make ``"<prefix>:<name>"`` buildable without a registered entry (e.g. ``tv:``, ``timm:``).

    ``resolve(name)`` returns the entry point ``fn(num_classes=..., pretrained=False, **kwargs)`` for ``name``
    and raises ``KeyError`` for a name it does not know.
    """
    if prefix in _PREFIXES and _PREFIXES[prefix] is not resolve:
        raise ValueError(f"model prefix {prefix!r} is already registered by {_PREFIXES[prefix].__module__}")
    _PREFIXES[prefix] = resolve


def list_models(pattern: str = "*", tag: str | None = None) -> list[str]:
    """Sorted registered names matching the fnmatch ``pattern`` (and carrying ``tag`` when given)."""
    return sorted(n for n, e in _REGISTRY.items() if fnmatch.fnmatch(n, pattern) and (tag is None or tag in e.tags))


def get_model_entry(name: str) -> ModelEntry:
    """The registry entry for ``name``; an unknown name raises ``KeyError`` listing the closest names.

    ``"<prefix>:<model>"`` (``tv:resnet152``, ``timm:convnext_tiny.fb_in1k``) resolves through the prefix
    fallbacks of :func:`register_model_prefix` instead of the registry.
    """
    prefix, sep, rest = name.partition(":")
    if sep and prefix in _PREFIXES and name not in _REGISTRY:
        resolve = _PREFIXES[prefix]
        return ModelEntry(name, resolve(rest), resolve.__module__, (prefix,))
    if name not in _REGISTRY:
        near = difflib.get_close_matches(name, list(_REGISTRY), n=5, cutoff=0.4)
        hint = f" Did you mean: {', '.join(near)}?" if near else ""
        raise KeyError(
            f"unknown model {name!r}.{hint} `diffkd.models.list_models()` lists all {len(_REGISTRY)} names"
            + (
                f"; prefixes {', '.join(p + ':<name>' for p in sorted(_PREFIXES))} build other models."
                if _PREFIXES
                else "."
            )
        )
    return _REGISTRY[name]


def create_model(name: str, num_classes: int | None = None, pretrained: bool = False, **kwargs) -> nn.Module:
    """Build the registered model ``name``.

    Args:
        name: a registered name (``list_models()``), or ``"<prefix>:<model>"`` such as ``"tv:resnet152"`` or
            ``"timm:convnext_tiny"`` (see :func:`get_model_entry`).
        num_classes: classifier width; ``None`` keeps the entry point's default.
        pretrained: load the entry point's published weights (downloads on first use).
        **kwargs: passed to the entry point.
    """
    entry = get_model_entry(name)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    return entry.fn(pretrained=pretrained, **kwargs)
