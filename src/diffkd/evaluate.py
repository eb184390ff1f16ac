"""``python -m diffkd.evaluate`` — a task module's own validation (or test) run on a checkpoint's student.

The metrics are the ones training logs (classification: ``val/acc``, ``val/acc_top5``, ``val/loss``), computed by
the task module's ``validation_step``/``test_step`` under ``lightning.Trainer.validate``/``test``: any task that
trains here is evaluated the same way.

What to evaluate (one of):

* a diffkd training checkpoint (``.ckpt``): the run's config stored inside (``checkpoint["diffkd"]["config"]``)
  rebuilds the data (same data config, image size, normalisation), the task module and its student alone (no
  teacher, no heads); the ``student.*`` weights are loaded (``--ema``: the EMA weights that
  :class:`diffkd.callbacks.EMA` saved). A checkpoint without a stored config is evaluated as exported weights;
* exported weights (``.pth`` / ``.safetensors``, anything :func:`diffkd.models.load_weights` reads) with
  ``--model <registry name>``: ``train.yaml`` is composed from the packaged ``conf/`` (no experiment, no
  distillation, ``data=<--data>``, ``model.student.name=<--model>``);
* a registry model with ``--model <name> --pretrained`` (its published weights; without ``--pretrained`` it is
  randomly initialised, only useful as a smoke test).

Flags override the config: ``--data`` (another ``conf/data/<name>.yaml``, or a folder → ``image_folder``),
``--data-dir``, ``--root``, ``--image-size``, ``--batch-size``, ``--num-workers`` and ``--set key=value`` (Hydra
override syntax; a key that does not start with a config group is relative to ``data``: ``--set crop_pct=0.95``).

Examples::

    python -m diffkd.evaluate logs/cifar_wrn40_wrn16/runs/<time>/checkpoints/last.ckpt
    python -m diffkd.evaluate last.ckpt --data-dir /data/imagenet --set data.crop_pct=0.95 --json r18.json
    python -m diffkd.evaluate exports/r18.safetensors --model tv_resnet18 --data imagenet --data-dir /data/imagenet
    python -m diffkd.evaluate --model tv_resnet34 --pretrained --data imagenet --data-dir /data/imagenet

Prints what it used (checkpoint, model, data config and its settings, overrides) and the metrics as a table;
``--json out.json`` writes the same.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import pickle
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from lightning.pytorch.utilities.model_helpers import is_overridden
from omegaconf import DictConfig, OmegaConf

from diffkd.utils.instantiate import compose_packaged, data_config_name

__all__ = ["EvalResult", "main"]

log = logging.getLogger(__name__)

#: The task (``conf/model/<task>.yaml``) that evaluates a data config; every other data config is classification.
TASK_OF_DATA = {"coco": "detection", "cityscapes": "segmentation"}

CONFIG_DIR = Path(__file__).resolve().parent / "conf"
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


# ------------------------------------------------------------------------------------------------ reading files


def _read_file(path: Path) -> Mapping[str, Any]:
    """The file's contents (a weights-only load), or an :class:`EvalError` that says what the file is not."""
    if not path.is_file():
        raise EvalError(f"no such file: {path}" + (" (it is a directory)" if path.is_dir() else ""))
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except SafetensorError as err:
            raise EvalError(f"{path} is not a safetensors file ({err})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        refused = next((ln.strip() for ln in str(err).splitlines() if "Unsupported global" in ln), None)
        if refused is not None:  # a real pickle, with Python objects beyond tensors and plain containers
            what = refused.split("GLOBAL", 1)[-1].split(" was not", 1)[0].strip()
            raise EvalError(
                f"{path} holds Python objects ({what}) that a weights-only load refuses: it is not a diffkd "
                "checkpoint or exported weights file"
            ) from None
        raise EvalError(f"{path} is not a PyTorch checkpoint") from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError):  # zip/pickle framing errors of other bytes
        raise EvalError(f"{path} is not a PyTorch checkpoint") from None
    if not isinstance(obj, Mapping):
        raise EvalError(f"{path} holds a {type(obj).__name__}, not a checkpoint or a dict of weights")
    return obj


def _stored_config(checkpoint: Mapping[str, Any]) -> dict[str, Any] | None:
    """The composed run config that ``DistillationModule.on_save_checkpoint`` stored, or ``None``."""
    if "state_dict" not in checkpoint:
        return None
    config = (checkpoint.get("diffkd") or {}).get("config")
    return config if isinstance(config, Mapping) and config.get("model") and config.get("data") else None


# ------------------------------------------------------------------------------------------------------ configs


def _data_name(data: str) -> tuple[str, str | None]:
    """``(data config name, image_folder root or None)``: a config name, or a folder (``image_folder``)."""
    try:
        return data_config_name(data)
    except ValueError as bad:
        raise EvalError(f"--data {bad}") from None


def _compose(overrides: Sequence[str]) -> DictConfig:
    """``train.yaml`` of the packaged ``conf/`` with ``overrides`` (no Hydra app, no run folder)."""
    return compose_packaged(overrides, "evaluate")


def _data_group(name: str) -> dict[str, Any]:
    """``conf/data/<name>.yaml`` as composed, unresolved (its ``${paths...}`` resolve in the config it joins)."""
    cfg = _compose(["~experiment", f"data={name}"])
    return OmegaConf.to_container(cfg.data, resolve=False)  # type: ignore[return-value]


def _config_name_of(data_cfg: DictConfig) -> str:
    """The ``conf/data`` config whose ``_target_`` is this data config's, else the target's class name."""
    target = data_cfg.get("_target_", "")
    for path in sorted((CONFIG_DIR / "data").glob("*.yaml")):
        if OmegaConf.load(path).get("_target_") == target:
            return path.stem
    return str(target).rsplit(".", 1)[-1] or "?"


def _data_class_accepts(data_cfg: DictConfig, key: str) -> bool:
    """Whether the datamodule class takes ``key`` (a flag may set an entry its config file leaves out)."""
    try:
        params = inspect.signature(hydra.utils.get_class(data_cfg._target_)).parameters
    except Exception:
        return False
    return key in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _set_data(cfg: DictConfig, key: str, value: Any, flag: str, applied: list[str]) -> None:
    """``cfg.data.<key> = value`` for a flag; an entry the config lacks is added when the datamodule takes it."""
    if key not in cfg.data and not _data_class_accepts(cfg.data, key):
        name = _config_name_of(cfg.data)
        raise EvalError(f"{flag}: the data config {name} ({cfg.data.get('_target_')}) has no {key}")
    OmegaConf.update(cfg, f"data.{key}", value, merge=False, force_add=True)
    applied.append(f"data.{key}={value} ({flag})")


def _absolute(override: str, cfg: DictConfig) -> str:
    """``override`` with its key made absolute: a key whose first part is no config group is relative to data."""
    prefix = override[: len(override) - len(override.lstrip("~+"))]
    body = override[len(prefix) :]
    first = body.split("=", 1)[0].split(".", 1)[0]
    if isinstance(cfg.get(first), DictConfig):
        return override
    return f"{prefix}data.{body}"


def _apply_set(cfg: DictConfig, overrides: Sequence[str], applied: list[str]) -> None:
    """Hydra-style ``key=value`` / ``+key=value`` / ``++key=value`` / ``~key`` overrides applied to ``cfg``."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    for raw in overrides:
        text = _absolute(raw, cfg)
        try:
            (override,) = parser.parse_overrides([text])
        except HydraException as err:
            raise EvalError(f"--set {raw}: {err}") from None
        if override.is_sweep_override():
            raise EvalError(f"--set {raw}: one value per key (no sweeps)")
        key = override.key_or_group
        current = OmegaConf.select(cfg, key, default=_MISSING)
        present = current is not _MISSING
        if isinstance(current, DictConfig) and not override.is_delete() and not isinstance(override.value(), dict):
            hint = "use --data <name>" if key == "data" else f"set its entries ({key}.<entry>=...)"
            raise EvalError(f"--set {raw}: {key} is a config node, not a value: {hint}")
        if override.is_delete():
            if not present:
                raise EvalError(f"--set {raw}: the config has no {key} to delete")
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(cfg, parent) if parent else cfg
            del node[leaf]
        elif override.is_add() or override.is_force_add():
            if override.is_add() and present:
                raise EvalError(f"--set {raw}: {key} is already set; override it without '+' (or with '++')")
            OmegaConf.update(cfg, key, override.value(), merge=True, force_add=True)
        else:
            if not present:
                raise EvalError(f"--set {raw}: the config has no {key}; add it with --set +{key}=...")
            OmegaConf.update(cfg, key, override.value(), merge=True)
        applied.append(f"{text} (--set)")


def _apply_flags(cfg: DictConfig, args: argparse.Namespace, root: str | None, applied: list[str]) -> None:
    """The data flags (``--data-dir``, ``--root``, ``--image-size``, ``--batch-size``, ``--num-workers``)."""
    if args.data_dir is not None:
        _set_data(cfg, "data_dir", args.data_dir, "--data-dir", applied)
    root = args.root if args.root is not None else root
    if root is not None:
        _set_data(cfg, "root", root, "--root" if args.root is not None else "--data", applied)
    if args.image_size is not None:
        _set_data(cfg, "image_size", args.image_size, "--image-size", applied)
    if args.batch_size is not None:
        # the evaluation batch; batch_size itself stays (Mixup, for one, checks that it is even)
        separate = "val_batch_size" in cfg.data or _data_class_accepts(cfg.data, "val_batch_size")
        _set_data(cfg, "val_batch_size" if separate else "batch_size", args.batch_size, "--batch-size", applied)
    if args.num_workers is not None:
        _set_data(cfg, "num_workers", args.num_workers, "--num-workers", applied)


def _student_overrides(cfg: DictConfig, args: argparse.Namespace, applied: list[str]) -> None:
    """``--model`` / ``--num-classes`` on a stored config; published weights are never fetched for a checkpoint."""
    student = cfg.model.student
    if args.model is not None and args.model != student.get("name"):
        student.name = args.model
        applied.append(f"model.student.name={args.model} (--model)")
    if args.num_classes is not None:
        student.num_classes = args.num_classes
        applied.append(f"model.student.num_classes={args.num_classes} (--num-classes)")
    if student.get("pretrained"):  # the checkpoint's weights replace them anyway
        student.pretrained = False


def _run_config(
    args: argparse.Namespace, checkpoint: Mapping[str, Any] | None
) -> tuple[DictConfig, list[str], list[str]]:
    """The config to evaluate with, the overrides applied (for the summary), and notes to print."""
    applied: list[str] = []
    notes: list[str] = []
    stored = _stored_config(checkpoint) if checkpoint is not None else None
    root: str | None = None
    if stored is not None:
        cfg = OmegaConf.create(dict(stored))
        if args.data is not None:
            name, root = _data_name(args.data)
            group = _data_group(name)
            if group.get("_target_") != cfg.data.get("_target_"):  # the run's own data keeps its stored settings
                cfg.data = OmegaConf.create(group)
                applied.append(f"data={name} (--data)")
        _student_overrides(cfg, args, applied)
    else:
        if checkpoint is not None and "state_dict" in checkpoint:
            notes.append(
                f"{args.weights} carries no diffkd run config (an older or foreign checkpoint): composing conf/ "
                f"with --data {args.data or DEFAULT_DATA} --model {args.model}"
            )
        name, root = _data_name(args.data or DEFAULT_DATA)
        overrides = [
            "~experiment",
            "~callbacks",
            "logger=none",
            "distill=none",
            f"data={name}",
            f"model={TASK_OF_DATA.get(name, 'classification')}",  # the task module that validates this data
        ]
        cfg = _compose(overrides)
        # set here, not as override strings: names such as timm:<model> and paths need no quoting this way
        cfg.model.student.name = args.model
        if args.num_classes is not None:
            cfg.model.student.num_classes = args.num_classes
        if args.pretrained:
            OmegaConf.update(cfg, "model.student.pretrained", True, force_add=True)
        applied.append(f"data={name} ({'--data' if args.data else 'default'})")
    _apply_flags(cfg, args, root, applied)
    _apply_set(cfg, args.overrides, applied)
    return cfg, applied, notes


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

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._count(batch)


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
    lines.append(f"{'model':<11} {result.model}, {params:,} parameters ({result.task})")
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
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Hydra override of the config, e.g. --set data.crop_pct=0.95 (repeatable; +key= adds, ~key deletes; "
        "a key not starting with a config group is relative to data: --set crop_pct=0.95)",
    )
    parser.add_argument("--split", choices=["val", "test"], default="val", help="trainer.validate or trainer.test")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (one device)")
    parser.add_argument("--bf16", action="store_true", help="precision bf16-mixed (default 32-true)")
    parser.add_argument("--limit-batches", type=int, help="evaluate only the first N batches")
    parser.add_argument("--json", dest="json_path", help="also write the result to this JSON file")
    return parser


def main(argv: list[str] | None = None) -> EvalResult:
    """Evaluate as the command line says; prints the summary and the metrics and returns them."""
    from diffkd.data.base import DataNotFoundError
    from diffkd.utils.instantiate import build_module, instantiate

    parser = _parser()
    args = parser.parse_args(argv)
    checkpoint = None
    if args.weights is not None:
        if args.pretrained:
            parser.error("--pretrained loads the registry's weights: give no weights file")
        checkpoint = _read_file(Path(args.weights))
    elif args.model is None:
        parser.error("give a checkpoint or weights file, or --model <name> (with --pretrained for its weights)")
    stored = checkpoint is not None and _stored_config(checkpoint) is not None
    if not stored and args.ema:
        raise EvalError("--ema reads the EMA weights of a diffkd training checkpoint (.ckpt with its run config)")
    if not stored and args.model is None:
        assert checkpoint is not None
        if "state_dict" in checkpoint:
            raise EvalError(
                f"{args.weights} carries no diffkd run config (an older or foreign checkpoint): give --model "
                "<registry name> (and --data) to evaluate it"
            )
        raise EvalError(f"{args.weights}: exported weights need --model <registry name> (e.g. --model tv_resnet18)")
    cfg, applied, notes = _run_config(args, checkpoint)

    try:
        dm = instantiate(cfg.data)
        # the data first: a missing data set should be reported as such, not as a classifier-width mismatch
        dm.prepare_data()
        dm.setup("validate" if args.split == "val" else "test")
        num_classes = None if args.pretrained and args.num_classes is None else getattr(dm, "num_classes", None)
    except DataNotFoundError as err:
        raise EvalError(f"{err}\n(point to the data with --data-dir / --root)") from None
    except (TypeError, ValueError) as err:  # an entry the datamodule does not take, or a value it refuses
        raise EvalError(f"data config {_config_name_of(cfg.data)}: {err}") from None
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
    run = trainer.validate if args.split == "val" else trainer.test
    start = time.perf_counter()
    try:
        outputs = run(module, datamodule=dm, verbose=False)
    except DataNotFoundError as err:
        raise EvalError(f"{err}\n(point to the data with --data-dir / --root)") from None
    seconds = time.perf_counter() - start

    result = EvalResult(
        source=args.weights,
        model=str(cfg.model.student.get("name", type(module.student).__name__)),
        weights=weights,
        task=f"{type(module).__module__}.{type(module).__qualname__}",
        config="stored in the checkpoint" if stored else f"composed from {CONFIG_DIR}/train.yaml",
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
    )
    trained = ""
    if stored and checkpoint is not None:
        trained = f" (epoch {checkpoint.get('epoch')}, step {checkpoint.get('global_step')})"
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
