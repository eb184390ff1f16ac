""" "Did you mean": when Hydra refuses a command-line override of a key that does not exist, name the nearest keys."""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

__all__ = ["unknown_key_hint"]

_REFUSED = re.compile(r"Could not override '([^']+)'|Key '([^']+)' is not in struct|full_key: (\S+)")


def _keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    out = []
    for key, value in cfg.items_ex(resolve=False) if hasattr(cfg, "items_ex") else cfg.items():
        full = f"{prefix}{key}"
        out.append(full)
        if isinstance(value, DictConfig):
            out += _keys(value, f"{full}.")
    return out


def unknown_key_hint(overrides: Sequence[str], config_dir: str | Path, config_name: str = "train") -> str | None:
    """Compose ``config_name`` with ``overrides``; when a plain ``key=value`` names a key that does not exist,
    return ``"unknown config key ...: did you mean ...?"`` with the nearest real keys (``None`` otherwise)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    plain = [o for o in overrides if "=" in o and not o.startswith(("+", "~", "hydra.", "hydra/"))]
    others = [o for o in overrides if o not in plain]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            keep: list[str] = []
            for override in plain:  # the first plain override the composition refuses
                try:
                    compose(config_name=config_name, overrides=[*others, *keep, override])
                except Exception as err:
                    if _REFUSED.search(str(err)) is None:
                        return None
                    key = override.split("=", 1)[0]
                    base = compose(config_name=config_name, overrides=[*others, *keep])
                    known = _keys(base)
                    parent = key.rsplit(".", 1)[0] if "." in key else ""
                    siblings = [k for k in known if k.rsplit(".", 1)[0] == parent] if parent else known
                    near = difflib.get_close_matches(key, siblings, n=3, cutoff=0.6) or difflib.get_close_matches(
                        key, known, n=3, cutoff=0.6
                    )
                    if OmegaConf.select(base, key, default=None) is not None:
                        return None  # the key exists: the error was about its value
                    hint = f"did you mean {' or '.join(near)}? " if near else ""
                    return (
                        f"unknown config key {key!r}: {hint}(to add a new key on purpose: +{override}; "
                        "`python -m diffkd.train --cfg job` prints the whole config)"
                    )
                keep.append(override)
    finally:
        GlobalHydra.instance().clear()
    return None
