"""Loading DiffKD weights trained with the official code (hunto/image_classification_sota).

Our ``DiffKD`` uses the official submodule names (``ae``, ``trans``, ``model``, ``noise_adapter``, ``proj``), so
a state_dict of one official ``DiffKD`` module loads with ``strict=True`` as it is. This module handles what
surrounds it in real files:

- full student checkpoints, where the heads live under ``[module.]_diff.<teacher module name>.`` (the official
  code attaches them as ``student._diff``), possibly inside ``{"state_dict": ...}``;
- the June-2023 version whose ``proj`` was a bare 1×1 conv (``proj.weight``/``proj.bias``): it becomes
  ``proj.0`` followed by an identity BatchNorm, which computes the same function.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["convert_official_state_dict", "split_official_checkpoint"]

_HEAD_PREFIX = "_diff."


def _unwrap(state_dict: Mapping[str, object]) -> Mapping[str, Tensor]:
    for key in ("state_dict", "model", "state_dict_ema"):
        inner = state_dict.get(key)
        if isinstance(inner, Mapping):
            return inner
    return state_dict  # type: ignore[return-value]


def split_official_checkpoint(state_dict: Mapping[str, object]) -> dict[str, dict[str, Tensor]]:
    """Per distillation point, the DiffKD weights inside an official student checkpoint.

    Returns ``{teacher module name: state_dict}``, e.g. ``{"layer4": {...}, "fc": {...}}``; each value is
    already converted with :func:`convert_official_state_dict`.
    """
    sd = _unwrap(state_dict)
    points: dict[str, dict[str, Tensor]] = {}
    for key, value in sd.items():
        k = key.removeprefix("module.")
        if not k.startswith(_HEAD_PREFIX):
            continue
        point, _, rest = k[len(_HEAD_PREFIX) :].partition(".")
        points.setdefault(point, {})[rest] = value
    if not points:
        raise KeyError("no '_diff.<point>.' keys found: this is not an official DiffKD student checkpoint")
    return {p: convert_official_state_dict(v) for p, v in points.items()}


def convert_official_state_dict(state_dict: Mapping[str, object], point: str | None = None) -> dict[str, Tensor]:
    """Convert one official DiffKD module's weights to ours (``DiffKD.load_state_dict(..., strict=True)``).

    Args:
        state_dict: the module's own state_dict, or a full official checkpoint (then ``point`` names the
            teacher module of the head to take, e.g. ``"layer4"``; it may be left out when there is one head).
    """
    sd = _unwrap(state_dict)
    if any(k.removeprefix("module.").startswith(_HEAD_PREFIX) for k in sd):
        heads = split_official_checkpoint(sd)
        if point is None:
            if len(heads) != 1:
                raise ValueError(f"checkpoint holds several DiffKD heads {sorted(heads)}; pass point=<name>")
            return next(iter(heads.values()))
        if point not in heads:
            raise KeyError(f"no DiffKD head {point!r} in the checkpoint; it has {sorted(heads)}")
        return heads[point]
    out = {k.removeprefix("module."): v for k, v in sd.items()}
    if "proj.weight" in out:  # June-2023 layout: proj was a bare Conv2d
        w, b = out.pop("proj.weight"), out.pop("proj.bias")
        c = w.shape[0]
        out["proj.0.weight"], out["proj.0.bias"] = w, b
        out["proj.1.weight"] = torch.ones(c, dtype=w.dtype)
        out["proj.1.bias"] = torch.zeros(c, dtype=w.dtype)
        out["proj.1.running_mean"] = torch.zeros(c, dtype=w.dtype)
        # BN divides by sqrt(var + eps): var = 1 - eps makes it an exact identity in eval mode
        out["proj.1.running_var"] = torch.full((c,), 1.0 - 1e-5, dtype=w.dtype)
        out["proj.1.num_batches_tracked"] = torch.tensor(0)
    return out
