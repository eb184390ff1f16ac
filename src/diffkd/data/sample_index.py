"""Sample indices: each training batch can carry the dataset positions of its samples (CRD's memory bank needs them).

One implementation for every data module:

* :class:`IndexedSamples` wraps a data set so that item ``i`` is ``(*dataset[i], i)`` — the position of the sample
  actually returned (with ``data.skip_bad_images`` a bad sample ``i`` is replaced by the next readable one ``j``,
  and the index is then ``j``, the sample's own position). It sits *inside* the seeded training wrapper
  (:class:`~diffkd.data.resumable.SeededSamples`), which hands it ``code % N``: the index is the same for the same
  sample in every epoch, after a resume and on every rank.
* :class:`IndexedCollate` collates the samples without their index exactly as the loader would, and appends the
  indices: a batch is ``(*batch, index)`` with ``index`` int64 (B,).
* :class:`SampleIndexCapability` is the data-module side: :meth:`~SampleIndexCapability.enable_sample_index`,
  :meth:`~SampleIndexCapability.num_train_samples`, :meth:`~SampleIndexCapability.train_labels` (see
  :class:`~diffkd.data.protocol.SampleIndexData`).

The device-resident loader (:class:`~diffkd.data.device_loader.DeviceTensorLoader`) has the same option
(``with_index``): its batches already gather by index.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["IndexedCollate", "IndexedSamples", "NoPerSampleClassError", "SampleIndexCapability", "with_sample_index"]


class IndexedSamples(Dataset):
    """``dataset`` whose item ``i`` is ``(*dataset[i], j)``: the sample followed by its position ``j`` (``i``, or
    the replacement's position when the data set replaces unreadable samples: its ``indexed_item(i) -> (j,
    sample)``). Other attributes are the wrapped data set's."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        dataset = self.__dict__.get("dataset")  # absent while unpickling
        if dataset is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(dataset, name)

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        indexed_item = getattr(self.dataset, "indexed_item", None)
        position, sample = indexed_item(int(index)) if callable(indexed_item) else (int(index), self.dataset[index])
        return (*sample, position)


class _IndexedBatchSamples(IndexedSamples):
    """:class:`IndexedSamples` of a data set that augments whole batches (``__getitems__``), kept batched: the
    seeded wrapper draws one seed per batch only when the data set has ``__getitems__``, so the wrapper has it
    exactly when the data set does."""

    def __getitems__(self, indices: list[int]) -> list[tuple[Any, ...]]:
        samples = self.dataset.__getitems__(indices)  # type: ignore[attr-defined]
        return [(*sample, int(i)) for sample, i in zip(samples, indices, strict=True)]


def with_sample_index(dataset: Dataset) -> IndexedSamples:
    """``dataset`` with each item followed by its position (see :class:`IndexedSamples`)."""
    batched = callable(getattr(dataset, "__getitems__", None))
    return _IndexedBatchSamples(dataset) if batched else IndexedSamples(dataset)


class IndexedCollate:
    """``collate`` of the samples without their last element, followed by those last elements as int64 (B,).

    The batch is ``(*collate(samples), index)``: its other elements are exactly what ``collate`` gives the plain
    samples (errors included: a :class:`~diffkd.data.usable.MixedSizeError` still names the image or the label).
    """

    def __init__(self, collate: Callable[[list[Any]], Any]) -> None:
        self.collate = collate

    def __call__(self, samples: list[Sequence[Any]]) -> tuple[Any, ...]:
        index = torch.tensor([int(s[-1]) for s in samples], dtype=torch.int64)
        batch = self.collate([tuple(s[:-1]) for s in samples])
        return (*batch, index)


class NoPerSampleClassError(TypeError):
    """``train_labels()`` of a data module whose samples have no single class (detection, segmentation)."""


class SampleIndexCapability:
    """Sample indices for a data module (see :class:`~diffkd.data.protocol.SampleIndexData`).

    A data module that builds its training loaders through :meth:`indexed_train_set` and
    :meth:`indexed_collate` (every one in :mod:`diffkd.data` does) sets ``builds_sample_index = True`` in the class
    that defines ``train_dataloader`` and ``example_batch``; a subclass that overrides either without declaring it
    makes :meth:`enable_sample_index` raise, since its batches would come without indices.
    """

    #: Set by :meth:`enable_sample_index`: training batches end with the samples' positions.
    sample_index: bool = False
    #: Declared in the class body that defines ``train_dataloader``/``example_batch`` and adds the indices.
    builds_sample_index: bool = False
    #: What to use instead of :meth:`train_labels` when the samples have no class (a data module's own words).
    no_class_hint: str = "a method that needs no per-sample class"
    train_set: Dataset | None

    def enable_sample_index(self) -> None:
        """From now on every training batch (loaders and ``example_batch(split="train")``) ends with a (B,) int64
        tensor of the samples' positions in the training set, 0..N-1; validation and test loaders are unchanged.

        Raises:
            TypeError: a subclass builds its own training loader (``train_dataloader`` or ``example_batch``
                overridden without ``builds_sample_index = True``), so its batches would have no index.
        """
        for name in ("train_dataloader", "example_batch"):
            owner = next((k for k in type(self).__mro__ if name in vars(k)), None)
            if owner is not None and not vars(owner).get("builds_sample_index", False):
                raise TypeError(
                    f"{type(self).__qualname__} cannot give sample indices: {owner.__qualname__}.{name} builds its "
                    "own batches, which would come without them. Build the training loader with the base class's "
                    "loader (self._loader(dataset, batch_size, train=True), which appends them) and set "
                    f"builds_sample_index = True in {owner.__qualname__}, or use a method that needs no indices."
                )
        self.sample_index = True

    def num_train_samples(self) -> int:
        """N, the number of samples of the training set (sets it up when needed)."""
        self.setup("fit")  # type: ignore[attr-defined]
        return len(self.train_set)  # type: ignore[arg-type]

    def train_labels(self) -> Tensor:
        """int64 (N,): the class of each training sample, in index order, read without decoding any image.

        Raises:
            NoPerSampleClassError: the samples have no single class (this default).
        """
        raise NoPerSampleClassError(
            f"{type(self).__qualname__} has no per-image class (its samples are {self.sample_kind()}): "
            f"train_labels() exists for classification data; use {self.no_class_hint}."
        )

    def sample_kind(self) -> str:
        """What one sample is, for messages."""
        return {"detection": "images with boxes", "segmentation": "images with per-pixel labels"}.get(
            getattr(self, "task", ""), "not single-class images"
        )

    def indexed_train_set(self, dataset: Dataset) -> Dataset:
        """The training set as the training loader reads it: with positions when :attr:`sample_index` is on."""
        return with_sample_index(dataset) if self.sample_index else dataset

    def indexed_collate(self, collate: Callable[[list[Any]], Any]) -> Callable[[list[Any]], Any]:
        """The training collate: ``collate`` followed by the positions when :attr:`sample_index` is on."""
        return IndexedCollate(collate) if self.sample_index else collate
