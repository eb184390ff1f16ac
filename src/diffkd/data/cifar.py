"""CIFAR-100 (torchvision's ``CIFAR100``): 50 000 train / 10 000 test RGB images, 32 × 32, 100 classes.

Batches: images (B, 3, 32, 32) float32, normalised with the CIFAR-100 mean/std; targets (B,) int64 in [0, 100).

Transforms: ``train_transform``/``val_transform`` from the configuration (a mapping of timm
``create_transform`` arguments or a list of torchvision transforms, see :mod:`diffkd.data.transforms`); each
receives a 32 × 32 RGB PIL image and must give float32 (3, 32, 32). ``null`` keeps the default below, whose
tensors and random draws are those this module has always produced.
"""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import transforms as T
from torchvision.datasets import CIFAR100
from torchvision.datasets.utils import download_and_extract_archive

from diffkd.data.classification import PreloadableDataModule
from diffkd.data.images import DataNotFoundError
from diffkd.data.loader_keywords import loader_keywords
from diffkd.data.transforms import TransformSpec

__all__ = ["CIFAR100_MEAN", "CIFAR100_STD", "CIFAR100DataModule"]

log = logging.getLogger(__name__)

CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
CIFAR100_FILES = ("train", "test", "meta")
CIFAR100_PADDING = 4  # RandomCrop(32, padding=4)


class _CIFAR100Files(CIFAR100):
    """torchvision's ``CIFAR100`` whose presence check only asks that the files exist.

    torchvision compares the md5 sum of ``train``/``test``/``meta`` on every construction, which (a) re-hashes
    ~180 MB each time and (b) rejects any re-written copy (our tests' small files). The download itself is
    unchanged: ``download()`` still fetches the archive with torchvision's ``download_and_extract_archive``,
    which verifies the archive's md5 (``tgz_md5``) before extracting it.
    """

    def _check_integrity(self) -> bool:
        folder = Path(self.root) / self.base_folder
        return all((folder / name).is_file() for name in CIFAR100_FILES)

    def _load_meta(self) -> None:
        path = os.path.join(self.root, self.base_folder, self.meta["filename"])
        with open(path, "rb") as f:
            data = pickle.load(f, encoding="latin1")
        self.classes = data[self.meta["key"]]
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}


@loader_keywords(after="data_dir", batch_size=64, num_workers=2)
class CIFAR100DataModule(PreloadableDataModule):
    """CIFAR-100 for classification and distillation.

    CIFAR-100 has no separate validation split: like mdistiller and RepDistiller, the official test split
    (10 000 images) is used for validation (``val_dataloader`` and ``test_dataloader`` give the same data).

    Default train transform: ``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip`` + ``ToTensor`` +
    ``Normalize`` (torchvision v1); val: ``ToTensor`` + ``Normalize``. ``train_transform``/``val_transform``
    replace them (see :mod:`diffkd.data.transforms`; e.g. ``[{_target_: torchvision.transforms.v2.RandomCrop,
    size: 32, padding: 4}, {_target_: torchvision.transforms.v2.ColorJitter, brightness: 0.2}]``). Batches are
    images (B, 3, 32, 32) float32 and targets (B,) int64.

    Files live in ``<data_dir>/cifar-100-python/{train,test,meta}`` (what the official archive extracts to).
    ``prepare_data`` (run on global rank 0 only) downloads them when missing and ``download=True``;
    ``setup`` builds the data sets on every rank.

    With ``gpu_preload=True`` the uint8 pixels (``CIFAR100.data``, (N, 32, 32, 3) → (N, 3, 32, 32)) go to the
    device once and the same crop/flip/normalise runs there per batch (``PreloadableDataModule``); no workers.

    Args:
        data_dir: folder holding ``cifar-100-python/``.
        batch_size, val_batch_size, num_workers, pin_memory, drop_last: see ``ClassificationDataModule``.
        download: fetch the archive from the CIFAR web page when the files are missing.
        gpu_preload: keep the data set on the training device and augment there (see ``PreloadableDataModule``);
            only with the default transforms.
        train_transform, val_transform: None (the defaults above), a mapping of timm ``create_transform``
            arguments, or a list of torchvision transforms (see :mod:`diffkd.data.transforms`); the output must
            be 32 × 32.
    """

    num_classes = 100
    in_chans = 3
    image_size = 32
    mean = CIFAR100_MEAN
    std = CIFAR100_STD
    url = _CIFAR100Files.url
    image_size_key = None  # fixed at 32

    def __init__(
        self,
        data_dir: str = "data",
        download: bool = True,
        gpu_preload: bool = False,
        train_transform: TransformSpec = None,
        val_transform: TransformSpec = None,
        **loader_options: Any,
    ) -> None:
        transforms = {"train_transform": train_transform, "val_transform": val_transform}
        super().__init__(data_dir, gpu_preload=gpu_preload, **transforms, **loader_options)
        self.download = download

    @property
    def folder(self) -> Path:
        """``<data_dir>/cifar-100-python``."""
        return Path(self.data_dir) / _CIFAR100Files.base_folder

    def files_present(self) -> bool:
        """Whether ``train``, ``test`` and ``meta`` all exist (no md5 check; see ``_CIFAR100Files``)."""
        return all((self.folder / name).is_file() for name in CIFAR100_FILES)

    def prepare_data(self) -> None:
        """Download and extract the archive (md5-checked by torchvision) when the files are missing."""
        if self.files_present() or not self.download:
            return
        log.info("CIFAR-100: downloading %s into %s", self.url, self.data_dir)
        download_and_extract_archive(
            self.url, self.data_dir, filename=_CIFAR100Files.filename, md5=_CIFAR100Files.tgz_md5
        )

    def _not_found(self) -> DataNotFoundError:
        return DataNotFoundError(
            "CIFAR-100",
            searched=[self.folder],
            layout=[f"{self.folder}/{{train,test,meta}}  (python pickles from cifar-100-python.tar.gz)"],
            remedies=[
                f"set data.download=true to download {self.url} (md5-checked) into {self.data_dir}",
                f"or download {self.url} yourself and extract it in {self.data_dir}",
            ],
        )

    def build_datasets(self) -> tuple[Dataset, Dataset]:
        if not self.files_present() and self.download:
            self.prepare_data()  # a standalone `setup()` without the Trainer's `prepare_data` call
        if not self.files_present():
            raise self._not_found()
        train_tf = self.make_transform("train", self.default_train_transform)
        val_tf = self.make_transform("val", self.default_val_transform)
        train = _CIFAR100Files(self.data_dir, train=True, transform=train_tf, download=False)
        val = _CIFAR100Files(self.data_dir, train=False, transform=val_tf, download=False)
        log.info("CIFAR-100: %d train / %d test images from %s", len(train), len(val), self.folder)
        return train, val

    def default_train_transform(self) -> T.Compose:
        """``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip`` + ``ToTensor`` + ``Normalize``: PIL → float32
        (3, 32, 32)."""
        normalize = [T.ToTensor(), T.Normalize(self.mean, self.std)]
        return T.Compose([T.RandomCrop(32, padding=CIFAR100_PADDING), T.RandomHorizontalFlip(), *normalize])

    def default_val_transform(self) -> T.Compose:
        """``ToTensor`` + ``Normalize``: PIL → float32 (3, 32, 32)."""
        return T.Compose([T.ToTensor(), T.Normalize(self.mean, self.std)])

    def preload_tensors(self, split: str) -> tuple[Tensor, Tensor]:
        """uint8 (N, 3, 32, 32) images and int64 (N,) fine labels of ``"train"`` or ``"val"`` (the test split)."""
        ds = {"train": self.train_set, "val": self.val_set}[split]
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # (N, 32, 32, 3) HWC -> NCHW
        return images, torch.as_tensor(ds.targets, dtype=torch.long)

    def train_augmentation(self) -> tuple[int, bool]:
        return CIFAR100_PADDING, True
