"""The shared LightningDataModule for image classification: data sets in, data loaders out.

A subclass only says how to build its data sets (``build_datasets``) and what it holds (``num_classes``,
``in_chans``, ``image_size``, ``mean``, ``std``); batching, workers, shuffling, the configured transforms
(``train_transform``/``val_transform``, see :mod:`diffkd.data.transforms`) and the members of the task protocols
(:class:`~diffkd.data.protocol.ClassificationData`: ``example_batch``, ``batch_transform``,
``loss_label_smoothing``) live here once.
Batches are ``(images, targets)`` with images (B, C, H, W) float and targets (B,) int64.
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate

from diffkd.data.device_loader import DeviceTensorLoader
from diffkd.data.protocol import preserved_rng_state
from diffkd.data.transforms import TransformSpec, build_transform, check_transform_output, describe_spec

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


def _check_split(split: str) -> None:
    if split not in ("train", "val"):
        raise ValueError(f"example_batch(split={split!r}): choose 'train' or 'val'")


class ClassificationDataModule(L.LightningDataModule):
    """Base for classification data; satisfies :class:`~diffkd.data.protocol.ClassificationData`.

    Defaults of the protocol members: ``loss_label_smoothing = 0.0``, ``batch_transform()`` → ``None`` (no
    on-device batch transform), ``example_batch(size)`` → the first ``size`` training samples through the train
    transform and :meth:`collate_fn`, global random states untouched.

    Args:
        data_dir: folder holding (or receiving) the data set.
        batch_size: per-device training batch; the global batch is ``batch_size × devices × num_nodes``.
        val_batch_size: per-device evaluation batch (default: ``batch_size``).
        num_workers: loader worker processes (0 loads in the main process).
        pin_memory: pin host memory for faster host-to-device copies.
        drop_last: drop the last incomplete training batch (keeps BatchNorm batches full).
        train_transform, val_transform: the transforms from the configuration (None: the data set's default);
            a mapping of ``timm.data.create_transform`` arguments or a list of torchvision transforms, see
            :mod:`diffkd.data.transforms`. A subclass builds them with :meth:`make_transform`.
    """

    num_classes: int
    in_chans: int = 3
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    loss_label_smoothing: float = 0.0
    #: The config key that sets ``image_size`` (named in transform errors); None where the size is fixed.
    image_size_key: str | None = "data.image_size"

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 64,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        pin_memory: bool = False,
        drop_last: bool = True,
        *,
        train_transform: TransformSpec = None,
        val_transform: TransformSpec = None,
    ) -> None:
        super().__init__()
        self.data_dir = str(data_dir)
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.drop_last = drop_last
        self.transform_specs: dict[str, TransformSpec] = {"train": train_transform, "val": val_transform}
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    @abstractmethod
    def build_datasets(self) -> tuple[Dataset, Dataset]:
        """Return ``(train_set, val_set)``; raise a clear error when the files are missing."""

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None or self.val_set is None:
            self.train_set, self.val_set = self.build_datasets()
            self.check_transforms()

    # ------------------------------------------------------------------------------------------ transforms
    def custom_transform(self, split: Literal["train", "val"]) -> bool:
        """Whether ``split``'s transform comes from the configuration (not the data set's default)."""
        return self.transform_specs[split] is not None

    def configured_transform(self, split: Literal["train", "val"]) -> Callable | None:
        """``split``'s transform built from ``data.<split>_transform``, or None when that is null.

        It maps a PIL image to float32 (C, S, S); timm's ``input_size``, ``is_training``, ``mean``, ``std`` and the
        appended ``Normalize`` take this data set's values (see :mod:`diffkd.data.transforms`).
        """
        spec = self.transform_specs[split]
        if spec is None:
            return None
        key = f"data.{split}_transform"
        transform = build_transform(
            spec, key=key, is_training=split == "train", image_size=self.image_size, mean=self.mean, std=self.std
        )
        log.info("%s: %s = %s", type(self).__name__, key, describe_spec(spec))
        return transform

    def make_transform(self, split: Literal["train", "val"], default: Callable[[], Callable]) -> Callable:
        """``split``'s transform: the configured one (:meth:`configured_transform`), else ``default()``."""
        configured = self.configured_transform(split)
        return default() if configured is None else configured

    def check_transforms(self) -> None:
        """Try each configured transform on the first image of its split (random states preserved); raise with
        the key and the fix when it does not give float32 (``in_chans``, ``image_size``, ``image_size``)."""
        for split, dataset in (("train", self.train_set), ("val", self.val_set)):
            if not self.custom_transform(split) or dataset is None or len(dataset) == 0:
                continue
            key = f"data.{split}_transform"
            try:
                with preserved_rng_state():
                    image = dataset[0][0]
            except Exception as err:  # the transform's own error says what; add which key, and the usual cause
                what = f"{type(err).__name__}: {str(err).rstrip('.')}"
                raise ValueError(
                    f"{key} fails on the first {split} image: {what}. (Normalize needs a float tensor: leave ToImage, "
                    "ToDtype and Normalize out of the list to have them appended, or put ToImage + ToDtype(float32, "
                    "scale=True) before your Normalize.)"
                ) from err
            check_transform_output(
                image,
                key=key,
                in_chans=self.in_chans,
                image_size=self.image_size,
                size_key=self.image_size_key,
            )

    # --------------------------------------------------------------------------------- protocol members
    def batch_transform(self) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None:
        """The on-device training-batch transform (Mixup/CutMix); ``None``: none (the default)."""
        return None

    def collate_fn(self) -> Callable[[list[Any]], Any]:
        """How the loaders (and :meth:`example_batch`) turn a list of samples into a batch."""
        return default_collate

    def example_batch(self, size: int = 2, split: str = "train") -> tuple[Tensor, Tensor]:
        """The first ``size`` samples of ``split`` (``train`` through the train transform, ``val`` through the
        val transform) and :meth:`collate_fn`, on the CPU.

        Sets up the data sets when needed. Every global random state (torch CPU and CUDA, Python, NumPy) is the
        same afterwards as before: the augmentation draws are undone.

        Returns:
            images (size, C, S, S) float32, targets (size,) int64.
        """
        _check_split(split)
        with preserved_rng_state():
            self.setup("fit" if split == "train" else "validate")
            dataset = self.train_set if split == "train" else self.val_set
            self._check_example_size(size, len(dataset), split)
            loader = DataLoader(dataset, batch_size=size, shuffle=False, collate_fn=self.collate_fn())
            return next(iter(loader))

    def _check_example_size(self, size: int, available: int, split: str = "train") -> None:
        if size < 1 or size > available:
            raise ValueError(f"example_batch(size={size}): the {split} split has {available} samples")

    # ------------------------------------------------------------------------------------------- loaders
    def _loader(self, dataset: Dataset, batch_size: int, train: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=train,
            drop_last=train and self.drop_last,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            collate_fn=self.collate_fn(),
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

    ``gpu_preload`` runs the data set's own crop + flip only: a configured ``train_transform`` or
    ``val_transform`` with it is an error (raised at construction).

    :meth:`example_batch` with ``gpu_preload``: the first samples, augmented as the device loader augments (its
    crop/flip/normalise, its memory format) on the preload device, crop offsets and flips from a fixed generator.

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
        *,
        train_transform: TransformSpec = None,
        val_transform: TransformSpec = None,
    ) -> None:
        super().__init__(
            data_dir,
            batch_size,
            val_batch_size,
            num_workers,
            pin_memory,
            drop_last,
            train_transform=train_transform,
            val_transform=val_transform,
        )
        self.gpu_preload = bool(gpu_preload)
        configured = [f"data.{split}_transform" for split in ("train", "val") if self.custom_transform(split)]
        if self.gpu_preload and configured:
            keys, verb = " and ".join(configured), "is" if len(configured) == 1 else "are"
            nulls = " ".join(f"{k}=null" for k in configured)
            raise ValueError(
                f"data.gpu_preload=true runs only the built-in crop + flip on the device, but {keys} {verb} set: set "
                f"data.gpu_preload=false to use the configured transform, or {nulls} to keep gpu_preload"
            )
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

    def example_batch(self, size: int = 2, split: str = "train") -> tuple[Tensor, Tensor]:
        """See :meth:`ClassificationDataModule.example_batch`; with ``gpu_preload``, built as the device loader
        builds batches, on the preload device."""
        if not self.gpu_preload:
            return super().example_batch(size, split)
        _check_split(split)
        with preserved_rng_state():
            self.setup("fit" if split == "train" else "validate")
            self._check_example_size(size, len(self.device_data[split][1]), split)
            return self.device_loader(split, size, train=split == "train").example(size)

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
