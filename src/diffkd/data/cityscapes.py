"""Cityscapes semantic segmentation (``data=cityscapes``): torchvision's ``Cityscapes`` (fine, semantic) with CIRKD's
training pipeline, fixed-size crops and the 19 evaluation classes.

Layout (the official one, from ``leftImg8bit_trainvaltest.zip`` and ``gtFine_trainvaltest.zip``)::

    <root>/leftImg8bit/{train,val,test}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    <root>/gtFine/{train,val,test}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png

A batch is ``(images, labels)``: images float32 (B, 3, H, W), normalised (see ``normalization``), labels int64
(B, H, W) holding the trainIds 0..18 and 255 (ignored). Training samples are ``crop_size`` crops (512×1024 by
default), evaluation samples the full 1024×2048 images.

The training transform is CIRKD's (winycg/CIRKD @05a2753, ``dataset/cityscapes.py``, ``CSTrainValSet``): labelIds
mapped to trainIds; a random scale from {0.5, 0.6, ..., 2.0} (bilinear for the image, nearest for the label);
normalisation; padding at the bottom and right to the crop size (image 0 after normalisation, label ignore); a random
crop; a horizontal flip with probability 0.5. Evaluation: mapping and normalisation only.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

from diffkd.data.loader_keywords import loader_keywords
from diffkd.data.loaders import LoaderOptions
from diffkd.data.segmentation import (
    VAL_SIZE_FIX,
    PairLayout,
    SegmentationDataModule,
    SegmentationFolder,
    SegmentationTransform,
    discrete_scales,
    find_layout_pairs,
)

__all__ = [
    "CIRKD_MEAN_BGR",
    "CITYSCAPES_LAYOUT",
    "CITYSCAPES_URL",
    "CLASS_NAMES",
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LABEL_ID_TO_TRAIN_ID",
    "VAL_SIZE_FIX",
    "CityscapesDataModule",
    "CityscapesFine",
    "CityscapesTransform",
    "SegmentationLoaders",
    "discrete_scales",
    "find_pairs",
    "label_id_lut",
    "map_label_ids",
]

log = logging.getLogger(__name__)

CITYSCAPES_URL = "https://www.cityscapes-dataset.com/downloads/"
IGNORE_INDEX = 255

# The standard table (cityscapesScripts' labels.py; torchvision's Cityscapes.classes): labelId -> trainId of the 19
# evaluated classes. Every other labelId (void, parking, rail track, guard rail, bridge, tunnel, polegroup, caravan,
# trailer, ...) is ignored.
LABEL_ID_TO_TRAIN_ID: dict[int, int] = {
    7: 0,
    8: 1,
    11: 2,
    12: 3,
    13: 4,
    17: 5,
    19: 6,
    20: 7,
    21: 8,
    22: 9,
    23: 10,
    24: 11,
    25: 12,
    26: 13,
    27: 14,
    28: 15,
    31: 16,
    32: 17,
    33: 18,
}

CLASS_NAMES: tuple[str, ...] = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)

# CIRKD's input normalisation (dataset/cityscapes.py): cv2's BGR order, 0-255 scale, this mean, no std division.
CIRKD_MEAN_BGR: tuple[float, float, float] = (104.00698793, 116.66876762, 122.67891434)
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

Normalization = Literal["cirkd", "imagenet"]
NORMALIZATIONS: tuple[str, ...] = ("cirkd", "imagenet")
SPLITS: tuple[str, ...] = ("train", "val", "test")
IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"


def label_id_lut() -> Tensor:
    """The labelId → trainId lookup table: uint8 (256,), ``IGNORE_INDEX`` where a labelId is not evaluated."""
    lut = torch.full((256,), IGNORE_INDEX, dtype=torch.uint8)
    for label_id, train_id in LABEL_ID_TO_TRAIN_ID.items():
        lut[label_id] = train_id
    return lut


_LUT = label_id_lut()


def map_label_ids(label_ids: Tensor) -> Tensor:
    """Map a uint8 labelId image (any shape, e.g. (H, W)) to trainIds 0..18 / 255, uint8 of the same shape."""
    if label_ids.dtype != torch.uint8:
        raise TypeError(f"labelIds must be uint8 (an 8-bit PNG), got {label_ids.dtype}")
    return _LUT[label_ids.long()]


#: ``leftImg8bit/<split>/<city>/<key>_leftImg8bit.png`` with ``gtFine/<split>/<city>/<key>_gtFine_labelIds.png``.
CITYSCAPES_LAYOUT = PairLayout(
    name="Cityscapes",
    image_dir="leftImg8bit/{split}",
    label_dir="gtFine/{split}",
    image_suffixes=(IMAGE_SUFFIX,),
    label_suffix=LABEL_SUFFIX,
    grouped=True,
    layout=(
        f"{{root}}/leftImg8bit/{{splits}}/<city>/<city>_<seq>_<frame>{IMAGE_SUFFIX}",
        f"{{root}}/gtFine/{{splits}}/<city>/<city>_<seq>_<frame>{LABEL_SUFFIX}",
    ),
    remedies=(
        f"register at {CITYSCAPES_URL} (an account is needed), download leftImg8bit_trainvaltest.zip (11 GB) and "
        "gtFine_trainvaltest.zip (241 MB), and unzip both into {root} (cityscapesScripts' csDownload can fetch them)",
        "or point data.root at a folder that has them (data.train_split / data.val_split choose the split folders)",
    ),
    unpaired_fix=(
        "each image needs its gtFine labelIds file and each labelIds file its image: re-extract "
        "leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip (an interrupted unzip leaves some out)",
        "or remove the unpaired file(s) named above",
    ),
)


def find_pairs(root: str | Path, splits: Sequence[str]) -> dict[str, list[tuple[Path, Path]]]:
    """Check the files of ``splits`` (names only, nothing is decoded) and pair each image with its label:
    :func:`~diffkd.data.segmentation.find_layout_pairs` with :data:`CITYSCAPES_LAYOUT`.

    Returns:
        ``{split: [(image path, label path), ...]}``, sorted by city and frame.
    """
    return find_layout_pairs(root, splits, CITYSCAPES_LAYOUT)


def _normalization(normalization: Normalization) -> dict[str, Any]:
    """The :class:`~diffkd.data.segmentation.SegmentationTransform` arguments of a Cityscapes normalisation."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    if normalization == "cirkd":  # cv2 reads BGR, 0-255 scale, no std division
        return {"pixel_mean": CIRKD_MEAN_BGR, "bgr": True}
    return {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}


class CityscapesTransform(SegmentationTransform):
    """CIRKD's Cityscapes pipeline: the shared :class:`~diffkd.data.segmentation.SegmentationTransform` (scale → pad
    → crop → flip; padding 0 after normalisation and label 255) with the Cityscapes normalisation.

    Called on tensors (``(uint8 RGB (3, H, W), uint8 trainIds (H, W))``, what :class:`CityscapesFine` gives) or on
    ``(PIL RGB image, PIL labelId image)``, whose labelIds it maps to trainIds first.

    Args:
        train: augment (training) or not (evaluation: (H', W') = (H, W)).
        crop_size: ``(height, width)`` of the training crops.
        scales: the scale choices (uniform).
        hflip_prob: probability of a horizontal flip.
        normalization: ``"cirkd"`` (BGR, 0-255 minus ``CIRKD_MEAN_BGR``) or ``"imagenet"`` (RGB, /255, ImageNet
            mean/std).
    """

    def __init__(
        self,
        train: bool,
        crop_size: tuple[int, int] = (512, 1024),
        scales: Sequence[float] = (1.0,),
        hflip_prob: float = 0.5,
        normalization: Normalization = "cirkd",
    ) -> None:
        super().__init__(
            train,
            crop_size=crop_size,
            scales=scales,
            hflip_prob=hflip_prob,
            ignore_index=IGNORE_INDEX,
            **_normalization(normalization),
        )
        self.normalization = normalization

    def __call__(self, image: Image.Image | Tensor, target: Image.Image | Tensor) -> tuple[Tensor, Tensor]:
        if isinstance(image, Tensor):
            return super().__call__(image, target)
        pixels = TF.pil_to_tensor(image if image.mode == "RGB" else image.convert("RGB"))
        label_ids = TF.pil_to_tensor(target)
        if label_ids.dtype != torch.uint8 or label_ids.shape[0] != 1:
            raise ValueError(
                f"a Cityscapes labelIds file must be a single-channel 8-bit PNG, got PIL mode {target.mode!r}"
            )
        label = map_label_ids(label_ids[0])
        if pixels.shape[-2:] != label.shape:
            raise ValueError(f"image {tuple(pixels.shape[-2:])} and label {tuple(label.shape)} differ in size")
        return super().__call__(pixels, label)


class CityscapesFine(SegmentationFolder):
    """The checked, sorted pairs of one Cityscapes split (fine, semantic): RGB images and their labelIds mapped to
    trainIds (:func:`label_id_lut`), through ``transforms``.

    The pairs from :func:`find_pairs` make the order (and so ``example_batch`` and ``val``-set indices) the same on
    every file system. A file that does not decode raises :class:`~diffkd.data.images.ImageReadError` naming it,
    and a label of the wrong mode or size a ``ValueError`` naming both files.

    Args:
        root: the Cityscapes folder.
        split: ``train``, ``val`` or ``test``.
        pairs: ``(image, labelIds file)`` paths, in order.
        transforms: called on ``(uint8 RGB (3, H, W), uint8 trainIds (H, W))``.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        pairs: Sequence[tuple[Path, Path]],
        transforms: CityscapesTransform | None = None,
    ) -> None:
        super().__init__(pairs, transforms, len(CLASS_NAMES), IGNORE_INDEX, "RGB", label_map=_LUT, what="labelIds")
        self.root = str(root)
        self.split = split

    @property
    def targets(self) -> list[list[str]]:
        """The labelIds file of each sample, as torchvision's ``Cityscapes`` lists them (``[[path], ...]``)."""
        return [[str(label)] for _, label in self.pairs]


#: The segmentation data module base, by its former name.
SegmentationLoaders = SegmentationDataModule


@loader_keywords(after="root", moved={"drop_last": "normalization"}, batch_size=2, val_batch_size=1, num_workers=4)
class CityscapesDataModule(SegmentationDataModule):
    """Cityscapes fine semantic segmentation; satisfies :class:`~diffkd.data.protocol.DistillDataModule`.

    ``setup`` checks the split folders and the image/label pairing from the file names, then builds the data sets.
    Batches: images float32 (B, 3, H, W), labels int64 (B, H, W) with trainIds 0..18 and 255 = ignore; training
    (B, 3, ch, cw) crops, evaluation full images. The train loader shuffles and drops the last incomplete batch with
    plain samplers, so Lightning swaps in its ``DistributedSampler`` under DDP. ``test_dataloader`` is the
    ``val_split`` loader (the test split's labels are withheld by the benchmark).

    Args:
        root: the Cityscapes folder (``leftImg8bit/`` and ``gtFine/``).
        batch_size: per-device training batch (CIRKD: 16 global = 2 × 8 GPUs).
        val_batch_size: per-device evaluation batch (CIRKD: 1, full resolution).
        num_workers: loader worker processes (0 loads in the main process).
        pin_memory: pin host memory for faster host-to-device copies.
        train_split: split folder of the training samples (``val`` for a quick run).
        val_split: split folder of the evaluation samples.
        crop_size: ``[height, width]`` of the training crops (an int: square).
        scale_range: ``[lo, hi]`` of the random training scale; null: no rescaling.
        scale_step: spacing of the scale choices in ``scale_range``.
        hflip_prob: probability of a horizontal flip in training.
        normalization: ``"cirkd"`` or ``"imagenet"``, see :class:`CityscapesTransform`; the teacher's checkpoint
            decides which.
        drop_last: drop the last incomplete training batch.
        verify: decode every image and label at setup and raise one error listing the bad files (see
            :class:`~diffkd.data.image_checks.ImageFileChecks`).
        skip_bad_images: replace a sample whose image or label does not decode by the next readable one, with a
            warning; ``skipped_images`` counts them (default: such a file raises an error naming it).
    """

    checks_name = "Cityscapes"
    layout = CITYSCAPES_LAYOUT

    num_classes: int = len(CLASS_NAMES)
    ignore_index: int = IGNORE_INDEX
    class_names: tuple[str, ...] = CLASS_NAMES

    def __init__(
        self,
        root: str = "data/cityscapes",
        train_split: str = "train",
        val_split: str = "val",
        crop_size: int | Sequence[int] = (512, 1024),
        scale_range: Sequence[float] | None = (0.5, 2.0),
        scale_step: float = 0.1,
        hflip_prob: float = 0.5,
        normalization: Normalization = "cirkd",
        verify: bool = False,
        skip_bad_images: bool = False,
        **loader_options: Any,
    ) -> None:
        loader = LoaderOptions(**loader_options)
        checks = {"verify": verify, "skip_bad_images": skip_bad_images}
        super().__init__(root, loader, train_split, val_split, crop_size, scale_range, scale_step, hflip_prob, **checks)
        for key, split in (("train_split", train_split), ("val_split", val_split)):
            if split not in SPLITS:
                raise ValueError(f"data.{key} must be one of {SPLITS} (Cityscapes' fine splits), got {split!r}")
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"data.normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        if self.crop_size is None:
            raise ValueError(f"data.crop_size must be [height, width] of positive ints, got {crop_size!r}")
        self.normalization: Normalization = normalization

    def transform(self, train: bool) -> CityscapesTransform:
        """The training (CIRKD's augmentation) or evaluation transform of this configuration."""
        return CityscapesTransform(
            train=train,
            crop_size=self.crop_size,
            scales=self.scales,
            hflip_prob=self.hflip_prob,
            normalization=self.normalization,
        )

    def dataset(self, split: str, pairs: Sequence[tuple[Path, Path]], train: bool) -> CityscapesFine:
        return CityscapesFine(self.root, split, pairs, self.transform(train))
