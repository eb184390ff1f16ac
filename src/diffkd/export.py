"""``python -m diffkd.export <checkpoint.ckpt> <out>`` — the student alone, without teacher or heads.

Writes ``<out>.pth`` in the RepDistiller/mdistiller format (``{"model": state_dict}``, loadable with
``torch.load(weights_only=True)``) and ``<out>.safetensors``. The student's architecture comes from the config
stored in the checkpoint, so ``diffkd.models.create_model(name)`` + ``load_weights`` rebuild it anywhere.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffkd.models.checkpoint import NotACheckpointError, read_checkpoint

__all__ = ["build_student", "export_student", "load_student", "main", "student_state_dict"]


def student_state_dict(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
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


def student_spec(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The student's model config (``_target_``, ``name``, ``num_classes``, ...) stored at training time."""
    config = (checkpoint.get("diffkd") or {}).get("config") or {}
    spec = (config.get("model") or {}).get("student")
    if not spec:
        raise KeyError("the checkpoint carries no diffkd config (model.student); it predates diffkd.export")
    return dict(spec)


def build_student(checkpoint: dict[str, Any]) -> nn.Module:
    """The student of a loaded diffkd checkpoint, rebuilt from its stored config, weights loaded (eval mode).

    When the config left ``num_classes`` to the data (``null``), the width is read from the checkpoint: the one
    2-D weight whose shape differs from a default-width build (``fc``, ``classifier``, ``head.fc``, ...).
    """
    import hydra

    state = student_state_dict(checkpoint)
    spec = student_spec(checkpoint)
    if spec.get("num_classes") is None:
        own = hydra.utils.instantiate(spec).state_dict()
        widths = {
            state[k].shape[0]
            for k, v in own.items()
            if k.endswith(".weight") and v.ndim == 2 and k in state and state[k].shape != v.shape
        }
        if len(widths) == 1:
            spec["num_classes"] = widths.pop()
    model = hydra.utils.instantiate(spec)
    model.load_state_dict(state, strict=True)
    return model.eval()


def load_student(path: str | Path) -> nn.Module:
    """Rebuild the student of a diffkd checkpoint file and load its weights (eval mode)."""
    return build_student(torch.load(path, map_location="cpu", weights_only=True))


def export_student(checkpoint_path: str | Path, out: str | Path, formats: tuple[str, ...] = ("pth", "safetensors")):
    """Write the student of ``checkpoint_path`` to ``<out>.pth`` and/or ``<out>.safetensors``; returns the paths."""
    from safetensors.torch import save_file

    checkpoint = read_checkpoint(checkpoint_path)
    state = {k: v.contiguous() for k, v in student_state_dict(checkpoint).items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    base = out.with_suffix("") if out.suffix in (".pth", ".safetensors") else out
    written = []
    meta = {"source": str(checkpoint_path), "epoch": str(checkpoint.get("epoch"))}
    with contextlib.suppress(KeyError):
        meta["student"] = json.dumps(student_spec(checkpoint))
    if "pth" in formats:
        path = base.with_suffix(".pth")
        torch.save({"model": state, "epoch": checkpoint.get("epoch"), "meta": meta}, path)
        written.append(path)
    if "safetensors" in formats:
        path = base.with_suffix(".safetensors")
        save_file(state, str(path), metadata=meta)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m diffkd.export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a Lightning checkpoint written by diffkd.train (e.g. last.ckpt)")
    parser.add_argument("out", help="output path without suffix (e.g. exports/wrn_16_2)")
    parser.add_argument("--format", choices=["pth", "safetensors", "both"], default="both")
    args = parser.parse_args(argv)
    formats = ("pth", "safetensors") if args.format == "both" else (args.format,)
    if not Path(args.checkpoint).is_file():
        raise SystemExit(f"no such file: {args.checkpoint} (a diffkd run's checkpoints/last.ckpt or best .ckpt)")
    try:
        paths = export_student(args.checkpoint, args.out, formats)
    except NotACheckpointError as err:
        raise SystemExit(str(err)) from None
    for path in paths:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
