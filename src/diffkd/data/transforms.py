"""Image transforms from the configuration: ``data.train_transform`` and ``data.val_transform``.

Every classification datamodule takes these two keys. A transform receives one PIL image (RGB, or ``L`` for
grey data sets) and returns a float32 tensor (C, S, S), S = ``image_size``. Accepted values:

``null``
    The data set's own default (what it has always done; see each datamodule's docstring).

a mapping: the arguments of ``timm.data.create_transform``
    ``input_size`` (default: the datamodule's ``image_size``), ``is_training`` (default: true for
    ``train_transform``, false for ``val_transform``), ``mean``/``std`` (default: the data set's) and any other
    ``create_transform`` argument (``scale``, ``ratio``, ``hflip``, ``color_jitter``, ``auto_augment``,
    ``interpolation``, ``re_prob``, ``crop_pct``, ...)::

        train_transform: {scale: [0.5, 1.0], hflip: 0.5, auto_augment: rand-m9-mstd0.5}

a list: torchvision transforms (v2, or v1), one entry each
    Each entry a Hydra ``{_target_: <class>, <argument>: <value>, ...}`` mapping or an already-built transform
    object (Hydra builds ``_target_`` entries itself unless ``_recursive_: false``). The list describes the
    augmentation; when it holds no ``Normalize``, what is missing of ``ToImage()``, ``ToDtype(float32,
    scale=True)`` and ``Normalize(mean, std)`` (the data set's statistics) is appended, in that order. A list with
    its own ``Normalize`` is taken as complete and nothing is appended::

        train_transform:
          - {_target_: torchvision.transforms.v2.RandomCrop, size: 32, padding: 4}
          - {_target_: torchvision.transforms.v2.RandomHorizontalFlip}

    One object or one ``_target_`` mapping (a ``Compose`` say) counts as a list of one.

On the command line: ``data.train_transform='[{_target_:torchvision.transforms.v2.RandomCrop,size:32,padding:4}]'``
or ``data.train_transform='{scale:[0.5,1.0]}'``.

After ``setup`` each configured transform is tried on the first image of its split (random states preserved);
an output that is not a float tensor (C, S, S) with the data set's C and S is an error that names the key and
the fix.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["TransformSpec", "build_transform", "check_transform_output", "describe_spec"]

#: A ``data.train_transform`` / ``data.val_transform`` value (see the module docstring).
TransformSpec = Mapping[str, Any] | Sequence[Any] | Callable[..., Any] | None

# Class names (torchvision v1 and v2, timm) of the steps that end a pipeline: PIL image -> tensor, -> float
_TO_TENSOR = {"ToImage", "ToTensor", "PILToTensor", "MaybeToTensor", "MaybePILToTensor", "ToImageTensor"}
_TO_FLOAT = {"ToDtype", "ConvertImageDtype", "ToTensor", "MaybeToTensor"}
_NORMALIZE = {"Normalize"}
# create_transform arguments that do not give one transform returning a float tensor
_TIMM_UNSUPPORTED = ("separate", "use_prefetcher", "naflex", "patchify")

_FORMS = (
    "null (the data set's default), a mapping of timm.data.create_transform arguments "
    "({scale: [0.5, 1.0], hflip: 0.5}), or a list of torchvision transforms "
    "([{_target_: torchvision.transforms.v2.RandomCrop, size: 32, padding: 4}, ...])"
)


def _plain(value: Any) -> Any:
    """OmegaConf containers (possibly holding objects) → dicts and lists; anything else unchanged."""
    from omegaconf import DictConfig, ListConfig

    if isinstance(value, DictConfig | Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, ListConfig | list | tuple):
        return [_plain(v) for v in value]
    return value


def _is_target_mapping(value: Any) -> bool:
    return isinstance(value, Mapping) and "_target_" in value


def describe_spec(spec: TransformSpec) -> str:
    """A short human description of a configured value, for messages and logs."""
    if spec is None:
        return "default"
    if isinstance(spec, Mapping) and not _is_target_mapping(spec):
        return f"timm create_transform({', '.join(f'{k}={v!r}' for k, v in _plain(spec).items())})"
    steps = [spec] if _is_target_mapping(spec) or callable(spec) else list(spec)
    names = [str(s["_target_"]).rsplit(".", 1)[-1] if _is_target_mapping(s) else type(s).__name__ for s in steps]
    return f"[{', '.join(names)}]"


def build_transform(
    spec: TransformSpec,
    *,
    key: str,
    is_training: bool,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> Callable[[Any], Tensor]:
    """The transform a configured value describes (see the module docstring for the forms).

    Args:
        spec: the configured value; not None (None means the caller's default).
        key: its config key, for messages (``"data.train_transform"``).
        is_training: timm's ``is_training`` default.
        image_size: timm's ``input_size`` default.
        mean, std: the data set's statistics: timm's defaults, and the appended ``Normalize``.

    Returns:
        a callable PIL image → float32 tensor (C, S, S).

    Raises:
        TypeError, ValueError: a value of no accepted form, an unknown timm argument, a list entry that cannot be
            built; the message names ``key``, the problem and the fix.
    """
    if spec is None:
        raise ValueError(f"{key} is null: the caller uses the data set's default")
    if isinstance(spec, str | bytes):
        raise TypeError(f"{key} is the string {spec!r}; it must be {_FORMS}")
    if isinstance(spec, Mapping) and not _is_target_mapping(spec):
        return _timm_transform(_plain(spec), key, is_training, image_size, mean, std)
    if _is_target_mapping(spec) or callable(spec):
        return _list_transform([spec], key, mean, std)
    if isinstance(spec, Sequence):
        return _list_transform(list(spec), key, mean, std)
    raise TypeError(f"{key} is a {type(spec).__name__} ({spec!r}); it must be {_FORMS}")


def _timm_transform(
    kwargs: dict[str, Any], key: str, is_training: bool, image_size: int, mean: Sequence[float], std: Sequence[float]
) -> Callable[[Any], Tensor]:
    from timm.data import create_transform

    accepted = list(inspect.signature(create_transform).parameters)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(
            f"{key}: unknown timm create_transform argument(s) {unknown}; accepted: {', '.join(accepted)}. "
            "(A list of torchvision transforms is a YAML list, not a mapping.)"
        )
    bad = [name for name in _TIMM_UNSUPPORTED if kwargs.get(name)]
    if bad:
        raise ValueError(
            f"{key}: {', '.join(f'{n}=true' for n in bad)} is not supported: the data set needs one transform "
            "returning a normalised float tensor; remove it"
        )
    args: dict[str, Any] = {"input_size": image_size, "is_training": is_training, "mean": mean, "std": std}
    args.update({k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()})
    args["mean"], args["std"] = tuple(float(m) for m in args["mean"]), tuple(float(s) for s in args["std"])
    if len(args["mean"]) != len(args["std"]):
        raise ValueError(f"{key}: mean {args['mean']} and std {args['std']} differ in length")
    return create_transform(**args)


def _steps(transform: Any) -> Iterator[Any]:
    """``transform`` and, for a ``Compose``/``RandomApply``/... , the steps inside it, depth first."""
    yield transform
    inner = getattr(transform, "transforms", None)
    if isinstance(inner, Sequence | torch.nn.ModuleList):
        for t in inner:
            yield from _steps(t)


def _list_transform(
    entries: list[Any], key: str, mean: Sequence[float], std: Sequence[float]
) -> Callable[[Any], Tensor]:
    import hydra
    from torchvision.transforms import v2

    if not entries:
        raise ValueError(f"{key} is an empty list: give at least one transform, or null for the data set's default")
    built = []
    for i, entry in enumerate(entries):
        if isinstance(entry, Mapping):
            if "_target_" not in entry:
                raise TypeError(
                    f"{key}[{i}] is a mapping without _target_ ({_plain(entry)}): each list entry is "
                    "{_target_: torchvision.transforms.v2.<Transform>, <argument>: <value>} or a transform object; "
                    f"timm create_transform arguments go directly under {key} as one mapping, not in a list"
                )
            try:
                entry = hydra.utils.instantiate(_plain(entry), _convert_="all")
            except Exception as err:  # Hydra's own message says what failed; add which entry
                cause = err.__cause__ if err.__cause__ is not None else err
                raise ValueError(f"{key}[{i}]: cannot build {entry['_target_']}: {cause}") from err
        if not callable(entry):
            raise TypeError(
                f"{key}[{i}] is a {type(entry).__name__} ({entry!r}), not a transform; {key} must be {_FORMS}"
            )
        built.append(entry)
    names = {type(t).__name__ for step in built for t in _steps(step)}
    if not names & _NORMALIZE:  # the augmentation only: finish it as the default pipelines do
        if not names & _TO_FLOAT:
            if not names & _TO_TENSOR:
                built.append(v2.ToImage())
            built.append(v2.ToDtype(torch.float32, scale=True))
        built.append(v2.Normalize(list(mean), list(std)))
    return v2.Compose(built)


def check_transform_output(
    output: Any, *, key: str, in_chans: int, image_size: int, size_key: str | None = "data.image_size"
) -> None:
    """Raise when a configured transform's output is not a float32-like tensor (in_chans, image_size, image_size).

    Args:
        output: the transform's output for one image.
        key: the transform's config key, for the message.
        in_chans, image_size: what the data set promises (C and S).
        size_key: the config key that sets ``image_size`` (None when the data set's size is fixed).
    """
    finish = "end the list with ToImage + ToDtype(float32, scale=True) + Normalize, or leave Normalize out of it"
    if not isinstance(output, Tensor):
        raise TypeError(f"{key} returns a {type(output).__name__}, not a tensor: {finish} so they are appended")
    if not output.is_floating_point():
        raise TypeError(
            f"{key} returns {output.dtype} images, not float: {finish} so they are appended "
            "(ToDtype(torch.float32, scale=True) goes before Normalize)"
        )
    if output.ndim != 3 or output.shape[0] != in_chans:
        raise ValueError(
            f"{key} returns images of shape {tuple(output.shape)}, but this data set gives (C, S, S) = "
            f"({in_chans}, {image_size}, {image_size}): keep {in_chans} channel(s) (mean/std with {in_chans} values)"
        )
    if tuple(output.shape[-2:]) != (image_size, image_size):
        also = f", or set {size_key}={output.shape[-1]}" if size_key and output.shape[-1] == output.shape[-2] else ""
        raise ValueError(
            f"{key} returns {output.shape[-2]}×{output.shape[-1]} images, but image_size is {image_size}: crop or "
            f"resize to {image_size} (v2.RandomResizedCrop(size={image_size}), v2.CenterCrop(size={image_size}), "
            f"timm input_size={image_size}){also}"
        )
