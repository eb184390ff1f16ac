"""``python -m diffkd.bench_tasks`` — the cost of DiffKD on dense tasks: Cityscapes logits and the detector's FPN.

Two tasks, each measured the way ``python -m diffkd.bench`` measures classification:

- **segmentation** (``experiment=cityscapes_dlv3r101_dlv3r18``, CIRKD's DeepLabV3-R101 → DeepLabV3-R18): the
  experiment's DiffKD heads (``distill=diffkd_seg_aux``: one on ``:out``, one on ``:aux``, kernel 3, DIST) on
  19-channel logit maps of 64×128 — a 512×1024 training crop at stride 8 —, their parameters, FLOPs (forward and
  forward + backward) and CPU forward + backward time; then training steps of student alone / pixel KD
  (``distill=kd_seg``) / DiffKD at a crop and batch small enough for the machine.
- **detection** (``experiment=coco_frcnn_r101_r50``, Faster R-CNN R101-FPN → R50-FPN): the experiment's DiffKD heads
  (``distill=diffkd_det``: one per FPN level ``backbone.fpn:*`` = P2–P6, 256 channels, kernel 3, MSE) at an
  800×1333 input, their parameters and FLOPs; then training steps of student alone / FitNet
  (``distill=fitnet_fpn``) / DiffKD at a small image size, with the target DiffKD/FitNet ≤ 1.6 checked.

Everything is built by the library's own builders from the experiment's config
(:func:`~diffkd.bench.common.bench_config`: ``compose_packaged`` + ``build_module``, with overrides for sizes only)
and driven through the task module's own hooks (``synthetic_batch``, ``student_forward``, ``teacher_forward``): the
steps are real Lightning training steps of the task's module (``SegmentationModule`` / ``DetectionModule``: student
forward, teacher forward under no-grad, distiller terms, backward, SGD step) on the task's synthetic batch grown to
the step's batch, untimed warm-up steps then timed ones. A task of the benchmark is one :class:`TaskSpec` (an
experiment, the distill configs, the sizes); nothing here branches on its name. Teachers are untrained (random
weights, no files needed); students start without pretrained weights. The configurations of a task are timed
round-robin (``--repeat``), each keeping its median, so that the ratios come from one run even on a busy machine.

FLOPs are torch's :class:`~torch.utils.flop_counter.FlopCounterMode` counts (matrix products and convolutions; one
multiply-accumulate = 2 FLOPs): of the first warm-up step for a training step, and for the heads of one sample,
counted on the ``meta`` device (shapes only, no arithmetic) through the same head and distance the distiller uses.
The head shapes come from the real models run on ``meta`` tensors at the stated input size.

Detection's FitNet and DiffKD steps both include the experiment's RoI box-regression KD (``regression_kd_weight=1``,
the teacher's box head on the student's proposals); the student-alone step has no teacher at all.

OpenMP's wait policy matters for DiffKD's heads, which are thousands of small operations: on a CPU shared with other
jobs, spin-waiting threads (the default) wait for a descheduled partner and every small operation gets several times
slower, so run with ``OMP_WAIT_POLICY=PASSIVE`` there (set before torch loads); on an idle CPU leave it unset —
passive threads sleep between operations and wake late (the demo's DiffKD step: 50 → 121 ms on 2 idle cores,
BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from diffkd.bench.common import (
    Measured,
    add_common_options,
    as_row,
    bench_config,
    build_bench_module,
    calibrate_norms,
    check_configs,
    cpu_malloc_mode,
    data_facts,
    describe_batch,
    device_name,
    median_round,
    parse_names,
    point_loss,
    quiet_logs,
    repeat_loader,
    time_point_heads,
    time_training_steps,
    write_report,
)

__all__ = [
    "TASKS",
    "HeadCost",
    "StepResult",
    "TaskSpec",
    "bench_heads",
    "bench_task_step",
    "build_head_distiller",
    "calibrate_norms",
    "head_costs",
    "main",
    "point_flops",
    "tapped_shapes",
    "task_config",
    "time_heads",
]

COCO_ASPECT = 4 / 3  # synthetic detection images are H × 4H/3 (COCO's common 480×640)
MAX_OVER_MIN = 1333 / 800  # the detectors' max_size / min_size


@dataclass(frozen=True)
class TaskSpec:
    """One dense task of the benchmark: which experiment, which methods, at which sizes.

    Attributes:
        experiment: the experiment config (``conf/experiment/<name>.yaml``).
        methods: the distill configs timed by default (student alone first, then the baseline, then DiffKD).
        baseline: the distillation baseline the DiffKD step is compared with.
        diffkd: the DiffKD config whose heads are profiled.
        step_input, batch: the training steps' input (H, W) and batch (``tiny_*``: those of ``--tiny``).
        head_input: the input (H, W) of the head table (``tiny_head_input``: of ``--tiny``).
        time_heads: whether the heads' forward + backward is timed too (at ``--head-batch``).
        target: the issue's bound on the DiffKD / baseline step-time ratio, if any.
        tiny_teacher: the teacher of ``--tiny`` runs (a small one of the same family, so the test stays fast).
        tiny_overrides: further overrides of ``--tiny`` runs.
        num_classes: the data's number of classes where its data module reads it from files (COCO: category ids
            1..90 + background = 91); else the data module's own.
    """

    experiment: str
    methods: tuple[str, ...]
    baseline: str
    diffkd: str
    step_input: tuple[int, int]
    batch: int
    head_input: tuple[int, int]
    tiny_step_input: tuple[int, int]
    tiny_batch: int
    tiny_head_input: tuple[int, int]
    tiny_teacher: str
    time_heads: bool = False
    target: float | None = None
    tiny_overrides: tuple[str, ...] = ()
    num_classes: int | None = None


def _detection_hw(short: int) -> tuple[int, int]:
    return short, round(short * COCO_ASPECT)


# torchvision's RPN sampling shrunk for --tiny (as tests/test_coco_experiments.py does)
_TINY_RPN = {"rpn_pre_nms_top_n_train": 100, "rpn_post_nms_top_n_train": 40, "rpn_pre_nms_top_n_test": 100,
             "rpn_post_nms_top_n_test": 40}  # fmt: skip

TASKS: dict[str, TaskSpec] = {
    "segmentation": TaskSpec(
        "cityscapes_dlv3r101_dlv3r18",
        ("none", "kd_seg", "diffkd_seg_aux"),
        baseline="kd_seg",
        diffkd="diffkd_seg_aux",
        step_input=(256, 512),  # crop
        batch=2,
        head_input=(512, 1024),  # a training crop: 19×64×128 logits
        tiny_step_input=(32, 64),
        tiny_batch=2,
        tiny_head_input=(64, 128),
        tiny_teacher="cirkd_deeplabv3_resnet18",
        time_heads=True,
    ),
    "detection": TaskSpec(
        "coco_frcnn_r101_r50",
        ("none", "fitnet_fpn", "diffkd_det"),
        baseline="fitnet_fpn",
        diffkd="diffkd_det",
        step_input=_detection_hw(512),
        batch=1,
        head_input=(800, 1333),
        tiny_step_input=_detection_hw(64),
        tiny_batch=1,
        tiny_head_input=(64, 107),
        tiny_teacher="fasterrcnn_resnet50_fpn",
        target=1.6,
        tiny_overrides=(
            *(f"+model.{side}.{k}={v}" for side in ("student", "teacher") for k, v in _TINY_RPN.items()),
            "+model.student.box_batch_size_per_image=32",
        ),
        num_classes=91,
    ),
}


# ------------------------------------------------------------------------------------------------ configs


def task_config(
    task: str, method: str, *, size: int | None = None, tiny: bool = False, overrides: Sequence[str] = ()
) -> Any:
    """The composed config of ``task``'s experiment with ``distill=<method>``, as training composes it, plus what a
    benchmark needs (:func:`~diffkd.bench.common.bench_config`: no weight files, no learning-rate scaling by a data
    module's batch); models that resize their input themselves (a ``min_size`` key: the detectors) resize to
    ``size`` (short side; long side ≤ ``size``·1333/800)."""
    spec = TASKS[task]
    extra = [f"model.teacher.name={spec.tiny_teacher}", *spec.tiny_overrides] if tiny else []
    cfg = bench_config(spec.experiment, method, [*extra, *overrides], tool="bench_tasks")
    given = {o.lstrip("+~").split("=", 1)[0] for o in overrides}
    for side in ("student", "teacher") if size is not None else ():
        resize = {"min_size": size, "max_size": round(size * MAX_OVER_MIN)}
        for key, value in resize.items():
            if key in cfg.model.get(side, {}) and f"model.{side}.{key}" not in given:
                cfg.model[side][key] = value
    return cfg


def _num_classes(task: str, cfg: Any) -> int | None:
    nc, _ = data_facts(cfg)
    return nc if nc is not None else TASKS[task].num_classes


# ------------------------------------------------------------------------------------------------ training steps


@dataclass
class StepResult(Measured):
    """One configuration's training step: median over ``--repeat`` rounds."""

    task: str
    method: str
    batch: int
    input: str  # what one step sees, e.g. "2×3×256×512" or "2 images 512×683"
    ms_per_step: float
    device: str
    gflop_per_step: float | None = None  # matmul/conv FLOPs of one step, forward + backward (first warm-up step)
    finite: bool | None = None  # was the last timed step's loss finite (all rounds)
    losses: dict[str, float] = field(default_factory=dict)  # the last step's logged loss terms
    ms_runs: list[float] | None = None  # every round's ms/step
    error: str | None = None


def bench_task_step(
    task: str,
    method: str,
    *,
    hw: tuple[int, int],
    batch: int,
    steps: int,
    warmup: int,
    size: int | None = None,
    tiny: bool = False,
    overrides: Sequence[str] = (),
    device: str = "cpu",
    module: Any = None,
    count_flops: bool = True,
) -> tuple[StepResult, Any]:
    """Time ``steps`` training steps (after ``warmup``) of ``task`` with ``distill=<method>``.

    Args:
        hw: the input (H, W) of the task's synthetic batch (a crop, or the detector's images).
        size: the short side models that resize their input resize to (default ``hw[0]``).
        module: ``(module, data)`` of an earlier round (reused: no second build), else built here.
    Returns:
        ``(result, (module, data))``.
    """
    if module is None:  # built on the CPU, then moved
        cfg = task_config(task, method, size=size or hw[0], tiny=tiny, overrides=overrides)
        module = build_bench_module(cfg, _num_classes(task, cfg), (3, *hw), batch, device)
    net, data = module
    out = time_training_steps(net, repeat_loader(data, warmup + steps), steps, warmup, device, count_flops=count_flops)
    result = StepResult(
        task, method, batch, describe_batch(data), 1000 * out.seconds, device,
        gflop_per_step=out.flops / 1e9 if out.flops is not None else None, finite=out.finite,
        losses=out.losses,
    )  # fmt: skip
    return result, module


def step_ratios(task: str, results: Sequence[StepResult]) -> list[dict[str, Any]]:
    """Step-time (and FLOP) ratios of one task: baseline / student, DiffKD / baseline, DiffKD / student, and every
    other measured method against the student alone; with the task's target where it has one."""
    spec = TASKS[task]
    by = {r.method: r for r in results if r.task == task and not r.error}
    pairs = [(spec.baseline, "none"), (spec.diffkd, spec.baseline), (spec.diffkd, "none")]
    pairs += [(m, "none") for m in by if m not in ("none", spec.baseline, spec.diffkd)]
    out = []
    for num, den in pairs:
        a, b = by.get(num), by.get(den)
        if a is None or b is None:
            continue
        flops = a.gflop_per_step / b.gflop_per_step if a.gflop_per_step and b.gflop_per_step else None
        q: dict[str, Any] = {"task": task, "ratio": f"{num}/{den}", "time": a.ms_per_step / b.ms_per_step,
                             "flops": flops}  # fmt: skip
        if (num, den) == (spec.diffkd, spec.baseline) and spec.target is not None:
            q["target"] = spec.target
            q["holds"] = q["time"] <= spec.target
        out.append(q)
    return out


# ------------------------------------------------------------------------------------------------ the heads alone


class _Emit(nn.Module):
    """Zero maps of fixed shapes (a dict), standing in for a model's tapped output in :func:`build_head_distiller`."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]) -> None:
        super().__init__()
        self.shapes = dict(shapes)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return OrderedDict((k, x.new_zeros(x.shape[0], *s)) for k, s in self.shapes.items())


class _Stub(nn.Module):
    """A "model" whose module ``path`` ('' = the output) returns ``shapes``: the distiller sizes its heads from it
    exactly as from the real model's dry run."""

    def __init__(self, path: str, shapes: dict[str, tuple[int, ...]]) -> None:
        super().__init__()
        self.path = path or "emit"
        parent: nn.Module = self
        *parents, last = self.path.split(".")
        for name in parents:
            child = nn.Module()
            parent.add_module(name, child)
            parent = child
        parent.add_module(last, _Emit(shapes))

    def forward(self, x: Tensor) -> Any:
        return self.get_submodule(self.path)(x)


def _tap_path(cfg: Any) -> str:
    """The single module path every point of ``cfg.distill`` taps (both tasks tap one: '' or ``backbone.fpn``)."""
    from diffkd.distill import TapAddress

    paths = {TapAddress.parse(p[side]).path for p in cfg.distill.points.values() for side in ("student", "teacher")}
    if len(paths) != 1:
        raise ValueError(f"the head benchmark expects the points to tap one module path, got {sorted(paths)}")
    return paths.pop()


class _MetaScalars(TorchDispatchMode):
    """Reads a scalar out of a ``meta`` tensor as 0 / False: a model's data checks on its inputs (a detector's
    "no degenerate box") pass in a shapes-only run instead of failing on a value that does not exist."""

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func is torch.ops.aten._local_scalar_dense.default and args[0].is_meta:
            return False if args[0].dtype == torch.bool else 0
        return func(*args, **(kwargs or {}))


class _Reached(Exception):
    """Raised by the tapped module's hook: the rest of the forward is not needed."""


def _tapped_value(model: nn.Module, path: str, forward: Callable[[], Any]) -> Any:
    """The output of ``model``'s module ``path`` ('' = the model's output) in ``forward()``, which stops there."""
    if not path:
        return forward()
    seen: list[Any] = []

    def hook(m: nn.Module, i: Any, o: Any) -> None:
        seen.append(o)
        raise _Reached

    handle = model.get_submodule(path).register_forward_hook(hook)
    try:
        forward()
    except _Reached:
        pass
    finally:
        handle.remove()
    if not seen:
        raise RuntimeError(f"module {path!r} did not run in the forward; it can't be distilled")
    return seen[0]


def tapped_shapes(task: str, cfg: Any, hw: tuple[int, int]) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """``{entry: (C, H, W)}`` of the tapped module's output for the student and the teacher at input ``hw``, from
    the experiment's module built on the ``meta`` device (no weights, no arithmetic) and run, in eval mode, through
    its own hooks on its own synthetic batch (``student_forward``, then ``teacher_forward``: a detector's teacher
    reads the student's resized, padded batch), each up to the tapped module."""
    from diffkd.utils.instantiate import build_module

    path = _tap_path(cfg)
    with torch.device("meta"):
        module = build_module(cfg, _num_classes(task, cfg)).eval()
        batch = module.synthetic_batch((3, *hw))
        with torch.no_grad(), _MetaScalars():
            values = [_tapped_value(module.student, path, lambda: module.student_forward(batch))]
            values.append(_tapped_value(module.teacher, path, lambda: module.teacher_forward(batch)))
    shapes = []
    for side, value in zip(("student", "teacher"), values, strict=True):
        if isinstance(value, Tensor):
            raise TypeError(f"{side} {path!r}: expected a dict of maps, got a tensor")
        shapes.append({k: tuple(v.shape[1:]) for k, v in value.items() if isinstance(v, Tensor)})
    return shapes[0], shapes[1]


def build_head_distiller(cfg: Any, student_shapes: dict[str, tuple], teacher_shapes: dict[str, tuple]) -> Any:
    """The experiment's ``Distiller`` (``cfg.distill``), built on stand-in models whose tapped module returns maps
    of the given shapes: the same heads, distances and weights the experiment trains, sized for those maps."""
    from diffkd.utils.instantiate import instantiate

    distiller = instantiate(cfg.distill, _convert_="all")
    path = _tap_path(cfg)
    torch.manual_seed(0)
    distiller.build(_Stub(path, student_shapes), _Stub(path, teacher_shapes), torch.zeros(2, 1))
    return distiller


def point_flops(distiller: Any, name: str, batch: int = 1) -> tuple[int, int]:
    """(forward, forward + backward) FLOPs of one point — its head's training forward, the head's own loss terms
    and the distance, then the backward of their weighted sum — for ``batch`` samples, counted on ``meta`` copies
    (shapes only)."""
    info = distiller.points[name]
    meta = copy.deepcopy(distiller).to("meta").train()
    s = torch.empty(batch, *info.student_shape, device="meta", requires_grad=True)
    t = torch.empty(batch, *info.teacher_shape, device="meta")
    forward, backward = FlopCounterMode(display=False), FlopCounterMode(display=False)
    with forward:
        loss = point_loss(meta, name, s, t)
    with backward:
        loss.backward()
    fwd = int(forward.get_total_flops())
    return fwd, fwd + int(backward.get_total_flops())


@dataclass
class HeadCost:
    """One distillation point's head at the profiled size (FLOPs for one sample)."""

    point: str
    student_shape: tuple[int, ...]
    teacher_shape: tuple[int, ...]
    params: int
    gflop_fwd: float
    gflop_fwd_bwd: float
    shared_with: str | None = None  # the head is another point's (shared_head): its parameters counted there


def head_costs(distiller: Any) -> list[HeadCost]:
    """Parameters and per-sample FLOPs of every point of a built distiller."""
    out, seen = [], set()
    for name, info in distiller.points.items():
        head = distiller.heads[info.head] if info.head is not None else None
        params = sum(p.numel() for p in head.parameters()) if head is not None else 0
        shared = info.head if info.head in seen and info.head != name else None
        seen.add(info.head)
        fwd, total = point_flops(distiller, name)
        out.append(HeadCost(name, tuple(info.student_shape), tuple(info.teacher_shape), 0 if shared else params,
                            fwd / 1e9, total / 1e9, shared))  # fmt: skip
    return out


def time_heads(distiller: Any, batch: int, steps: int = 10, warmup: int = 2, device: str = "cpu") -> list[float]:
    """ms of each of ``steps`` forwards + backwards (after ``warmup``) of every point of ``distiller`` together
    (their weighted losses summed) at ``batch`` samples, on ``device`` (training mode, random maps)."""
    return time_point_heads(distiller, batch, steps, warmup, device)


def bench_heads(
    task: str, hw: tuple[int, int], *, tiny: bool = False, overrides: Sequence[str] = (), time_batch: int | None = None,
    time_steps: int = 10, device: str = "cpu",
) -> dict[str, Any]:  # fmt: skip
    """The DiffKD heads of ``task``'s experiment at input ``hw``: shapes, parameters and per-sample FLOPs of each
    point, and (``time_batch``) the ms of one forward + backward of all of them at that batch."""
    spec = TASKS[task]
    cfg = task_config(task, spec.diffkd, size=hw[0], tiny=tiny, overrides=overrides)
    s_shapes, t_shapes = tapped_shapes(task, cfg, hw)
    distiller = build_head_distiller(cfg, s_shapes, t_shapes)
    costs = head_costs(distiller)
    out: dict[str, Any] = {
        "task": task,
        "distill": spec.diffkd,
        "input": list(hw),
        "diffkd_defaults": dict(distiller.diffkd_defaults),
        "head_kwargs": {k: dict(s.head_kwargs) for k, s in distiller.specs.items()},
        "distance": {k: dict(s.distance) for k, s in distiller.specs.items()},
        "points": [asdict(c) for c in costs],
        "params": sum(c.params for c in costs),
        "gflop_fwd": sum(c.gflop_fwd for c in costs),
        "gflop_fwd_bwd": sum(c.gflop_fwd_bwd for c in costs),
    }
    if time_batch:
        out["time_batch"] = time_batch
        times = time_heads(distiller, time_batch, steps=time_steps, device=device)
        out["ms_fwd_bwd"] = statistics.median(times)
        out["ms_fwd_bwd_runs"] = [round(t, 1) for t in times]
    return out


# ------------------------------------------------------------------------------------------------ printing


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def head_table(h: dict[str, Any]) -> str:
    lines = [f"{'point':<12}{'student map':<18}{'params':>12}{'GFLOP fwd':>12}{'GFLOP fwd+bwd':>15}"]
    for p in h["points"]:
        shape = "×".join(str(d) for d in p["student_shape"])
        params = f"{p['params']:,}" if not p["shared_with"] else f"(= {p['shared_with']})"
        lines.append(f"{p['point']:<12}{shape:<18}{params:>12}{p['gflop_fwd']:>12.3f}{p['gflop_fwd_bwd']:>15.3f}")
    lines.append(f"{'total':<12}{'':<18}{h['params']:>12,}{h['gflop_fwd']:>12.3f}{h['gflop_fwd_bwd']:>15.3f}")
    if "ms_fwd_bwd" in h:
        runs = h["ms_fwd_bwd_runs"]
        lines.append(f"forward + backward of all heads at batch {h['time_batch']}: {h['ms_fwd_bwd']:.1f} ms (median of"
                     f" {len(runs)}, {min(runs):.0f}–{max(runs):.0f})")  # fmt: skip
    return "\n".join(lines)


def step_table(results: Sequence[StepResult]) -> str:
    lines = [f"{'task':<14}{'method':<16}{'input':<20}{'ms/step':>10}{'GFLOP/step':>12}{'GFLOP/s':>9}"]
    for r in results:
        row = f"{r.task:<14}{r.method:<16}{r.input:<20}{_fmt(r.ms_per_step, '.0f'):>10}"
        row += f"{_fmt(r.gflop_per_step, '.1f'):>12}{_fmt(r.gflop_per_s, '.1f'):>9}"
        lines.append(row + r.notes())
    return "\n".join(lines)


def ratio_lines(ratios: Sequence[dict[str, Any]]) -> str:
    lines = []
    for q in ratios:
        line = f"{q['task']:<14}{q['ratio']:<28} step time ×{q['time']:.2f}"
        line += f"  (FLOPs ×{q['flops']:.2f})" if q.get("flops") else ""
        if "target" in q:
            line += f"  — target ≤ {q['target']}: {'holds' if q['holds'] else 'does NOT hold'}"
        lines.append(line)
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ command line


def _hw(value: str) -> tuple[int, int]:
    parts = value.lower().replace("×", "x").split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"expected HxW, e.g. 256x512; got {value!r}")
    return int(parts[0]), int(parts[1])


def _step_rounds(
    task: str, methods: Sequence[str], args: argparse.Namespace, hw: tuple[int, int], batch: int,
    say: Callable[[str], None],
) -> list[StepResult]:  # fmt: skip
    modules: dict[str, Any] = {}
    rounds: dict[str, list[StepResult]] = {m: [] for m in methods}
    for i in range(args.repeat):  # round-robin: a slow spell of a shared machine hits every configuration
        for method in methods:
            try:
                r, modules[method] = bench_task_step(
                    task, method, hw=hw, batch=batch, steps=args.steps, warmup=args.warmup, tiny=args.tiny,
                    overrides=args.override, device=args.device, module=modules.get(method), count_flops=i == 0,
                )  # fmt: skip
            except Exception as err:  # one failing configuration must not lose the others
                if args.raise_errors:
                    raise
                label = f"{batch}×3×{hw[0]}×{hw[1]}"
                r = StepResult(task, method, batch, label, float("nan"), args.device, error=repr(err)[:300])
            rounds[method].append(r)
            say(step_table([r]).splitlines()[1])
    modules.clear()
    return [median_round(rounds[m]) for m in methods]


def _parser() -> argparse.ArgumentParser:
    seg, det = TASKS["segmentation"], TASKS["detection"]
    parser = argparse.ArgumentParser(prog="python -m diffkd.bench_tasks", description=__doc__.splitlines()[0])
    add = parser.add_argument
    # fmt: off
    add("--task", default=",".join(TASKS), help="segmentation, detection or both")
    add("--seg-methods", default=",".join(seg.methods), help="distill configs timed for segmentation (none = student "
        "alone)")
    add("--det-methods", default=",".join(det.methods), help="distill configs timed for detection (none = student "
        "alone)")
    add("--steps", type=int, default=2, help="timed steps per round")
    add("--warmup", type=int, default=1, help="untimed steps first (the first one counts FLOPs)")
    add("--repeat", type=int, default=3, help="round-robin rounds; the median is kept")
    add("--crop", type=_hw, default=None, help="segmentation crop HxW (default "
        f"{seg.step_input[0]}x{seg.step_input[1]})")
    add("--size", type=int, default=None, help="detection short side: the detectors' min_size, images size×4size/3, "
        f"max_size size·1333/800 (default {det.step_input[0]})")
    add("--batch", type=int, default=None, help=f"batch of every step (default: segmentation {seg.batch}, detection "
        f"{det.batch})")
    add("--head-crop", type=_hw, default=None, help="segmentation crop of the head table (default "
        f"{seg.head_input[0]}x{seg.head_input[1]}: 19×64×128 logits)")
    add("--head-input", type=_hw, default=None, help="detection image of the head table (default "
        f"{det.head_input[0]}x{det.head_input[1]})")
    add("--head-batch", type=int, default=2, help="batch of the segmentation heads' forward + backward timing (0: not "
        "timed)")
    add("--no-heads", action="store_true", help="skip the head tables")
    add("--no-steps", action="store_true", help="skip the training steps")
    add("--override", action="append", default=[], help="a Hydra override for every config")
    add("--tiny", action="store_true", help="toy sizes and small teachers (the test): crop 32x64 batch 2, detection 64 "
        "px batch 1")
    add("--raise-errors", action="store_true", help="stop at the first failing configuration")
    # fmt: on
    add_common_options(parser, "tasks-<time>")
    return parser


def _sizes(task: str, args: argparse.Namespace) -> tuple[tuple[int, int], int, tuple[int, int]]:
    """(step input, batch, head input) of ``task`` from the command line, else the spec's (``--tiny``'s)."""
    spec = TASKS[task]
    given = {
        "segmentation": (args.crop, args.head_crop),
        "detection": (args.size and _detection_hw(args.size), args.head_input),
    }.get(task, (None, None))
    step = given[0] or (spec.tiny_step_input if args.tiny else spec.step_input)
    head = given[1] or (spec.tiny_head_input if args.tiny else spec.head_input)
    return step, args.batch or (spec.tiny_batch if args.tiny else spec.batch), head


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parser().parse_args(argv)
    tasks = parse_names(args.task, list(TASKS), "task")
    methods = {"segmentation": parse_names(args.seg_methods), "detection": parse_names(args.det_methods)}
    check_configs("distill", [m for t in tasks for m in methods[t]])
    if "segmentation" in tasks and not args.no_steps and _sizes("segmentation", args)[1] < 2:
        raise SystemExit("segmentation steps need --batch ≥ 2 (the ASPP's pooled branch has BatchNorm on 1×1 maps)")
    quiet_logs(diffkd_level=40)  # ERROR: the untrained teachers' warnings are known, by design
    gpu = args.device.startswith("cuda")
    malloc_mode = cpu_malloc_mode(args.device, args.cpu_malloc)

    def say(text: str) -> None:
        print(text, flush=True)

    started = time.perf_counter()
    omp = os.environ.get("OMP_WAIT_POLICY")
    if not gpu:
        say(
            f"note: OMP_WAIT_POLICY={omp or 'unset (spin-wait)'}: spin-waiting suits an idle CPU; on one shared with"
            " other jobs it makes small operations many times slower (there use OMP_WAIT_POLICY=PASSIVE, which in turn"
            " slows them on an idle CPU)"
        )
    say(
        f"device: {device_name(args.device)} | torch {torch.__version__} | cpu_malloc={malloc_mode} | "
        f"steps {args.steps} after {args.warmup} warm-up, {args.repeat} round(s)" + (" | tiny" if args.tiny else "")
    )
    heads: dict[str, Any] = {}
    results: list[StepResult] = []
    ratios: list[dict[str, Any]] = []
    for task in tasks:
        step_hw, batch, head_hw = _sizes(task, args)
        if not args.no_heads:
            time_batch = args.head_batch if TASKS[task].time_heads else None
            h = bench_heads(task, head_hw, tiny=args.tiny, overrides=args.override, time_batch=time_batch,
                            time_steps=2 if args.tiny else 10, device=args.device)  # fmt: skip
            heads[task] = h
            say(f"\n{task}: DiffKD heads of distill={h['distill']} at a {head_hw[0]}×{head_hw[1]} input, FLOPs per "
                "sample")  # fmt: skip
            say(head_table(h))
        if not args.no_steps:
            say(f"\n{task}: training steps, batch {batch} at {step_hw[0]}×{step_hw[1]}")
            task_results = _step_rounds(task, methods[task], args, step_hw, batch, say)
            results += task_results
            ratios += step_ratios(task, task_results)
    if results:
        say("\n" + step_table(results))
        say(ratio_lines(ratios))
    meta = {
        "cpu_malloc": malloc_mode,
        "omp_wait_policy": omp,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "wall_s": round(time.perf_counter() - started, 1),
        "experiments": {t: TASKS[t].experiment for t in tasks},
    }
    body = {"heads": heads, "steps": [as_row(r) for r in results], "ratios": ratios}
    out = write_report(args, argv, "tasks", meta, body)
    say(f"wrote {out} ({meta['wall_s']:.0f} s)")
    import json

    return json.loads(out.read_text())
