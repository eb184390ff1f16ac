"""The loaders of every data module, written once: the loader options, the exactly resumable training loader, the
evaluation loaders, the training-split check and the models' dry-run ``example_batch``.

A data module derives from :class:`DataModuleBase` (classification: :class:`~diffkd.data.classification.
ClassificationDataModule`; segmentation: :class:`~diffkd.data.segmentation.SegmentationDataModule`; detection:
:class:`~diffkd.data.coco.COCODataModule`), builds ``train_set``/``val_set`` in its ``setup`` and plugs in only what
differs:

* :meth:`~DataModuleBase.collate_fn` — how samples become a batch (``default_collate``; COCO: two lists);
* :meth:`~DataModuleBase.size_fix` — what to change when a split's samples differ in size;
* :meth:`~DataModuleBase.train_batch_sampler` — a batch sampler of its own (COCO's aspect-ratio groups) instead of
  the shuffled fixed-size batches;
* :meth:`~DataModuleBase.train_location` — where the training split is, for the "no training batch" error;
* :meth:`~DataModuleBase.example_samples` — which samples make the dry-run batch (segmentation keeps one size).

Training batches resume exactly (:mod:`diffkd.data.resumable`: order from ``(seed, epoch)``, each sample's
augmentation from ``(seed, epoch, index)``, a run resumed mid-epoch starting after the batches it had trained) and
carry the samples' positions after ``enable_sample_index()`` (:mod:`diffkd.data.sample_index`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from diffkd.data.protocol import preserved_rng_state
from diffkd.data.resumable import ResumableDataLoader, SeededSamples, resume_position, seeded_train_loader
from diffkd.data.sample_index import SampleIndexCapability
from diffkd.data.usable import SameSizeCollate, SplitProblem, batch_problem, raise_problems, world_size

__all__ = ["DataModuleBase", "LoaderOptions"]


@dataclass(frozen=True)
class LoaderOptions:
    """The loader settings every data module takes (``data.<name>`` in the configs).

    Attributes:
        batch_size: per-device training batch; the global batch is ``batch_size × devices × num_nodes``.
        val_batch_size: per-device evaluation batch (``None``: ``batch_size``).
        num_workers: loader worker processes (0 loads in the main process).
        pin_memory: pin host memory for faster host-to-device copies.
        drop_last: drop the last incomplete training batch (keeps BatchNorm batches full).
    """

    batch_size: int
    val_batch_size: int | None
    num_workers: int
    pin_memory: bool
    drop_last: bool

    def __post_init__(self) -> None:
        for key in ("batch_size", "val_batch_size"):
            value = getattr(self, key)
            if value is not None and int(value) < 1:
                raise ValueError(f"data.{key} must be >= 1, got {value}")
        if int(self.num_workers) < 0:
            raise ValueError(f"data.num_workers must be >= 0 (0 loads in the main process), got {self.num_workers}")


class DataModuleBase(SampleIndexCapability, L.LightningDataModule):
    """A LightningDataModule whose loaders, resume position and dry-run batch come from here (see the module
    docstring for what a subclass plugs in). Satisfies :class:`~diffkd.data.protocol.DistillDataModule` and
    :class:`~diffkd.data.protocol.SampleIndexData`.

    Args:
        options: the loader settings (:class:`LoaderOptions`); kept as the attributes ``batch_size``,
            ``val_batch_size``, ``num_workers``, ``pin_memory`` and ``drop_last``.
    """

    builds_sample_index = True
    #: The splits :meth:`example_batch` takes.
    example_splits: ClassVar[tuple[str, ...]] = ("train", "val")
    #: Seed of the augmentation draws of :meth:`example_batch` (the same batch every call); ``None``: the current
    #: global random state, restored afterwards.
    example_seed: int | None = None

    def __init__(self, options: LoaderOptions) -> None:
        super().__init__()
        self.batch_size = int(options.batch_size)
        self.val_batch_size = int(options.val_batch_size or options.batch_size)
        self.num_workers = int(options.num_workers)
        self.pin_memory = bool(options.pin_memory)
        self.drop_last = bool(options.drop_last)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    # ------------------------------------------------------------------------------------- what subclasses plug in
    def collate_fn(self) -> Callable[[list[Any]], Any]:
        """How the loaders (and :meth:`example_batch`) turn a list of samples into a batch."""
        return default_collate

    def size_fix(self, split: str, example: bool) -> str:
        """What to change when ``split``'s samples differ in size (the end of the mixed-size error)."""
        key = "data.batch_size" if split == "train" else "data.val_batch_size"
        return f"make the {split} samples one size, or set {key}=1"

    def train_batch_sampler(self, size: int) -> Sampler[list[int]] | None:
        """A batch sampler of :class:`~diffkd.data.resumable.SeededSamples` codes ``epoch × size + index`` for the
        training loader, or ``None`` (the default): shuffled batches of ``batch_size``, the last incomplete one
        dropped with ``drop_last``."""
        return None

    def train_seed(self) -> int | None:
        """The seed of the training order and augmentation; ``None``: Lightning's (``PL_GLOBAL_SEED``)."""
        return None

    def train_location(self) -> str:
        """Where the training split is, for :meth:`train_batch_problem`."""
        return str(getattr(self, "train_dir", None) or getattr(self, "data_dir", ""))

    def empty_split_name(self) -> str:
        """The data set's name in :class:`~diffkd.data.usable.EmptySplitError`."""
        return type(self).__name__

    def example_samples(self, dataset: Dataset, size: int, train: bool) -> list[Any]:
        """The samples of :meth:`example_batch`: the first ``size``, fetched as the loader fetches a batch (one
        ``__getitems__`` call where the data set augments whole batches)."""
        fetch = getattr(dataset, "__getitems__", None)
        if callable(fetch):
            return fetch(list(range(size)))
        return [dataset[i] for i in range(size)]

    # ------------------------------------------------------------------------------------------------ collation
    def checked_collate(self, split: str, batch_size: int, example: bool = False) -> Callable[[list[Any]], Any]:
        """:meth:`collate_fn`, raising :class:`~diffkd.data.usable.MixedSizeError` (the sizes, the split,
        :meth:`size_fix`) instead of torch's bare "stack expects each tensor to be equal size" when the samples
        differ in size. ``example``: for :meth:`example_batch` (the models' dry run), not a loader."""
        key = "data.batch_size" if split == "train" else "data.val_batch_size"
        batch = f"the models' dry-run example batch of {batch_size}" if example else f"{key}={batch_size}"
        fix = self.size_fix(split, example)
        return SameSizeCollate(self.collate_fn(), "train" if split == "train" else "val", batch, fix)

    # -------------------------------------------------------------------------------------------------- loaders
    def _loader(self, dataset: Dataset, batch_size: int, train: bool) -> DataLoader:
        """The loader of ``dataset``: evaluation in order; training exactly resumable, with the samples' positions
        after :meth:`enable_sample_index`."""
        collate = self.checked_collate("train" if train else "val", batch_size)
        workers = {
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory,
            "persistent_workers": self.num_workers > 0,
        }
        if not train:
            return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate, **workers)
        dataset, collate = self.indexed_train_set(dataset), self.indexed_collate(collate)
        batches = self.train_batch_sampler(len(dataset))  # type: ignore[arg-type]
        if batches is None:
            return seeded_train_loader(
                dataset,
                batch_size=batch_size,
                position_fn=self._resume_position,
                drop_last=self.drop_last,
                collate_fn=collate,
                **workers,
            )
        return ResumableDataLoader(
            SeededSamples(dataset, seed=self.train_seed()),
            batch_sampler=batches,
            collate_fn=collate,
            position_fn=self._resume_position,
            **workers,
        )

    def _resume_position(self) -> tuple[int, int]:
        return resume_position(getattr(self, "trainer", None))

    def _resume_epoch(self) -> int:
        return self._resume_position()[0]

    def train_batch_problem(self) -> SplitProblem | None:
        """Why the training split gives no batch on this process (``drop_last`` and fewer samples than
        ``batch_size``, where Lightning would skip training with a warning), or None. ``python -m diffkd.data.check``
        reports it; :meth:`train_dataloader` raises it."""
        self.setup("fit")
        return batch_problem(
            "train", self.train_location(), len(self.train_set), self.batch_size, self.drop_last, world_size(self)
        )

    def require_a_train_batch(self) -> None:
        """Raise :class:`~diffkd.data.usable.EmptySplitError` for :meth:`train_batch_problem`."""
        raise_problems(self.empty_split_name(), [self.train_batch_problem()])

    def train_dataloader(self) -> Any:
        self.setup("fit")
        self.require_a_train_batch()
        return self._loader(self.train_set, self.batch_size, train=True)

    def val_dataloader(self) -> Any:
        self.setup("validate")
        return self._loader(self.val_set, self.val_batch_size, train=False)

    def test_dataloader(self) -> Any:
        return self.val_dataloader()

    # ---------------------------------------------------------------------------------------------- dry run
    def check_example_request(self, size: int, split: str, available: int | None = None) -> None:
        """Raise ``ValueError`` for a split :meth:`example_batch` does not take, or a size the split cannot give."""
        if split not in self.example_splits:
            *rest, last = (repr(s) for s in self.example_splits)
            choices = f"{', '.join(rest)} or {last}" if rest else last
            raise ValueError(f"example_batch(split={split!r}): choose {choices}")
        if available is not None and not 1 <= size <= available:
            raise ValueError(
                f"example_batch size must be in 1..{available}: the {split} split has {available} samples, got "
                f"size={size}"
            )

    def example_batch(self, size: int = 2, split: str = "train") -> Any:
        """A real batch of the first ``size`` samples of ``split`` (``"train"``: through the training transform,
        ``"val"``: the evaluation transform), collated as that split's loader does, on the CPU.

        Sets up the data sets when needed. Every global random state (torch CPU and CUDA, Python, NumPy) is the same
        afterwards as before; with :attr:`example_seed` the draws come from that seed, so the batch is the same
        every call. After :meth:`enable_sample_index` a training batch ends with the positions ``0 … size-1``.

        Returns:
            what the split's loader yields: classification ``(images (size, C, S, S) float32, targets (size,)
            int64)``; segmentation ``(images, labels (size, H, W) int64)``; detection ``(images, targets)`` lists.
        """
        self.check_example_request(size, split)
        train = split == "train"
        with preserved_rng_state():
            self.setup("fit" if train else "validate")
            dataset = self.train_set if train else self.val_set
            self.check_example_request(size, split, len(dataset))
            collate = self.checked_collate(split, size, example=True)
            if train:
                dataset, collate = self.indexed_train_set(dataset), self.indexed_collate(collate)
            if self.example_seed is not None:
                torch.default_generator.manual_seed(self.example_seed)  # CPU only: torch.manual_seed seeds CUDA too
            return collate(self.example_samples(dataset, size, train))
