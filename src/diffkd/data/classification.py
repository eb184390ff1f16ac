"""The shared LightningDataModule for image classification: data sets in, data loaders out.

A subclass only says how to build its data sets (``build_datasets``) and what it holds (``num_classes``,
``in_chans``, ``image_size``, ``mean``, ``std``); the configured transforms (``train_transform``/``val_transform``,
see :mod:`diffkd.data.transforms`) and the members of the task protocols (:class:`~diffkd.data.protocol.
ClassificationData`: ``batch_transform``, ``loss_label_smoothing``; ``train_labels`` of
:class:`~diffkd.data.protocol.SampleIndexData`) live here once; batching, workers, shuffling, resuming and
``example_batch`` come from :class:`~diffkd.data.loaders.DataModuleBase`.
Batches are ``(images, targets)`` with images (B, C, H, W) float and targets (B,) int64.

:class:`PreloadableDataModule` adds ``gpu_preload``: the data set lives on the device as uint8 tensors and the
device loader (:class:`~diffkd.data.device_loader.DeviceTensorLoader`) augments there.
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from diffkd.data.device_loader import DeviceTensorLoader
from diffkd.data.loader_keywords import loader_keywords
from diffkd.data.loaders import DataModuleBase, LoaderOptions
from diffkd.data.protocol import preserved_rng_state
from diffkd.data.transforms import TransformSpec, build_transform, check_transform_output, describe_spec

__all__ = ["ClassificationDataModule", "PreloadableDataModule"]

log = logging.getLogger("diffkd.data.base")  # the logger name of these lines before the split: filters keep working


@loader_keywords(after="data_dir", batch_size=64, num_workers=2)
class ClassificationDataModule(DataModuleBase):
    """Base for classification data; satisfies :class:`~diffkd.data.protocol.ClassificationData`.

    Defaults of the protocol members: ``loss_label_smoothing = 0.0``, ``batch_transform()`` → ``None`` (no
    on-device batch transform), ``example_batch(size)`` → the first ``size`` training samples through the train
    transform and :meth:`collate_fn`, global random states untouched.

    Args:
        data_dir: folder holding (or receiving) the data set.
        batch_size, val_batch_size, num_workers, pin_memory, drop_last: the loader settings,
            :class:`~diffkd.data.loaders.LoaderOptions`.
        train_transform, val_transform: the transforms from the configuration (None: the data set's default);
            a mapping of ``timm.data.create_transform`` arguments or a list of torchvision transforms, see
            :mod:`diffkd.data.transforms`. A subclass builds them with :meth:`make_transform`.
    """

    task: ClassVar[str] = "classification"
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
        *,
        train_transform: TransformSpec = None,
        val_transform: TransformSpec = None,
        **loader_options: Any,
    ) -> None:
        super().__init__(LoaderOptions(**loader_options))
        self.data_dir = str(data_dir)
        self.transform_specs: dict[str, TransformSpec] = {"train": train_transform, "val": val_transform}

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

    def size_fix(self, split: str, example: bool) -> str:
        """Make the transform give one size (the fix of a mixed-size batch)."""
        fix = (
            f"make data.{split}_transform give one size, e.g. end it with Resize([{self.image_size}, "
            f"{self.image_size}]) or CenterCrop({self.image_size}) (data.image_size), or set it to null for the "
            "default transform"
        )
        return fix + ", or set data.val_batch_size=1" if split == "val" and not example else fix

    def train_labels(self) -> Tensor:
        """int64 (N,): the class of each training sample in index order, from the training set's ``targets`` (no
        image is decoded).

        Raises:
            TypeError: the training set has no ``targets`` (one class per sample) of length N.
        """
        self.setup("fit")
        targets = getattr(self.train_set, "targets", None)
        n = len(self.train_set)
        labels = None if targets is None else torch.as_tensor(targets, dtype=torch.int64).flatten()
        if labels is None or len(labels) != n:
            found = "none" if labels is None else f"{len(labels)} values"
            raise TypeError(
                f"{type(self).__qualname__}.train_labels(): its training set ({type(self.train_set).__name__}) "
                f"needs a `targets` sequence with one class per sample ({n}), found {found}: give the data set "
                "a `targets` list, or override train_labels()."
            )
        return labels


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
        gpu_preload: keep the data set on the device and augment there (see above); a keyword.
        args, kwargs: those of ``ClassificationDataModule``.
    """

    fused_normalize: bool = False  # False: torchvision's ToTensor + Normalize order of operations
    builds_sample_index = True

    def __init__(self, *args: Any, gpu_preload: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
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
            with_index=train and self.sample_index,
        )

    def example_batch(self, size: int = 2, split: str = "train") -> tuple[Tensor, Tensor]:
        """See :meth:`ClassificationDataModule.example_batch`; with ``gpu_preload``, built as the device loader
        builds batches, on the preload device."""
        if not self.gpu_preload:
            return super().example_batch(size, split)
        self.check_example_request(size, split)
        with preserved_rng_state():
            self.setup("fit" if split == "train" else "validate")
            self.check_example_request(size, split, len(self.device_data[split][1]))
            return self.device_loader(split, size, train=split == "train").example(size)

    def train_dataloader(self) -> DataLoader | DeviceTensorLoader:
        if not self.gpu_preload:
            return super().train_dataloader()
        self.setup("fit")
        self.require_a_train_batch()
        return self.device_loader("train", self.batch_size, train=True)

    def val_dataloader(self) -> DataLoader | DeviceTensorLoader:
        if not self.gpu_preload:
            return super().val_dataloader()
        self.setup("validate")
        return self.device_loader("val", self.val_batch_size, train=False)
