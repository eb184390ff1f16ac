"""The shared LightningDataModule for image classification: data sets in, data loaders out.

A subclass only says how to build its data sets (``build_datasets``) and what it holds (``num_classes``,
``in_chans``, ``image_size``, ``mean``, ``std``); batching, workers and shuffling live here once.
Batches are ``(images, targets)`` with images (B, C, H, W) float and targets (B,) int64.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader, Dataset

__all__ = ["ClassificationDataModule", "DataNotFoundError"]


class DataNotFoundError(FileNotFoundError):
    """A data set's files are missing: the message says what was expected, where we looked, and how to fix it.

    It is a ``FileNotFoundError``, so ``except FileNotFoundError`` catches it.

    Args:
        dataset: human name of the data set (``"CIFAR-100"``).
        searched: every place that was looked in, in search order.
        layout: the expected on-disk layout, one path pattern per line.
        remedies: ways to get the data (a download URL, a config switch, a package to install).
    """

    def __init__(
        self,
        dataset: str,
        searched: Sequence[str | Path],
        layout: str | Sequence[str],
        remedies: Sequence[str] = (),
    ) -> None:
        self.dataset = dataset
        self.searched = [str(p) for p in searched]
        self.layout = [layout] if isinstance(layout, str) else list(layout)
        self.remedies = list(remedies)
        lines = [f"{dataset} not found.", "Looked in (in this order):"]
        lines += [f"  - {p}" for p in self.searched]
        lines += ["Expected layout:"] + [f"  {row}" for row in self.layout]
        if self.remedies:
            lines += ["To get it:"] + [f"  - {r}" for r in self.remedies]
        super().__init__("\n".join(lines))

    def __reduce__(self):  # keep it picklable (worker processes, DDP spawn) despite the custom __init__
        return (type(self), (self.dataset, self.searched, self.layout, self.remedies))


class ClassificationDataModule(L.LightningDataModule):
    """Base for classification data.

    Args:
        data_dir: folder holding (or receiving) the data set.
        batch_size: per-device training batch; the global batch is ``batch_size × devices × num_nodes``.
        val_batch_size: per-device evaluation batch (default: ``batch_size``).
        num_workers: loader worker processes (0 loads in the main process).
        pin_memory: pin host memory for faster host-to-device copies.
        drop_last: drop the last incomplete training batch (keeps BatchNorm batches full).
    """

    num_classes: int
    in_chans: int = 3
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 64,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        pin_memory: bool = False,
        drop_last: bool = True,
    ) -> None:
        super().__init__()
        self.data_dir = str(data_dir)
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.drop_last = drop_last
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    @abstractmethod
    def build_datasets(self) -> tuple[Dataset, Dataset]:
        """Return ``(train_set, val_set)``; raise a clear error when the files are missing."""

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None or self.val_set is None:
            self.train_set, self.val_set = self.build_datasets()

    def _loader(self, dataset: Dataset, batch_size: int, train: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=train,
            drop_last=train and self.drop_last,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        return self._loader(self.train_set, self.batch_size, train=True)

    def val_dataloader(self) -> DataLoader:
        self.setup("validate")
        return self._loader(self.val_set, self.val_batch_size, train=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
