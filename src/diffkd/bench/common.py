"""What both benchmarks share: the packaged experiment as a benchmark module, its synthetic batch, timed Lightning
training steps, a head's forward + backward, the device in words, round-robin medians and the JSON report.

A benchmark composes ``conf/`` as training does (:func:`bench_config`: ``experiment=<name> distill=<name>`` plus
overrides that only remove weight files and set what is measured), builds the task's module with
:func:`~diffkd.utils.instantiate.build_module` and feeds it the task's own ``synthetic_batch`` — so a benchmark of a
new task or method needs no code here.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from diffkd.utils.cpu_malloc import configure_cpu_malloc

__all__ = [
    "TimedSteps",
    "bench_config",
    "build_bench_module",
    "calibrate_norms",
    "data_facts",
    "describe_batch",
    "device_name",
    "median_round",
    "point_loss",
    "repeat_loader",
    "tile_batch",
    "time_point_heads",
    "time_training_steps",
    "write_report",
]

# overrides that take every weight file out of a composed experiment (untrained teacher, no pretrained student
# parts); keys an experiment lacks are skipped (see bench_config)
NO_WEIGHTS = {
    "model.teacher.weights": None,
    "model.teacher.pretrained": False,
    "model.student.pretrained": False,
    "model.student.weights": None,
    "model.student.weights_backbone": None,
    "model.student.backbone_weights": None,
}


# ------------------------------------------------------------------------------------------------ the experiment


def bench_config(experiment: str, method: str, overrides: Sequence[str] = (), tool: str = "bench") -> Any:
    """``experiment=<experiment> distill=<method>`` composed as training composes it
    (:func:`~diffkd.utils.instantiate.compose_packaged`), without weight files (:data:`NO_WEIGHTS`, where the
    experiment has the key), without learning-rate scaling by a data module's batch, with ``overrides`` last.

    The demo experiment names its models under ``demo.teacher`` / ``demo.student`` (its pipeline trains those):
    they replace ``model.*.name`` here too."""
    from omegaconf import OmegaConf

    from diffkd.utils.instantiate import compose_packaged

    cfg = compose_packaged([f"experiment={experiment}", f"distill={method}", *overrides], tool=tool)
    given = {o.lstrip("+~").split("=", 1)[0] for o in overrides}  # the command line's word is the last
    for key, value in NO_WEIGHTS.items():
        if key not in given and OmegaConf.select(cfg, key, default="<absent>") != "<absent>":
            OmegaConf.update(cfg, key, value)
    if "optim.lr_base_batch_size" not in given and OmegaConf.select(cfg, "optim.lr_base_batch_size") is not None:
        cfg.optim.lr_base_batch_size = None
    demo = cfg.get("demo")
    if demo is not None and demo.get("student") and demo.get("teacher"):
        for side in ("student", "teacher"):
            if f"model.{side}.name" not in given:
                cfg.model[side].name = demo[side]
    return cfg


def data_facts(cfg: Any) -> tuple[int | None, tuple[int, int, int] | None]:
    """``(num_classes, (C, S, S))`` the experiment's data module declares (``num_classes``, ``in_chans``,
    ``image_size``), read from the configured module without setting it up; ``None`` for what it does not declare
    as a number or reads from files that are not there."""
    from diffkd.utils.instantiate import instantiate

    dm = instantiate(cfg.data)
    try:
        nc = getattr(dm, "num_classes", None)
    except (OSError, ValueError):  # a data module that reads it from its files (COCO's annotations), absent here
        nc = None
    chans, size = getattr(dm, "in_chans", None), getattr(dm, "image_size", None)
    shape = (int(chans), int(size), int(size)) if isinstance(chans, int) and isinstance(size, int) else None
    return (int(nc) if isinstance(nc, int) else None), shape


# ------------------------------------------------------------------------------------------------ the batch


def tile_batch(batch: Any, n: int) -> Any:
    """A task's synthetic batch (``module.synthetic_batch``: two samples) grown or cut to ``n`` samples, whatever
    its format: tensors are indexed along their first dimension, lists (one entry per sample, e.g. a detector's
    images and targets) repeat their entries, tuples and dicts are walked."""
    if isinstance(batch, Tensor):
        return batch[torch.arange(n) % batch.shape[0]].clone()
    if isinstance(batch, tuple):
        return tuple(tile_batch(b, n) for b in batch)
    if isinstance(batch, dict):
        return {k: tile_batch(v, n) for k, v in batch.items()}
    if isinstance(batch, list):
        return [copy.deepcopy(batch[i % len(batch)]) for i in range(n)]
    raise TypeError(f"cannot grow a batch of {type(batch).__name__} to {n} samples")


def describe_batch(batch: Any) -> str:
    """What one step sees, e.g. ``2×3×256×512`` (a batch tensor) or ``2 images 512×683`` (a list of images)."""
    first = batch[0] if isinstance(batch, (tuple, list)) else batch
    if isinstance(first, Tensor):
        return "×".join(str(d) for d in first.shape)
    h, w = first[0].shape[-2:]
    return f"{len(first)} images {h}×{w}"


def repeat_loader(batch: Any, n: int) -> Any:
    """The same device-resident batch ``n`` times, as a DataLoader (a length Lightning reads: per-iteration
    schedulers count their epochs from it)."""
    from torch.utils.data import DataLoader

    return DataLoader([batch] * n, batch_size=None, shuffle=False, collate_fn=_identity)


def _identity(batch: Any) -> Any:
    return batch


# ------------------------------------------------------------------------------------------------ the module


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


class _Untrained(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "it is untrained" not in record.getMessage()


def build_bench_module(
    cfg: Any, num_classes: int | None, input_size: Sequence[int], batch: int, device: str = "cpu"
) -> tuple[Any, Any]:
    """``(module, data)``: the task's LightningModule from ``cfg`` (``build_module``) and ``batch`` samples of the
    task's own ``synthetic_batch`` at ``input_size`` (C, H, W), on ``device``.

    The untrained frozen teacher's normalisation statistics are set from ``data`` (:func:`calibrate_norms`) through
    the task's ``student_forward`` / ``teacher_forward`` (a detector's teacher reads what the student's call kept),
    then the module is built (dry run, heads) on the two-sample synthetic batch. The student is left as built."""
    from lightning.fabric.utilities.apply_func import move_data_to_device

    from diffkd.utils.instantiate import build_module

    torch.manual_seed(0)
    untrained = _Untrained()
    logging.getLogger("diffkd").addFilter(untrained)  # untrained on purpose (bench_config): not worth a warning
    try:
        module = build_module(cfg, num_classes)
    finally:
        logging.getLogger("diffkd").removeFilter(untrained)
    example = module.synthetic_batch(tuple(input_size))
    data = tile_batch(example, batch)
    if module.teacher is not None:
        modes = {m: m.training for m in module.student.modules()}
        module.student.eval()
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                module.student_forward(data)
                calibrate_norms(module.teacher, lambda: module.teacher_forward(data))
        finally:
            for m, training in modes.items():
                m.training = training
    module.build(example)
    return module.to(device), move_data_to_device(data, torch.device(device))


# ------------------------------------------------------------------------------------------------ timing


def device_name(device: str) -> str:
    """The benchmarked device in words: a GPU's name, or the CPU's model, cores and torch threads."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    models = [ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")]
    name = models[0] if models else name
    return f"{name}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class TimedSteps:
    """What :func:`time_training_steps` measured."""

    seconds: float  # per timed step
    flops: int | None  # of the first warm-up step (forward + backward), when counted
    finite: bool | None  # the last step's loss
    peak_mb: float | None  # CUDA peak memory of the timed steps
    losses: dict[str, float]  # the last step's logged train/loss* values


def time_training_steps(
    module: Any,
    loader: Any,
    steps: int,
    warmup: int,
    device: str,
    precision: str = "32-true",
    count_flops: bool = True,
) -> TimedSteps:
    """``warmup`` + ``steps`` real Lightning training steps of ``module`` over ``loader`` (``warmup + steps``
    batches, with a length); the device is synchronised around the timed steps only. FLOPs are counted in the
    first warm-up step (eagerly: compiled graphs bypass the counting dispatch mode)."""
    import lightning as L

    dev = torch.device(device)
    marks: dict[str, float] = {}
    last_loss: list[Tensor] = []
    counter = FlopCounterMode(display=False) if count_flops and warmup > 0 else None

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0 and counter is not None:
                counter.__enter__()
            if batch_idx == warmup:
                sync(dev)
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dev)
                marks["start"] = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 0 and counter is not None:
                counter.__exit__(None, None, None)
            if batch_idx == warmup + steps - 1:
                sync(dev)
                marks["end"] = time.perf_counter()
                last_loss.append(outputs["loss"].detach())

    trainer = L.Trainer(
        accelerator="gpu" if dev.type == "cuda" else "cpu",
        devices=1,
        precision=precision,
        max_steps=warmup + steps,
        max_epochs=1,  # not -1 (Lightning's default with max_steps): the train loader's length must be read
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[Timer()],
    )
    trainer.fit(module, train_dataloaders=loader)
    return TimedSteps(
        seconds=(marks["end"] - marks["start"]) / steps,
        flops=counter.get_total_flops() if counter is not None else None,
        finite=bool(torch.isfinite(last_loss[0]).item()) if last_loss else None,
        peak_mb=torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None,
        losses={k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/loss")},
    )


def point_loss(distiller: Any, name: str, s: Tensor, t: Tensor) -> Tensor:
    """One point's weighted loss — head, its own terms (L_diff, ...), distance — as ``Distiller.forward`` forms it.

    Args:
        s, t: the student's and the teacher's tapped value, (B, *student_shape) and (B, *teacher_shape).
    """
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


def time_point_heads(
    distiller: Any,
    batch: int,
    steps: int = 10,
    warmup: int = 2,
    device: str = "cpu",
    points: Sequence[str] | None = None,
    precision: str = "fp32",
) -> list[float]:
    """ms of each of ``steps`` forwards + backwards (after ``warmup``) of the ``points`` of a built ``distiller``
    (default all) together — their weighted losses summed (:func:`point_loss`) — at ``batch`` samples of random
    maps, on ``device`` in training mode, under bf16 autocast with ``precision="bf16"``."""
    dev = torch.device(device)
    distiller.to(dev).train()
    g = torch.Generator().manual_seed(0)
    inputs = []
    for name, info in distiller.points.items():
        if points is not None and name not in points:
            continue
        s = torch.randn(batch, *info.student_shape, generator=g).to(dev).requires_grad_()
        inputs.append((name, s, torch.randn(batch, *info.teacher_shape, generator=g).to(dev)))

    def step() -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = sum(point_loss(distiller, name, s, t) for name, s, t in inputs)
        loss.backward()

    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):  # one by one: the median resists a shared machine's slow spells
        sync(dev)
        start = time.perf_counter()
        step()
        sync(dev)
        times.append(1000 * (time.perf_counter() - start))
    return times


# ------------------------------------------------------------------------------------------------ rounds and report


class Measured:
    """What the result rows of both benchmarks (dataclasses with these fields) derive and print alike."""

    ms_per_step: float
    gflop_per_step: float | None
    ms_runs: list[float] | None
    finite: bool | None
    error: str | None

    @property
    def gflop_per_s(self) -> float | None:
        """Achieved matmul/conv throughput: GFLOP per step / seconds per step."""
        if self.gflop_per_step is None or not self.ms_per_step > 0:
            return None
        return self.gflop_per_step / (self.ms_per_step / 1000)

    def notes(self) -> str:
        """The end of its table row: the rounds' spread, a non-finite loss, the error."""
        out = (
            f"   runs {min(self.ms_runs):.0f}–{max(self.ms_runs):.0f}" if self.ms_runs and len(self.ms_runs) > 1 else ""
        )
        out += "   loss NaN/inf" if self.finite is False else ""
        return out + (f"   error: {self.error}" if self.error else "")


R = TypeVar("R", bound=Measured)


def median_round(runs: list[R]) -> R:
    """The round with the median step time (a copy), every round's time kept in ``ms_runs``; finite only when all
    rounds were; the FLOPs of the round that counted them."""
    ok = sorted((r for r in runs if not r.error), key=lambda r: r.ms_per_step)
    if not ok:
        return runs[-1]
    best = copy.copy(ok[(len(ok) - 1) // 2])
    best.ms_runs = [round(r.ms_per_step, 1) for r in runs if not r.error]
    best.finite = None if any(r.finite is None for r in ok) else all(r.finite for r in ok)
    best.gflop_per_step = next((r.gflop_per_step for r in runs if r.gflop_per_step is not None), None)
    return best


def quiet_logs(diffkd_level: int = logging.WARNING) -> None:
    """Lightning's INFO lines and warnings off for a benchmark's run (its import sets its loggers to INFO)."""
    import lightning  # noqa: F401

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger("diffkd").setLevel(diffkd_level)
    warnings.filterwarnings("ignore")


def cpu_malloc_mode(device: str, mode: str) -> str | None:
    """What the CPU's malloc does in this run (``None`` on a GPU, where the setting does not apply)."""
    if device.startswith("cuda"):
        return None
    return "keep" if configure_cpu_malloc(mode) else "default"


def parse_names(value: str, allowed: Sequence[str] | None = None, what: str = "value") -> list[str]:
    """Comma-separated names; ``SystemExit`` naming the unknown ones and the choices."""
    names = [v.strip() for v in value.split(",") if v.strip()]
    bad = [n for n in names if allowed is not None and n not in allowed]
    if bad:
        raise SystemExit(f"unknown {what}(s) {bad}; choose from {', '.join(allowed or ())}")
    return names


def check_configs(group: str, names: Sequence[str]) -> None:
    """``SystemExit`` naming every ``names`` entry that is no ``conf/<group>/<name>.yaml``, with the choices."""
    from diffkd.utils.instantiate import CONFIG_DIR

    missing = [n for n in names if not (CONFIG_DIR / group / f"{n}.yaml").is_file()]
    if missing:
        known = ", ".join(sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml")))
        raise SystemExit(f"no {group} config {missing} in {CONFIG_DIR / group}; choose from {known}")


def add_common_options(parser: argparse.ArgumentParser, out: str) -> None:
    """The options both benchmarks take: ``--device``, ``--out`` (default ``bench_results/<out>.json``),
    ``--cpu-malloc``."""
    from diffkd.utils.cpu_malloc import CPU_MALLOC_MODES

    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--out", default=None, help=f"JSON path (default: bench_results/{out}.json)")
    parser.add_argument(
        "--cpu-malloc",
        default="keep",
        choices=CPU_MALLOC_MODES,
        help="CPU only: keep = glibc keeps freed memory for reuse (as diffkd.train does on the CPU); default = leave"
        " malloc alone (what a plain training loop gets)",
    )


def write_report(
    args: argparse.Namespace, argv: list[str] | None, default_name: str, meta: dict[str, Any], body: dict[str, Any]
) -> Path:
    """``{"meta": {device, torch, argv, cpu_count, ...meta}, **body}`` as JSON at ``args.out`` (default
    ``bench_results/<default_name>-<time>.json``, or ``<time>.json`` for an empty name); returns the path."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or f"bench_results/{default_name + '-' if default_name else ''}{stamp}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    head = {
        "device": device_name(args.device),
        "torch": torch.__version__,
        "argv": sys.argv[1:] if argv is None else argv,
        "cpu_count": os.cpu_count(),
    }
    out.write_text(json.dumps({"meta": {**head, **meta}, **body}, indent=2))
    return out


def as_row(result: Any) -> dict[str, Any]:
    """A result dataclass as a JSON row, with its achieved ``gflop_per_s``."""
    return {**asdict(result), "gflop_per_s": result.gflop_per_s}
