"""Training loaders whose every random draw is a function of where the run is, so that a run killed at any point and
resumed from its newest checkpoint sees exactly the batches the uninterrupted run saw — on every rank, with any
number of (persistent) workers.

- :class:`EpochShuffleSampler` shuffles with a generator seeded from ``(seed, epoch)`` (the epoch read from the
  trainer's progress when the epoch's iterator starts), not from the global generator.
- :class:`SeededSamples` draws each sample's augmentation from ``(seed, epoch, index)``: the sampler hands it
  ``epoch × N + index``, so neither the worker that loads a sample nor what that worker loaded before matters.
- :class:`ResumableDataLoader` resumes mid-epoch: when the trainer restarts inside an epoch it skips, at the index
  level (nothing is loaded), the batches the checkpointed run had already trained on. It declares
  ``state_dict``/``load_state_dict`` (Lightning's resumable-loader protocol); its state is Lightning's own progress.
- :func:`seeded_train_loader` puts the three together (classification, segmentation);
  :class:`EpochCodedBatchSampler` is the batch-sampler form of the epoch codes, for loaders whose batches a batch
  sampler forms (COCO's aspect-ratio groups).

Under DDP Lightning wraps the sampler in a ``DistributedSamplerWrapper``: every rank computes the same epoch
permutation and takes its shard, and the skip applies to the shard's batches.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from diffkd.utils.seeding import lightning_seed, mix_seed

__all__ = [
    "EpochCodedBatchSampler",
    "EpochShuffleSampler",
    "ResumableDataLoader",
    "SeededSamples",
    "resume_position",
    "seeded_train_loader",
]


def resume_position(trainer: Any) -> tuple[int, int]:
    """``(epoch, batches already trained in it)`` for the train iterator being created now.

    Read from Lightning's fit-loop progress (restored from the checkpoint before the first iterator is made): an
    epoch that started and did not finish is resumed after its ``processed`` batches; otherwise the next epoch
    starts from its first batch.
    """
    if trainer is None or getattr(trainer, "fit_loop", None) is None:
        return 0, 0
    epochs = trainer.fit_loop.epoch_progress.current
    batches = trainer.fit_loop.epoch_loop.batch_progress.current
    if epochs.started > epochs.processed:  # inside an epoch: a fresh one has processed 0 batches
        return epochs.processed, batches.processed
    return epochs.processed, 0


class EpochShuffleSampler(Sampler[int]):
    """Indices ``epoch × N + i`` for a permutation of ``range(N)`` seeded from ``(seed, epoch)`` (or in order).

    Args:
        size: N, the data set's length.
        shuffle: permute (training) or keep the order.
        seed: the run's seed (default: ``PL_GLOBAL_SEED``, as Lightning's samplers).
        epoch_fn: the current epoch, read when iteration starts (the datamodule passes the trainer's).
    """

    def __init__(
        self, size: int, shuffle: bool = True, seed: int | None = None, epoch_fn: Callable[[], int] | None = None
    ) -> None:
        self.size = int(size)
        self.shuffle = shuffle
        self.seed = lightning_seed() if seed is None else int(seed)
        self.epoch_fn = epoch_fn or (lambda: 0)

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        epoch = int(self.epoch_fn())
        if self.shuffle:
            g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 0xDA7A))
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = range(self.size)
        base = epoch * self.size
        return iter([base + i for i in order])


class SeededSamples(Dataset):
    """``dataset[code % N]`` with torch's, Python's and NumPy's global generators seeded from
    ``(seed, code // N, code % N)`` — (seed, epoch, index) — before the sample's transforms run.

    In a worker process the global generators are the worker's own; in the main process (``num_workers=0``) the
    training step reseeds them before it draws anything (``DistillationModule.reseed_every_step``).
    """

    def __init__(self, dataset: Dataset, seed: int | None = None) -> None:
        self.dataset = dataset
        self.size = len(dataset)  # type: ignore[arg-type]
        self.seed = lightning_seed() if seed is None else int(seed)

    def __len__(self) -> int:
        return self.size

    def __getattr__(self, name: str) -> Any:  # targets, classes, ... of the wrapped data set
        if name.startswith("__") or name in ("dataset", "size", "seed"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def _seed(self, *words: int) -> None:
        s = mix_seed(self.seed, *words, 0xA06)
        torch.default_generator.manual_seed(s)
        random.seed(s)
        np.random.seed(s % 2**32)

    def __getitem__(self, code: int) -> Any:
        epoch, index = divmod(int(code), self.size)
        self._seed(epoch, index)
        return self.dataset[index]

    def __getitems__(self, codes: list[int]) -> list[Any]:
        """A whole batch: one seed from (seed, epoch, its first index, its size) where the data set augments
        batches in one vectorised draw (``__getitems__``; the batch's members are fixed by the sampler), else one
        seed per sample."""
        fetch = getattr(self.dataset, "__getitems__", None)
        if fetch is None:
            return [self[c] for c in codes]
        epoch, first = divmod(int(codes[0]), self.size)
        self._seed(epoch, first, len(codes))
        return fetch([int(c) % self.size for c in codes])


class _SkipBatches:
    """A batch sampler that, each time iteration starts, leaves out the batches the resumed epoch already trained
    (index lists only: nothing is loaded). Read at every start, so a persistent worker iterator skips only once."""

    def __init__(self, batch_sampler: Any, position_fn: Callable[[], tuple[int, int]]) -> None:
        self.batch_sampler, self.position_fn = batch_sampler, position_fn

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[list[int]]:
        _, skip = self.position_fn()
        it = iter(self.batch_sampler)
        for _ in range(skip):
            if next(it, None) is None:
                break
        return it


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` that, when the trainer resumes inside an epoch, starts after the batches already trained.

    ``position_fn`` returns ``(epoch, batches to skip)`` (:func:`resume_position` of the attached trainer). Its
    length stays the epoch's full length: Lightning counts the skipped batches as done.
    """

    def __init__(self, *args: Any, position_fn: Callable[[], tuple[int, int]] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.position_fn = position_fn

    @property
    def _index_sampler(self) -> Any:
        base = super()._index_sampler
        if self.position_fn is None or not self._auto_collation:
            return base
        return _SkipBatches(base, self.position_fn)

    def __len__(self) -> int:
        return len(DataLoader._index_sampler.fget(self))  # type: ignore[attr-defined]

    def state_dict(self) -> dict[str, Any]:
        return {}  # the position is Lightning's own fit-loop progress, restored with the checkpoint

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


class EpochCodedBatchSampler(BatchSampler):
    """``BatchSampler`` whose batches hold :class:`SeededSamples` codes ``epoch × size + index`` instead of indices.

    For loaders that form batches with a batch sampler over a plain index sampler (a ``DistributedSampler``, which
    Lightning may swap for its own). With ``epoch_fn`` (the trainer's epoch) each pass first hands that epoch to
    ``sampler.set_epoch``, so order and codes follow the trainer's progress whenever the iterator is made — a resumed
    run makes it before Lightning's own ``set_epoch`` call. Without it the epoch is the sampler's ``epoch`` (a
    ``DistributedSampler``'s) or the one given to :meth:`set_epoch`. Subclasses form batches in :meth:`batches` and
    leave the coding to ``__iter__``.

    Args:
        sampler: dataset indices in ``[0, size)``.
        batch_size, drop_last: as ``BatchSampler``.
        size: N, the data set's length (not the shard's: under data parallelism ``len(sampler)`` is a shard).
        codes: ``False`` yields the plain indices (a data set not wrapped in ``SeededSamples``).
        epoch_fn: the current epoch, read when a pass starts.
    """

    def __init__(
        self,
        sampler: Sampler[int],
        batch_size: int,
        drop_last: bool,
        size: int,
        codes: bool = True,
        epoch_fn: Callable[[], int] | None = None,
    ) -> None:
        super().__init__(sampler, batch_size, drop_last)
        self.size = int(size)
        self.codes = codes
        self.epoch_fn = epoch_fn
        self.epoch = 0

    def batches(self) -> Iterator[list[int]]:
        """Batches of dataset indices (``BatchSampler``'s own by default)."""
        return super().__iter__()

    def __iter__(self) -> Iterator[list[int]]:
        if self.epoch_fn is not None:
            self.set_epoch(int(self.epoch_fn()))
        epoch = getattr(self.sampler, "epoch", self.epoch)
        base = int(epoch) * self.size if self.codes else 0
        for batch in self.batches():
            yield [base + int(i) for i in batch]

    def set_epoch(self, epoch: int) -> None:
        """Pass ``epoch`` on to ``sampler`` (a ``DistributedSampler`` reshuffles), and code the coming pass with it
        when the sampler keeps no epoch of its own."""
        self.epoch = int(epoch)
        set_epoch = getattr(self.sampler, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)


def seeded_train_loader(
    dataset: Dataset,
    batch_size: int,
    position_fn: Callable[[], tuple[int, int]],
    drop_last: bool = False,
    **loader_kwargs: Any,
) -> ResumableDataLoader:
    """The exactly resumable training loader: order from ``(seed, epoch)`` (:class:`EpochShuffleSampler`), each
    sample's augmentation from ``(seed, epoch, index)`` (:class:`SeededSamples`), a resumed epoch starting after the
    batches it had trained (:class:`ResumableDataLoader`) — whatever the ranks and workers.

    Args:
        dataset: the training set (its random transforms draw from the global generators).
        batch_size, drop_last: as ``DataLoader``.
        position_fn: ``(epoch, batches already trained in it)``, usually :func:`resume_position` of the trainer.
        loader_kwargs: the rest of the ``DataLoader`` arguments (workers, collate_fn, pin_memory, ...).
    """
    sampler = EpochShuffleSampler(len(dataset), shuffle=True, epoch_fn=lambda: position_fn()[0])  # type: ignore[arg-type]
    return ResumableDataLoader(
        SeededSamples(dataset),
        batch_size=batch_size,
        sampler=sampler,
        drop_last=drop_last,
        position_fn=position_fn,
        **loader_kwargs,
    )
