"""``python -m diffkd.evaluate`` — a task module's own validation (or test) run on a checkpoint's student.

The metrics are the ones training logs (classification: ``val/acc``, ``val/acc_top5``, ``val/loss``), computed by
the task module's ``validation_step``/``test_step`` under ``lightning.Trainer.validate``/``test``: any task that
trains here is evaluated the same way.

What to evaluate (one of):

* a diffkd training checkpoint (``.ckpt``): the run's config stored inside (``checkpoint["diffkd"]["config"]``)
  rebuilds the data (same data config, image size, normalisation), the task module and its student alone (no
  teacher, no heads); the ``student.*`` weights are loaded (``--ema``: the EMA weights that
  :class:`diffkd.callbacks.EMA` saved). A checkpoint without a stored config is evaluated as exported weights;
* an export of :mod:`diffkd.export` (``.pth`` / ``.safetensors``): its meta brings the run's task module and its
  options, the student's full spec (architecture arguments, detector min/max size, ``frozen_bn``, number of
  classes) and the run's data config (image size, normalisation, label convention), used as a checkpoint's stored
  config is: no ``--model`` needed, and the metric is the one of evaluating the training checkpoint;
* other weights (``.pth`` / ``.safetensors`` without that meta: older exports, anything
  :func:`diffkd.models.load_weights` reads) with ``--model <registry name>``: ``train.yaml`` is composed from the
  packaged ``conf/`` (no experiment, no distillation, ``data=<--data>``, ``model.student.name=<--model>``), with
  the task module the data module declares (its class's ``task``, :func:`diffkd.config.task_of_data`);
* a registry model with ``--model <name> --pretrained`` (its published weights; without ``--pretrained`` it is
  randomly initialised, only useful as a smoke test).

Flags override the config: ``--data`` (another ``conf/data/<name>.yaml``, or a folder → ``image_folder``; the
run's image size, normalisation and label settings go with it where the new data module takes them),
``--data-dir``, ``--root``, ``--image-size``, ``--batch-size``, ``--num-workers`` and ``--set key=value`` (Hydra
override syntax; a key that does not start with a config group is relative to ``data``: ``--set crop_pct=0.95``).
A flag that changes a value of the checkpoint's or the export's config wins, and the summary says which value it
replaced.

Examples::

    python -m diffkd.evaluate logs/cifar_wrn40_wrn16/runs/<time>/checkpoints/last.ckpt
    python -m diffkd.evaluate last.ckpt --data-dir /data/imagenet --set data.crop_pct=0.95 --json r18.json
    python -m diffkd.evaluate exports/r18.safetensors --data-dir /data/imagenet
    python -m diffkd.evaluate old_exports/r18.pth --model tv_resnet18 --data imagenet --data-dir /data/imagenet
    python -m diffkd.evaluate --model tv_resnet34 --pretrained --data imagenet --data-dir /data/imagenet

Prints what it used (checkpoint, model, data config and its settings, overrides) and the metrics as a table;
``--json out.json`` writes the same.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.model_helpers import is_overridden
from omegaconf import DictConfig, ListConfig, OmegaConf

from diffkd.config import (
    CONFIG_DIR,
    ConfigError,
    accepts,
    add_set_option,
    apply_overrides,
    compose,
    config_name_of,
    data_config_name,
    stored_config,
    task_of_data,
)

__all__ = ["EvalResult", "main"]

log = logging.getLogger(__name__)

DEFAULT_DATA = "imagenet"  # of exported weights and registry models, when --data is not given
_MISSING = object()
# Data config entries shown in the summary, in this order, when the config has them.
_SHOWN_DATA_KEYS = (
    "data_dir",
    "root",
    "image_size",
    "batch_size",
    "num_workers",
    "crop_pct",
    "interpolation",
    "val_transform",
)
# Data entries that shape what the model sees or how its outputs are scored: kept from the run's config when --data
# names another data config that takes them.
_SHAPING_DATA_KEYS = (
    "image_size",
    "crop_pct",
    "interpolation",
    "in_chans",
    "mean",
    "std",
    "normalization",
    "num_classes",
    "ignore_index",
    "contiguous_labels",
    "class_names",
)
# Data entries that say where the data is and how it is loaded, not what is measured: no "replaced" note for them.
_PLACE_KEYS = ("data_dir", "root", "batch_size", "val_batch_size", "num_workers", "pin_memory")


class EvalError(SystemExit):
    """A user error: its message is printed as one line (no traceback) and the exit status is 1."""


@dataclass
class EvalResult:
    """One evaluation.

    Attributes:
        source: the checkpoint or weights file (``None`` for a registry model).
        model: the student's registry name.
        weights: what was loaded (``student.*`` of a checkpoint, its EMA, a file, pretrained, random init).
        task: the task module's class.
        config: where the config came from (the checkpoint, or ``conf/``).
        data: the data config's name (``conf/data/<name>.yaml``) or its class when no config matches.
        split: ``val`` or ``test``.
        settings: the data settings used (data_dir/root, image_size, batch_size, normalisation, ...).
        overrides: what the flags and ``--set`` changed, ``"key=value (flag)"``.
        device: where it ran (``cpu``, ``cuda:0``).
        precision: the trainer's precision.
        samples: evaluated samples (``None`` when the batch format does not say).
        batches: evaluated batches.
        seconds: wall time of the evaluation loop.
        metrics: the task's logged metrics (``val/acc``, ...).
        model_args: the student's build arguments besides its name (``min_size``, ``frozen_bn``, ``num_classes``, ...).
    """

    source: str | None
    model: str
    weights: str
    task: str
    config: str
    data: str
    split: str
    settings: dict[str, Any]
    overrides: list[str]
    device: str
    precision: str
    samples: int | None
    batches: int
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)
    model_args: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ reading files


def _read_file(path: Path) -> tuple[Mapping[str, Any], dict[str, Any] | None]:
    """The file's contents (a weights-only load) and its export meta (``None`` where it has none), or an
    :class:`EvalError` that says what the file is not (or why it was refused)."""
    from safetensors import SafetensorError

    from diffkd.export import read_export_meta
    from diffkd.models.checkpoint import NotACheckpointError, RefusedCheckpointError, read_checkpoint

    if not path.is_file():
        raise EvalError(f"no such file: {path}" + (" (it is a directory)" if path.is_dir() else ""))
    try:
        obj = read_checkpoint(path)
        meta = None if "state_dict" in obj else read_export_meta(path, obj)
    except RefusedCheckpointError as err:
        raise EvalError(str(err)) from None
    except NotACheckpointError:
        raise EvalError(f"{path} is not a PyTorch checkpoint") from None
    except SafetensorError as err:
        raise EvalError(f"{path} is not a safetensors file ({err})") from None
    except RuntimeError as err:  # a pickle of something else than a dict
        raise EvalError(str(err)) from None
    return obj, meta


def _export_config(meta: Mapping[str, Any] | None) -> DictConfig | None:
    """The config an export's meta gives (its task module and student, its run's data), on the packaged
    ``train.yaml`` for the rest (no distillation, no callbacks, no logger); ``None`` for exports without it."""
    if not meta or not meta.get("model") or not meta.get("data"):
        return None
    cfg = _compose(["~experiment", "~callbacks", "logger=none", "distill=none"])
    cfg.model = OmegaConf.create(dict(meta["model"]))
    cfg.data = OmegaConf.create(dict(meta["data"]))
    return cfg


# ------------------------------------------------------------------------------------------------------ configs


def _data_name(data: str) -> tuple[str, str | None]:
    """``(data config name, image_folder root or None)``: a config name, or a folder (``image_folder``)."""
    try:
        return data_config_name(data)
    except ValueError as bad:
        raise EvalError(f"--data {bad}") from None


def _compose(overrides: Sequence[str]) -> DictConfig:
    """``train.yaml`` of the packaged ``conf/`` with ``overrides`` (no Hydra app, no run folder)."""
    return compose(overrides, "evaluate")


def _data_group(name: str) -> dict[str, Any]:
    """``conf/data/<name>.yaml`` as composed, unresolved (its ``${paths...}`` resolve in the config it joins)."""
    cfg = _compose(["~experiment", f"data={name}"])
    return OmegaConf.to_container(cfg.data, resolve=False)  # type: ignore[return-value]


def _config_name_of(data_cfg: DictConfig) -> str:
    """The ``conf/data`` config whose ``_target_`` is this data config's, else the target's class name."""
    target = str(data_cfg.get("_target_", ""))
    return config_name_of("data", target) or target.rsplit(".", 1)[-1] or "?"


def _replaced(key: str, old: Any, value: Any, origin: str | None) -> str:
    """``"; <origin> was <old>"`` when ``value`` replaces another value ``old`` of the run's config at ``key``."""
    if origin is None or key.rsplit(".", 1)[-1] in _PLACE_KEYS or old is None or old == value:
        return ""
    return f"; {origin} was {old}"


def _set_data(cfg: DictConfig, key: str, value: Any, flag: str, applied: list[str], origin: str | None = None) -> None:
    """``cfg.data.<key> = value`` for a flag; an entry the config lacks is added when the datamodule takes it."""
    if key not in cfg.data and not accepts(cfg.data, key):
        name = _config_name_of(cfg.data)
        raise EvalError(f"{flag}: the data config {name} ({cfg.data.get('_target_')}) has no {key}")
    old = OmegaConf.select(cfg, f"data.{key}", default=None)
    old = OmegaConf.to_container(old, resolve=True) if isinstance(old, (DictConfig, ListConfig)) else old
    note = _replaced(f"data.{key}", old, value, origin)
    OmegaConf.update(cfg, f"data.{key}", value, merge=False, force_add=True)
    applied.append(f"data.{key}={value} ({flag}{note})")


def _apply_set(cfg: DictConfig, overrides: Sequence[str], applied: list[str], origin: str | None = None) -> None:
    """``--set``: Hydra's ``key=value`` / ``+key=value`` / ``++key=value`` / ``~key`` on the config
    (:func:`diffkd.config.apply_overrides`; keys relative to ``data`` unless they start with a config group)."""
    try:
        changes = apply_overrides(cfg, overrides, "data", flag="--set ", node_hints={"data": "use --data <name>"})
    except ConfigError as err:
        raise EvalError(f"--set {err}") from None
    for change in changes:
        plain = not change.override.startswith(("+", "~"))
        note = _replaced(change.key, change.old, change.new, origin) if plain else ""
        applied.append(f"{change.override} (--set{note})")


def _apply_flags(
    cfg: DictConfig, args: argparse.Namespace, root: str | None, applied: list[str], origin: str | None = None
) -> None:
    """The data flags (``--data-dir``, ``--root``, ``--image-size``, ``--batch-size``, ``--num-workers``)."""
    if args.data_dir is not None:
        _set_data(cfg, "data_dir", args.data_dir, "--data-dir", applied)
    root = args.root if args.root is not None else root
    if root is not None:
        _set_data(cfg, "root", root, "--root" if args.root is not None else "--data", applied)
    if args.image_size is not None:
        _set_data(cfg, "image_size", args.image_size, "--image-size", applied, origin)
    if args.batch_size is not None:
        # the evaluation batch; batch_size itself stays (Mixup, for one, checks that it is even)
        separate = "val_batch_size" in cfg.data or accepts(cfg.data, "val_batch_size")
        _set_data(cfg, "val_batch_size" if separate else "batch_size", args.batch_size, "--batch-size", applied)
    if args.num_workers is not None:
        _set_data(cfg, "num_workers", args.num_workers, "--num-workers", applied)


def _no_downloads(student: DictConfig) -> None:
    """Published weights (``pretrained``, a detector's ImageNet ``weights_backbone``) are never fetched for weights
    that replace them; the architecture does not depend on them (``frozen_bn`` says the detectors' norm layers)."""
    if student.get("pretrained"):
        student.pretrained = False
    if student.get("weights_backbone") is not None:
        student.weights_backbone = None


def _student_overrides(cfg: DictConfig, args: argparse.Namespace, applied: list[str], origin: str) -> None:
    """``--model`` / ``--num-classes`` on a checkpoint's or an export's config (the flag wins; the summary says
    what it replaced)."""
    student = cfg.model.student
    if args.model is not None and args.model != student.get("name"):
        note = _replaced("model.student.name", student.get("name"), args.model, origin)
        student.name = args.model
        applied.append(f"model.student.name={args.model} (--model{note})")
    if args.num_classes is not None:
        note = _replaced("model.student.num_classes", student.get("num_classes"), args.num_classes, origin)
        student.num_classes = args.num_classes
        applied.append(f"model.student.num_classes={args.num_classes} (--num-classes{note})")
    _no_downloads(student)


def _keep_shaping(cfg: DictConfig, run_data: DictConfig, name: str, origin: str, applied: list[str]) -> None:
    """After ``--data <name>`` replaced the run's data config by another one: the run's image size, normalisation
    and label settings where the new data module takes them (the model was trained with them)."""
    for key in _SHAPING_DATA_KEYS:
        value = run_data.get(key)
        if value is None or not (key in cfg.data or accepts(cfg.data, key)):
            continue
        value = OmegaConf.to_container(value, resolve=True) if isinstance(value, ListConfig) else value
        if cfg.data.get(key) != value:
            OmegaConf.update(cfg, f"data.{key}", value, merge=False, force_add=True)
            applied.append(f"data.{key}={value} ({origin}, kept with --data {name})")


@dataclass
class _RunConfig:
    """The config to evaluate with and where it came from.

    Attributes:
        cfg: the composed config.
        applied: the overrides applied, ``"key=value (flag)"``, for the summary.
        notes: lines printed before the summary.
        origin: ``"the checkpoint's"`` / ``"the export's"`` when the config is the run's, ``None`` when composed
            from ``conf/``.
    """

    cfg: DictConfig
    applied: list[str]
    notes: list[str]
    origin: str | None


def _run_config(
    args: argparse.Namespace,
    checkpoint: Mapping[str, Any] | None,
    meta: Mapping[str, Any] | None,
) -> _RunConfig:
    """The config to evaluate with: a checkpoint's stored config, an export's meta, or ``conf/`` composed with
    ``data=<--data> model=<the task its data module declares>``; then the flags and ``--set``."""
    applied: list[str] = []
    notes: list[str] = []
    stored = stored_config(checkpoint) if checkpoint is not None else None
    root: str | None = None
    cfg = OmegaConf.create(dict(stored)) if stored is not None else _export_config(meta)
    origin = None if cfg is None else "the checkpoint's" if stored is not None else "the export's"
    if cfg is not None and origin is not None:
        if args.data is not None:
            name, root = _data_name(args.data)
            group = _data_group(name)
            if group.get("_target_") != cfg.data.get("_target_"):  # the run's own data keeps its stored settings
                run_data = cfg.data
                cfg.data = OmegaConf.create(group)
                applied.append(f"data={name} (--data; {origin} was {_config_name_of(run_data)})")
                _keep_shaping(cfg, run_data, name, origin, applied)
        _student_overrides(cfg, args, applied, origin)
    else:
        if checkpoint is not None and "state_dict" in checkpoint:
            notes.append(
                f"{args.weights} carries no diffkd run config (an older or foreign checkpoint): composing conf/ "
                f"with --data {args.data or DEFAULT_DATA} --model {args.model}"
            )
        name, root = _data_name(args.data or DEFAULT_DATA)
        try:  # the task module is the one for what the data yields: the data module class says which
            task = task_of_data(_data_group(name))
        except ConfigError as err:
            raise EvalError(f"--data {name}: {err}") from None
        overrides = [
            "~experiment",
            "~callbacks",
            "logger=none",
            "distill=none",
            f"data={name}",
            f"model={task}",
        ]
        cfg = _compose(overrides)
        # set here, not as override strings: names such as timm:<model> and paths need no quoting this way
        cfg.model.student.name = args.model
        if args.num_classes is not None:
            cfg.model.student.num_classes = args.num_classes
        _no_downloads(cfg.model.student)
        if cfg.model.get("num_classes") is not None:  # a task option set for one data set (Cityscapes' 19)
            cfg.model.num_classes = None  # the student's width says it
        if args.pretrained:
            OmegaConf.update(cfg, "model.student.pretrained", True, force_add=True)
        applied.append(f"data={name} ({'--data' if args.data else 'default'})")
    _apply_flags(cfg, args, root, applied, origin)
    _apply_set(cfg, args.overrides, applied, origin)
    return _RunConfig(cfg, applied, notes, origin)


# --------------------------------------------------------------------------------------------------- the model


def _load_student(
    module: L.LightningModule, args: argparse.Namespace, checkpoint: Mapping[str, Any] | None, stored: bool
) -> str:
    """Load the weights to evaluate into ``module.student``; returns what was loaded, for the summary."""
    from diffkd.callbacks.ema import ema_state_from_checkpoint
    from diffkd.export import student_state_dict
    from diffkd.models import load_weights

    if checkpoint is None:
        return "pretrained" if args.pretrained else "random init"
    name = Path(args.weights).name
    try:
        if stored:
            state = student_state_dict(dict(checkpoint))
            what = f"student.* of {name}"
            if args.ema:
                ema = ema_state_from_checkpoint(dict(checkpoint))
                if ema is None:
                    raise EvalError(f"{args.weights} holds no EMA weights (was it trained with callbacks=ema?)")
                state = {**state, **ema}  # the EMA covers floating-point tensors; integer buffers come from state
                what = f"EMA of the student of {name}"
            load_weights(module.student, state)
            return what
        lightning_state = checkpoint.get("state_dict")
        student_keys = isinstance(lightning_state, Mapping) and any(k.startswith("student.") for k in lightning_state)
        load_weights(module.student, checkpoint, key="student" if student_keys else None)
    except (KeyError, RuntimeError) as err:
        raise EvalError(f"{args.weights}: {err.args[0] if err.args else err}") from None
    return f"student.* of {name}" if student_keys else name


# ---------------------------------------------------------------------------------------------------- running


class _Counter(L.Callback):
    """Counts the evaluated batches and, where the batch format says, samples."""

    def __init__(self) -> None:
        self.batches = 0
        self.samples: int | None = 0

    def _count(self, batch: Any) -> None:
        self.batches += 1
        first = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
        if isinstance(first, torch.Tensor) and first.dim() > 0:
            n: int | None = int(first.shape[0])
        elif isinstance(first, (tuple, list)):  # detection/segmentation: a list of images
            n = len(first)
        else:
            n = None
        self.samples = None if n is None or self.samples is None else self.samples + n

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._count(batch)

    on_test_batch_end = on_validation_batch_end


def _accelerator(device: str) -> tuple[str, int | list[int]]:
    """``--device`` as Lightning's ``(accelerator, devices)``: ``auto``, ``cpu``, ``cuda``, ``cuda:N``."""
    kind, _, index = device.partition(":")
    if kind not in ("auto", "cpu", "cuda", "gpu") or (index and not index.isdigit()):
        raise EvalError(f"--device {device!r}: use auto, cpu, cuda or cuda:N")
    return kind, [int(index)] if index else 1


def _settings(data_cfg: DictConfig, dm: Any) -> dict[str, Any]:
    """The data settings worth printing: where, image size, evaluation batch, workers, transforms, normalisation."""
    resolved = OmegaConf.to_container(data_cfg, resolve=True)
    out: dict[str, Any] = {}
    for key in _SHOWN_DATA_KEYS:
        value = resolved.get(key, _MISSING)
        if key == "batch_size":  # the evaluation batch
            value = getattr(dm, "val_batch_size", None) or resolved.get("val_batch_size") or resolved.get(key)
        elif key in ("image_size", "crop_pct", "interpolation") and getattr(dm, key, None) is not None:
            value = getattr(dm, key)  # what the datamodule uses; CIFAR's fixed size is a class attribute
        if value is _MISSING or (key == "val_transform" and value is None):
            continue
        out[key] = value
    for key in ("mean", "std"):
        value = getattr(dm, key, None)
        if value is not None:
            out[key] = [round(float(v), 4) for v in value]
    return out


def _summary(result: EvalResult, notes: Sequence[str], trained: str, params: int, limit_batches: int | None) -> str:
    """The block printed before the metrics."""
    settings = " ".join(f"{k}={v}" for k, v in result.settings.items() if k not in ("mean", "std"))
    lines = [*notes]
    lines.append(f"{'evaluating':<11} {result.source or '(no file)'}{trained}: {result.weights}")
    lines.append(f"{'config':<11} {result.config}")
    arguments = ", ".join(f"{k}={v}" for k, v in result.model_args.items())
    lines.append(f"{'model':<11} {result.model}({arguments}), {params:,} parameters ({result.task})")
    lines.append(f"{'data':<11} {result.data}, {result.split} split: {settings}")
    if "mean" in result.settings:
        lines.append(f"{'':<11} normalisation mean={result.settings['mean']} std={result.settings.get('std')}")
    lines.append(f"{'overrides':<11} " + ("; ".join(result.overrides) if result.overrides else "none"))
    limit = f", first {limit_batches} batches" if limit_batches is not None else ""
    lines.append(f"{'trainer':<11} {result.device}, precision {result.precision}{limit}")
    return "\n".join(lines) + "\n"


def format_metrics(result: EvalResult) -> str:
    """The metrics table: one row per logged metric, then the samples and batches evaluated."""
    width = max([len("metric"), *(len(k) for k in result.metrics)])
    rows = [f"{'metric':<{width}}  {'value':>10}"]
    rows += [f"{k:<{width}}  {v:>10.4f}" for k, v in sorted(result.metrics.items())]
    samples = "?" if result.samples is None else str(result.samples)
    rows.append(f"({samples} samples in {result.batches} batches, {result.seconds:.1f} s)")
    return "\n".join(rows)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m diffkd.evaluate",
        description="Run a task module's own validation (the metrics training logs) on a diffkd checkpoint's "
        "student, exported weights or a registry model. A checkpoint brings its run's config (data, image size, "
        "normalisation, model); the flags override it.",
    )
    parser.add_argument("weights", nargs="?", help="a diffkd .ckpt, or .pth/.safetensors weights for --model")
    parser.add_argument("--model", help="registry name (diffkd.models.list_models(), tv:<name>, timm:<name>)")
    parser.add_argument("--pretrained", action="store_true", help="the registry's published weights for --model")
    parser.add_argument("--ema", action="store_true", help="the EMA weights saved in a .ckpt")
    parser.add_argument("--num-classes", type=int, help="classifier width of the student (default: the data's)")
    parser.add_argument(
        "--data",
        help="data config (conf/data/<name>.yaml) or a folder (image_folder); default: a checkpoint's own, "
        f"else {DEFAULT_DATA}. The run's own data config keeps its stored settings",
    )
    parser.add_argument("--data-dir", help="the data config's data_dir")
    parser.add_argument("--root", help="the data config's root (image_folder, coco)")
    parser.add_argument("--image-size", type=int, help="the data config's image_size")
    parser.add_argument("--batch-size", type=int, help="evaluation batch (the data config's val_batch_size)")
    parser.add_argument("--num-workers", type=int, help="data loader workers")
    add_set_option(parser, "data.crop_pct=0.95")
    parser.add_argument("--split", choices=["val", "test"], default="val", help="trainer.validate or trainer.test")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (one device)")
    parser.add_argument("--bf16", action="store_true", help="precision bf16-mixed (default 32-true)")
    parser.add_argument("--limit-batches", type=int, help="evaluate only the first N batches")
    parser.add_argument("--json", dest="json_path", help="also write the result to this JSON file")
    return parser


def _datamodule(cfg: DictConfig, args: argparse.Namespace) -> Any:
    """The data module of ``cfg.data``, prepared and set up for the split; data errors as :class:`EvalError`."""
    from omegaconf.errors import MissingMandatoryValue

    from diffkd.data.base import DataNotFoundError
    from diffkd.utils.instantiate import instantiate

    try:
        dm = instantiate(cfg.data)
        # the data first: a missing data set should be reported as such, not as a classifier-width mismatch
        dm.prepare_data()
        dm.setup("validate" if args.split == "val" else "test")
    except DataNotFoundError as err:
        raise EvalError(f"{err}\n(point to the data with --data-dir / --root)") from None
    except MissingMandatoryValue as err:
        key = str(err.full_key).removeprefix("data.")
        raise EvalError(
            f"the data config {_config_name_of(cfg.data)} needs data.{key} (it is ??? there): give it with "
            f"--set {key}=<value>"
        ) from None
    except (TypeError, ValueError) as err:  # an entry the datamodule does not take, or a value it refuses
        raise EvalError(f"data config {_config_name_of(cfg.data)}: {err}") from None
    return dm


def main(argv: list[str] | None = None) -> EvalResult:
    """Evaluate as the command line says; prints the summary and the metrics and returns them."""
    from diffkd.data.base import DataNotFoundError
    from diffkd.utils.instantiate import build_module

    parser = _parser()
    args = parser.parse_args(argv)
    checkpoint = meta = None
    if args.weights is not None:
        if args.pretrained:
            parser.error("--pretrained loads the registry's weights: give no weights file")
        checkpoint, meta = _read_file(Path(args.weights))
    elif args.model is None:
        parser.error("give a checkpoint or weights file, or --model <name> (with --pretrained for its weights)")
    stored = checkpoint is not None and stored_config(checkpoint) is not None
    if not stored and args.ema:
        raise EvalError("--ema reads the EMA weights of a diffkd training checkpoint (.ckpt with its run config)")
    if not stored and _export_config(meta) is None and args.model is None:
        assert checkpoint is not None
        if "state_dict" in checkpoint:
            raise EvalError(
                f"{args.weights} carries no diffkd run config (an older or foreign checkpoint): give --model "
                "<registry name> (and --data) to evaluate it"
            )
        raise EvalError(
            f"{args.weights}: exported weights without diffkd's meta (an older export, or another tool's) need "
            "--model <registry name> (e.g. --model tv_resnet18) and --data"
        )
    run = _run_config(args, checkpoint, meta)
    dm = _datamodule(run.cfg, args)
    cfg, applied, notes = run.cfg, run.applied, run.notes
    num_classes = None if args.pretrained and args.num_classes is None else getattr(dm, "num_classes", None)
    module = build_module(cfg, num_classes, teacher=False)
    weights = _load_student(module, args, checkpoint, stored)
    if args.split == "test" and not is_overridden("test_step", module):
        raise EvalError(f"{type(module).__name__} has no test step: use --split val")

    accelerator, devices = _accelerator(args.device)
    counter = _Counter()
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=devices,
        precision="bf16-mixed" if args.bf16 else "32-true",
        logger=False,
        callbacks=[counter],
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=sys.stdout.isatty(),
        limit_val_batches=args.limit_batches,
        limit_test_batches=args.limit_batches,
    )
    evaluate = trainer.validate if args.split == "val" else trainer.test
    start = time.perf_counter()
    try:
        outputs = evaluate(module, datamodule=dm, verbose=False)
    except DataNotFoundError as err:
        raise EvalError(f"{err}\n(point to the data with --data-dir / --root)") from None
    seconds = time.perf_counter() - start

    if stored:
        config = "stored in the checkpoint"
    elif run.origin is not None:
        config = f"the export's meta (diffkd_export {meta.get('diffkd_export') if meta else '?'})"
    else:
        config = f"composed from {CONFIG_DIR}/train.yaml"
    student_cfg = OmegaConf.to_container(cfg.model.student, resolve=True)
    model_args = {k: v for k, v in student_cfg.items() if k not in ("_target_", "name") and v is not None}
    if model_args.get("num_classes") is None and num_classes is not None:
        model_args["num_classes"] = num_classes
    result = EvalResult(
        source=args.weights,
        model=str(cfg.model.student.get("name", type(module.student).__name__)),
        weights=weights,
        task=f"{type(module).__module__}.{type(module).__qualname__}",
        config=config,
        data=_config_name_of(cfg.data),
        split=args.split,
        settings=_settings(cfg.data, dm),
        overrides=applied,
        device=str(trainer.strategy.root_device),
        precision=str(trainer.precision),
        samples=counter.samples,
        batches=counter.batches,
        seconds=round(seconds, 3),
        metrics={k: float(v) for k, v in (outputs[0] if outputs else {}).items()},
        model_args=model_args,
    )
    trained = ""
    if stored and checkpoint is not None:
        trained = f" (epoch {checkpoint.get('epoch')}, step {checkpoint.get('global_step')})"
    elif run.origin is not None and meta is not None:
        trained = f" (exported from {meta.get('source')}, epoch {meta.get('epoch')}, step {meta.get('global_step')})"
    params = sum(p.numel() for p in module.student.parameters())
    print(_summary(result, notes, trained, params, args.limit_batches))
    print(format_metrics(result))
    if args.json_path:
        out = Path(args.json_path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(asdict(result), indent=2, default=str) + "\n")
    return result


if __name__ == "__main__":
    # the command prints its own summary: Lightning's banners (accelerators, tips, batch limits) would bury it
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    main()
