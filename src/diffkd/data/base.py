"""The shared LightningDataModule for image classification: data sets in, data loaders out.

A subclass only says how to build its data sets (``build_datasets``) and what it holds (``num_classes``,
``in_chans``, ``image_size``, ``mean``, ``std``); batching, workers and shuffling live here once.
Batches are ``(images, targets)`` with images (B, C, H, W) float and targets (B,) int64.
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from diffkd.data.device_loader import DeviceTensorLoader

__all__ = ["ClassificationDataModule", "DataNotFoundError", "PreloadableDataModule"]

log = logging.getLogger(__name__)


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


class PreloadableDataModule(ClassificationDataModule):
    """A ``ClassificationDataModule`` whose data sets can live on the device as uint8 tensors (``gpu_preload``).

    With ``gpu_preload=True``, ``setup`` moves both splits to the trainer's root device once, as uint8
    (N, C, H, W) images and int64 (N,) targets, and ``train_dataloader``/``val_dataloader`` return
    :class:`~diffkd.data.device_loader.DeviceTensorLoader` s: crop, flip and normalisation run on the device per
    batch, with no worker processes (``num_workers`` and ``pin_memory`` are ignored, with a log line). Without a
    trainer (a standalone ``setup()``), the device is the CPU.

    The device loaders shard the data themselves in data-parallel runs (rank and world size from the trainer, the
    ``DistributedSampler`` arithmetic: equal, disjoint shards); Lightning does not touch a loader that is not a
    ``DataLoader``, so ``trainer.use_distributed_sampler`` needs no change. Batches come out in the
    LightningModule's memory format (its ``channels_last`` attribute), so it needs no conversion of its own.

    A subclass provides :meth:`preload_tensors` (the uint8 tensors of a split, from its built data sets) and
    :meth:`train_augmentation` (crop padding and flip of its CPU training transform).

    ``fused_normalize`` (class attribute): normalise as the CPU path of the subclass does (see
    :class:`~diffkd.data.device_loader.CropFlipNormalize`), so that device and CPU batches are the same numbers.

    Args:
        gpu_preload: keep the data set on the device and augment there (see above).
        others: see ``ClassificationDataModule``.
    """

    fused_normalize: bool = False  # False: torchvision's ToTensor + Normalize order of operations

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 64,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        pin_memory: bool = False,
        drop_last: bool = True,
        gpu_preload: bool = False,
    ) -> None:
        super().__init__(data_dir, batch_size, val_batch_size, num_workers, pin_memory, drop_last)
        self.gpu_preload = bool(gpu_preload)
        self.device_data: dict[str, tuple[Tensor, Tensor]] = {}

    @abstractmethod
    def preload_tensors(self, split: str) -> tuple[Tensor, Tensor]:
        """Split ``"train"`` or ``"val"`` of the built data sets as CPU tensors: images uint8 (N, C, H, W),
        targets int64 (N,)."""

    @abstractmethod
    def train_augmentation(self) -> tuple[int, bool]:
        """``(padding, flip)`` of the training transform: random-crop zero padding in pixels, horizontal flip."""

    def preload_device(self) -> torch.device:
        """Where the data go: the trainer's root device when attached, else the CPU."""
        trainer = self.trainer
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if self.gpu_preload:
            self._preload(self.preload_device())

    def _preload(self, device: torch.device) -> None:
        """Move both splits to ``device`` as uint8, once (again only if the device changed)."""
        if self.device_data and all(x.device == device for x, _ in self.device_data.values()):
            return
        data = {}
        for split in ("train", "val"):
            if split in self.device_data:  # moved before, to another device
                images, targets = self.device_data[split]
            else:
                images, targets = self.preload_tensors(split)
            if images.dtype != torch.uint8 or images.ndim != 4:
                raise TypeError(f"preload_tensors({split!r}) gave {images.dtype} {tuple(images.shape)}")
            data[split] = (images.to(device).contiguous(), targets.to(device=device, dtype=torch.long))
        self.device_data = data
        mb = sum(x.numel() + 8 * y.numel() for x, y in data.values()) / 2**20
        ignored = f"; num_workers={self.num_workers} and pin_memory ignored" if self.num_workers else ""
        log.info(
            "%s: gpu_preload: %d train / %d val images on %s as uint8 (%.1f MB), augmented there%s",
            type(self).__name__,
            len(data["train"][1]),
            len(data["val"][1]),
            device,
            mb,
            ignored,
        )

    def device_loader(self, split: str, batch_size: int, train: bool) -> DeviceTensorLoader:
        """A loader over the preloaded ``split``, sharded for the attached trainer (rank, world size)."""
        self._preload(self.preload_device())
        images, targets = self.device_data[split]
        padding, flip = self.train_augmentation() if train else (0, False)
        trainer = self.trainer
        dist = (trainer.distributed_sampler_kwargs if trainer is not None else None) or {}
        module = trainer.lightning_module if trainer is not None else None
        return DeviceTensorLoader(
            images,
            targets,
            batch_size,
            self.mean,
            self.std,
            padding=padding,
            flip=flip,
            shuffle=train,
            drop_last=train and self.drop_last,
            rank=dist.get("rank", 0),
            world_size=dist.get("num_replicas", 1),
            channels_last=bool(getattr(module, "channels_last", False)),
            fused_normalize=self.fused_normalize,
        )

    def train_dataloader(self) -> DataLoader | DeviceTensorLoader:
        if not self.gpu_preload:
            return super().train_dataloader()
        self.setup("fit")
        return self.device_loader("train", self.batch_size, train=True)

    def val_dataloader(self) -> DataLoader | DeviceTensorLoader:
        if not self.gpu_preload:
            return super().val_dataloader()
        self.setup("validate")
        return self.device_loader("val", self.val_batch_size, train=False)
