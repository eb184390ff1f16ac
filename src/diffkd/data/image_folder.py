"""A user's own images, one folder per class (torchvision's ``ImageFolder``).

Layout::

    <root>/<train_dir>/<class>/*.jpg   (any extension PIL reads: jpg, jpeg, png, bmp, webp, ...)
    <root>/<val_dir>/<class>/*.jpg

Classes are the sorted sub-folder names of ``<root>/<train_dir>``; ``<val_dir>`` must hold the same ones.
Batches: images (B, 3, S, S) float32 (S = ``image_size``) normalised with ``mean``/``std``, targets (B,) int64.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from torch.utils.data import Dataset
from torchvision import transforms as T
from torchvision.datasets import ImageFolder

from diffkd.data.base import ClassificationDataModule, DataNotFoundError

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ImageFolderDataModule", "list_classes"]

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def list_classes(folder: str | Path) -> list[str]:
    """Sorted names of the sub-folders of ``folder`` (hidden ones skipped), as ``ImageFolder`` orders them."""
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))


class _ImageFolder(ImageFolder):
    """``ImageFolder`` whose classes come from ``list_classes`` (hidden folders such as ``.ipynb_checkpoints``
    are not classes), so the module's ``classes`` and the data set's targets always agree."""

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        classes = list_classes(directory)
        return classes, {name: i for i, name in enumerate(classes)}


class ImageFolderDataModule(ClassificationDataModule):
    """Classification on ``<root>/{train,val}/<class>/*`` images.

    Train: ``RandomResizedCrop(image_size)`` + ``RandomHorizontalFlip``; val: ``Resize(int(image_size / 0.875))``
    + ``CenterCrop(image_size)`` (256 → 224 at the default size); both then ``ToTensor`` + ``Normalize``.
    Images are converted to RGB on load (``in_chans = 3``).

    ``num_classes`` is read from the train folder's sub-folders, so it is known before ``setup`` (a model can be
    built from it); ``setup`` checks that the val folder has exactly the same classes.

    Args:
        root: folder holding ``train_dir`` and ``val_dir``.
        train_dir, val_dir: sub-folder names of the two splits.
        image_size: side S of the crops.
        batch_size, val_batch_size, num_workers, pin_memory, drop_last: see ``ClassificationDataModule``.
        mean, std: per-channel normalisation (ImageNet statistics by default).
    """

    in_chans = 3

    def __init__(
        self,
        root: str,
        train_dir: str = "train",
        val_dir: str = "val",
        image_size: int = 224,
        batch_size: int = 64,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        pin_memory: bool = False,
        drop_last: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__(root, batch_size, val_batch_size, num_workers, pin_memory, drop_last)
        self.root = Path(root)
        self.train_dir = self.root / train_dir
        self.val_dir = self.root / val_dir
        self.image_size = int(image_size)
        self.mean = tuple(float(m) for m in mean)  # Hydra hands ListConfig; keep plain floats
        self.std = tuple(float(s) for s in std)
        if len(self.mean) != len(self.std):
            raise ValueError(f"mean {self.mean} and std {self.std} differ in length")
        self._classes: list[str] | None = None

    # --------------------------------------------------------------------------------------------- classes
    def _layout_error(self, missing: Sequence[Path], why: str) -> DataNotFoundError:
        return DataNotFoundError(
            f"Image-folder data ({why})",
            searched=list(missing),
            layout=[
                f"{self.train_dir}/<class>/<image>.jpg   (one sub-folder per class)",
                f"{self.val_dir}/<class>/<image>.jpg     (the same class sub-folders)",
            ],
            remedies=["put your images there, or point data.root / data.train_dir / data.val_dir at them"],
        )

    def _scan(self, folder: Path) -> list[str]:
        if not folder.is_dir():
            raise self._layout_error([folder], f"missing folder {folder}")
        classes = list_classes(folder)
        if not classes:
            raise self._layout_error([folder], f"no class sub-folders in {folder}")
        return classes

    @property
    def classes(self) -> list[str]:
        """Class names (sorted train sub-folders); index i is target i. Scans the folder the first time."""
        if self._classes is None:
            self._classes = self._scan(self.train_dir)
        return self._classes

    @property
    def num_classes(self) -> int:  # type: ignore[override]
        """Number of classes: the train folder's sub-folders (readable before ``setup``)."""
        return len(self.classes)

    # ------------------------------------------------------------------------------------------- data sets
    def transforms(self) -> tuple[T.Compose, T.Compose]:
        """``(train_transform, val_transform)``: PIL image -> float32 (3, S, S)."""
        s = self.image_size
        normalize = [T.ToTensor(), T.Normalize(self.mean, self.std)]
        train = T.Compose([T.RandomResizedCrop(s), T.RandomHorizontalFlip(), *normalize])
        val = T.Compose([T.Resize(int(s / 0.875)), T.CenterCrop(s), *normalize])
        return train, val

    def build_datasets(self) -> tuple[Dataset, Dataset]:
        missing = [d for d in (self.train_dir, self.val_dir) if not d.is_dir()]
        if missing:
            raise self._layout_error(missing, "missing " + " and ".join(str(d) for d in missing))
        self._classes = None  # rescan: the folder may have changed since `num_classes` was first read
        train_classes, val_classes = self.classes, self._scan(self.val_dir)
        if train_classes != val_classes:
            only_train = sorted(set(train_classes) - set(val_classes))
            only_val = sorted(set(val_classes) - set(train_classes))
            raise ValueError(
                "train and val class folders differ (targets would not line up):\n"
                f"  {self.train_dir}: {train_classes}\n"
                f"  {self.val_dir}: {val_classes}\n"
                f"  only in train: {only_train}; only in val: {only_val}"
            )
        train_tf, val_tf = self.transforms()
        try:
            train = _ImageFolder(str(self.train_dir), transform=train_tf)
            val = _ImageFolder(str(self.val_dir), transform=val_tf)
        except FileNotFoundError as err:  # a class folder without a single image
            raise self._layout_error([self.train_dir, self.val_dir], f"empty class folder: {err}") from err
        log.info(
            "ImageFolder: %d classes, %d train images in %s, %d val images in %s",
            len(train.classes),
            len(train),
            self.train_dir,
            len(val),
            self.val_dir,
        )
        return train, val
