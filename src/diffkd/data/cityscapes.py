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
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning as L
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision import tv_tensors
from torchvision.datasets import Cityscapes
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from diffkd.data.image_checks import ImageFileChecks
from diffkd.data.images import DataIssue, DataNotFoundError, inspect_image, read_image
from diffkd.data.protocol import preserved_rng_state
from diffkd.data.resumable import resume_position, seeded_train_loader
from diffkd.data.sample_index import SampleIndexCapability
from diffkd.data.usable import (
    SameSizeCollate,
    SplitProblem,
    batch_problem,
    raise_problems,
    require_one_size,
    world_size,
)

__all__ = [
    "CIRKD_MEAN_BGR",
    "CITYSCAPES_URL",
    "CLASS_NAMES",
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LABEL_ID_TO_TRAIN_ID",
    "CityscapesDataModule",
    "CityscapesFine",
    "CityscapesTransform",
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
#: What to change when evaluation images differ in size: they are used at their own size, so one per batch.
VAL_SIZE_FIX = "set data.val_batch_size=1 (evaluation uses every image at its own size)"
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


def discrete_scales(scale_range: Sequence[float] | None, scale_step: float) -> tuple[float, ...]:
    """The scale choices ``lo, lo + step, ..., hi`` (CIRKD: ``0.5 + randint(0, 15) / 10`` = 0.5, 0.6, ..., 2.0).

    Args:
        scale_range: ``(lo, hi)``, ``hi - lo`` a whole number of steps; ``None``: no rescaling, ``(1.0,)``.
        scale_step: the spacing of the choices.
    """
    if scale_range is None:
        return (1.0,)
    lo, hi = (float(v) for v in scale_range)
    if not 0 < lo <= hi:
        raise ValueError(f"scale_range must be [lo, hi] with 0 < lo <= hi, got {list(scale_range)}")
    if lo == hi:
        return (lo,)
    if scale_step <= 0:
        raise ValueError(f"scale_step must be > 0, got {scale_step}")
    steps = round((hi - lo) / scale_step)
    if abs(lo + steps * scale_step - hi) > 1e-6:
        raise ValueError(f"scale_range {[lo, hi]} is not a whole number of scale_step={scale_step} steps")
    return tuple(round(lo + k * scale_step, 6) for k in range(steps + 1))


# ------------------------------------------------------------------------------------------ files


def _layout(root: Path, splits: Sequence[str]) -> list[str]:
    names = "{" + ",".join(dict.fromkeys(splits)) + "}"
    return [
        f"{root}/leftImg8bit/{names}/<city>/<city>_<seq>_<frame>{IMAGE_SUFFIX}",
        f"{root}/gtFine/{names}/<city>/<city>_<seq>_<frame>{LABEL_SUFFIX}",
    ]


def _remedies(root: Path) -> list[str]:
    return [
        f"register at {CITYSCAPES_URL} (an account is needed), download leftImg8bit_trainvaltest.zip (11 GB) and "
        f"gtFine_trainvaltest.zip (241 MB), and unzip both into {root} (cityscapesScripts' csDownload can fetch them)",
        "or point data.root at a folder that has them (data.train_split / data.val_split choose the split folders)",
    ]


def _scan(folder: Path, suffix: str) -> dict[str, Path]:
    """``{"<city>/<city>_<seq>_<frame>": path}`` of the files ending in ``suffix`` one city folder down."""
    found: dict[str, Path] = {}
    with os.scandir(folder) as cities:
        for city in cities:
            if not city.is_dir():
                continue
            with os.scandir(city.path) as files:
                for entry in files:
                    if entry.name.endswith(suffix) and entry.is_file():
                        found[f"{city.name}/{entry.name[: -len(suffix)]}"] = Path(entry.path)
    return found


def find_pairs(root: str | Path, splits: Sequence[str]) -> dict[str, list[tuple[Path, Path]]]:
    """Check the files of ``splits`` (names only, nothing is decoded) and pair each image with its label.

    Args:
        root: the Cityscapes folder (holding ``leftImg8bit/`` and ``gtFine/``).
        splits: split folder names (``train``, ``val``, ``test``).

    Returns:
        ``{split: [(image path, label path), ...]}``, sorted by city and frame.

    Raises:
        DataNotFoundError: a split folder is missing or holds no image; or an image has no label file, or a label file
            no image (the message names the file and its missing partner).
    """
    root = Path(root)
    splits = list(dict.fromkeys(splits))
    folders = {s: (root / "leftImg8bit" / s, root / "gtFine" / s) for s in splits}
    missing = [f"{d}/ (missing folder)" for s in splits for d in folders[s] if not d.is_dir()]
    if missing:
        raise DataNotFoundError(
            f"Cityscapes ({len(missing)} folder(s) missing)", missing, _layout(root, splits), _remedies(root)
        )
    pairs: dict[str, list[tuple[Path, Path]]] = {}
    for split in splits:
        image_dir, label_dir = folders[split]
        images, labels = _scan(image_dir, IMAGE_SUFFIX), _scan(label_dir, LABEL_SUFFIX)
        if not images and not labels:
            raise DataNotFoundError(
                f"Cityscapes {split} images (the split folders are empty)",
                [f"{image_dir}/", f"{label_dir}/"],
                _layout(root, splits),
                _remedies(root),
            )
        orphan_labels = sorted(labels.keys() - images)
        orphan_images = sorted(images.keys() - labels)
        unpaired = [(labels[k], "label file", image_dir / f"{k}{IMAGE_SUFFIX}", "image") for k in orphan_labels]
        unpaired += [(images[k], "image", label_dir / f"{k}{LABEL_SUFFIX}", "label file") for k in orphan_images]
        if unpaired:
            path, kind, partner, partner_kind = unpaired[0]
            more = [f"{p} (no {pk} {q})" for p, _, q, pk in unpaired[:10]]
            if len(unpaired) > 10:
                more.append(f"... and {len(unpaired) - 10} more unpaired file(s)")
            raise DataNotFoundError(
                f"The {partner_kind} {partner} of the Cityscapes {kind} {path}",
                more,
                _layout(root, splits),
                [
                    "each image needs its gtFine labelIds file and each labelIds file its image: re-extract "
                    "leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip (an interrupted unzip leaves some out)",
                    "or remove the unpaired file(s) named above",
                ],
            )
        pairs[split] = [(images[k], labels[k]) for k in sorted(images)]
    return pairs


# ------------------------------------------------------------------------------------------ samples


class CityscapesTransform:
    """``(PIL RGB image, PIL labelId image)`` → ``(image float32 (3, H', W'), label int64 (H', W'))``.

    Both modes map the labelIds to trainIds (255 = ignore) and normalise the image. Training (``train=True``) also
    runs CIRKD's augmentation (``CSTrainValSet.__getitem__``): a scale drawn from ``scales`` (image bilinear without
    antialiasing, as cv2's ``INTER_LINEAR``; label nearest), padding at the bottom and right up to ``crop_size``
    (image 0 after normalisation, label 255), a uniformly placed ``crop_size`` crop, and a horizontal flip of both
    with probability ``hflip_prob``. The draws come from torch's default generator (in that order: scale, top, left,
    flip), which the training loader seeds per sample from (seed, epoch, index).

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
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        self.train = train
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.scales = tuple(float(s) for s in scales)
        self.hflip_prob = float(hflip_prob)
        self.normalization = normalization
        # On the 0-255 scale: (x - 255·mean) / (255·std) is ImageNet's (x / 255 - mean) / std.
        if normalization == "cirkd":
            self.mean, self.std = torch.tensor(CIRKD_MEAN_BGR).view(3, 1, 1), None
        else:
            self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255
            self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255

    def normalize(self, pixels: Tensor) -> Tensor:
        """uint8 RGB (3, H, W) → normalised float32 (3, H, W), channels reordered to BGR for ``"cirkd"``."""
        x = pixels.to(torch.float32)
        if self.std is None:  # CIRKD: cv2 reads BGR, and there is no std division
            return x.flip(0) - self.mean
        return (x - self.mean) / self.std

    def sample_scale(self) -> float:
        """One scale from ``scales``, uniformly (torch's default generator)."""
        if len(self.scales) == 1:
            return self.scales[0]
        return self.scales[int(torch.randint(len(self.scales), ()))]

    def __call__(self, image: Image.Image, target: Image.Image) -> tuple[Tensor, Tensor]:
        pixels = TF.pil_to_tensor(image if image.mode == "RGB" else image.convert("RGB"))
        label_ids = TF.pil_to_tensor(target)
        if label_ids.dtype != torch.uint8 or label_ids.shape[0] != 1:
            raise ValueError(
                f"a Cityscapes labelIds file must be a single-channel 8-bit PNG, got PIL mode {target.mode!r}"
            )
        label = map_label_ids(label_ids[0])
        if pixels.shape[-2:] != label.shape:
            raise ValueError(f"image {tuple(pixels.shape[-2:])} and label {tuple(label.shape)} differ in size")
        if not self.train:
            return self.normalize(pixels), label.long()
        return self.augment(pixels, label)

    def augment(self, pixels: Tensor, label: Tensor) -> tuple[Tensor, Tensor]:
        """Scale, pad, crop and flip uint8 RGB ``pixels`` (3, H, W) and uint8 trainId ``label`` (H, W).

        Returns:
            image float32 (3, ch, cw) normalised, label int64 (ch, cw).
        """
        scale = self.sample_scale()
        height, width = label.shape
        if scale != 1.0:
            size = [round(height * scale), round(width * scale)]
            pixels = TF.resize(tv_tensors.Image(pixels), size, v2.InterpolationMode.BILINEAR, antialias=False)
            label = TF.resize(tv_tensors.Mask(label), size, v2.InterpolationMode.NEAREST)  # a Mask is never blended
            pixels, label = pixels.as_subclass(Tensor), label.as_subclass(Tensor)
            height, width = label.shape
        crop_h, crop_w = self.crop_size
        # Offsets range over the padded canvas (max(H, ch), max(W, cw)); only the part of the window that lies on the
        # image is normalised and copied, the rest keeps the padding values.
        top = int(torch.randint(max(height - crop_h, 0) + 1, ()))
        left = int(torch.randint(max(width - crop_w, 0) + 1, ()))
        bottom, right = min(top + crop_h, height), min(left + crop_w, width)
        image_out = torch.zeros(3, crop_h, crop_w, dtype=torch.float32)
        label_out = torch.full((crop_h, crop_w), IGNORE_INDEX, dtype=torch.uint8)
        image_out[:, : bottom - top, : right - left] = self.normalize(pixels[:, top:bottom, left:right])
        label_out[: bottom - top, : right - left] = label[top:bottom, left:right]
        if self.hflip_prob > 0 and float(torch.rand(())) < self.hflip_prob:
            image_out, label_out = image_out.flip(-1), label_out.flip(-1)
        return image_out, label_out.long()


def _label_problem(label: Image.Image, image_size: tuple[int, int]) -> str | None:
    """What makes a decoded labelIds image unusable with an image of ``image_size`` (PIL's (W, H)), or None."""
    if label.mode not in ("L", "P"):  # the modes that give CityscapesTransform its uint8 (1, H, W)
        return f"a labelIds file must be a single-channel 8-bit PNG, got PIL mode {label.mode!r}"
    if label.size != image_size:
        width, height = image_size
        return f"label {label.width}×{label.height} px, its image {width}×{height} px: they differ in size"
    return None


class CityscapesFine(Cityscapes):
    """torchvision's ``Cityscapes`` (``mode="fine"``, ``target_type="semantic"``) over checked, sorted pairs.

    torchvision lists the files in directory order, which differs between file systems; the pairs from
    :func:`find_pairs` make the order (and so ``example_batch`` and ``val``-set indices) the same everywhere.

    Items are torchvision's (the RGB image and the labelIds image through ``transforms``), but both files are
    decoded before the transform: one that does not decode raises :class:`~diffkd.data.images.ImageReadError`
    naming it, and a label of the wrong mode or size a ``ValueError`` naming both files.

    Args:
        root: the Cityscapes folder.
        split: ``train``, ``val`` or ``test``.
        pairs: ``(image, labelIds file)`` paths, in order.
        transforms: called on ``(PIL image, PIL labelIds image)``.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        pairs: Sequence[tuple[Path, Path]],
        transforms: CityscapesTransform | None = None,
    ) -> None:
        super().__init__(str(root), split=split, mode="fine", target_type="semantic", transforms=transforms)
        self.images = [str(image) for image, _ in pairs]
        self.targets = [[str(label)] for _, label in pairs]

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        image = read_image(self.images[index], "RGB")
        label = read_image(self.targets[index][0], None, what="label")
        problem = _label_problem(label, image.size)
        if problem is not None:
            raise ValueError(f"{self.targets[index][0]} (the label of {self.images[index]}): {problem}")
        if self.transforms is not None:
            return self.transforms(image, label)
        return image, label

    def sample_files(self, index: int) -> tuple[str, str]:
        """``(image, labelIds file)`` of sample ``index``."""
        return self.images[index], self.targets[index][0]

    def check_sample(self, index: int) -> list[DataIssue]:
        """Decode sample ``index``'s image and label; errors when one does not decode or the label does not fit
        (mode, size), a note when the image is not RGB."""
        image_path, label_path = self.sample_files(index)
        image, issues = inspect_image(image_path, index)
        label, label_issues = inspect_image(label_path, index, what="label", rgb=False)
        issues += label_issues
        if image is not None and label is not None:
            problem = _label_problem(label, image.size)
            if problem is not None:
                issues.append(DataIssue(label_path, "label", problem, "error", index=index))
        return issues


# ------------------------------------------------------------------------------------------ datamodule


class SegmentationLoaders(SampleIndexCapability):
    """The loaders and ``example_batch`` of a segmentation datamodule whose ``train_set``/``val_set`` yield
    ``(image (C, H, W), label (H, W))`` (Cityscapes, the segmentation folders): shuffled training batches (the last
    incomplete one dropped with ``drop_last``) that resume exactly, also mid-epoch
    (:func:`~diffkd.data.resumable.seeded_train_loader`), evaluation in order, the val split for testing."""

    task: ClassVar[str] = "segmentation"
    builds_sample_index = True
    no_class_hint = "the per-pixel labels of the batches (masks), or a method that needs no per-image class"
    #: Seed of the augmentation draws of :meth:`example_batch`, so that it is the same batch every call.
    example_seed: int = 0
    #: What to change when training samples differ in size (a subclass whose training samples can).
    train_size_fix: str = "set data.batch_size=1"
    #: The data set's name in :class:`~diffkd.data.usable.EmptySplitError`.
    checks_name: str = "segmentation"

    def collate(self, train: bool, example: int | None = None) -> SameSizeCollate:
        """``default_collate``, with a :class:`~diffkd.data.usable.MixedSizeError` naming the sizes and the fix
        instead of torch's bare "stack expects each tensor to be equal size". ``example``: the size of an
        :meth:`example_batch` (the models' dry run), not a loader's."""
        key, size = ("data.batch_size", self.batch_size) if train else ("data.val_batch_size", self.val_batch_size)
        batch = f"the models' dry-run example batch of {example}" if example is not None else f"{key}={size}"
        return SameSizeCollate(
            default_collate, "train" if train else "val", batch, self.train_size_fix if train else VAL_SIZE_FIX
        )

    def require_one_val_size(self, pairs: Sequence[tuple[Path, Path]]) -> None:
        """Evaluation uses every image at its own size: raise :class:`~diffkd.data.usable.MixedSizeError` at
        setup when they differ and ``val_batch_size`` > 1 would stack them (reads the file headers only)."""
        files = [image for image, _ in pairs]
        require_one_size("val", files, self.val_batch_size, "data.val_batch_size", VAL_SIZE_FIX)

    def _loader(self, dataset: Dataset, batch_size: int, train: bool) -> DataLoader:
        common = {
            "batch_size": batch_size,
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory,
            "persistent_workers": self.num_workers > 0,
            "collate_fn": self.collate(train),
        }
        if not train:
            return DataLoader(dataset, shuffle=False, **common)
        # exactly resumable (diffkd.data.resumable): the order from (seed, epoch), each crop, scale and flip from
        # (seed, epoch, index), and a run resumed mid-epoch starting after the batches it had trained
        common["collate_fn"] = self.indexed_collate(common["collate_fn"])
        dataset = self.indexed_train_set(dataset)
        return seeded_train_loader(dataset, position_fn=self._resume_position, drop_last=self.drop_last, **common)

    def _resume_position(self) -> tuple[int, int]:
        return resume_position(getattr(self, "trainer", None))

    def train_batch_problem(self) -> SplitProblem | None:
        """Why the training split gives no batch on this process (``drop_last`` and fewer samples than
        ``batch_size``), or None; ``python -m diffkd.data.check`` reports it, :meth:`train_dataloader` raises it."""
        self.setup("fit")
        where = f"{getattr(self, 'root', '')} ({self.train_split})"
        return batch_problem("train", where, len(self.train_set), self.batch_size, self.drop_last, world_size(self))

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        raise_problems(self.checks_name, [self.train_batch_problem()])
        return self._loader(self.train_set, self.batch_size, train=True)

    def val_dataloader(self) -> DataLoader:
        self.setup("validate")
        return self._loader(self.val_set, self.val_batch_size, train=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def example_batch(self, size: int = 2, split: str = "train") -> tuple[Tensor, Tensor]:
        """A real collated batch of the first ``size`` samples of ``split``, on the CPU.

        ``"train"``: through the training transform (``crop_size`` crops), its draws from a fixed seed, so the batch
        is the same every call; ``"val"`` (or ``"test"``): the evaluation transform (full images), only those of the
        first image's size (evaluation images may differ in size with ``val_batch_size: 1``; the batch then holds
        fewer than ``size``). Sets up the data sets when needed; every global random state is the same afterwards
        as before.

        Returns:
            images float32 (size, C, H, W), labels int64 (size, H, W).
        """
        if split not in ("train", "val", "test"):
            raise ValueError(f"example_batch split must be 'train', 'val' or 'test', got {split!r}")
        train = split == "train"
        with preserved_rng_state():
            self.setup("fit" if train else "validate")
            dataset = self.train_set if train else self.val_set
            if not 1 <= size <= len(dataset):
                raise ValueError(f"example_batch size must be in 1..{len(dataset)} for split {split!r}, got {size}")
            torch.default_generator.manual_seed(self.example_seed)  # CPU only: torch.manual_seed also seeds CUDA
            if train:
                dataset = self.indexed_train_set(dataset)
                return self.indexed_collate(self.collate(train, example=size))([dataset[i] for i in range(size)])
            samples = [dataset[i] for i in range(size)]
            samples = [s for s in samples if s[0].shape == samples[0][0].shape]
            return self.collate(train, example=size)(samples)


class CityscapesDataModule(SegmentationLoaders, ImageFileChecks, L.LightningDataModule):
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

    num_classes: int = len(CLASS_NAMES)
    ignore_index: int = IGNORE_INDEX
    class_names: tuple[str, ...] = CLASS_NAMES

    def __init__(
        self,
        root: str = "data/cityscapes",
        batch_size: int = 2,
        val_batch_size: int = 1,
        num_workers: int = 4,
        pin_memory: bool = False,
        train_split: str = "train",
        val_split: str = "val",
        crop_size: int | Sequence[int] = (512, 1024),
        scale_range: Sequence[float] | None = (0.5, 2.0),
        scale_step: float = 0.1,
        hflip_prob: float = 0.5,
        normalization: Normalization = "cirkd",
        drop_last: bool = True,
        verify: bool = False,
        skip_bad_images: bool = False,
    ) -> None:
        super().__init__()
        self.init_image_checks(verify, skip_bad_images)
        for key, split in (("train_split", train_split), ("val_split", val_split)):
            if split not in SPLITS:
                raise ValueError(f"data.{key} must be one of {SPLITS} (Cityscapes' fine splits), got {split!r}")
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"data.normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        crop = (int(crop_size), int(crop_size)) if isinstance(crop_size, int) else tuple(int(c) for c in crop_size)
        if len(crop) != 2 or min(crop) < 1:
            raise ValueError(f"data.crop_size must be [height, width] of positive ints, got {crop_size!r}")
        if not 0.0 <= hflip_prob <= 1.0:
            raise ValueError(f"data.hflip_prob must be in [0, 1], got {hflip_prob}")
        self.root = Path(root)
        self.batch_size = int(batch_size)
        self.val_batch_size = int(val_batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.train_split = train_split
        self.val_split = val_split
        self.crop_size: tuple[int, int] = (crop[0], crop[1])
        self.scales = discrete_scales(scale_range, float(scale_step))
        self.hflip_prob = float(hflip_prob)
        self.normalization: Normalization = normalization
        self.drop_last = bool(drop_last)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    @property
    def data_dir(self) -> str:
        """The Cityscapes folder, as a string (``root``)."""
        return str(self.root)

    def transform(self, train: bool) -> CityscapesTransform:
        """The training (CIRKD's augmentation) or evaluation transform of this configuration."""
        return CityscapesTransform(
            train=train,
            crop_size=self.crop_size,
            scales=self.scales,
            hflip_prob=self.hflip_prob,
            normalization=self.normalization,
        )

    def setup(self, stage: str | None = None) -> None:
        """Check the files and build the data sets (once): both for ``fit``/``None``, the evaluation one otherwise."""
        want_train = stage in (None, "fit") and self.train_set is None
        want_val = self.val_set is None
        if not (want_train or want_val):
            return
        splits = ([self.train_split] if want_train else []) + ([self.val_split] if want_val else [])
        pairs = find_pairs(self.root, splits)
        built: dict[str, Dataset] = {}
        if want_train:
            built["train"] = CityscapesFine(self.root, self.train_split, pairs[self.train_split], self.transform(True))
        if want_val:
            self.require_one_val_size(pairs[self.val_split])
            built["val"] = CityscapesFine(self.root, self.val_split, pairs[self.val_split], self.transform(False))
        built = self.guard_image_sets(built)  # data.verify checks both splits before raising
        self.train_set = built.get("train", self.train_set)
        self.val_set = built.get("val", self.val_set)
        for split in dict.fromkeys(splits):
            log.info("Cityscapes %s: %d images", split, len(pairs[split]))
