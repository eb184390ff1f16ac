"""Distillers: which tapped student/teacher tensors meet, through which head and distance, with which weight.

One class, :class:`Distiller`, serves every method and task; the methods (``diffkd``, ``diffkd_dist``, ``kd``,
``dist``, ``fitnet``, ``dkd``, ``none``) are configurations of it (``conf/distill/*.yaml``). A distiller is a
set of named *points*; each point says

- where to tap: ``student``/``teacher`` addresses (:mod:`diffkd.distill.taps`: a module path, ``''`` for the
  model output, ``path:key`` for an entry of a dict/tuple output, ``path:*`` for every entry — one point each —,
  ``@feature`` for the last feature map, ``path@input`` for a module's input), or a *list* of addresses on each
  side: one point over several taps, whose head and distance receive the lists (ReviewKD's stages);
- the head between them: any registered head (:mod:`diffkd.distill.registry`; built in: ``diffkd``,
  ``conv1x1``, ``identity``), one per expanded entry or one shared by all (``shared_head``);
- the distance (any registered one: ``kl``, ``mse``, ``dist``, ``dkd``, ...) and the weights of the terms.

Channels, spatial sizes and layouts are never typed: :meth:`Distiller.build` reads them from one dry-run forward of
each model on a real batch, keeps them (:attr:`Distiller.points`), and ``describe()`` and ``profile()`` reuse them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffkd.distill.layouts import resolve_layout
from diffkd.distill.registry import build_distance, get_distance, get_head
from diffkd.distill.taps import (
    AUTO_FEATURE,
    DryRun,
    TapAddress,
    _describe,
    _first_tensor,
    dry_run,
    expand_address,
    find_last_feature_map,
    module_of,
    module_path_error,
    select,
)
from diffkd.method.layout import Layout, to_bchw
from diffkd.method.profile import HeadProfile, profile_head

__all__ = ["DistillOutput", "Distiller", "PointInfo", "PointSpec"]


@dataclass
class PointSpec:
    """One distillation point (see the module docstring).

    Attributes:
        student, teacher: tap addresses; '' is the model output, ``@feature`` the last spatial feature map,
            ``path:key`` an entry of the module's output, ``path:*`` every entry (one point each, named
            ``<point>_<entry>``; both sides must expand to the same entries). Or a list of concrete addresses on
            both sides, of equal length (no ``*`` or ``@feature``): a *multi-tap* point, one head over every
            level — its builder gets lists of channels (and of ``vector`` flags), its ``apply`` and the distance
            get lists of (B, C_i, H_i, W_i) maps, student and teacher paired by position.
        head: a registered head name (``diffkd`` | ``conv1x1`` | ``identity`` | yours).
        distance: ``{"name": <registered distance>, **kwargs}``.
        weight: λ of the distance term (λ3 of the paper for DiffKD points).
        diff_weight, ae_weight: λ1 (diffusion loss) and λ2 (autoencoder loss) of DiffKD points.
        term_weights: weights of other loss terms a head adds, by the head's term name.
        head_kwargs: passed to the head builder (for DiffKD: ``use_ae``, ``ae_channels``, ``inference_steps``, ...;
            ``kernel_size`` defaults to 1 for vectors such as logits and 3 for maps).
        shared_head: with ``*``: one head for every entry (equal widths needed) instead of one per entry.
        align: ``None`` (spatial sizes must match), ``interpolate`` (bilinear-resize the student map) or ``head``
            (the maps go to the head as they are: a head that aligns them itself, as ``vid`` pools the larger).
        warmup_epochs: linear ramp of the distance term's weight over this many epochs (DKD: 20).
        student_layout, teacher_layout: force the tensor layout (``bchw``, ``bhwc``, ``tokens``, ``vector``)
            where the model does not declare it.
    """

    student: str | list[str] = AUTO_FEATURE
    teacher: str | list[str] = AUTO_FEATURE
    head: str = "identity"
    distance: dict[str, Any] = field(default_factory=lambda: {"name": "mse"})
    weight: float = 1.0
    diff_weight: float = 1.0
    ae_weight: float = 1.0
    term_weights: dict[str, float] = field(default_factory=dict)
    head_kwargs: dict[str, Any] = field(default_factory=dict)
    shared_head: bool = False
    align: Literal["interpolate", "head"] | None = None
    warmup_epochs: float = 0.0
    student_layout: Layout | None = None
    teacher_layout: Layout | None = None

    @property
    def multi_tap(self) -> bool:
        """Whether the point lists several taps per side (see ``student, teacher``)."""
        return not isinstance(self.student, str) or not isinstance(self.teacher, str)

    def tap_addresses(self, side: Literal["student", "teacher"]) -> list[str]:
        """The addresses of one side as a list (one entry for a single-tap point)."""
        value = getattr(self, side)
        return [value] if isinstance(value, str) else [str(a) for a in value]


def _check_multi_tap(name: str, spec: PointSpec) -> PointSpec:
    """A multi-tap point with its address lists as plain lists, or a clear error for a malformed one."""
    if not spec.multi_tap:
        return spec
    if isinstance(spec.student, str) or isinstance(spec.teacher, str):
        raise ValueError(
            f"point {name!r}: student {spec.student!r} and teacher {spec.teacher!r}: a point over several taps "
            "lists them on both sides (student: [a, b, ...], teacher: [a', b', ...], paired by position)"
        )
    student, teacher = spec.tap_addresses("student"), spec.tap_addresses("teacher")
    if not student or len(student) != len(teacher):
        raise ValueError(
            f"point {name!r}: {len(student)} student taps {student} but {len(teacher)} teacher taps {teacher}; "
            "list as many on each side (they are paired by position)"
        )
    for address in (*student, *teacher):
        if address == AUTO_FEATURE or TapAddress.parse(address).expands:
            raise ValueError(
                f"point {name!r}: {address!r} in a list of taps; name each tap by its module path "
                "('@feature' and '*' are for single-tap points)"
            )
    spec.student, spec.teacher = student, teacher
    return spec


@dataclass
class PointInfo:
    """What :meth:`Distiller.build` inferred for one (expanded) point.

    Attributes:
        name: the point's name (``feature``, or ``fpn_0`` for entry ``0`` of the config point ``fpn``).
        config: the config point it comes from.
        student, teacher: concrete tap addresses (a tuple of them for a multi-tap point, as the fields below).
        student_layout, teacher_layout: the layouts and where they came from (``config``/``declared``/``shape``).
        student_shape, teacher_shape: (C, H, W) of one sample after the layout conversion (the dry run's sizes).
        head: key of its head in ``Distiller.heads`` (``None``: no head).
    """

    name: str
    config: str
    student: str | tuple[str, ...]
    teacher: str | tuple[str, ...]
    student_layout: Layout | tuple[Layout, ...]
    teacher_layout: Layout | tuple[Layout, ...]
    layout_source: tuple[str, str] | tuple[tuple[str, str], ...]
    student_shape: tuple[int, ...] | tuple[tuple[int, ...], ...]
    teacher_shape: tuple[int, ...] | tuple[tuple[int, ...], ...]
    head: str | None

    @property
    def multi_tap(self) -> bool:
        return isinstance(self.student, tuple)


class DistillOutput(NamedTuple):
    """``terms``: weighted loss terms by name (``<point>/kd``, ``<point>/diff``, ``<point>/ae``);
    ``stats``: detached statistics to log (e.g. ``gamma/<point>`` means)."""

    terms: dict[str, Tensor]
    stats: dict[str, Tensor]


Example = Tensor | Callable[[], Any] | DryRun


class _Sides(NamedTuple):
    """What :meth:`Distiller.build` taps: the two models, their dry runs, and the device the heads go to."""

    student: nn.Module
    teacher: nn.Module
    s_run: DryRun
    t_run: DryRun
    device: Any

    def of(self, role: str) -> tuple[nn.Module, DryRun]:
        """``(model, dry run)`` of ``role`` (``"student"`` or ``"teacher"``)."""
        return (self.student, self.s_run) if role == "student" else (self.teacher, self.t_run)


class _Tap(NamedTuple):
    """One side's tap of a point: the tensor, its layout and where that came from, and its (B, C, H, W) shape."""

    text: str
    value: Tensor
    layout: Layout
    source: str
    shape: torch.Size


class Distiller(nn.Module):
    """The distillation losses between a student and a frozen teacher.

    Args:
        points: ``{name: PointSpec or dict}``; empty for plain training (``none``).
        task_weight: weight of the task loss (e.g. CE) in the total.
        diffkd: defaults for every DiffKD head (``beta_schedule``, ``inference_steps``, ...), overridden by a
            point's own ``head_kwargs``; lets one override sweep all points (``distill.diffkd.beta_schedule=...``).
    """

    def __init__(
        self,
        points: Mapping[str, PointSpec | Mapping[str, Any]] | None = None,
        task_weight: float = 1.0,
        diffkd: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.specs: dict[str, PointSpec] = {}
        for name, spec in (points or {}).items():
            if any(c in name for c in "/.:"):
                raise ValueError(f"point name {name!r} may not contain '/', '.' or ':'")
            if isinstance(spec, PointSpec):
                self.specs[name] = spec
                continue
            spec = dict(spec)
            unknown = sorted(set(spec) - set(PointSpec.__dataclass_fields__))
            if unknown:
                raise TypeError(
                    f"point {name!r}: unknown keys {unknown}; allowed: {sorted(PointSpec.__dataclass_fields__)}"
                )
            self.specs[name] = PointSpec(**spec)
        for name, spec in self.specs.items():
            _check_multi_tap(name, spec)
        # looked up once (unknown names fail here, with the registered ones listed), not at every step
        self._heads_of = {n: get_head(s.head) for n, s in self.specs.items()}
        self._distances_of = {n: get_distance(s.distance["name"]) for n, s in self.specs.items()}
        self.task_weight = float(task_weight)
        self.head_defaults: dict[str, dict[str, Any]] = {"diffkd": dict(diffkd or {})}
        self.heads = nn.ModuleDict()
        self.distances = nn.ModuleDict({n: build_distance(**dict(s.distance)) for n, s in self.specs.items()})
        self.points: dict[str, PointInfo] = {}
        self.built = False

    @property
    def needs_teacher(self) -> bool:
        return bool(self.specs)

    @property
    def diffkd_defaults(self) -> dict[str, Any]:
        return self.head_defaults["diffkd"]

    @property
    def student_paths(self) -> dict[str, str]:
        """``{point: student address}`` after :meth:`build`."""
        return {n: p.student for n, p in self.points.items()}

    @property
    def teacher_paths(self) -> dict[str, str]:
        """``{point: teacher address}`` after :meth:`build`."""
        return {n: p.teacher for n, p in self.points.items()}

    @property
    def layouts(self) -> dict[str, tuple[Layout, Layout]]:
        return {n: (p.student_layout, p.teacher_layout) for n, p in self.points.items()}

    def inputs_needed(self) -> set[str]:
        """Batch inputs some distance requires (``labels``, ...)."""
        return {k for entry in self._distances_of.values() for k in entry.needs}

    def points_needing(self, key: str) -> dict[str, str]:
        """``{point: distance name}`` of the points whose distance requires the batch input ``key``."""
        return {n: entry.name for n, entry in self._distances_of.items() if key in entry.needs}

    def data_facts_needed(self) -> dict[str, tuple[str, ...]]:
        """``{point: names}`` of the facts about the training data some distance reads before training (CRD's
        ``num_train_samples`` and ``train_labels``: its memory bank's size and the classes its negatives come from),
        each the name of a data-module method; see :meth:`bind_data`."""
        out = {}
        for name, distance in self.distances.items():
            facts = tuple(getattr(distance, "data_facts", ()))
            if facts:
                out[name] = facts
        return out

    def bind_data(self, facts: Mapping[str, Any]) -> None:
        """Give each distance that declares ``data_facts`` their values (``{fact name: value}``), through its
        ``bind_data(**facts)``; the task calls this before :meth:`build`."""
        for name, wanted in self.data_facts_needed().items():
            missing = [k for k in wanted if k not in facts]
            if missing:
                raise ValueError(f"point {name!r}: distance {self._distances_of[name].name!r} needs {missing}")
            self.distances[name].bind_data(**{k: facts[k] for k in wanted})

    # ------------------------------------------------------------------ setup
    def build(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        example: Example,
        teacher_example: Example | None = None,
    ) -> dict[str, dict[str, Any]]:
        """Resolve and expand the addresses, read shapes and layouts from one dry-run forward per model, and
        create the heads.

        Args:
            student, teacher: the models (on their device).
            example: the student's dry run: an input batch tensor (B ≥ 2, C, H, W), a callable running the
                student on a real batch (see :func:`~diffkd.distill.taps.dry_run`), or a finished ``DryRun``.
            teacher_example: the same for the teacher (default: ``example``); it runs after the student's.
        Returns:
            :meth:`describe`.
        """
        if self.built:
            return self.describe()
        if self.specs and teacher is None:
            raise ValueError(f"distillation points {sorted(self.specs)} need a teacher; set model.teacher")
        if not self.specs:
            self.built = True
            return {}
        s_run = self._run(
            student, example, "student", [a for s in self.specs.values() for a in s.tap_addresses("student")]
        )
        t_source = example if teacher_example is None else teacher_example
        t_run = self._run(
            teacher, t_source, "teacher", [a for s in self.specs.values() for a in s.tap_addresses("teacher")]
        )
        device = next((t.device for t in (*student.parameters(), *student.buffers())), None)
        sides = _Sides(student, teacher, s_run, t_run, device)
        for config, spec in self.specs.items():
            if spec.multi_tap:
                self.points[config] = self._build_multi_tap_point(config, spec, sides)
                continue
            s_addr = self._resolve(student, s_run, spec.student, "student")
            t_addr = self._resolve(teacher, t_run, spec.teacher, "teacher")
            s_pairs, t_pairs = expand_address(s_run, s_addr), expand_address(t_run, t_addr)
            if s_addr.expands != t_addr.expands or [k for k, _ in s_pairs] != [k for k, _ in t_pairs]:
                raise ValueError(
                    f"point {config!r}: student {s_addr} gives entries {[k for k, _ in s_pairs]} but teacher "
                    f"{t_addr} gives {[k for k, _ in t_pairs]}; both sides must expand ('*') to the same entries"
                )
            for (key, s_concrete), (_, t_concrete) in zip(s_pairs, t_pairs):
                name = f"{config}_{key}" if key else config
                if name in self.points:
                    raise ValueError(f"point {name!r} (from {config!r}) collides with another point's name")
                self.points[name] = self._build_point(name, config, spec, sides, s_concrete, t_concrete)
        self.built = True
        return self.describe()

    @staticmethod
    def _run(model: nn.Module, example: Example, role: str, addresses: list[str]) -> DryRun:
        if isinstance(example, DryRun):
            return example
        if AUTO_FEATURE in addresses:
            return dry_run(model, example, None, role)
        return dry_run(model, example, [TapAddress.parse(a).path for a in addresses if a], role)

    @staticmethod
    def _resolve(model: nn.Module, run: DryRun, address: str, role: str) -> TapAddress:
        if address == AUTO_FEATURE:
            return TapAddress(find_last_feature_map(model, run, role))
        parsed = TapAddress.parse(address)
        if parsed.path and parsed.path not in run.calls:
            if module_of(parsed.path) in dict(model.named_modules()):
                raise RuntimeError(f"{role} module {module_of(parsed.path)!r} did not run in the dry-run forward")
            raise module_path_error(model, module_of(parsed.path), role)
        return parsed

    @staticmethod
    def _tapped(config: str, role: str, model: nn.Module, run: DryRun, addr: TapAddress) -> Tensor:
        """The dry run's tensor at a concrete address, or an error naming the point and how to select one."""
        value, multi = run.value(addr.path)
        try:
            value = select(value, addr, multi) if (addr.selectors or multi) else _first_tensor(value)
        except (KeyError, ValueError) as err:
            raise type(err)(f"point {config!r}, {role} ({type(model).__name__}): {err.args[0]}") from None
        if not isinstance(value, Tensor):
            raise TypeError(
                f"point {config!r}: the {role} tap {str(addr)!r} is {_describe(value)}, not a tensor; "
                f"select an entry with '{addr}:<key>' or every entry with '{addr}:*'"
            )
        return value

    def _tap_side(self, config: str, spec: PointSpec, sides: _Sides, role: str, addr: TapAddress) -> _Tap:
        """``role``'s tap at a concrete address with its layout (``spec.<role>_layout``, declared or from the
        shape) and its shape as (B, C, H, W)."""
        model, run = sides.of(role)
        value = self._tapped(config, role, model, run, addr)
        explicit = spec.student_layout if role == "student" else spec.teacher_layout
        layout, source = resolve_layout(model, module_of(addr.path), value, explicit, role, config, f"{role}_layout")
        text = str(addr) if addr.selectors else addr.path
        return _Tap(text, value, layout, source, to_bchw(value, layout).shape)

    @staticmethod
    def _check_align(config: str, spec: PointSpec) -> None:
        if spec.align not in (None, "interpolate", "head"):
            raise ValueError(f"point {config!r}: align must be null, 'interpolate' or 'head', got {spec.align!r}")

    @staticmethod
    def _check_sizes(name: str, config: str, spec: PointSpec, s: _Tap, t: _Tap, s_text: str, t_text: str) -> None:
        """Refuse maps of different (H, W) unless the point aligns them."""
        if s.shape[-2:] != t.shape[-2:] and spec.align is None:
            raise ValueError(
                f"point {name!r}: student {s_text!r} is {_size(s.value, s.layout)} but teacher {t_text!r} is "
                f"{_size(t.value, t.layout)}; tap maps of equal size or set "
                f"++distill.points.{config}.align=interpolate (or align=head where the head aligns them)"
            )

    def _build_multi_tap_point(self, config: str, spec: PointSpec, sides: _Sides) -> PointInfo:
        """One point over several taps per side: every level resolved, laid out and size-checked as a single-tap
        point's tap, then one head built from the lists of channels."""
        self._check_align(config, spec)
        levels: list[tuple[_Tap, _Tap]] = []
        for s_text, t_text in zip(spec.tap_addresses("student"), spec.tap_addresses("teacher")):
            s_tap, t_tap = (
                self._tap_side(config, spec, sides, role, self._resolve(*sides.of(role), text, role))
                for role, text in (("student", s_text), ("teacher", t_text))
            )
            s_tap, t_tap = s_tap._replace(text=s_text), t_tap._replace(text=t_text)  # the addresses as configured
            self._check_sizes(config, config, spec, s_tap, t_tap, s_text, t_text)
            levels.append((s_tap, t_tap))
        s_levels, t_levels = [lv[0] for lv in levels], [lv[1] for lv in levels]
        kwargs = {**self.head_defaults.get(spec.head, {}), **spec.head_kwargs}
        try:
            head = self._heads_of[config].build(
                [int(tap.shape[1]) for tap in s_levels],
                [int(tap.shape[1]) for tap in t_levels],
                vector=[tap.layout == "vector" for tap in s_levels],
                **kwargs,
            )
        except ValueError as err:
            raise ValueError(f"point {config!r}: {err}") from None
        head_key: str | None = None
        if head is not None:
            head_key = config
            self.heads[config] = head.to(sides.device) if sides.device is not None else head
        return PointInfo(
            name=config,
            config=config,
            student=tuple(tap.text for tap in s_levels),
            teacher=tuple(tap.text for tap in t_levels),
            student_layout=tuple(tap.layout for tap in s_levels),
            teacher_layout=tuple(tap.layout for tap in t_levels),
            layout_source=tuple((s.source, t.source) for s, t in zip(s_levels, t_levels)),
            student_shape=tuple(tuple(tap.shape[1:]) for tap in s_levels),
            teacher_shape=tuple(tuple(tap.shape[1:]) for tap in t_levels),
            head=head_key,
        )

    def _build_point(
        self, name: str, config: str, spec: PointSpec, sides: _Sides, s_addr: TapAddress, t_addr: TapAddress
    ) -> PointInfo:
        s_tap = self._tap_side(config, spec, sides, "student", s_addr)
        t_tap = self._tap_side(config, spec, sides, "teacher", t_addr)
        self._check_align(config, spec)
        self._check_sizes(name, config, spec, s_tap, t_tap, str(s_addr), str(t_addr))
        head_key: str | None = config if spec.shared_head else name
        if head_key not in self.heads:
            entry = self._heads_of[config]
            kwargs = {**self.head_defaults.get(spec.head, {}), **spec.head_kwargs}
            try:
                head = entry.build(int(s_tap.shape[1]), int(t_tap.shape[1]), vector=s_tap.layout == "vector", **kwargs)
            except ValueError as err:
                raise ValueError(f"point {name!r}: {err}") from None
            if head is None:
                head_key = None
            else:
                self.heads[head_key] = head.to(sides.device) if sides.device is not None else head
        return PointInfo(
            name=name,
            config=config,
            student=s_tap.text,
            teacher=t_tap.text,
            student_layout=s_tap.layout,
            teacher_layout=t_tap.layout,
            layout_source=(s_tap.source, t_tap.source),
            student_shape=tuple(s_tap.shape[1:]),
            teacher_shape=tuple(t_tap.shape[1:]),
            head=head_key,
        )

    def describe(self) -> dict[str, dict[str, Any]]:
        """What each point taps, the shapes and layouts it found, and how big its head is (printed at setup,
        stored in checkpoints)."""
        out = {}
        for name, info in self.points.items():
            spec = self.specs[info.config]
            head = self.heads[info.head] if info.head is not None else None
            multi = info.multi_tap
            out[name] = {
                "student": list(info.student) if multi else info.student,
                "teacher": list(info.teacher) if multi else info.teacher,
                "head": spec.head,
                "shared_head": info.head if spec.shared_head and head is not None else None,
                "distance": dict(spec.distance),
                "student_shape": [list(s) for s in info.student_shape] if multi else list(info.student_shape),
                "teacher_shape": [list(t) for t in info.teacher_shape] if multi else list(info.teacher_shape),
                "layouts": (
                    [list(info.student_layout), list(info.teacher_layout)]
                    if multi
                    else [info.student_layout, info.teacher_layout]
                ),
                "params": sum(p.numel() for p in head.parameters()) if head is not None else 0,
            }
        return out

    def profile(self) -> dict[str, HeadProfile | None]:
        """Parameters and per-sample training MACs of each point's head at the shapes found by :meth:`build`
        (the student map takes the teacher's size, as ``align`` does); ``None`` for points without a head and for
        multi-tap points (their heads take lists; ``describe()`` still counts their parameters)."""
        out: dict[str, HeadProfile | None] = {}
        for name, info in self.points.items():
            if info.head is None or info.multi_tap:
                out[name] = None
                continue
            student_shape = (info.student_shape[0], *info.teacher_shape[1:])
            out[name] = profile_head(self.heads[info.head], student_shape, info.teacher_shape)
        return out

    def tap_paths(self) -> tuple[list[str], list[str]]:
        """(student addresses, teacher addresses) to tap, after :meth:`build`."""
        student, teacher = [], []
        for p in self.points.values():
            student += list(p.student) if p.multi_tap else [p.student]
            teacher += list(p.teacher) if p.multi_tap else [p.teacher]
        return list(dict.fromkeys(student)), list(dict.fromkeys(teacher))

    # ------------------------------------------------------------------ training
    def forward(
        self,
        student_feats: Mapping[str, Tensor],
        teacher_feats: Mapping[str, Tensor],
        inputs: Mapping[str, Any] | Tensor | None = None,
        epoch: float = 0.0,
    ) -> DistillOutput:
        """Loss terms from tapped features.

        Args:
            student_feats, teacher_feats: ``{address: tensor}`` from the taps.
            inputs: what the distances declare from the batch (``labels`` (B,) int64 or soft (B, K) for DKD,
                ``valid_mask`` (B, H, W) bool for masked per-pixel distances, ``sample_index`` (B,) int64
                training-set positions for CRD, ...); a tensor means ``labels``.
            epoch: training progress in epochs, for ``warmup_epochs`` ramps.
        """
        if not self.built:
            raise RuntimeError("Distiller.build(student, teacher, example) must run before the first forward")
        if isinstance(inputs, Tensor):
            inputs = {"labels": inputs}
        inputs = inputs or {}
        terms: dict[str, Tensor] = {}
        stats: dict[str, Tensor] = {}
        for name, info in self.points.items():
            spec = self.specs[info.config]
            s: Tensor | list[Tensor]
            t: Tensor | list[Tensor]
            if info.multi_tap:
                s = [to_bchw(student_feats[a], lay) for a, lay in zip(info.student, info.student_layout)]
                t = [to_bchw(teacher_feats[a], lay) for a, lay in zip(info.teacher, info.teacher_layout)]
                if spec.align == "interpolate":
                    s = [_resize(si, ti) for si, ti in zip(s, t)]
            else:
                s = to_bchw(student_feats[info.student], info.student_layout)
                t = to_bchw(teacher_feats[info.teacher], info.teacher_layout)
                if spec.align == "interpolate":
                    s = _resize(s, t)
            ramp = min(epoch / spec.warmup_epochs, 1.0) if spec.warmup_epochs > 0 else 1.0
            if info.head is not None:
                entry = self._heads_of[info.config]
                out = entry.apply(self.heads[info.head], s, t)
                s, t = out.student, out.teacher
                for term, value in out.losses.items():
                    weight = spec.term_weights.get(term, getattr(spec, entry.term_weights.get(term, ""), 1.0))
                    terms[f"{name}/{term}"] = weight * value
                for stat, value in out.stats.items():
                    stats[f"{stat}/{name}"] = value
            distance = self.distances[info.config]
            kwargs = self._distance_inputs(info.config, inputs)
            terms[f"{name}/kd"] = (spec.weight * ramp) * distance(s, t, **kwargs)
        return DistillOutput(terms, stats)

    def _distance_inputs(self, point: str, inputs: Mapping[str, Any]) -> dict[str, Any]:
        entry = self._distances_of[point]
        missing = [k for k in entry.needs if inputs.get(k) is None]
        if missing:
            raise ValueError(
                f"point {point!r}: distance {entry.name!r} needs {missing} from the batch, which this task does "
                f"not provide (it provides {sorted(k for k, v in inputs.items() if v is not None)})"
            )
        wanted = (*entry.needs, *entry.accepts)
        return {k: inputs[k] for k in wanted if inputs.get(k) is not None}

    def extra_repr(self) -> str:
        return f"task_weight={self.task_weight}, points={ {n: asdict(s)['head'] for n, s in self.specs.items()} }"


def _resize(student: Tensor, teacher: Tensor) -> Tensor:
    """The student map bilinearly resized to the teacher's (H, W) where they differ (``align: interpolate``)."""
    if student.shape[-2:] == teacher.shape[-2:]:
        return student
    return F.interpolate(student, size=teacher.shape[-2:], mode="bilinear", align_corners=False)


def _size(value: Tensor, layout: Layout) -> str:
    """How a tapped tensor reads in a size-mismatch error: a map's (H, W), or what it is when it has no grid."""
    if layout == "vector":
        return f"a vector of shape {tuple(value.shape)} (no spatial map)"
    h, w = to_bchw(value, layout).shape[-2:]
    return f"({h}, {w}) (H, W; tensor shape {tuple(value.shape)})"
