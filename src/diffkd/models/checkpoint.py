"""Load weights from the checkpoint formats a distillation user meets, with errors that say what went wrong.

:func:`load_weights` accepts

- RepDistiller / mdistiller files: ``{"model": state_dict, "epoch": ..., "accuracy": ...}`` (the CIFAR teachers),
- a bare ``state_dict``,
- Lightning checkpoints ``{"state_dict": ...}``; a distillation module's keys are ``student.*`` / ``teacher.*``:
  all-``student.`` keys are unwrapped automatically, otherwise pass ``key="student"`` or ``key="teacher"``,
- ``module.``-prefixed keys (``nn.DataParallel``/DDP) and ``_orig_mod.`` (``torch.compile``),
- ``.safetensors`` files.

Files are read with ``torch.load(path, map_location="cpu", weights_only=True)``: a checkpoint never runs code.
"""

from __future__ import annotations

import logging
import pickle
import pickletools
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from diffkd.models.cifar._common import CIFAR_TEACHERS_HINT

__all__ = [
    "NotACheckpointError",
    "RefusedCheckpointError",
    "extract_state_dict",
    "format_mismatches",
    "key_mismatches",
    "load_weights",
    "pickle_globals",
    "read_checkpoint",
    "read_source",
    "refusal_message",
    "refused_by_weights_only",
]

log = logging.getLogger(__name__)

# Top-level entries that hold the weights, in the order they are tried (Lightning, RepDistiller/mdistiller, others).
_CONTAINER_KEYS = ("state_dict", "model", "model_state_dict", "net", "weights")
# Whole-model wrappers whose prefix is always stripped when every key carries it.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_SHOW = 10


# What torch's weights-only unpickler says when a well-formed pickle asks for more than tensors and plain containers
# (a class, a function such as os.system); random bytes fail earlier, on an unknown opcode or a broken frame.
_REFUSALS = (
    re.compile(r"unsupported GLOBAL:? (?:GLOBAL )?([\w.]+)", re.IGNORECASE),
    re.compile(r"(Can only (?:create new object|build) .* but got [^\n]+)"),
    re.compile(r"(Trying to call reduce for unrecognized function [^\n]+)"),
)


class NotACheckpointError(ValueError):
    """A weights file that is no checkpoint at all (random bytes, a text file, a truncated download)."""


class RefusedCheckpointError(RuntimeError):
    """A pickle that holds objects outside what ``torch.load(weights_only=True)`` allows: refused without running
    any of it (loading it in full could execute code from the file)."""


def refused_by_weights_only(error: BaseException) -> str | None:
    """What a weights-only ``torch.load`` refused (``GLOBAL posix.system``, ...), or ``None`` when ``error`` is not
    such a refusal (random bytes, a truncated file)."""
    text = str(error)
    for pattern in _REFUSALS:
        found = pattern.search(text)
        if found is not None:
            return f"GLOBAL {found.group(1)}" if pattern is _REFUSALS[0] else found.group(1)
    return None


def pickle_globals(path: str | Path) -> list[str] | None:
    """The globals a plain pickle file (``pickle.dump``, any protocol) names, read without unpickling anything, or
    ``None`` when the file is no pickle. torch's weights-only loader stops at protocol 4's first opcode, before it
    could name what it refuses."""
    data = Path(path).read_bytes()
    if len(data) < 2 or data[0] != pickle.PROTO[0] or not 2 <= data[1] <= pickle.HIGHEST_PROTOCOL:
        return None
    names: list[str] = []
    strings: list[str] = []
    try:
        for opcode, arg, _ in pickletools.genops(data):
            if isinstance(arg, str):
                strings.append(arg)
            if opcode.name == "GLOBAL":
                names.append(str(arg).replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(f"{strings[-2]}.{strings[-1]}")
    except Exception:  # random bytes behind a pickle header: no pickle after all
        return None
    return names


def refusal_message(path: str | Path, what: str) -> str:
    """The message for a file refused by a weights-only load: what happened, why, and what to do if it is trusted."""
    return (
        f"'{path}' was refused: it holds Python objects outside what a weights-only load allows ({what}). Such a "
        "file may be unsafe (unpickling it in full can run code), so none of it was loaded. If you trust the file, "
        "re-save its weights as a plain state dict and use that file, e.g. in Python: "
        f"torch.save(torch.load('{path}', weights_only=False)['state_dict'], 'clean.pth') (the key that holds the "
        "weights may be 'model' or none); or allow those classes with torch.serialization.add_safe_globals([...])"
    )


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read ``path`` on the CPU: ``.safetensors`` via safetensors, anything else via ``torch.load(weights_only=True)``.

    Raises:
        FileNotFoundError: the file does not exist (the message says where the CIFAR teachers come from).
        NotACheckpointError: the bytes are no checkpoint (random bytes, a text file, a truncated download).
        RefusedCheckpointError: a pickle holding objects a weights-only load does not allow (possibly unsafe).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint file not found: '{path}'"
            + (" (it is a directory)" if path.is_dir() else "")
            + ". Weights are loaded from a file, never downloaded by name"
            + (f": {CIFAR_TEACHERS_HINT}" if "cifar" in str(path).lower() else "")
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        what = refused_by_weights_only(e)
        if what is None:
            names = pickle_globals(path)
            if names is not None:
                what = ", ".join(f"GLOBAL {n}" for n in dict.fromkeys(names)) or "a pickle.dump file, not torch.save's"
        if what is None:  # not a pickle of Python objects at all
            raise NotACheckpointError(f"'{path}' is not a checkpoint: torch.load cannot read it ({e})") from None
        raise RefusedCheckpointError(refusal_message(path, what)) from None
    # zip or pickle framing of other bytes: the unpickler stumbles in many ways (IndexError on an empty stack, ...)
    except (RuntimeError, EOFError, ValueError, KeyError, IndexError, TypeError, OverflowError, OSError) as e:
        raise NotACheckpointError(f"'{path}' is not a checkpoint: torch.load cannot read it ({e})") from None
    if not isinstance(obj, Mapping):
        raise RuntimeError(f"'{path}' holds a {type(obj).__name__}, not a dict of weights")
    return dict(obj)


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, Tensor) for v in obj.values())


def _strip_common(sd: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in sd.items()} if all(k.startswith(prefix) for k in sd) else sd


def _top_level_names(sd: Mapping[str, Any]) -> list[str]:
    return sorted({k.split(".", 1)[0] for k in sd})


def extract_state_dict(obj: Mapping[str, Any], key: str | None = None, *, origin: str = "<dict>") -> dict[str, Tensor]:
    """The bare ``state_dict`` inside a loaded checkpoint ``obj``.

    Args:
        obj: a state dict, or a dict holding one under ``state_dict`` / ``model`` / ``model_state_dict`` / ...
        key: either a top-level entry of ``obj`` that holds the state dict (``"model"``, ``"state_dict"``,
            ``"model_ema"`` …), or a submodule prefix to select and strip (``"student"``, ``"teacher"``,
            ``"model.backbone"`` …); keys outside that prefix are dropped.
        origin: names the source in error messages.
    """
    prefix: str | None = None
    if key is not None and key in obj and isinstance(obj[key], Mapping):
        sd: Any = obj[key]
    else:
        prefix = key
        sd = obj
        if not _is_state_dict(sd):
            found = next((c for c in _CONTAINER_KEYS if isinstance(obj.get(c), Mapping)), None)
            if found is None:
                raise RuntimeError(
                    f"no state dict found in {origin}: top-level keys are {sorted(map(str, obj))[:20]}; "
                    f"expected a dict of tensors or one of {list(_CONTAINER_KEYS)} (or pass key=...)"
                )
            sd = obj[found]
    if not _is_state_dict(sd):
        bad = sorted(k for k, v in sd.items() if not isinstance(v, Tensor))[:_SHOW]
        raise RuntimeError(f"the weights in {origin} are not a dict of tensors (non-tensor entries: {bad})")
    state: dict[str, Tensor] = dict(sd)
    for wrapper in _WRAPPER_PREFIXES:
        state = _strip_common(state, wrapper)
    if prefix is not None:
        p = prefix.rstrip(".") + "."
        selected = {k[len(p) :]: v for k, v in state.items() if k.startswith(p)}
        if not selected:
            raise RuntimeError(
                f"no weights under key/prefix {prefix!r} in {origin}; its top-level names are "
                f"{_top_level_names(state)[:20]}"
            )
        state = selected
    return state


def _fmt(names: list[str], what: str) -> str:
    more = f", … (+{len(names) - _SHOW} more)" if len(names) > _SHOW else ""
    return f"  {what} ({len(names)}): {', '.join(names[:_SHOW])}{more}\n"


def read_source(source: str | Path | Mapping[str, Any]) -> tuple[str, Mapping[str, Any]]:
    """``(origin, obj)``: a loaded dict as given (origin ``"<dict>"``), or a path read with :func:`read_checkpoint`
    (origin the quoted, user-expanded path, as error messages show it)."""
    if isinstance(source, Mapping):
        return "<dict>", source
    return f"'{Path(source).expanduser()}'", read_checkpoint(source)


def key_mismatches(
    own: Mapping[str, Tensor], state: Mapping[str, Tensor], *, source_word: str = "checkpoint"
) -> tuple[list[str], list[str], list[str]]:
    """``(missing, unexpected, shapes)`` of ``state`` against the model's ``own`` state dict.

    ``missing`` leaves out BatchNorm's ``num_batches_tracked``, which BatchNorm fills itself (files from
    PyTorch < 0.4.1 have none); ``shapes`` reads ``"<key>: <source_word> (shape) vs model (shape)"``.
    """
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: {source_word} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    return missing, unexpected, shapes


def format_mismatches(missing: list[str], unexpected: list[str], shapes: list[str]) -> str:
    """The lines of a load error listing each non-empty kind (first few names, with counts), newline-ended."""
    kinds = ((missing, "missing keys"), (unexpected, "unexpected keys"), (shapes, "shape mismatches"))
    return "".join(_fmt(names, what) for names, what in kinds if names)


def load_weights(
    model: nn.Module, source: str | Path | Mapping[str, Any], *, strict: bool = True, key: str | None = None
) -> None:
    """Load ``source`` into ``model`` in place, on the parameters' device and dtype.

    Args:
        model: the module to fill.
        source: a checkpoint path (``.pth``/``.pt``/``.ckpt``/``.safetensors``) or an already-loaded dict.
        strict: every model key must be filled and every checkpoint key used (BatchNorm's
            ``num_batches_tracked``, absent from very old files, may be missing). Shape mismatches always raise.
        key: a top-level entry holding the weights, or a submodule prefix to select (see
            :func:`extract_state_dict`), e.g. ``key="teacher"`` for a Lightning distillation checkpoint.

    Raises:
        FileNotFoundError: ``source`` is a path that does not exist.
        RuntimeError: the weights do not fit: the message names the source and lists missing and unexpected keys
            (the first few of each, with counts) and shape mismatches. The model is left untouched.
    """
    origin, obj = read_source(source)
    # a model that reads another framework's checkpoints (diffkd.models.mmdet: MMDetection's model zoo) converts them
    # itself, strictly, and answers None for anything else
    convert = getattr(model, "convert_foreign_checkpoint", None)
    if key is None and callable(convert):
        converted = convert(obj, origin)
        if converted is not None:
            model.load_state_dict(converted, strict=True)
            return
    state = extract_state_dict(obj, key, origin=origin)

    own = model.state_dict()
    if key is None and not (own.keys() & state.keys()):
        # a distillation checkpoint whose only submodule is the student, or any single common prefix
        heads = _top_level_names(state)
        head = heads[0] + "." if len(heads) == 1 else ""
        if head and all(k.startswith(head) for k in state) and not all(k.startswith(head) for k in own):
            state = {k.split(".", 1)[1]: v for k, v in state.items()}

    missing, unexpected, shapes = key_mismatches(own, state)
    if shapes or (strict and (missing or unexpected)):
        msg = f"cannot load the weights from {origin} into {type(model).__name__} (strict={strict}):\n"
        msg += format_mismatches(missing, unexpected, shapes)
        heads = _top_level_names(state)
        if key is None and {"student", "teacher"} & set(heads):
            msg += (
                "hint: this looks like a distillation checkpoint; pass key='student' or key='teacher' "
                "(in a config: ++model.teacher.key=student).\n"
            )
        elif missing and unexpected:
            msg += "hint: is this the checkpoint of another architecture (or another depth/width)?\n"
        elif unexpected and not missing and all(k.endswith("num_batches_tracked") for k in unexpected):
            msg += (
                "hint: the weights come from BatchNorm layers and this model has frozen ones (FrozenBatchNorm2d keeps "
                "no num_batches_tracked): build it with frozen_bn=false (config: model.student.frozen_bn=false; "
                "python -m diffkd.evaluate: --set model.student.frozen_bn=false).\n"
            )
        raise RuntimeError(msg.rstrip("\n"))
    result = model.load_state_dict(state, strict=strict)
    if not strict and (result.missing_keys or result.unexpected_keys):
        log.warning(
            "loaded %s non-strictly: %d missing keys (e.g. %s), %d unexpected keys (e.g. %s)",
            origin,
            len(result.missing_keys),
            result.missing_keys[:3],
            len(result.unexpected_keys),
            result.unexpected_keys[:3],
        )
