"""Distances and heads beyond the built-in ones, one file per method (CWD, FGD, ...).

Every module in this package is imported when the registries are first read, so a new method is one new file
here that calls ``@register_distance`` / ``@register_head`` — no other file changes.
"""

import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")
