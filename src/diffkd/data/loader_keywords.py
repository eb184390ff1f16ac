"""The loader keywords of a data module's constructor, written once: :func:`loader_keywords`.

Every data module takes the :class:`~diffkd.data.loaders.LoaderOptions` fields (``batch_size``, ``val_batch_size``,
``num_workers``, ``pin_memory``, ``drop_last``) as keywords of its constructor, because a config's ``data.*`` keys
are its keyword arguments and :func:`diffkd.config.accepts` (``--set`` key checks, Hydra) reads them from the
constructor's signature. A data module writes ``**loader_options`` in its ``__init__`` instead of the five
parameters; the decorator puts them back into the signature that :func:`inspect.signature`, Hydra and ``help()``
see, at the place and with the defaults the class declares, and hands them to ``__init__`` as ``loader_options``
(always all five, the declared defaults filled in). Calls by keyword or by position behave as if the parameters
were written out.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from diffkd.data.loaders import LoaderOptions

__all__ = ["LOADER_KEYWORDS", "loader_keywords"]

#: The loader keywords, in their order in the signatures: the fields of :class:`LoaderOptions`.
LOADER_KEYWORDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(LoaderOptions))
_ANNOTATIONS = {f.name: f.type for f in dataclasses.fields(LoaderOptions)}
#: Defaults every data module shares; ``batch_size`` and ``num_workers`` it declares itself.
_COMMON_DEFAULTS: dict[str, Any] = {"val_batch_size": None, "pin_memory": False, "drop_last": True}

T = TypeVar("T", bound=type)


def loader_keywords(after: str, *, moved: Mapping[str, str] | None = None, **defaults: Any) -> Callable[[T], T]:
    """Class decorator: the class's ``__init__(self, ..., **loader_options)`` takes the loader keywords as written-out
    parameters.

    Args:
        after: the parameter of ``__init__`` the keywords follow, in :data:`LOADER_KEYWORDS` order.
        moved: keywords that stand elsewhere, each after the parameter named (e.g. ``{"drop_last": "hflip_prob"}``).
        **defaults: the class's defaults; ``batch_size`` and ``num_workers`` are required, ``val_batch_size``
            (None), ``pin_memory`` (False) and ``drop_last`` (True) may be given.

    Returns:
        The decorator; it replaces ``__init__`` by a wrapper with the full signature (``__signature__``).
    """
    moved = dict(moved or {})
    unknown = sorted((set(defaults) | set(moved)) - set(LOADER_KEYWORDS))
    missing = sorted({"batch_size", "num_workers"} - set(defaults))
    if unknown or missing:
        raise TypeError(
            f"loader_keywords: unknown keyword(s) {unknown}, missing default(s) {missing}; "
            f"the loader keywords are {list(LOADER_KEYWORDS)}"
        )
    values = {**_COMMON_DEFAULTS, **defaults}
    loader_params = {
        name: inspect.Parameter(
            name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=values[name], annotation=_ANNOTATIONS[name]
        )
        for name in LOADER_KEYWORDS
    }
    anchors: dict[str, list[str]] = {after: [k for k in LOADER_KEYWORDS if k not in moved]}
    for name, anchor in moved.items():
        anchors.setdefault(anchor, []).append(name)

    def decorate(cls: T) -> T:
        init = cls.__dict__.get("__init__")
        if init is None:
            raise TypeError(f"loader_keywords: {cls.__name__} defines no __init__ of its own")
        written = list(inspect.signature(init).parameters.values())
        if not written or written[-1].kind is not inspect.Parameter.VAR_KEYWORD or written[-1].name != "loader_options":
            raise TypeError(f"loader_keywords: {cls.__name__}.__init__ must end in **loader_options")
        names = {p.name for p in written}
        if not set(anchors) <= names or names & set(LOADER_KEYWORDS):
            raise TypeError(
                f"loader_keywords: {cls.__name__}.__init__ must name {sorted(anchors)} and none of {LOADER_KEYWORDS}"
            )
        params: list[inspect.Parameter] = []
        for param in written[:-1]:
            params.append(param)
            params += [loader_params[k] for k in anchors.get(param.name, ())]
        public = inspect.signature(init).replace(parameters=params)

        @functools.wraps(init)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            bound = public.bind(self, *args, **kwargs)
            bound.apply_defaults()
            arguments = bound.arguments
            loader = {k: arguments.pop(k) for k in LOADER_KEYWORDS}
            arguments.pop(next(iter(public.parameters)))  # self
            init(self, **arguments, **loader)

        __init__.__signature__ = public  # type: ignore[attr-defined]
        cls.__init__ = __init__  # type: ignore[misc]
        return cls

    return decorate
