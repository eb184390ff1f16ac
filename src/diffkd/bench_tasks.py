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
(:func:`~diffkd.utils.instantiate.compose_packaged` + :func:`~diffkd.utils.instantiate.build_module`, with overrides
for sizes only): the steps are real Lightning training steps of the task's module (``SegmentationModule`` /
``DetectionModule``: student forward, teacher forward under no-grad, distiller terms, backward, SGD step) on a
synthetic batch in the data module's format, untimed warm-up steps then timed ones. Teachers are untrained (random
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
import json
import logging
import math
import os
import statistics
import sys
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from diffkd.bench import device_name, time_training_steps
from diffkd.utils.cpu_malloc import CPU_MALLOC_MODES, configure_cpu_malloc

__all__ = [
    "TASKS",
    "HeadCost",
    "StepResult",
    "TaskSpec",
    "bench_task_step",
    "build_head_distiller",
    "head_costs",
    "main",
    "point_flops",
    "task_config",
    "time_heads",
]


@dataclass(frozen=True)
class TaskSpec:
    """One dense task of the benchmark.

    Attributes:
        experiment: the experiment config (``conf/experiment/<name>.yaml``).
        methods: the distill configs timed by default (student alone first, then the baseline, then DiffKD).
        baseline: the distillation baseline the DiffKD step is compared with.
        diffkd: the DiffKD config whose heads are profiled.
        num_classes: the data's number of classes (Cityscapes 19; COCO's category ids 1..90 + background: 91).
        target: the issue's bound on the DiffKD / baseline step-time ratio, if any.
        tiny_teacher: the teacher of ``--tiny`` runs (a small one of the same family, so the test stays fast).
    """

    experiment: str
    methods: tuple[str, ...]
    baseline: str
    diffkd: str
    num_classes: int
    target: float | None
    tiny_teacher: str


TASKS: dict[str, TaskSpec] = {
    "segmentation": TaskSpec(
        "cityscapes_dlv3r101_dlv3r18",
        ("none", "kd_seg", "diffkd_seg_aux"),
        baseline="kd_seg",
        diffkd="diffkd_seg_aux",
        num_classes=19,
        target=None,
        tiny_teacher="cirkd_deeplabv3_resnet18",
    ),
    "detection": TaskSpec(
        "coco_frcnn_r101_r50",
        ("none", "fitnet_fpn", "diffkd_det"),
        baseline="fitnet_fpn",
        diffkd="diffkd_det",
        num_classes=91,
        target=1.6,
        tiny_teacher="fasterrcnn_resnet50_fpn",
    ),
}

# the sizes of a full run and of --tiny (the test's)
SEG_CROP, SEG_BATCH, SEG_HEAD_CROP, SEG_HEAD_BATCH = (256, 512), 2, (512, 1024), 2
DET_SIZE, DET_BATCH, DET_HEAD_INPUT = 512, 1, (800, 1333)
TINY = {"crop": (32, 64), "size": 64, "seg_batch": 2, "det_batch": 1, "head_crop": (64, 128), "head_input": (64, 107)}
# torchvision's RPN sampling shrunk for --tiny (as tests/test_coco_experiments.py does)
_TINY_RPN = {"rpn_pre_nms_top_n_train": 100, "rpn_post_nms_top_n_train": 40, "rpn_pre_nms_top_n_test": 100,
             "rpn_post_nms_top_n_test": 40}  # fmt: skip
COCO_ASPECT = 4 / 3  # synthetic detection images are H × 4H/3 (COCO's common 480×640)
MAX_OVER_MIN = 1333 / 800  # the detectors' max_size / min_size


# ------------------------------------------------------------------------------------------------ configs


def _max_size(short: int) -> int:
    return round(short * MAX_OVER_MIN)


def task_config(
    task: str, method: str, *, size: int | None = None, tiny: bool = False, overrides: Sequence[str] = ()
) -> Any:
    """The composed config of ``task``'s experiment with ``distill=<method>``, as training composes it, plus what a
    benchmark needs: no weight files (untrained teacher, student without pretrained backbone), no learning-rate
    scaling by a data module's batch, and for detection the detectors' resize set to ``size`` (short side; long
    side ≤ ``size``·1333/800)."""
    from diffkd.utils.instantiate import compose_packaged

    spec = TASKS[task]
    extra = [f"experiment={spec.experiment}", f"distill={method}", "model.teacher.weights=null",
             "optim.lr_base_batch_size=null"]  # fmt: skip
    if task == "segmentation":
        extra += ["model.student.backbone_weights=null", "model.iou_table=false"]
    else:
        extra.append("model.student.weights_backbone=null")
        if size is not None:
            extra += [f"model.{side}.{k}={v}" for side in ("student", "teacher")
                      for k, v in (("min_size", size), ("max_size", _max_size(size)))]  # fmt: skip
        if tiny:
            extra += [f"+model.{side}.{k}={v}" for side in ("student", "teacher") for k, v in _TINY_RPN.items()]
            extra.append("+model.student.box_batch_size_per_image=32")
    if tiny:
        extra.append(f"model.teacher.name={spec.tiny_teacher}")
    return compose_packaged([*extra, *overrides], tool="bench_tasks")


# ------------------------------------------------------------------------------------------------ synthetic batches


def synthetic_batch(task: str, hw: tuple[int, int], batch: int, num_classes: int, device: str = "cpu") -> Any:
    """A batch in the data module's format, from a fixed seed.

    Segmentation: ``(images (B, 3, H, W) normalised, labels (B, H, W) int64)`` with 5 % of the pixels 255
    (CityscapesDataModule's ignore label). Detection: ``(images, targets)``, two lists — float images (3, H, W) in
    [0, 1] and per image 8 boxes (xyxy, 16 px to half the image wide), labels in 1..num_classes−1, ``image_id``,
    ``area``, ``iscrowd`` (COCODataModule's training targets).
    """
    g = torch.Generator().manual_seed(0)
    h, w = hw
    if task == "segmentation":
        images = torch.randn(batch, 3, h, w, generator=g)
        labels = torch.randint(0, num_classes, (batch, h, w), generator=g)
        labels[torch.rand(batch, h, w, generator=g) < 0.05] = 255
        return images.to(device), labels.to(device)
    images, targets = [], []
    for i in range(batch):
        images.append(torch.rand(3, h, w, generator=g).to(device))
        n = 8
        wh = 16 + torch.rand(n, 2, generator=g) * torch.tensor([w / 2 - 16, h / 2 - 16])
        xy = torch.rand(n, 2, generator=g) * (torch.tensor([w, h]) - wh)
        boxes = torch.cat([xy, xy + wh], dim=1)
        targets.append({
            "boxes": boxes.to(device),
            "labels": torch.randint(1, num_classes, (n,), generator=g).to(device),
            "image_id": i,
            "area": (wh[:, 0] * wh[:, 1]).to(device),
            "iscrowd": torch.zeros(n, dtype=torch.int64, device=device),
        })  # fmt: skip
    return images, targets


def _first_sample(batch: Any) -> Any:
    """The first sample of a batch, as a batch (the dry run that sizes the heads needs no more)."""
    return batch[0][:1], batch[1][:1]


def _detection_hw(size: int) -> tuple[int, int]:
    return size, round(size * COCO_ASPECT)


# ------------------------------------------------------------------------------------------------ training steps


@dataclass
class StepResult:
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

    @property
    def gflop_per_s(self) -> float | None:
        if self.gflop_per_step is None or not self.ms_per_step > 0:
            return None
        return self.gflop_per_step / (self.ms_per_step / 1000)


def _identity(batch: Any) -> Any:
    return batch


def _loader(batch: Any, n: int) -> Any:
    """The same device-resident batch ``n`` times, as a DataLoader (a length Lightning reads: per-iteration
    schedulers such as detection's WarmupMultiStepLR count their epochs from it)."""
    from torch.utils.data import DataLoader

    return DataLoader([batch] * n, batch_size=None, shuffle=False, collate_fn=_identity)


def _model_forward(task: str, model: nn.Module, batch: Any) -> Any:
    """``model``'s forward on a batch as the task's module runs it: a segmenter on the images, a detector's
    transform then its backbone + FPN (the part with normalisation layers)."""
    if task == "segmentation":
        return model(batch[0])
    return model.backbone(model.transform(list(batch[0]))[0].tensors)


@torch.no_grad()
def calibrate_norms(model: nn.Module, forward: Callable[[], Any]) -> int:
    """Give every BatchNorm / FrozenBatchNorm of an untrained ``model`` the statistics of its own input in one
    ``forward`` (each layer in turn, in eval mode: per-channel means, the layer's mean variance), as a trained model
    has the statistics of its data; returns how many layers were set.

    A random ResNet whose normalisation layers keep their initial statistics (mean 0, variance 1), as the untrained
    frozen teacher of a benchmark does, roughly doubles its activations' variance at every residual block:
    ResNet-101's FPN features reach ~10⁴–10⁵, and FitNet's and DiffKD's MSE to them blows the student up in a step
    (NaN at the second step, 1 image of 512×683). The arithmetic (and so the timing) does not change, only the
    values."""
    from torchvision.ops import FrozenBatchNorm2d

    def set_stats(m: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].float()
        m.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        # one variance for the layer (the channels' mean), not one per channel: a channel that is nearly constant
        # on this input would otherwise be scaled up ~300× and blow up as soon as the weights move
        m.running_var.fill_(x.var(dim=(0, 2, 3), unbiased=False).mean().clamp_min(1e-6).item())

    layers = [m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))]
    handles = [m.register_forward_pre_hook(set_stats) for m in layers]
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        forward()
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    return len(layers)


def build_task_module(task: str, cfg: Any, example: Any, data: Any = None) -> Any:
    """The task's LightningModule from ``cfg`` (``build_module``), its untrained frozen teacher's normalisation
    statistics set from ``data`` (default ``example``; :func:`calibrate_norms`), then built (dry run, heads) on
    ``example``. The student is left as built (it trains: its BatchNorms, if any, use batch statistics)."""
    from diffkd.utils.instantiate import build_module

    torch.manual_seed(0)
    module = build_module(cfg, TASKS[task].num_classes)
    if module.teacher is not None:
        teacher = module.teacher
        calibrate_norms(teacher, lambda: _model_forward(task, teacher, example if data is None else data))
    module.build(example)
    return module


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _input_label(task: str, hw: tuple[int, int], batch: int) -> str:
    h, w = hw
    return f"{batch}×3×{h}×{w}" if task == "segmentation" else f"{batch} images {h}×{w}"


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
        hw: the crop (segmentation) or the synthetic images' size (detection).
        size: detection only: the detectors' ``min_size`` (their resize; default ``hw[0]``).
        module: a module built by an earlier round (reused: no second build), else built here.
    Returns:
        ``(result, module)``.
    """
    from lightning.fabric.utilities.apply_func import move_data_to_device

    data = synthetic_batch(task, hw, batch, TASKS[task].num_classes)
    if module is None:  # built on the CPU, then moved
        cfg = task_config(task, method, size=size or hw[0], tiny=tiny, overrides=overrides)
        module = build_task_module(task, cfg, _first_sample(data), data)
        module.to(device)
    data = move_data_to_device(data, torch.device(device))
    out = time_training_steps(module, _loader(data, warmup + steps), steps, warmup, device, count_flops=count_flops)
    result = StepResult(
        task, method, batch, _input_label(task, hw, batch), 1000 * out.seconds, device,
        gflop_per_step=out.flops / 1e9 if out.flops is not None else None, finite=out.finite,
        losses=out.losses,
    )  # fmt: skip
    return result, module


def _median(runs: list[StepResult]) -> StepResult:
    ok = sorted((r for r in runs if not r.error), key=lambda r: r.ms_per_step)
    if not ok:
        return runs[-1]
    best = copy.copy(ok[(len(ok) - 1) // 2])
    best.ms_runs = [round(r.ms_per_step, 1) for r in runs if not r.error]
    best.finite = None if any(r.finite is None for r in ok) else all(r.finite for r in ok)
    best.gflop_per_step = next((r.gflop_per_step for r in runs if r.gflop_per_step is not None), None)
    return best


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


def tapped_shapes(task: str, cfg: Any, hw: tuple[int, int]) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """``{entry: (C, H, W)}`` of the tapped module's output for the student and the teacher at input ``hw``, from
    the real models of ``cfg`` run on ``meta`` tensors (no weights, no arithmetic). Detection: the detector's own
    transform (resize to ``min_size``, padding to a multiple of 32) then its backbone + FPN."""
    from diffkd.distill import dry_run
    from diffkd.utils.instantiate import instantiate

    path = _tap_path(cfg)
    nc = TASKS[task].num_classes
    shapes = []
    for side in ("student", "teacher"):
        side_cfg = cfg.model[side]
        kwargs = {"num_classes": nc} if side_cfg.get("num_classes") is None else {}
        with torch.device("meta"):
            model = instantiate(side_cfg, **kwargs).eval()
        image = torch.empty(1, 3, *hw, device="meta")
        if task == "segmentation":

            def forward(model=model, image=image):
                return model(image)
        else:

            def forward(model=model, image=image):
                return model.backbone(model.transform(list(image))[0].tensors)

        value, _ = dry_run(model, forward, [path] if path else [], side).value(path)
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


def _point_loss(distiller: Any, name: str, s: Tensor, t: Tensor) -> Tensor:
    """One point's weighted loss — head, its own terms (L_diff, ...), distance — as ``Distiller.forward`` forms it."""
    from diffkd.distill import get_head

    info = distiller.points[name]
    spec = distiller.specs[info.config]
    loss = None
    if info.head is not None:
        entry = get_head(spec.head)
        out = entry.apply(distiller.heads[info.head], s, t)
        s, t = out.student, out.teacher
        for term, value in out.losses.items():
            weight = spec.term_weights.get(term, getattr(spec, entry.term_weights.get(term, ""), 1.0))
            loss = weight * value if loss is None else loss + weight * value
    kd = spec.weight * distiller.distances[info.config](s, t)
    return kd if loss is None else loss + kd


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
        loss = _point_loss(meta, name, s, t)
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
    dev = torch.device(device)
    distiller.to(dev).train()
    g = torch.Generator().manual_seed(0)
    inputs = []
    for name, info in distiller.points.items():
        s = torch.randn(batch, *info.student_shape, generator=g).to(dev).requires_grad_()
        inputs.append((name, s, torch.randn(batch, *info.teacher_shape, generator=g).to(dev)))

    def step() -> None:
        loss = sum(_point_loss(distiller, name, s, t) for name, s, t in inputs)
        loss.backward()

    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):  # one by one: the median resists a shared machine's slow spells
        _sync(dev)
        start = time.perf_counter()
        step()
        _sync(dev)
        times.append(1000 * (time.perf_counter() - start))
    return times


def bench_heads(
    task: str, hw: tuple[int, int], *, tiny: bool = False, overrides: Sequence[str] = (), time_batch: int | None = None,
    time_steps: int = 10, device: str = "cpu",
) -> dict[str, Any]:  # fmt: skip
    """The DiffKD heads of ``task``'s experiment at input ``hw``: shapes, parameters and per-sample FLOPs of each
    point, and (``time_batch``) the ms of one forward + backward of all of them at that batch."""
    spec = TASKS[task]
    size = hw[0] if task == "detection" else None
    cfg = task_config(task, spec.diffkd, size=size, tiny=tiny, overrides=overrides)
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
        if r.ms_runs and len(r.ms_runs) > 1:
            row += f"   runs {min(r.ms_runs):.0f}–{max(r.ms_runs):.0f}"
        row += "   loss NaN/inf" if r.finite is False else ""
        lines.append(row + (f"   error: {r.error}" if r.error else ""))
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


def _names(value: str, allowed: Sequence[str] | None = None) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    bad = [n for n in names if allowed is not None and n not in allowed]
    if bad:
        raise SystemExit(f"unknown value(s) {bad}; choose from {', '.join(allowed or ())}")
    return names


def _check_methods(methods: Sequence[str]) -> None:
    from diffkd.utils.instantiate import CONFIG_DIR

    missing = [m for m in methods if not (CONFIG_DIR / "distill" / f"{m}.yaml").is_file()]
    if missing:
        raise SystemExit(f"no distill config {missing} in {CONFIG_DIR / 'distill'}")


def _step_rounds(
    task: str, methods: Sequence[str], args: argparse.Namespace, hw: tuple[int, int], batch: int,
    size: int | None, say: Callable[[str], None],
) -> list[StepResult]:  # fmt: skip
    modules: dict[str, Any] = {}
    rounds: dict[str, list[StepResult]] = {m: [] for m in methods}
    for i in range(args.repeat):  # round-robin: a slow spell of a shared machine hits every configuration
        for method in methods:
            try:
                r, modules[method] = bench_task_step(
                    task, method, hw=hw, batch=batch, steps=args.steps, warmup=args.warmup, size=size,
                    tiny=args.tiny, overrides=args.override, device=args.device, module=modules.get(method),
                    count_flops=i == 0,
                )  # fmt: skip
            except Exception as err:  # one failing configuration must not lose the others
                if args.raise_errors:
                    raise
                r = StepResult(task, method, batch, _input_label(task, hw, batch), float("nan"), args.device,
                               error=repr(err)[:300])  # fmt: skip
            rounds[method].append(r)
            say(step_table([r]).splitlines()[1])
    modules.clear()
    return [_median(rounds[m]) for m in methods]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m diffkd.bench_tasks", description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="segmentation,detection", help="segmentation, detection or both")
    parser.add_argument("--seg-methods", default=",".join(TASKS["segmentation"].methods),
                        help="distill configs timed for segmentation (none = student alone)")  # fmt: skip
    parser.add_argument("--det-methods", default=",".join(TASKS["detection"].methods),
                        help="distill configs timed for detection (none = student alone)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=2, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (the first one counts FLOPs)")
    parser.add_argument("--repeat", type=int, default=3, help="round-robin rounds; the median is kept")
    parser.add_argument("--crop", type=_hw, default=None, help=f"segmentation crop HxW (default {SEG_CROP[0]}x"
                        f"{SEG_CROP[1]})")  # fmt: skip
    parser.add_argument("--size", type=int, default=None, help=f"detection short side: the detectors' min_size, "
                        f"images size×4size/3, max_size size·1333/800 (default {DET_SIZE})")  # fmt: skip
    parser.add_argument(
        "--batch",
        type=int,
        default=None,
        help=f"batch of every step (default: segmentation {SEG_BATCH}, detection {DET_BATCH})",
    )
    parser.add_argument("--head-crop", type=_hw, default=None,
                        help=f"segmentation crop of the head table (default {SEG_HEAD_CROP[0]}x{SEG_HEAD_CROP[1]}:"
                             " 19×64×128 logits)")  # fmt: skip
    parser.add_argument(
        "--head-input",
        type=_hw,
        default=None,
        help=f"detection image of the head table (default {DET_HEAD_INPUT[0]}x{DET_HEAD_INPUT[1]})",
    )
    parser.add_argument(
        "--head-batch",
        type=int,
        default=SEG_HEAD_BATCH,
        help="batch of the segmentation heads' forward + backward timing (0: not timed)",
    )
    parser.add_argument("--no-heads", action="store_true", help="skip the head tables")
    parser.add_argument("--no-steps", action="store_true", help="skip the training steps")
    parser.add_argument("--override", action="append", default=[], help="a Hydra override for every config")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="toy sizes and small teachers (the test): crop 32x64 batch 2, detection 64 px batch 1",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--out", default=None, help="JSON path (default: bench_results/tasks-<time>.json)")
    parser.add_argument(
        "--cpu-malloc",
        default="keep",
        choices=CPU_MALLOC_MODES,
        help="CPU only: keep = glibc keeps freed memory for reuse (as diffkd.train does)",
    )
    parser.add_argument("--raise-errors", action="store_true", help="stop at the first failing configuration")
    args = parser.parse_args(argv)
    tasks = _names(args.task, list(TASKS))
    methods = {"segmentation": _names(args.seg_methods), "detection": _names(args.det_methods)}
    _check_methods([m for t in tasks for m in methods[t]])
    if args.tiny:
        crop, size = args.crop or TINY["crop"], args.size or TINY["size"]
        seg_batch, det_batch = args.batch or TINY["seg_batch"], args.batch or TINY["det_batch"]
        head_crop, head_input = args.head_crop or TINY["head_crop"], args.head_input or TINY["head_input"]
    else:
        crop, size = args.crop or SEG_CROP, args.size or DET_SIZE
        seg_batch, det_batch = args.batch or SEG_BATCH, args.batch or DET_BATCH
        head_crop, head_input = args.head_crop or SEG_HEAD_CROP, args.head_input or DET_HEAD_INPUT
    if "segmentation" in tasks and not args.no_steps and seg_batch < 2:
        raise SystemExit("segmentation steps need --batch ≥ 2 (the ASPP's pooled branch has BatchNorm on 1×1 maps)")
    import lightning  # noqa: F401  (its import sets its loggers to INFO: quiet them afterwards)

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger("diffkd").setLevel(logging.ERROR)  # the untrained teachers' warnings: known, by design
    warnings.filterwarnings("ignore")
    gpu = args.device.startswith("cuda")
    malloc_mode = None if gpu else ("keep" if configure_cpu_malloc(args.cpu_malloc) else "default")

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
        if not args.no_heads:
            hw = head_crop if task == "segmentation" else head_input
            time_batch = args.head_batch if task == "segmentation" else None
            h = bench_heads(task, hw, tiny=args.tiny, overrides=args.override, time_batch=time_batch,
                            time_steps=2 if args.tiny else 10, device=args.device)  # fmt: skip
            heads[task] = h
            say(f"\n{task}: DiffKD heads of distill={h['distill']} at a {hw[0]}×{hw[1]} input, FLOPs per sample")
            say(head_table(h))
        if not args.no_steps:
            if task == "segmentation":
                hw, b, det_size = crop, seg_batch, None
            else:
                hw, b, det_size = _detection_hw(size), det_batch, size
            say(f"\n{task}: training steps, {_input_label(task, hw, b)}")
            task_results = _step_rounds(task, methods[task], args, hw, b, det_size, say)
            results += task_results
            ratios += step_ratios(task, task_results)
    if results:
        say("\n" + step_table(results))
        say(ratio_lines(ratios))
    out = Path(args.out or f"bench_results/tasks-{time.strftime('%Y%m%d-%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "meta": {
            "device": device_name(args.device),
            "torch": torch.__version__,
            "argv": sys.argv[1:] if argv is None else argv,
            "cpu_count": os.cpu_count(),
            "cpu_malloc": malloc_mode,
            "omp_wait_policy": omp,
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "wall_s": round(time.perf_counter() - started, 1),
            "experiments": {t: TASKS[t].experiment for t in tasks},
        },
        "heads": heads,
        "steps": [{**asdict(r), "gflop_per_s": r.gflop_per_s} for r in results],
        "ratios": ratios,
    }
    out.write_text(json.dumps(data, indent=2))
    say(f"wrote {out} ({data['meta']['wall_s']:.0f} s)")
    return data


if __name__ == "__main__":
    main()
