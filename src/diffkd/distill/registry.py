"""Open registries of distillation heads and distances: a new method is one new file, never an edit of the Distiller.

A **head** sits between the tapped student tensor and the distance::

    @register_head("my_head")
    def build_my_head(student_channels: int, teacher_channels: int, *, vector: bool, **kwargs) -> nn.Module | None:
        ...

``vector`` is True for (B, C) taps such as logits (seen by the head as (B, C, 1, 1)). The built module is called
``head(student)`` and returns the adapted student (B, C_t, H, W); a head that also reads the teacher registers an
``apply(head, student, teacher) -> HeadOutput`` that may replace both and add loss terms of its own (DiffKD's
diffusion and autoencoder losses) and statistics to log.

A *multi-tap* point (``student``/``teacher`` lists of addresses, e.g. ReviewKD's stages) builds one head over
all its taps: the builder gets ``student_channels``/``teacher_channels`` as lists (shallow to deep, as listed) and
``vector`` as a list of flags, ``apply(head, students, teachers)`` gets the lists of (B, C_i, H_i, W_i) maps, and
the distance gets what ``apply`` returns (lists, unless the head reduces them).

A **distance** is an ``nn.Module`` class ``forward(student, teacher, **inputs) -> Tensor`` (scalar), registered with
``@register_distance("name")``. It *declares* what else it reads from the batch: ``needs`` (required, e.g.
``("labels",)`` for DKD) and ``accepts`` (used when the task provides them, e.g. ``("valid_mask",)`` for
per-pixel distances). Tasks supply these through ``distill_inputs(batch)``; nothing is sniffed. A distance that
needs ``("sample_index",)`` (CRD's memory bank) gets each sample's training-set position: the task asks the data
module for them (``enable_sample_index()``) and splits them off every training batch. A distance may also declare
``data_facts``, names of data-module methods (``num_train_samples``, ``train_labels``) whose values the task hands
to its ``bind_data(**facts)`` before the heads are built.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from torch import Tensor, nn

__all__ = [
    "DistanceEntry",
    "HeadEntry",
    "HeadOutput",
    "build_distance",
    "get_distance",
    "get_head",
    "list_distances",
    "list_heads",
    "register_distance",
    "register_head",
]


class HeadOutput(NamedTuple):
    """What a head hands to the distance: the (possibly replaced) student and teacher tensors, the head's own
    loss terms by short name (weighted by the point's ``term_weights``) and detached statistics to log."""

    student: Tensor | list[Tensor]
    teacher: Tensor | list[Tensor]
    losses: dict[str, Tensor]
    stats: dict[str, Tensor]


def _student_only(head: nn.Module, student: Tensor, teacher: Tensor) -> HeadOutput:
    return HeadOutput(head(student), teacher, {}, {})


@dataclass(frozen=True)
class HeadEntry:
    name: str
    build: Callable[..., nn.Module | None]
    apply: Callable[[nn.Module, Tensor, Tensor], HeadOutput] = _student_only
    term_weights: Mapping[str, str] = field(default_factory=dict)
    """Loss terms whose weight a point field gives (DiffKD: ``diff`` ← ``diff_weight``, ``ae`` ← ``ae_weight``)."""


@dataclass(frozen=True)
class DistanceEntry:
    name: str
    cls: type[nn.Module]

    @property
    def needs(self) -> tuple[str, ...]:
        return tuple(getattr(self.cls, "needs", ()))

    @property
    def accepts(self) -> tuple[str, ...]:
        return tuple(getattr(self.cls, "accepts", ()))


_HEADS: dict[str, HeadEntry] = {}
_DISTANCES: dict[str, DistanceEntry] = {}


def _unknown(kind: str, name: str, known: list[str]) -> ValueError:
    near = difflib.get_close_matches(name, known, n=3, cutoff=0.4)
    hint = f" Did you mean {' or '.join(near)}?" if near else ""
    return ValueError(f"unknown {kind} {name!r}; choose one of {', '.join(known)}.{hint}")


def register_head(
    name: str,
    *,
    apply: Callable[[nn.Module, Tensor, Tensor], HeadOutput] | None = None,
    term_weights: Mapping[str, str] | None = None,
) -> Callable[[Callable[..., nn.Module | None]], Callable[..., nn.Module | None]]:
    """Register a head builder under ``name`` (see the module docstring)."""

    def wrap(build: Callable[..., nn.Module | None]) -> Callable[..., nn.Module | None]:
        if name in _HEADS and _HEADS[name].build is not build:
            raise ValueError(f"head {name!r} is already registered by {_HEADS[name].build.__module__}")
        _HEADS[name] = HeadEntry(name, build, apply or _student_only, dict(term_weights or {}))
        return build

    return wrap


def register_distance(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Register a distance class under ``name``."""

    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _DISTANCES and _DISTANCES[name].cls is not cls:
            raise ValueError(f"distance {name!r} is already registered by {_DISTANCES[name].cls.__module__}")
        _DISTANCES[name] = DistanceEntry(name, cls)
        return cls

    return wrap


def get_head(name: str) -> HeadEntry:
    if name not in _HEADS:
        raise _unknown("head", name, list_heads())
    return _HEADS[name]


def get_distance(name: str) -> DistanceEntry:
    if name not in _DISTANCES:
        raise _unknown("distance", name, list_distances())
    return _DISTANCES[name]


def list_heads() -> list[str]:
    return sorted(_HEADS)


def list_distances() -> list[str]:
    return sorted(_DISTANCES)


def build_distance(name: str, **kwargs: Any) -> nn.Module:
    """The registered distance ``name`` built with its keyword arguments."""
    return get_distance(name).cls(**kwargs)
