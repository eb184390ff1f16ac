"""Distillers: which tapped student/teacher tensors meet, through which head and distance, with which weight.

One class, :class:`Distiller`, serves every method and task; the methods (``diffkd``, ``diffkd_dist``, ``kd``,
``dist``, ``fitnet``, ``dkd``, ``none``) are configurations of it (``conf/distill/*.yaml``). A distiller is a
set of named *points*; each point says

- where to tap: ``student``/``teacher`` module paths ('' = model output, ``@feature`` = last feature map);
- the head between them: ``diffkd`` (a :class:`~diffkd.method.DiffKD`), ``conv1x1`` (FitNet adapter) or
  ``identity``;
- the distance (``kl``, ``mse``, ``dist``, ``dkd`` with its arguments) and the weights of its loss terms.

Channels and spatial sizes are never typed: :meth:`Distiller.build` infers them with one dry-run forward.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffkd.distill.taps import AUTO_FEATURE, find_last_feature_map, probe_shapes
from diffkd.method import DiffKD, build_distance, guess_layout, to_bchw
from diffkd.method.layout import Layout

__all__ = ["DistillOutput", "Distiller", "PointSpec"]


@dataclass
class PointSpec:
    """One distillation point (see the module docstring).

    Attributes:
        student, teacher: module paths; '' is the model output, ``@feature`` the last spatial feature map.
        head: ``diffkd`` | ``conv1x1`` | ``identity``.
        distance: ``{"name": "kl"|"mse"|"dist"|"dkd", **kwargs}``.
        weight: λ of the distance term (λ3 of the paper for DiffKD points).
        diff_weight, ae_weight: λ1 (diffusion loss) and λ2 (autoencoder loss) of DiffKD points.
        head_kwargs: passed to the head (for DiffKD: ``use_ae``, ``ae_channels``, ``inference_steps``, ...;
            ``kernel_size`` defaults to 1 for vectors such as logits and 3 for maps).
        align: ``None`` (spatial sizes must match) or ``interpolate`` (bilinear-resize the student map).
        warmup_epochs: linear ramp of the distance term's weight over this many epochs (DKD: 20).
        student_layout, teacher_layout: force the tensor layout (``bchw``, ``bhwc``, ``tokens``, ``vector``).
    """

    student: str = AUTO_FEATURE
    teacher: str = AUTO_FEATURE
    head: Literal["diffkd", "conv1x1", "identity"] = "identity"
    distance: dict[str, Any] = field(default_factory=lambda: {"name": "mse"})
    weight: float = 1.0
    diff_weight: float = 1.0
    ae_weight: float = 1.0
    head_kwargs: dict[str, Any] = field(default_factory=dict)
    align: Literal["interpolate"] | None = None
    warmup_epochs: float = 0.0
    student_layout: Layout | None = None
    teacher_layout: Layout | None = None


class DistillOutput(NamedTuple):
    """``terms``: weighted loss terms by name (``<point>/kd``, ``<point>/diff``, ``<point>/ae``);
    ``stats``: detached statistics to log (e.g. ``gamma/<point>`` means)."""

    terms: dict[str, Tensor]
    stats: dict[str, Tensor]


def _conv_adapter(c_in: int, c_out: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))


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
            if "/" in name or "." in name:
                raise ValueError(f"point name {name!r} may not contain '/' or '.'")
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
        self.task_weight = float(task_weight)
        self.diffkd_defaults = dict(diffkd or {})
        self.heads = nn.ModuleDict()
        self.distances = nn.ModuleDict({n: build_distance(**dict(s.distance)) for n, s in self.specs.items()})
        self.student_paths: dict[str, str] = {}
        self.teacher_paths: dict[str, str] = {}
        self.layouts: dict[str, tuple[Layout, Layout]] = {}
        self.built = False

    @property
    def needs_teacher(self) -> bool:
        return bool(self.specs)

    # ------------------------------------------------------------------ setup
    def build(self, student: nn.Module, teacher: nn.Module | None, example: Tensor) -> dict[str, dict[str, Any]]:
        """Resolve paths, infer shapes with one dry-run forward per model, and create the heads.

        Args:
            example: an input batch (B ≥ 2, C, H, W) on the models' device.
        Returns:
            ``{point: {"student": path, "teacher": path, "student_shape": ..., "teacher_shape": ..., "params": n}}``
        """
        if self.built:
            return self.describe()
        if self.specs and teacher is None:
            raise ValueError(f"distillation points {sorted(self.specs)} need a teacher; set model.teacher")
        for name, spec in self.specs.items():
            self.student_paths[name] = (
                find_last_feature_map(student, example) if spec.student == AUTO_FEATURE else spec.student
            )
            self.teacher_paths[name] = (
                find_last_feature_map(teacher, example) if spec.teacher == AUTO_FEATURE else spec.teacher
            )
        s_shapes = probe_shapes(student, example, self.student_paths.values()) if self.specs else {}
        t_shapes = probe_shapes(teacher, example, self.teacher_paths.values()) if self.specs else {}
        device = example.device
        for name, spec in self.specs.items():
            s_probe = torch.empty(s_shapes[self.student_paths[name]], device="meta")
            t_probe = torch.empty(t_shapes[self.teacher_paths[name]], device="meta")
            s_layout = spec.student_layout or guess_layout(s_probe)
            t_layout = spec.teacher_layout or guess_layout(t_probe)
            self.layouts[name] = (s_layout, t_layout)
            s4, t4 = to_bchw(s_probe, s_layout).shape, to_bchw(t_probe, t_layout).shape
            if s4[-2:] != t4[-2:] and spec.align is None:
                raise ValueError(
                    f"point {name!r}: student {self.student_paths[name]!r} is {tuple(s4[-2:])} but teacher "
                    f"{self.teacher_paths[name]!r} is {tuple(t4[-2:])} (H, W); tap maps of equal size or set "
                    f"distill.points.{name}.align=interpolate"
                )
            head = self._make_head(name, spec, s4[1], t4[1], vector=s_layout == "vector")
            if head is not None:
                self.heads[name] = head.to(device)
        self.built = True
        return self.describe()

    def _make_head(self, name: str, spec: PointSpec, c_s: int, c_t: int, vector: bool) -> nn.Module | None:
        if spec.head == "diffkd":
            kwargs = {"kernel_size": 1 if vector else 3, **self.diffkd_defaults, **spec.head_kwargs}
            return DiffKD(c_s, c_t, **kwargs)
        if spec.head == "conv1x1":
            return _conv_adapter(c_s, c_t)
        if spec.head == "identity":
            if c_s != c_t:
                raise ValueError(
                    f"point {name!r}: student has {c_s} channels and teacher {c_t}; a direct distance needs equal "
                    f"widths — use head: conv1x1 (FitNet adapter) or head: diffkd"
                )
            return None
        raise ValueError(f"point {name!r}: unknown head {spec.head!r}; choose diffkd, conv1x1 or identity")

    def describe(self) -> dict[str, dict[str, Any]]:
        """What each point taps and how big its head is (printed at setup)."""
        out = {}
        for name, spec in self.specs.items():
            head = self.heads[name] if name in self.heads else None  # noqa: SIM401 (ModuleDict has no .get)
            out[name] = {
                "student": self.student_paths.get(name),
                "teacher": self.teacher_paths.get(name),
                "head": spec.head,
                "distance": dict(spec.distance),
                "params": sum(p.numel() for p in head.parameters()) if head is not None else 0,
            }
        return out

    def tap_paths(self) -> tuple[list[str], list[str]]:
        """(student paths, teacher paths) to tap, after :meth:`build`."""
        return list(dict.fromkeys(self.student_paths.values())), list(dict.fromkeys(self.teacher_paths.values()))

    # ------------------------------------------------------------------ training
    def forward(
        self,
        student_feats: Mapping[str, Tensor],
        teacher_feats: Mapping[str, Tensor],
        target: Tensor | None = None,
        epoch: float = 0.0,
    ) -> DistillOutput:
        """Loss terms from tapped features.

        Args:
            student_feats, teacher_feats: ``{path: tensor}`` from the taps.
            target: labels (B,) int64 (or soft (B, K), reduced to argmax) for distances that need them (DKD).
            epoch: training progress in epochs, for ``warmup_epochs`` ramps.
        """
        if not self.built:
            raise RuntimeError("Distiller.build(student, teacher, example) must run before the first forward")
        terms: dict[str, Tensor] = {}
        stats: dict[str, Tensor] = {}
        for name, spec in self.specs.items():
            s_layout, t_layout = self.layouts[name]
            s = to_bchw(student_feats[self.student_paths[name]], s_layout)
            t = to_bchw(teacher_feats[self.teacher_paths[name]], t_layout)
            if spec.align == "interpolate" and s.shape[-2:] != t.shape[-2:]:
                s = F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)
            ramp = min(epoch / spec.warmup_epochs, 1.0) if spec.warmup_epochs > 0 else 1.0
            distance = self.distances[name]
            head = self.heads[name] if name in self.heads else None  # noqa: SIM401 (ModuleDict has no .get)
            if isinstance(head, DiffKD):
                out = head(s, t)
                s, t = out.student, out.teacher
                terms[f"{name}/diff"] = spec.diff_weight * out.diffusion_loss
                if out.ae_loss is not None:
                    terms[f"{name}/ae"] = spec.ae_weight * out.ae_loss
                if out.gamma is not None:
                    stats[f"gamma/{name}"] = out.gamma.detach().mean()
            elif head is not None:
                s = head(s)
            if getattr(distance, "needs_target", False):
                if target is None:
                    raise ValueError(f"point {name!r}: distance {spec.distance['name']!r} needs the labels")
                labels = target.argmax(dim=1) if target.dim() == 2 else target
                kd = distance(s, t, labels)
            else:
                kd = distance(s, t)
            terms[f"{name}/kd"] = (spec.weight * ramp) * kd
        return DistillOutput(terms, stats)

    def extra_repr(self) -> str:
        return f"task_weight={self.task_weight}, points={ {n: asdict(s)['head'] for n, s in self.specs.items()} }"
