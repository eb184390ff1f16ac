"""Semantic segmentation from a plain folder of images and label PNGs (``data=segmentation_folder``).

Layout::

    <root>/{train,val}/images/<name>.{png,jpg,jpeg}
    <root>/{train,val}/labels/<name>.png      single-channel 8-bit: class index 0..K-1 per pixel, 255 = ignore

An image and its label share the file name's stem and the pixel size. ``K`` (``num_classes``) comes from the
config, since a folder does not say how many classes it has; a label value that is neither below ``K`` nor
``ignore_index`` raises an error naming the file.

A batch is ``(images, labels)``: images float32 (B, C, H, W) normalised as ``(x / 255 - mean) / std`` (C = 3 for
RGB, 1 for grey, ``in_chans``), labels int64 (B, H, W). Training can augment (all optional): a random scale from
``scale_range`` (bilinear image, nearest label), padding to ``crop_size`` (image 0 after normalisation, label
``ignore_index``), a random ``crop_size`` crop and a horizontal flip; the draws come from torch's default generator,
which the training loader seeds per sample from (seed, epoch, index), so a resumed run draws what the uninterrupted
one drew. Evaluation normalises only, so evaluation images must share one size to be batched (or use
``val_batch_size: 1``); without ``crop_size`` training images must too (or ``batch_size: 1``). ``setup`` reads
the image headers and stops with the sizes found and the fix when they do not.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from diffkd.data.loader_keywords import loader_keywords
from diffkd.data.loaders import LoaderOptions
from diffkd.data.segmentation import (
    PairLayout,
    SegmentationDataModule,
    SegmentationFolder,
    SegmentationTransform,
    find_layout_pairs,
)

__all__ = [
    "FOLDER_LAYOUT",
    "IMAGE_EXTENSIONS",
    "SegmentationFolder",
    "SegmentationFolderDataModule",
    "SegmentationTransform",
    "find_segmentation_pairs",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg")
LABEL_EXTENSION = ".png"

#: ``<root>/<split>/{images,labels}/<name>``, paired by the name's stem.
FOLDER_LAYOUT = PairLayout(
    name="Segmentation folder",
    image_dir="{split}/images",
    label_dir="{split}/labels",
    image_suffixes=IMAGE_EXTENSIONS,
    label_suffix=LABEL_EXTENSION,
    layout=(
        "{root}/{splits}/images/<name>.png  (or .jpg/.jpeg; RGB or grey)",
        "{root}/{splits}/labels/<name>.png  (single-channel 8-bit: class 0..num_classes-1, 255 = ignore)",
    ),
    remedies=(
        "write the images and their label PNGs into {root} in the layout above (same stem, same size)",
        "or point data.root at a folder that has them (data.train_split / data.val_split name the split folders)",
    ),
    unpaired_fix=(
        "give every image its label PNG (same stem) and every label its image, or remove the unpaired files",
    ),
)


def find_segmentation_pairs(root: str | Path, splits: Sequence[str]) -> dict[str, list[tuple[Path, Path]]]:
    """Pair each image of ``splits`` with its label file, by stem (names only: nothing is decoded); see
    :func:`~diffkd.data.segmentation.find_layout_pairs` with :data:`FOLDER_LAYOUT`.

    Returns:
        ``{split: [(image path, label path), ...]}`` sorted by stem.
    """
    return find_layout_pairs(root, splits, FOLDER_LAYOUT)


@loader_keywords(after="num_classes", moved={"drop_last": "cache"}, batch_size=8, num_workers=0)
class SegmentationFolderDataModule(SegmentationDataModule):
    """Semantic segmentation from ``<root>/{train,val}/{images,labels}/`` (see the module docstring); satisfies
    :class:`~diffkd.data.protocol.DistillDataModule`. The test loader is the validation split's.

    Args:
        root: the folder holding the split folders.
        num_classes: K, the number of classes of the labels (values 0..K-1; ``ignore_index`` besides).
        batch_size: per-device training batch.
        val_batch_size: evaluation batch (``None``: ``batch_size``).
        num_workers, pin_memory: of the loaders.
        train_split, val_split: split folder names.
        in_chans: 3 (images converted to RGB) or 1 (grey, ``L``).
        mean, std: per-channel normalisation on the [0, 1] scale (length ``in_chans``).
        crop_size: ``[height, width]`` (an int: square) of the training crops; ``None``: whole images.
        scale_range: ``[lo, hi]`` of the random training scale (needs ``crop_size``); ``None``: no rescaling.
        scale_step: spacing of the scale choices.
        hflip_prob: probability of a horizontal flip in training.
        ignore_index: the label value of pixels that count nowhere.
        class_names: one name per class (the per-class IoU table); ``None``: indices.
        cache: keep decoded samples in memory after their first read (small data sets).
        drop_last: drop the last incomplete training batch.
        verify, skip_bad_images: see :class:`~diffkd.data.image_checks.ImageFileChecks`.
    """

    checks_name = "Segmentation folder"
    layout = FOLDER_LAYOUT
    train_size_fix = "set data.crop_size=[height, width] (training crops of one size), or data.batch_size=1"

    def __init__(
        self,
        root: str,
        num_classes: int,
        train_split: str = "train",
        val_split: str = "val",
        in_chans: int = 3,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        crop_size: int | Sequence[int] | None = None,
        scale_range: Sequence[float] | None = None,
        scale_step: float = 0.25,
        hflip_prob: float = 0.0,
        ignore_index: int = 255,
        class_names: Sequence[str] | None = None,
        cache: bool = False,
        verify: bool = False,
        skip_bad_images: bool = False,
        **loader_options: Any,
    ) -> None:
        loader = LoaderOptions(**loader_options)
        checks = {"verify": verify, "skip_bad_images": skip_bad_images}
        super().__init__(root, loader, train_split, val_split, crop_size, scale_range, scale_step, hflip_prob, **checks)
        if int(num_classes) < 1:
            raise ValueError(f"data.num_classes must be >= 1, got {num_classes}")
        if in_chans not in (1, 3):
            raise ValueError(f"data.in_chans must be 1 (grey) or 3 (RGB), got {in_chans}")
        if len(mean) != in_chans or len(std) != in_chans:
            raise ValueError(f"data.mean and data.std need {in_chans} values (in_chans), got {list(mean)}, {list(std)}")
        if self.crop_size is None and self.scales != (1.0,):
            raise ValueError("data.scale_range needs data.crop_size: rescaled training samples are cropped to one size")
        self.num_classes = int(num_classes)
        self.in_chans = int(in_chans)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.ignore_index = int(ignore_index)
        if class_names is not None and len(class_names) != self.num_classes:
            raise ValueError(f"data.class_names has {len(class_names)} names for {self.num_classes} classes")
        self.class_names = tuple(class_names) if class_names is not None else None
        self.cache = bool(cache)

    def transform(self, train: bool) -> SegmentationTransform:
        """The training (augmenting) or evaluation transform of this configuration."""
        return SegmentationTransform(
            train=train,
            mean=self.mean,
            std=self.std,
            crop_size=self.crop_size,
            scales=self.scales if train else (1.0,),
            hflip_prob=self.hflip_prob,
            ignore_index=self.ignore_index,
        )

    def dataset(self, split: str, pairs: Sequence[tuple[Path, Path]], train: bool) -> SegmentationFolder:
        mode = "RGB" if self.in_chans == 3 else "L"
        return SegmentationFolder(pairs, self.transform(train), self.num_classes, self.ignore_index, mode, self.cache)
