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

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF

from diffkd.data.cityscapes import SegmentationLoaders, discrete_scales
from diffkd.data.image_checks import ImageFileChecks
from diffkd.data.images import DataIssue, DataNotFoundError, inspect_image, read_image
from diffkd.data.usable import require_one_size

__all__ = [
    "IMAGE_EXTENSIONS",
    "SegmentationFolder",
    "SegmentationFolderDataModule",
    "SegmentationTransform",
    "find_segmentation_pairs",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg")
LABEL_EXTENSION = ".png"


def _layout(root: Path, splits: Sequence[str]) -> list[str]:
    names = "{" + ",".join(dict.fromkeys(splits)) + "}"
    return [
        f"{root}/{names}/images/<name>.png  (or .jpg/.jpeg; RGB or grey)",
        f"{root}/{names}/labels/<name>.png  (single-channel 8-bit: class 0..num_classes-1, 255 = ignore)",
    ]


def _remedies(root: Path) -> list[str]:
    return [
        f"write the images and their label PNGs into {root} in the layout above (same stem, same size)",
        "or point data.root at a folder that has them (data.train_split / data.val_split name the split folders)",
    ]


def _files(folder: Path, extensions: Sequence[str]) -> dict[str, Path]:
    """``{stem: path}`` of the files in ``folder`` whose lower-cased suffix is in ``extensions``."""
    return {p.stem: p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in extensions}


def find_segmentation_pairs(root: str | Path, splits: Sequence[str]) -> dict[str, list[tuple[Path, Path]]]:
    """Pair each image of ``splits`` with its label file, by stem (names only: nothing is decoded).

    Returns:
        ``{split: [(image path, label path), ...]}`` sorted by stem.

    Raises:
        DataNotFoundError: a split's ``images/`` or ``labels/`` folder is missing or empty, or a file has no
            partner (the message names it and the expected layout).
    """
    root = Path(root)
    splits = list(dict.fromkeys(splits))
    folders = {s: (root / s / "images", root / s / "labels") for s in splits}
    missing = [f"{d}/ (missing folder)" for s in splits for d in folders[s] if not d.is_dir()]
    if missing:
        raise DataNotFoundError(
            f"Segmentation folder ({len(missing)} folder(s) missing)", missing, _layout(root, splits), _remedies(root)
        )
    pairs: dict[str, list[tuple[Path, Path]]] = {}
    for split in splits:
        image_dir, label_dir = folders[split]
        images, labels = _files(image_dir, IMAGE_EXTENSIONS), _files(label_dir, (LABEL_EXTENSION,))
        if not images:
            raise DataNotFoundError(
                f"Segmentation folder {split} images (no image file)",
                [f"{image_dir}/", f"{label_dir}/"],
                _layout(root, splits),
                _remedies(root),
            )
        unpaired = [f"{images[k]} (no label {label_dir / k}{LABEL_EXTENSION})" for k in sorted(images.keys() - labels)]
        unpaired += [f"{labels[k]} (no image {image_dir / k}.*)" for k in sorted(labels.keys() - images)]
        if unpaired:
            shown = unpaired[:10] + ([f"... and {len(unpaired) - 10} more"] if len(unpaired) > 10 else [])
            raise DataNotFoundError(
                f"Segmentation folder {split}: {len(unpaired)} unpaired file(s), e.g. {unpaired[0]}",
                shown,
                _layout(root, splits),
                ["give every image its label PNG (same stem) and every label its image, or remove the unpaired files"],
            )
        pairs[split] = [(images[k], labels[k]) for k in sorted(images)]
    return pairs


class SegmentationTransform:
    """``(uint8 image (C, H, W), uint8 label (H, W))`` → ``(float32 image (C, H', W'), int64 label (H', W'))``.

    Evaluation (``train=False``): normalisation only, (H', W') = (H, W). Training: a scale drawn from ``scales``,
    then (with ``crop_size``) padding at the bottom/right to the crop size and a uniformly placed crop, then a
    horizontal flip with probability ``hflip_prob``; draws from torch's default generator in that order.

    Args:
        train: augment or not.
        mean, std: per-channel statistics on the [0, 1] scale (length C).
        crop_size: ``(height, width)`` of the training crops; ``None``: no crop (then ``scales`` must be ``(1.0,)``,
            so that training samples keep one size).
        scales: the scale choices (uniform).
        hflip_prob: probability of a horizontal flip.
        ignore_index: the label of padded pixels.
    """

    def __init__(
        self,
        train: bool,
        mean: Sequence[float],
        std: Sequence[float],
        crop_size: tuple[int, int] | None = None,
        scales: Sequence[float] = (1.0,),
        hflip_prob: float = 0.0,
        ignore_index: int = 255,
    ) -> None:
        if len(mean) != len(std):
            raise ValueError(f"mean {list(mean)} and std {list(std)} differ in length")
        self.train = train
        self.scales = tuple(float(s) for s in scales)
        if crop_size is None and self.scales != (1.0,):
            raise ValueError("a random scale needs crop_size, so that the training samples have one size")
        self.crop_size = None if crop_size is None else (int(crop_size[0]), int(crop_size[1]))
        self.hflip_prob = float(hflip_prob)
        self.ignore_index = int(ignore_index)
        # (x - 255·mean) / (255·std) on the 0-255 scale is (x / 255 - mean) / std
        self.mean = torch.tensor([float(m) for m in mean]).view(-1, 1, 1) * 255
        self.std = torch.tensor([float(s) for s in std]).view(-1, 1, 1) * 255

    def normalize(self, pixels: Tensor) -> Tensor:
        """uint8 (C, H, W) → float32 (C, H, W)."""
        return (pixels.to(torch.float32) - self.mean) / self.std

    def __call__(self, pixels: Tensor, label: Tensor) -> tuple[Tensor, Tensor]:
        if not self.train:
            return self.normalize(pixels), label.long()
        if len(self.scales) > 1:
            scale = self.scales[int(torch.randint(len(self.scales), ()))]
        else:
            scale = self.scales[0]
        if scale != 1.0:
            size = [round(label.shape[0] * scale), round(label.shape[1] * scale)]
            pixels = TF.resize(pixels, size, TF.InterpolationMode.BILINEAR, antialias=False)
            label = TF.resize(label[None], size, TF.InterpolationMode.NEAREST)[0]
        image = self.normalize(pixels)
        if self.crop_size is not None:
            image, label = self._crop(image, label)
        if self.hflip_prob > 0 and float(torch.rand(())) < self.hflip_prob:
            image, label = image.flip(-1), label.flip(-1)
        return image, label.long()

    def _crop(self, image: Tensor, label: Tensor) -> tuple[Tensor, Tensor]:
        """A uniformly placed ``crop_size`` window of float (C, H, W) ``image`` and (H, W) ``label``, padded."""
        assert self.crop_size is not None
        crop_h, crop_w = self.crop_size
        height, width = label.shape
        pad_h, pad_w = max(crop_h - height, 0), max(crop_w - width, 0)
        if pad_h or pad_w:
            image = F.pad(image, (0, pad_w, 0, pad_h), value=0.0)
            label = F.pad(label, (0, pad_w, 0, pad_h), value=self.ignore_index)
        top = int(torch.randint(label.shape[0] - crop_h + 1, ()))
        left = int(torch.randint(label.shape[1] - crop_w + 1, ()))
        return image[:, top : top + crop_h, left : left + crop_w], label[top : top + crop_h, left : left + crop_w]


class SegmentationFolder(Dataset):
    """The ``(image, label)`` pairs of one split, decoded with :func:`~diffkd.data.images.read_image` and checked.

    Args:
        pairs: ``(image path, label path)`` in order.
        transform: called on ``(uint8 image (C, H, W), uint8 label (H, W))``.
        num_classes: K; label values must be in ``[0, K)`` or equal ``ignore_index``.
        ignore_index: the label of pixels that count nowhere.
        mode: PIL mode the images are converted to (``"RGB"`` or ``"L"``).
        cache: keep every decoded sample in memory after its first read (small data sets; per worker process).

    Items: the transform's output, by default ``(image float32 (C, H, W), label int64 (H, W))``.
    """

    def __init__(
        self,
        pairs: Sequence[tuple[Path, Path]],
        transform: SegmentationTransform,
        num_classes: int,
        ignore_index: int = 255,
        mode: str = "RGB",
        cache: bool = False,
    ) -> None:
        self.pairs = [(Path(i), Path(lbl)) for i, lbl in pairs]
        self.transform = transform
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.mode = mode
        self.cache: dict[int, tuple[Tensor, Tensor]] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.pairs)

    def sample_files(self, index: int) -> tuple[str, str]:
        """``(image file, label file)`` of sample ``index``."""
        image, label = self.pairs[index]
        return str(image), str(label)

    def _label_problem(self, label: Image.Image, image_size: tuple[int, int]) -> str | None:
        if label.mode not in ("L", "P"):
            return f"a label file must be a single-channel 8-bit PNG, got PIL mode {label.mode!r}"
        if label.size != image_size:
            return f"label {label.width}×{label.height} px, its image {image_size[0]}×{image_size[1]} px"
        values = np.unique(np.asarray(label)).tolist()
        bad = [v for v in values if v >= self.num_classes and v != self.ignore_index]
        if bad:
            return f"label values {bad[:8]} are neither classes 0..{self.num_classes - 1} nor {self.ignore_index}"
        return None

    def read(self, index: int) -> tuple[Tensor, Tensor]:
        """Decoded, checked sample ``index``: uint8 image (C, H, W) and uint8 label (H, W).

        Raises:
            ImageReadError: a file does not decode (the message names it).
            ValueError: the label does not fit its image or holds values outside the classes (naming both files).
        """
        if self.cache is not None and index in self.cache:
            return self.cache[index]
        image_path, label_path = self.sample_files(index)
        image = read_image(image_path, self.mode)
        label = read_image(label_path, None, what="label")
        problem = self._label_problem(label, image.size)
        if problem is not None:
            raise ValueError(f"{label_path} (the label of {image_path}): {problem}")
        sample = TF.pil_to_tensor(image), TF.pil_to_tensor(label)[0]
        if self.cache is not None:
            self.cache[index] = sample
        return sample

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        return self.transform(*self.read(index))

    def check_sample(self, index: int) -> list[DataIssue]:
        """Decode sample ``index``: errors when a file does not decode or the label does not fit."""
        image_path, label_path = self.sample_files(index)
        image, issues = inspect_image(image_path, index, rgb=self.mode == "RGB")
        label, label_issues = inspect_image(label_path, index, what="label", rgb=False)
        issues += label_issues
        if image is not None and label is not None:
            problem = self._label_problem(label, image.size)
            if problem is not None:
                issues.append(DataIssue(label_path, "label", problem, "error", index=index))
        return issues


class SegmentationFolderDataModule(SegmentationLoaders, ImageFileChecks, L.LightningDataModule):
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
    train_size_fix = "set data.crop_size=[height, width] (training crops of one size), or data.batch_size=1"

    def __init__(
        self,
        root: str,
        num_classes: int,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
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
        drop_last: bool = True,
        verify: bool = False,
        skip_bad_images: bool = False,
    ) -> None:
        super().__init__()
        self.init_image_checks(verify, skip_bad_images)
        if int(num_classes) < 1:
            raise ValueError(f"data.num_classes must be >= 1, got {num_classes}")
        if in_chans not in (1, 3):
            raise ValueError(f"data.in_chans must be 1 (grey) or 3 (RGB), got {in_chans}")
        if len(mean) != in_chans or len(std) != in_chans:
            raise ValueError(f"data.mean and data.std need {in_chans} values (in_chans), got {list(mean)}, {list(std)}")
        if not 0.0 <= hflip_prob <= 1.0:
            raise ValueError(f"data.hflip_prob must be in [0, 1], got {hflip_prob}")
        crop: tuple[int, int] | None = None
        if crop_size is not None:
            crop = (int(crop_size), int(crop_size)) if isinstance(crop_size, int) else tuple(int(c) for c in crop_size)
            if len(crop) != 2 or min(crop) < 1:
                raise ValueError(f"data.crop_size must be [height, width] of positive ints, got {crop_size!r}")
        self.scales = discrete_scales(scale_range, float(scale_step))
        if crop is None and self.scales != (1.0,):
            raise ValueError("data.scale_range needs data.crop_size: rescaled training samples are cropped to one size")
        self.root = Path(root)
        self.num_classes = int(num_classes)
        self.batch_size = int(batch_size)
        self.val_batch_size = int(val_batch_size) if val_batch_size is not None else self.batch_size
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.train_split = train_split
        self.val_split = val_split
        self.in_chans = int(in_chans)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.crop_size = crop
        self.hflip_prob = float(hflip_prob)
        self.ignore_index = int(ignore_index)
        if class_names is not None and len(class_names) != self.num_classes:
            raise ValueError(f"data.class_names has {len(class_names)} names for {self.num_classes} classes")
        self.class_names = tuple(class_names) if class_names is not None else None
        self.cache = bool(cache)
        self.drop_last = bool(drop_last)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    @property
    def data_dir(self) -> str:
        """The folder, as a string (``root``)."""
        return str(self.root)

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

    def _dataset(self, pairs: Sequence[tuple[Path, Path]], train: bool) -> SegmentationFolder:
        mode = "RGB" if self.in_chans == 3 else "L"
        return SegmentationFolder(pairs, self.transform(train), self.num_classes, self.ignore_index, mode, self.cache)

    def setup(self, stage: str | None = None) -> None:
        """Pair the files and build the data sets (once): both for ``fit``/``None``, the evaluation one otherwise."""
        want_train = stage in (None, "fit") and self.train_set is None
        want_val = self.val_set is None
        if not (want_train or want_val):
            return
        splits = ([self.train_split] if want_train else []) + ([self.val_split] if want_val else [])
        pairs = find_segmentation_pairs(self.root, splits)
        built: dict[str, Dataset] = {}
        if want_train:
            if self.crop_size is None:  # whole images: one size only if the files have one
                files = [image for image, _ in pairs[self.train_split]]
                require_one_size("train", files, self.batch_size, "data.batch_size", self.train_size_fix)
            built["train"] = self._dataset(pairs[self.train_split], train=True)
        if want_val:
            self.require_one_val_size(pairs[self.val_split])
            built["val"] = self._dataset(pairs[self.val_split], train=False)
        built = self.guard_image_sets(built)
        self.train_set = built.get("train", self.train_set)
        self.val_set = built.get("val", self.val_set)
        for split in dict.fromkeys(splits):
            log.info("segmentation folder %s/%s: %d images", self.root, split, len(pairs[split]))
