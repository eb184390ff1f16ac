"""What makes a split usable: the rules every datamodule applies at ``setup``, and so ``python -m diffkd.data.check``
too (it sets the datamodule up as training does), so that the two cannot disagree.

* :class:`EmptySplitError` — a split with no usable sample (a COCO json without annotations, every box dropped, a
  training split too small for one batch). Raised before anything is trained; the message names the split, the
  file or folder, and the fix.
* :class:`MixedSizeError` — samples of several sizes that would be stacked into one batch (segmentation images
  evaluated at full resolution with a batch > 1, a transform that does not give one size). Raised at ``setup``
  where the sizes can be read from the file headers (:func:`require_one_size`), else by the loader's collate
  (:class:`SameSizeCollate`) instead of torch's "stack expects each tensor to be equal size".

What a data set drops (COCO's boxes) is decided by that data set's own rule (``diffkd.data.coco.box_drop_codes``),
which its transform and its setup report both call.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

__all__ = [
    "EmptySplitError",
    "MixedSizeError",
    "SameSizeCollate",
    "SplitProblem",
    "batch_problem",
    "raise_problems",
    "require_one_size",
    "world_size",
]


@dataclass(frozen=True)
class SplitProblem:
    """Why one split has no usable sample.

    Attributes:
        split: ``train`` or ``val`` (and the split's own name, ``train (train2017)``).
        where: the file or folder the samples come from.
        why: what was found, with the counts.
        fix: what to change (config keys or the data).
    """

    split: str
    where: str
    why: str
    fix: str

    def line(self) -> str:
        """``"the <split> split (<where>) has no usable sample: <why>. Fix: <fix>."``"""
        return f"the {self.split} split ({self.where}) has no usable sample: {self.why}. Fix: {self.fix}."


class EmptySplitError(ValueError):
    """One or more splits with no usable sample; the message has one line per split (see :class:`SplitProblem`).

    Args:
        dataset: the data set's name at the head of the message (``"COCO"``).
        problems: one per unusable split.
    """

    def __init__(self, dataset: str, problems: Sequence[SplitProblem]) -> None:
        self.dataset = dataset
        self.problems = list(problems)
        lines = [f"{dataset}: {problem.line()}" for problem in self.problems]
        super().__init__("\n".join(lines))

    @property
    def splits(self) -> list[str]:
        """The unusable splits, in the message's order."""
        return [problem.split for problem in self.problems]

    def __reduce__(self):  # picklable across worker processes and DDP spawn despite the custom __init__
        return (type(self), (self.dataset, self.problems))


def raise_problems(dataset: str, problems: Sequence[SplitProblem | None]) -> None:
    """Raise :class:`EmptySplitError` for the problems that are not ``None`` (nothing when there are none)."""
    found = [p for p in problems if p is not None]
    if found:
        raise EmptySplitError(dataset, found)


def world_size(datamodule: Any) -> int:
    """Data-parallel processes of the trainer attached to ``datamodule`` (1 without one)."""
    trainer = getattr(datamodule, "trainer", None)
    kwargs = getattr(trainer, "distributed_sampler_kwargs", None) or {}
    return max(1, int(kwargs.get("num_replicas", 1)))


def batch_problem(
    split: str, where: str, samples: int, batch_size: int, drop_last: bool, replicas: int = 1
) -> SplitProblem | None:
    """The problem of a training split that gives no batch: with ``drop_last``, fewer samples per process than
    ``batch_size`` (Lightning would then skip training with only a warning). ``None`` when there is a batch."""
    per_process = math.ceil(samples / replicas)  # DistributedSampler pads every shard to this
    if samples == 0 or not drop_last or per_process >= batch_size:
        return None
    shard = f" per process ({samples} over {replicas} processes)" if replicas > 1 else ""
    return SplitProblem(
        split,
        where,
        f"{per_process} sample(s){shard} are fewer than data.batch_size={batch_size}, and data.drop_last=true drops "
        "that incomplete batch: not one training step would run",
        f"set data.batch_size={per_process} (or less), or data.drop_last=false",
    )


# ------------------------------------------------------------------------------------------ one size per batch


class MixedSizeError(ValueError):
    """Samples of several sizes that would be stacked into one batch; the message names the sizes, the split and
    the fix. It keeps the one-message constructor: a ``DataLoader`` worker re-raises it in the main process by
    calling its class with the message."""


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def mixed_size_message(split: str, sizes: dict[str, list[str]], what: str, batch: str, fix: str) -> str:
    """The message of :class:`MixedSizeError`.

    Args:
        split: the split (``val``).
        sizes: size (``"24×20 px"``) → the samples or files of that size, in order.
        what: what has those sizes, singular (``"image"``).
        batch: the batch setting that stacks them (``"data.val_batch_size=2"``).
        fix: what to change.
    """
    ordered = sorted(sizes.items(), key=lambda item: -len(item[1]))
    listed = ", ".join(f"{size} ({_plural(len(names), what)}, e.g. {names[0]})" for size, names in ordered)
    return (
        f"the {split} split's {what}s are of {len(sizes)} sizes: {listed}; batches of {batch} stack them into one "
        f"tensor, which needs one size. Fix: {fix}"
    )


def image_size(path: str | os.PathLike[str]) -> tuple[int, int] | None:
    """``(width, height)`` from an image file's header (nothing decoded); ``None`` when it cannot be read (the
    checks that decode report such files)."""
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None


def require_one_size(
    split: str, files: Sequence[str | os.PathLike[str]], batch_size: int, batch_key: str, fix: str
) -> None:
    """Raise :class:`MixedSizeError` when ``files`` (images used at their own size) differ in size and batches of
    ``batch_size`` > 1 would stack them. Reads the headers only.

    Args:
        split: the split, for the message.
        files: the image files, in sample order.
        batch_size: the batch they are loaded in.
        batch_key: the config key of that batch size (``data.val_batch_size``).
        fix: what to change.
    """
    if batch_size <= 1:
        return
    sizes: dict[str, list[str]] = {}
    for path in files:
        size = image_size(path)
        if size is not None:
            sizes.setdefault(f"{size[0]}×{size[1]} px", []).append(os.fspath(path))
    if len(sizes) > 1:
        raise MixedSizeError(mixed_size_message(split, sizes, "image", f"{batch_key}={batch_size}", fix))


def _shape(value: Any) -> tuple[int, ...] | None:
    shape = getattr(value, "shape", None)
    return tuple(int(s) for s in shape) if shape is not None else None


class SameSizeCollate:
    """``collate`` (``default_collate``) that turns torch's "stack expects each tensor to be equal size" into a
    :class:`MixedSizeError` naming the sizes in the batch, the split and ``fix``.

    Args:
        collate: the collate function to run.
        split: the split of the loader.
        batch: the loader's batch setting, as the message shows it (``"data.val_batch_size=4"``).
        fix: what to change when the samples differ in size.
    """

    def __init__(self, collate: Callable[[list[Any]], Any], split: str, batch: str, fix: str) -> None:
        self.collate = collate
        self.split = split
        self.batch = batch
        self.fix = fix

    def __call__(self, samples: list[Any]) -> Any:
        try:
            return self.collate(samples)
        except RuntimeError as err:
            if "stack expects each tensor to be equal size" not in str(err):
                raise
            raise MixedSizeError(self.message(samples)) from err

    def message(self, samples: Sequence[Any]) -> str:
        """The error for a batch whose samples differ in size: the sizes of the first element that differs."""
        parts = [s if isinstance(s, (tuple, list)) else (s,) for s in samples]
        what = "sample"
        sizes: dict[str, list[str]] = {}
        for position in range(min(len(p) for p in parts)):
            shapes = [_shape(p[position]) for p in parts]
            if None in shapes or len(set(shapes)) < 2:
                continue
            what = {0: "image", 1: "label"}.get(position, f"sample element {position}")
            for index, shape in enumerate(shapes):
                sizes.setdefault(f"shape {shape}", []).append(f"sample {index} of the batch")
            break
        return mixed_size_message(self.split, sizes, what, self.batch, self.fix)
