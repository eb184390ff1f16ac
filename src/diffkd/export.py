"""``python -m diffkd.export <checkpoint.ckpt> <out>`` — the student alone, without teacher or heads.

Writes ``<out>.pth`` in the RepDistiller/mdistiller format (``{"model": state_dict, "epoch", "meta"}``, loadable with
``torch.load(weights_only=True)``) and ``<out>.safetensors``; ``out`` that is a folder (it exists, or ends with
``/``) receives ``<student name>.pth`` / ``.safetensors``. The meta (a dict in the ``.pth``, the safetensors header's
metadata with each entry JSON-encoded) carries everything an evaluation needs, taken from the config stored in the
checkpoint (:func:`export_meta`): the task module and its options, the student's full model spec (its
``num_classes`` resolved from the weights), the data config of the run, the input (size, normalisation, channels)
and the label convention. ``python -m diffkd.evaluate <export>`` reads it, so that evaluating the export gives the
metric of evaluating the training checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffkd.config import config_name_of, stored_config
from diffkd.models.checkpoint import NotACheckpointError, RefusedCheckpointError, read_checkpoint

__all__ = [
    "EXPORT_FORMAT",
    "build_student",
    "export_meta",
    "export_student",
    "load_student",
    "main",
    "read_export_meta",
    "resolve_num_classes",
    "student_spec",
    "student_state_dict",
    "task_config_name",
]

#: Version of the export meta (``meta["diffkd_export"]``); files without it were written before the meta said more
#: than the student spec.
EXPORT_FORMAT = 2
# Spec entries that fetch published weights when the model is built: the exported weights replace them.
_DOWNLOADS = {"pretrained": False, "weights_backbone": None}
# What the data module says about its input, when it has it (read from the instance, else the config).
_INPUT_KEYS = ("in_chans", "image_size", "crop_pct", "interpolation", "mean", "std", "normalization")


def student_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The ``student.*`` weights of a diffkd Lightning checkpoint, prefix removed (``_orig_mod.`` too)."""
    state = checkpoint.get("state_dict")
    if state is None:
        raise KeyError("not a Lightning checkpoint: it has no 'state_dict' entry")
    out = {}
    for key, value in state.items():
        if key.startswith("student."):
            out[key.removeprefix("student.").replace("_orig_mod.", "")] = value
    if not out:
        raise KeyError("the checkpoint holds no 'student.*' weights; was it written by diffkd.train?")
    return out


def _stored_config(checkpoint: Mapping[str, Any]) -> Mapping[str, Any]:
    """The run config the checkpoint stores (:func:`diffkd.config.stored_config`), ``{}`` without one."""
    return stored_config(checkpoint, complete=False) or {}


def student_spec(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The student's model config (``_target_``, ``name``, ``num_classes``, ...) stored at training time."""
    spec = (_stored_config(checkpoint).get("model") or {}).get("student")
    if not spec:
        raise KeyError("the checkpoint carries no diffkd config (model.student); it predates diffkd.export")
    return dict(spec)


def _offline(spec: Mapping[str, Any]) -> dict[str, Any]:
    """``spec`` with the entries that would download published weights switched off (loaded weights replace them)."""
    return {**spec, **{k: v for k, v in _DOWNLOADS.items() if k in spec}}


def resolve_num_classes(spec: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> int | None:
    """The number of classes of the weights ``state`` for the architecture ``spec``: its own ``num_classes``, else
    read from the weights. Two builds (2 and 3 classes) show which dimensions grow with the classes and how
    (``a · K + b``: a classifier, Faster R-CNN's ``4 · K`` box regression, FCOS' per-anchor logits); the weights'
    sizes there give ``K``. ``None`` when no tensor depends on it or the builds fail."""
    import hydra

    if spec.get("num_classes") is not None:
        return int(spec["num_classes"])
    try:
        small, large = (hydra.utils.instantiate({**_offline(spec), "num_classes": k}).state_dict() for k in (2, 3))
    except Exception:
        return None
    found = set()
    for key, a in small.items():
        b, got = large.get(key), state.get(key)
        if b is None or got is None or a.ndim != b.ndim or a.ndim != got.ndim:
            continue
        for d2, d3, size in zip(a.shape, b.shape, got.shape):
            step = d3 - d2
            if step > 0 and (size - (d2 - 2 * step)) % step == 0:
                found.add((size - (d2 - 2 * step)) // step)
    return found.pop() if len(found) == 1 else None


def build_student(checkpoint: Mapping[str, Any]) -> nn.Module:
    """The student of a loaded diffkd checkpoint, rebuilt from its stored config, weights loaded (eval mode).

    When the config left ``num_classes`` to the data (``null``), it is read from the weights
    (:func:`resolve_num_classes`).
    """
    import hydra

    state = student_state_dict(checkpoint)
    spec = _offline(student_spec(checkpoint))
    spec["num_classes"] = resolve_num_classes(spec, state)
    if spec["num_classes"] is None:
        del spec["num_classes"]
    model = hydra.utils.instantiate(spec)
    model.load_state_dict(state, strict=True)
    return model.eval()


def load_student(path: str | Path) -> nn.Module:
    """Rebuild the student of a diffkd checkpoint file and load its weights (eval mode)."""
    return build_student(torch.load(path, map_location="cpu", weights_only=True))


# ------------------------------------------------------------------------------------------------------- the meta


def task_config_name(target: str) -> str | None:
    """The ``conf/model/<name>.yaml`` (``classification``, ``detection``, ``segmentation``) whose task module is
    ``target``'s class (``diffkd.tasks.DetectionModule`` and ``diffkd.tasks.detection.DetectionModule`` are one)."""
    return config_name_of("model", target)


def data_config_name(target: str) -> str | None:
    """The ``conf/data/<name>.yaml`` whose data module is ``target``'s class."""
    return config_name_of("data", target)


def _plain(value: Any) -> Any:
    """``value`` as JSON: tuples become lists, tensors lists, other objects their ``str``."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _input_of(data: Mapping[str, Any], model: nn.Module | None) -> dict[str, Any]:
    """What the model is fed: the data module's channels, size and normalisation (from an instance of the run's data
    config, no data read; else the config), and a torchvision detector's own resize and normalisation."""
    import hydra

    try:  # the constructor only: sizes and statistics that are class attributes (CIFAR's 32 px) come with it
        dm = hydra.utils.instantiate(dict(data))
    except Exception:
        dm = None
    out: dict[str, Any] = {}
    for key in _INPUT_KEYS:
        try:
            value = getattr(dm, key, None) if dm is not None else None
        except Exception:
            value = None
        value = data.get(key) if value is None else value
        if value is not None:
            out[key] = _plain(value)
    transform = getattr(model, "transform", None)  # GeneralizedRCNNTransform: resizes and normalises in the model
    for key, name in (("min_size", "min_size"), ("max_size", "max_size"), ("image_mean", "mean"), ("image_std", "std")):
        value = getattr(transform, key, None)
        if value is not None:
            value = _plain(value)
            out[name] = value[0] if name == "min_size" and isinstance(value, list) and len(value) == 1 else value
    return out


def _labels_of(task: str | None, num_classes: int | None, model: Mapping[str, Any], data: Mapping[str, Any]):
    """The label convention of the task's targets."""
    labels: dict[str, Any] = {"num_classes": num_classes}
    if task == "detection":
        contiguous = bool(data.get("contiguous_labels", False))
        labels["background"] = 0
        labels["contiguous_labels"] = contiguous
        labels["labels"] = (
            "1..K-1: the annotation file's categories in id order (background 0)"
            if contiguous
            else "COCO category ids (label = category id, background 0)"
        )
    elif task == "segmentation":
        labels["ignore_index"] = model.get("ignore_index", data.get("ignore_index"))
        labels["labels"] = "class index per pixel, 0..K-1; ignore_index counts nowhere"
    elif task == "classification":
        labels["labels"] = "class index 0..K-1"
    names = data.get("class_names") or model.get("class_names")
    if names:
        labels["class_names"] = list(names)
    return labels


def export_meta(checkpoint: Mapping[str, Any], source: str | Path) -> dict[str, Any]:
    """What evaluating the exported student needs, from the checkpoint's stored run config.

    Keys: ``diffkd_export`` (:data:`EXPORT_FORMAT`), ``source``, ``epoch``, ``global_step``, ``task`` (the task
    module's ``_target_``), ``task_name`` (its ``conf/model`` name), ``student`` (the full model spec, ``num_classes``
    resolved, weight downloads off), ``model`` (the task module's config without the teacher: its options and
    ``student``), ``data`` (the run's data config), ``data_config`` (its ``conf/data`` name), ``input`` (channels,
    image size or the detector's min/max size, normalisation) and ``labels`` (number of classes and their convention).
    A checkpoint without a stored config gives only the first four.
    """
    meta: dict[str, Any] = {
        "diffkd_export": EXPORT_FORMAT,
        "source": str(source),
        "epoch": checkpoint.get("epoch"),
        "global_step": checkpoint.get("global_step"),
    }
    import hydra

    config = _stored_config(checkpoint)
    if not config.get("model") or not (config["model"]).get("student"):
        return meta
    state = student_state_dict(checkpoint)
    spec = _offline(student_spec(checkpoint))
    spec["num_classes"] = resolve_num_classes(spec, state)
    model_cfg = {k: v for k, v in config["model"].items() if k != "teacher"}
    model_cfg["student"] = spec
    data = dict(config.get("data") or {})
    task = str(model_cfg.get("_target_", ""))
    name = task_config_name(task)
    try:  # a torchvision detector resizes and normalises inside: its transform says how
        student = hydra.utils.instantiate({k: v for k, v in spec.items() if v is not None or k != "num_classes"})
    except Exception:
        student = None
    meta |= {
        "task": task,
        "task_name": name,
        "student": spec,
        "model": model_cfg,
        "data": data,
        "data_config": data_config_name(str(data.get("_target_", ""))),
        "input": _input_of(data, student),
        "labels": _labels_of(name, spec["num_classes"], model_cfg, data),
    }
    return _plain(meta)


def read_export_meta(path: str | Path, contents: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """The meta of an export written by :func:`export_student` (``None`` for older exports and other files).

    Args:
        path: the ``.pth`` or ``.safetensors`` file.
        contents: the ``.pth`` file already loaded (saves reading it again).
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
        if "diffkd_export" not in header:
            return None
        return {k: json.loads(v) for k, v in header.items()}
    if contents is None:
        contents = read_checkpoint(path)
    meta = contents.get("meta")
    return dict(meta) if isinstance(meta, Mapping) and "diffkd_export" in meta else None


# --------------------------------------------------------------------------------------------------- the files


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish(tmp: Path, path: Path) -> None:
    """Give ``tmp`` the mode of a newly created file (``0o666`` less the umask; safetensors writes ``0o600``) and
    move it to ``path`` in one step, so that no half-written export is ever left under the final name."""
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)


def _base(out: str | Path, spec_name: str | None) -> Path:
    """The output path without suffix: ``out`` itself, or ``<out>/<student name>`` for a folder (one that exists, or
    a string ending with ``/``)."""
    path = Path(out)
    if path.is_dir() or str(out).endswith(("/", os.sep)):
        name = re.sub(r"[^\w.-]+", "_", spec_name or "student").strip("._") or "student"
        return path / name
    return path.with_suffix("") if path.suffix in (".pth", ".safetensors") else path


def export_student(
    checkpoint_path: str | Path, out: str | Path, formats: tuple[str, ...] = ("pth", "safetensors")
) -> list[Path]:
    """Write the student of ``checkpoint_path`` to ``<out>.pth`` and/or ``<out>.safetensors`` (``out`` a folder:
    ``<out>/<student name>.*``), with :func:`export_meta`; returns the paths."""
    from safetensors.torch import save_file

    checkpoint = read_checkpoint(checkpoint_path)
    state = {k: v.contiguous() for k, v in student_state_dict(checkpoint).items()}
    meta = export_meta(checkpoint, checkpoint_path)
    spec_name = (meta.get("student") or {}).get("name")
    if spec_name is None:
        try:
            spec_name = student_spec(checkpoint).get("name")
        except KeyError:
            spec_name = None
    base = _base(out, spec_name)
    base.parent.mkdir(parents=True, exist_ok=True)
    written = []
    if "pth" in formats:
        path = base.with_name(base.name + ".pth")
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save({"model": state, "epoch": checkpoint.get("epoch"), "meta": meta}, tmp)
        _publish(tmp, path)
        written.append(path)
    if "safetensors" in formats:
        path = base.with_name(base.name + ".safetensors")
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(state, str(tmp), metadata={k: json.dumps(v) for k, v in meta.items()})
        _publish(tmp, path)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> list[Path]:
    """Export as the command line says; prints the written paths and returns them."""
    parser = argparse.ArgumentParser(prog="python -m diffkd.export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a Lightning checkpoint written by diffkd.train (e.g. last.ckpt)")
    parser.add_argument(
        "out",
        help="output path without suffix (e.g. exports/wrn_16_2), or a folder (existing, or ending with /) that "
        "receives <student name>.pth / .safetensors",
    )
    parser.add_argument("--format", choices=["pth", "safetensors", "both"], default="both")
    args = parser.parse_args(argv)
    formats = ("pth", "safetensors") if args.format == "both" else (args.format,)
    if not Path(args.checkpoint).is_file():
        raise SystemExit(f"no such file: {args.checkpoint} (a diffkd run's checkpoints/last.ckpt or best .ckpt)")
    try:
        paths = export_student(args.checkpoint, args.out, formats)
    except (NotACheckpointError, RefusedCheckpointError, KeyError) as err:
        raise SystemExit(str(err.args[0] if isinstance(err, KeyError) and err.args else err)) from None
    for path in paths:
        print(f"wrote {path}")
    return paths


if __name__ == "__main__":
    main()
