"""A user's own images, one folder per class (torchvision ``ImageFolder`` semantics).

Layout::

    <root>/<train_dir>/<class>/*.jpg   (any extension PIL reads: jpg, jpeg, png, bmp, webp, ...)
    <root>/<val_dir>/<class>/*.jpg

Classes are the sorted sub-folder names of ``<root>/<train_dir>``; ``<val_dir>`` must hold the same ones. The scan
(and its errors) is :class:`~diffkd.data.folders.ClassFolders`, shared with ImageNet's ``folders`` layout.
Batches: images (B, 3, S, S) float32 (S = ``image_size``) normalised with ``mean``/``std``, targets (B,) int64.

Transforms: the default is ImageNet-style (``RandomResizedCrop(S)`` with scale (0.08, 1) + horizontal flip),
which suits photos but not small images, digits or text: set ``train_transform``/``val_transform`` (a mapping of
timm ``create_transform`` arguments or a list of torchvision transforms, see :mod:`diffkd.data.transforms`).
Each receives an RGB PIL image of the file's own size and must give float32 (3, S, S). E.g. for 32 × 32 digits::

    train_transform:
      - {_target_: torchvision.transforms.v2.Resize, size: 32}
      - {_target_: torchvision.transforms.v2.RandomCrop, size: 32, padding: 2}
    val_transform: [{_target_: torchvision.transforms.v2.Resize, size: 32}]
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset
from torchvision import transforms as T

from diffkd.data.classification import ClassificationDataModule
from diffkd.data.folders import ClassFolders, ImageListDataset, list_classes
from diffkd.data.image_checks import ImageFileChecks
from diffkd.data.loader_keywords import loader_keywords
from diffkd.data.transforms import TransformSpec

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ImageFolderDataModule", "list_classes"]

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@loader_keywords(after="image_size", batch_size=64, num_workers=2)
class ImageFolderDataModule(ImageFileChecks, ClassificationDataModule):
    """Classification on ``<root>/{train,val}/<class>/*`` images.

    Default train transform: ``RandomResizedCrop(image_size)`` (scale (0.08, 1)) + ``RandomHorizontalFlip``; val:
    ``Resize(int(image_size / 0.875))`` + ``CenterCrop(image_size)`` (256 → 224 at the default size); both then
    ``ToTensor`` + ``Normalize``. ``train_transform``/``val_transform`` replace them (see the module docstring).
    Images are converted to RGB on load (``in_chans = 3``).

    ``num_classes`` is read from the train folder's sub-folders, so it is known before ``setup`` (a model can be
    built from it); ``setup`` checks that the val folder has exactly the same classes.

    Args:
        root: folder holding ``train_dir`` and ``val_dir``.
        train_dir, val_dir: sub-folder names of the two splits.
        image_size: side S of the crops.
        batch_size, val_batch_size, num_workers, pin_memory, drop_last: see ``ClassificationDataModule``.
        mean, std: per-channel normalisation (ImageNet statistics by default).
        train_transform, val_transform: None (the defaults above), a mapping of timm ``create_transform``
            arguments, or a list of torchvision transforms (see :mod:`diffkd.data.transforms`).
        verify, skip_bad_images: decode every image at setup / replace an undecodable sample by the next readable
            one; see :class:`~diffkd.data.image_checks.ImageFileChecks`.
    """

    in_chans = 3
    checks_name = "ImageFolder"

    def __init__(
        self,
        root: str,
        train_dir: str = "train",
        val_dir: str = "val",
        image_size: int = 224,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        train_transform: TransformSpec = None,
        val_transform: TransformSpec = None,
        verify: bool = False,
        skip_bad_images: bool = False,
        **loader_options: Any,
    ) -> None:
        super().__init__(root, train_transform=train_transform, val_transform=val_transform, **loader_options)
        self.init_image_checks(verify, skip_bad_images)
        self.root = Path(root)
        self.train_dir = self.root / train_dir
        self.val_dir = self.root / val_dir
        self.image_size = int(image_size)
        self.mean = tuple(float(m) for m in mean)  # Hydra hands ListConfig; keep plain floats
        self.std = tuple(float(s) for s in std)
        if len(self.mean) != len(self.std):
            raise ValueError(f"mean {self.mean} and std {self.std} differ in length")
        self.folders = ClassFolders(
            self.train_dir,
            self.val_dir,
            dataset="Image-folder data",
            layout=[
                f"{self.train_dir}/<class>/<image>.jpg   (one sub-folder per class)",
                f"{self.val_dir}/<class>/<image>.jpg     (the same class sub-folders)",
            ],
            remedies=["put your images there, or point data.root / data.train_dir / data.val_dir at them"],
        )

    # --------------------------------------------------------------------------------------------- classes
    @property
    def classes(self) -> list[str]:
        """Class names (sorted train sub-folders); index i is target i. Scans the folder the first time."""
        return self.folders.classes

    @property
    def num_classes(self) -> int:  # type: ignore[override]
        """Number of classes: the train folder's sub-folders (readable before ``setup``)."""
        return len(self.classes)

    # ------------------------------------------------------------------------------------------- data sets
    def default_transforms(self) -> tuple[T.Compose, T.Compose]:
        """The default ``(train, val)`` transforms: PIL image -> float32 (3, S, S)."""
        s = self.image_size
        normalize = [T.ToTensor(), T.Normalize(self.mean, self.std)]
        train = T.Compose([T.RandomResizedCrop(s), T.RandomHorizontalFlip(), *normalize])
        val = T.Compose([T.Resize(int(s / 0.875)), T.CenterCrop(s), *normalize])
        return train, val

    def transforms(self) -> tuple[Callable, Callable]:
        """``(train_transform, val_transform)``: the configured ones, else the defaults; PIL -> float32 (3, S, S)."""
        train, val = self.default_transforms()
        return self.make_transform("train", lambda: train), self.make_transform("val", lambda: val)

    def build_datasets(self) -> tuple[Dataset, Dataset]:
        self.folders.require(dirs=[self.train_dir, self.val_dir])
        train_samples, val_samples = self.folders.scan()
        train_tf, val_tf = self.transforms()
        train = ImageListDataset(self.train_dir, train_samples, train_tf, classes=self.classes)
        val = ImageListDataset(self.val_dir, val_samples, val_tf, classes=self.classes)
        log.info(
            "ImageFolder: %d classes, %d train images in %s, %d val images in %s",
            len(train.classes),
            len(train),
            self.train_dir,
            len(val),
            self.val_dir,
        )
        sets = self.guard_image_sets({"train": train, "val": val})
        return sets["train"], sets["val"]
