"""What a task module may ask of its datamodule: declared protocols instead of ``getattr`` probing.

* :class:`DistillDataModule` — any task: the per-device training ``batch_size`` and :meth:`~DistillDataModule.
  example_batch`, a real collated training batch for the dry run that infers the models' shapes.
* :class:`ClassificationData` — image classification: ``num_classes``, ``in_chans``, ``image_size``,
  ``loss_label_smoothing`` and :meth:`~ClassificationData.batch_transform` (Mixup/CutMix or ``None``).
* :class:`SampleIndexData` — a method that needs each training sample's dataset position (CRD's memory bank):
  :meth:`~SampleIndexData.enable_sample_index`, :meth:`~SampleIndexData.num_train_samples`,
  :meth:`~SampleIndexData.train_labels`. Every data module of :mod:`diffkd.data` has them.

**The task a data module serves** is its class attribute ``task: ClassVar[str]``, one of :data:`DATA_TASKS`
(``"classification"``, ``"detection"``, ``"segmentation"``); every data module class here declares it (a
subclass inherits it). :func:`task_of` reads it from a data module or its class, with a clear error when it is
missing. It is not a member of :class:`DistillDataModule`: a data module of your own needs it only where a tool
picks the task from the data (evaluation).

Both are ``typing.Protocol`` s with ``@runtime_checkable``, so ``isinstance(dm, ClassificationData)`` works (it
only checks that the members exist). :class:`~diffkd.data.classification.ClassificationDataModule` implements every
member, so all the classification datamodules here satisfy both. A task calls :func:`require_protocol` to fail early
with the missing members named.

Note: on Python < 3.12, ``isinstance`` against a protocol with data members reads each member, so a property that
raises (``ImageFolderDataModule.num_classes`` on a missing folder) raises from ``isinstance``.
:func:`require_protocol` looks members up statically (``inspect.getattr_static``): it never runs a property.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DATA_TASKS",
    "ClassificationData",
    "DistillDataModule",
    "SampleIndexData",
    "preserved_rng_state",
    "protocol_members",
    "require_protocol",
    "task_of",
]

#: The values of a data module's ``task`` class attribute.
DATA_TASKS: tuple[str, ...] = ("classification", "detection", "segmentation")

P = TypeVar("P")


@runtime_checkable
class DistillDataModule(Protocol):
    """The datamodule of any distillation task.

    Attributes:
        batch_size: per-device training batch (the global batch is ``batch_size × devices × num_nodes``).
    """

    batch_size: int

    def example_batch(self, size: int = 2, split: str = "train") -> Any:
        """A real batch of ``size`` samples, for the dry run that infers the models' shapes.

        The first ``size`` items of ``split`` (``"train"``: through the training transforms; ``"val"``: the
        evaluation transforms, for runs that only validate), collated as that split's loader does. Segmentation
        ``"val"`` keeps only those of the first item's size (full-resolution evaluation images may differ in size
        with a ``val_batch_size`` of 1), so its batch may hold fewer. DataLoader
        path: on the CPU; ``gpu_preload`` path: built as the device loader builds its batches, on the preload
        device. Works before and after ``setup`` (it sets up when needed).

        Must leave every global random state as it found it (torch CPU and CUDA generators, Python ``random``,
        NumPy): seeded runs stay bit-identical whether or not it is called. See :func:`preserved_rng_state`.

        Returns:
            whatever the train loader yields; for classification ``(images (size, C, H, W) float32,
            targets (size,) int64)``.
        """
        ...


@runtime_checkable
class ClassificationData(DistillDataModule, Protocol):
    """The datamodule of an image-classification task.

    Attributes:
        num_classes: classifier width K (targets are in ``[0, K)``).
        in_chans: image channels C.
        image_size: side S of the (square) training and evaluation images.
        loss_label_smoothing: ε the loss applies to hard targets (0.0: none; with Mixup it is already in the soft
            targets, so 0.0).
    """

    num_classes: int
    in_chans: int
    image_size: int
    loss_label_smoothing: float

    def batch_transform(self) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None:
        """The on-device training-batch transform (Mixup/CutMix), or ``None``.

        Returns:
            ``f(images (B, C, S, S), targets (B,) int64) -> (images (B, C, S, S), targets)`` where the targets
            come out int64 (B,) or soft float (B, K); ``None`` when batches go to the model unchanged.
        """
        ...


@runtime_checkable
class SampleIndexData(Protocol):
    """A data module whose training batches can carry each sample's position in the training set.

    After :meth:`enable_sample_index` every training batch — the train loader's (the DataLoader, the
    ``gpu_preload`` device loader, COCO's grouped batches) and ``example_batch(split="train")`` — is a tuple whose
    last element is ``index`` int64 (B,), the samples' positions 0..N-1 in the training set, and whose other
    elements are the batch it would otherwise be: classification ``(images, targets, index)``, segmentation
    ``(images, masks, index)``, detection ``(images, targets, index)``. The same sample has the same position in
    every epoch, after a resume, on every rank, and with ``data.skip_bad_images`` (a replaced sample carries the
    position of the sample that replaced it). Validation and test loaders are unchanged.
    """

    def enable_sample_index(self) -> None:
        """Turn the index on for every training batch from now on.

        Raises:
            TypeError: this data module cannot give indices (the message names it and the fix).
        """
        ...

    def num_train_samples(self) -> int:
        """N, the size of the training set (the positions are 0..N-1)."""
        ...

    def train_labels(self) -> Tensor:
        """int64 (N,): the class of each training sample in position order, read without decoding any image.

        Raises:
            TypeError: the samples have no single class (detection, segmentation); the message says what to use.
        """
        ...


def task_of(datamodule: object) -> str:
    """The task a data module (or data module class) serves: its ``task`` class attribute, one of
    :data:`DATA_TASKS`.

    Raises:
        TypeError: it declares none, or another value; the message names the class and the fix.
    """
    klass = datamodule if isinstance(datamodule, type) else type(datamodule)
    task = getattr(klass, "task", None)
    if task not in DATA_TASKS:
        found = "declares no task" if task is None else f"declares task = {task!r}"
        raise TypeError(
            f"{klass.__module__}.{klass.__qualname__} {found}: set the class attribute task: ClassVar[str] to one "
            f"of {', '.join(map(repr, DATA_TASKS))} (or derive from a data module of diffkd.data, which declare it)"
        )
    return task


_PROTOCOL_BASES = {"Protocol", "Generic", "object"}


def protocol_members(protocol: type) -> dict[str, str]:
    """The public members a protocol declares, including inherited ones: ``{name: "attribute" | "method"}``."""
    members: dict[str, str] = {}
    for klass in reversed(protocol.__mro__):
        if klass.__name__ in _PROTOCOL_BASES and klass.__module__ in ("typing", "builtins", "typing_extensions"):
            continue
        for name in vars(klass).get("__annotations__", {}):
            if not name.startswith("_"):
                members[name] = "attribute"
        for name, value in vars(klass).items():
            if not name.startswith("_") and callable(value):
                members[name] = "method"
    return members


def _has_member(obj: object, name: str, kind: str) -> bool:
    try:
        value = inspect.getattr_static(obj, name)
    except AttributeError:
        return False
    if kind == "method":  # as typing's check: a method set to None is blocked
        return value is not None and (callable(value) or isinstance(value, staticmethod | classmethod))
    return True


def require_protocol(datamodule: object, protocol: type[P], role: str) -> P:
    """Return ``datamodule`` when it has every member of ``protocol``, else raise a ``TypeError`` naming them.

    The lookup is static (``inspect.getattr_static``): properties are not run, so no data set is touched.

    Args:
        datamodule: the object to check (typically ``trainer.datamodule``).
        protocol: :class:`DistillDataModule`, :class:`ClassificationData` or another protocol class.
        role: who needs it, for the message (``"ClassificationDistillation's datamodule"``).

    Raises:
        TypeError: ``datamodule`` is None or lacks members; the message names the protocol, the missing attributes
            and methods, and how to fix it.
    """
    name = f"{protocol.__module__}.{protocol.__qualname__}"
    if datamodule is None:
        raise TypeError(
            f"{role} must satisfy {name}, but there is no datamodule (got None): pass one to trainer.fit/validate "
            "(datamodule=...)"
        )
    members = protocol_members(protocol)
    missing = [(m, kind) for m, kind in members.items() if not _has_member(datamodule, m, kind)]
    if missing:
        attrs = [m for m, kind in missing if kind == "attribute"]
        methods = [f"{m}()" for m, kind in missing if kind == "method"]
        parts = ([f"attributes {', '.join(attrs)}"] if attrs else []) + (
            [f"methods {', '.join(methods)}"] if methods else []
        )
        raise TypeError(
            f"{role} must satisfy {name} (members: {', '.join(members)}), but {type(datamodule).__qualname__} "
            f"lacks {'; '.join(parts)}. Add them, or derive from diffkd.data.base.ClassificationDataModule, "
            "which provides every one of them."
        )
    return datamodule  # type: ignore[return-value]


@contextmanager
def preserved_rng_state() -> Iterator[None]:
    """Restore every global random state on exit: torch's CPU generator, the CUDA generators (when CUDA is
    initialised), Python's ``random`` and NumPy's legacy global generator.

    The CUDA generators are only saved when CUDA is already initialised: reading them would initialise CUDA, which
    breaks fork-based worker processes; a block that first initialises CUDA cannot have drawn from them before.
    """
    py_state = random.getstate()
    np_state = np.random.get_state()
    cpu_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
