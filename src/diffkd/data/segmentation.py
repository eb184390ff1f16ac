"""Semantic segmentation from image/label files, written once: the folder layout and pairing, the data set, the
transform (scale → pad → crop → flip) and the data module. A data set is a :class:`PairLayout` (where images and
labels are, how their names pair) plus, where its label files hold other ids than the classes, a label map:

* :mod:`diffkd.data.segmentation_folder` — ``<root>/<split>/{images,labels}/<name>``, labels are the classes;
* :mod:`diffkd.data.cityscapes` — ``leftImg8bit/<split>/<city>/…`` and ``gtFine/…``, labelIds mapped to the 19
  trainIds by a lookup table, CIRKD's normalisation.

A sample is ``(image float32 (C, H, W), label int64 (H, W))``; a batch ``(images (B, C, H, W), labels (B, H, W))``.
Training can augment: a scale drawn from ``scales`` (image bilinear without antialiasing, label nearest), padding at
the bottom and right up to ``crop_size`` (image 0 after normalisation, label ``ignore_index``), a uniformly placed
crop and a horizontal flip, drawn from torch's default generator in that order (scale, top, left, flip) — which the
training loader seeds per sample from (seed, epoch, index), so a resumed run draws what the uninterrupted one drew.
Evaluation normalises only.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF

from diffkd.data.image_checks import ImageFileChecks
from diffkd.data.images import DataIssue, DataNotFoundError, inspect_image, read_image
from diffkd.data.loaders import DataModuleBase, LoaderOptions
from diffkd.data.usable import require_one_size

__all__ = [
    "PairLayout",
    "SegmentationDataModule",
    "SegmentationFolder",
    "SegmentationTransform",
    "crop_size_of",
    "discrete_scales",
    "find_layout_pairs",
]

log = logging.getLogger(__name__)

#: What to change when evaluation images differ in size: they are used at their own size, so one per batch.
VAL_SIZE_FIX = "set data.val_batch_size=1 (evaluation uses every image at its own size)"


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


def crop_size_of(crop_size: int | Sequence[int] | None) -> tuple[int, int] | None:
    """``data.crop_size`` as ``(height, width)`` (an int: square; ``None`` stays ``None``).

    Raises:
        ValueError: not two positive ints.
    """
    if crop_size is None:
        return None
    crop = (int(crop_size), int(crop_size)) if isinstance(crop_size, int) else tuple(int(c) for c in crop_size)
    if len(crop) != 2 or min(crop) < 1:
        raise ValueError(f"data.crop_size must be [height, width] of positive ints, got {crop_size!r}")
    return crop[0], crop[1]


# ------------------------------------------------------------------------------------------ transform


class SegmentationTransform:
    """``(uint8 image (C, H, W), uint8 label (H, W))`` → ``(float32 image (C, H', W'), int64 label (H', W'))``.

    Evaluation (``train=False``): normalisation only, (H', W') = (H, W). Training: a scale drawn from ``scales``,
    then (with ``crop_size``) a uniformly placed ``crop_size`` window on the image padded at the bottom/right to at
    least the crop size (padding: image 0 after normalisation, label ``ignore_index``), then a horizontal flip with
    probability ``hflip_prob``; draws from torch's default generator in that order. Only the window is normalised.

    Normalisation is ``(x - mean) / std`` on the [0, 1] scale (``mean``, ``std`` of length C), or, given
    ``pixel_mean`` (on the 0-255 scale, no std division) and ``bgr``, CIRKD's: channels reversed to BGR and the mean
    subtracted.

    Args:
        train: augment or not.
        mean, std: per-channel statistics on the [0, 1] scale (length C).
        crop_size: ``(height, width)`` of the training crops; ``None``: no crop (then ``scales`` must be ``(1.0,)``,
            so that training samples keep one size).
        scales: the scale choices (uniform).
        hflip_prob: probability of a horizontal flip.
        ignore_index: the label of padded pixels.
        pixel_mean: instead of ``mean``/``std``: a mean on the 0-255 scale, subtracted without a std division.
        bgr: reverse the channels (RGB → BGR) before normalising.
    """

    def __init__(
        self,
        train: bool,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        crop_size: tuple[int, int] | None = None,
        scales: Sequence[float] = (1.0,),
        hflip_prob: float = 0.0,
        ignore_index: int = 255,
        *,
        pixel_mean: Sequence[float] | None = None,
        bgr: bool = False,
    ) -> None:
        self.train = train
        self.scales = tuple(float(s) for s in scales)
        if crop_size is None and self.scales != (1.0,):
            raise ValueError("a random scale needs crop_size, so that the training samples have one size")
        self.crop_size = None if crop_size is None else (int(crop_size[0]), int(crop_size[1]))
        self.hflip_prob = float(hflip_prob)
        self.ignore_index = int(ignore_index)
        self.bgr = bool(bgr)
        if pixel_mean is not None:
            self.mean, self.std = torch.tensor(tuple(pixel_mean)).view(-1, 1, 1), None
        else:
            if mean is None or std is None or len(mean) != len(std):
                raise ValueError(f"mean {mean} and std {std} must be given, of the same length")
            # (x - 255·mean) / (255·std) on the 0-255 scale is (x / 255 - mean) / std
            self.mean = torch.tensor([float(m) for m in mean]).view(-1, 1, 1) * 255
            self.std = torch.tensor([float(s) for s in std]).view(-1, 1, 1) * 255

    def normalize(self, pixels: Tensor) -> Tensor:
        """uint8 (C, H, W) → float32 (C, H, W)."""
        x = pixels.to(torch.float32)
        if self.bgr:
            x = x.flip(0)
        return x - self.mean if self.std is None else (x - self.mean) / self.std

    def sample_scale(self) -> float:
        """One scale from ``scales``, uniformly (torch's default generator; no draw for a single choice)."""
        if len(self.scales) == 1:
            return self.scales[0]
        return self.scales[int(torch.randint(len(self.scales), ()))]

    def __call__(self, pixels: Tensor, label: Tensor) -> tuple[Tensor, Tensor]:
        if not self.train:
            return self.normalize(pixels), label.long()
        return self.augment(pixels, label)

    def augment(self, pixels: Tensor, label: Tensor) -> tuple[Tensor, Tensor]:
        """Scale, pad, crop and flip uint8 ``pixels`` (C, H, W) and uint8 ``label`` (H, W).

        Returns:
            image float32 (C, ch, cw) normalised, label int64 (ch, cw) (without ``crop_size``: the scaled size).
        """
        scale = self.sample_scale()
        if scale != 1.0:
            size = [round(label.shape[0] * scale), round(label.shape[1] * scale)]
            pixels = TF.resize(pixels, size, TF.InterpolationMode.BILINEAR, antialias=False)
            label = TF.resize(label[None], size, TF.InterpolationMode.NEAREST)[0]
        if self.crop_size is None:
            image = self.normalize(pixels)
        else:
            image, label = self.crop(pixels, label)
        if self.hflip_prob > 0 and float(torch.rand(())) < self.hflip_prob:
            image, label = image.flip(-1), label.flip(-1)
        return image, label.long()

    def crop(self, pixels: Tensor, label: Tensor) -> tuple[Tensor, Tensor]:
        """A uniformly placed ``crop_size`` window of uint8 ``pixels`` (C, H, W) and ``label`` (H, W) on the canvas
        padded to (max(H, ch), max(W, cw)): the window's part on the image normalised, the rest the padding."""
        assert self.crop_size is not None
        crop_h, crop_w = self.crop_size
        height, width = label.shape
        top = int(torch.randint(max(height - crop_h, 0) + 1, ()))
        left = int(torch.randint(max(width - crop_w, 0) + 1, ()))
        bottom, right = min(top + crop_h, height), min(left + crop_w, width)
        image_out = torch.zeros(pixels.shape[0], crop_h, crop_w, dtype=torch.float32)
        label_out = torch.full((crop_h, crop_w), self.ignore_index, dtype=label.dtype)
        image_out[:, : bottom - top, : right - left] = self.normalize(pixels[:, top:bottom, left:right])
        label_out[: bottom - top, : right - left] = label[top:bottom, left:right]
        return image_out, label_out


# ------------------------------------------------------------------------------------------ files


@dataclass(frozen=True)
class PairLayout:
    """Where a segmentation data set keeps its images and labels, and how their names pair.

    An image ``<image_dir>/[<group>/]<key><image suffix>`` pairs with ``<label_dir>/[<group>/]<key><label_suffix>``
    (``grouped``: one folder level between, Cityscapes' cities). Suffixes are compared in lower case.

    Attributes:
        name: the data set's name in messages (``"Cityscapes"``).
        image_dir, label_dir: the split's folders relative to the root, with ``{split}``.
        image_suffixes: the endings of image file names (``(".png", ".jpg")``, ``("_leftImg8bit.png",)``).
        label_suffix: the ending of label file names.
        grouped: the files sit one folder level down (``<city>/``).
        layout: the expected layout, one line each, with ``{root}`` and ``{splits}``.
        remedies: how to get the data, with ``{root}``.
        unpaired_fix: what to do about an image without its label or the reverse.
    """

    name: str
    image_dir: str
    label_dir: str
    image_suffixes: tuple[str, ...]
    label_suffix: str
    grouped: bool = False
    layout: tuple[str, ...] = ()
    remedies: tuple[str, ...] = ()
    unpaired_fix: tuple[str, ...] = field(
        default=("give every image its label file and every label file its image, or remove the unpaired files",)
    )

    def folders(self, root: Path, split: str) -> tuple[Path, Path]:
        """``(image folder, label folder)`` of ``split``."""
        return root / self.image_dir.format(split=split), root / self.label_dir.format(split=split)

    def expected(self, root: Path, splits: Sequence[str]) -> list[str]:
        names = "{" + ",".join(dict.fromkeys(splits)) + "}"
        return [line.format(root=root, splits=names) for line in self.layout]

    def how_to_get(self, root: Path) -> list[str]:
        return [line.format(root=root) for line in self.remedies]

    def scan(self, folder: Path, suffixes: Sequence[str]) -> dict[str, Path]:
        """``{key: path}`` of the files in ``folder`` (one level down when ``grouped``) ending in ``suffixes``."""
        found: dict[str, Path] = {}
        folders = [folder]
        if self.grouped:
            with os.scandir(folder) as groups:
                folders = [Path(g.path) for g in groups if g.is_dir()]
        for directory in folders:
            prefix = f"{directory.name}/" if self.grouped else ""
            with os.scandir(directory) as files:
                for entry in files:
                    name = entry.name.lower()
                    suffix = next((s for s in suffixes if name.endswith(s.lower())), None)
                    if suffix is not None and entry.is_file():
                        found[prefix + entry.name[: -len(suffix)]] = Path(entry.path)
        return found


def find_layout_pairs(
    root: str | Path, splits: Sequence[str], layout: PairLayout
) -> dict[str, list[tuple[Path, Path]]]:
    """Check the files of ``splits`` (names only: nothing is decoded) and pair each image with its label.

    Returns:
        ``{split: [(image path, label path), ...]}`` sorted by key (group, then name).

    Raises:
        DataNotFoundError: a split folder is missing, a split has no image, or an image has no label file or a label
            file no image (the message names the files and their missing partners).
    """
    root = Path(root)
    splits = list(dict.fromkeys(splits))
    folders = {s: layout.folders(root, s) for s in splits}
    missing = [f"{d}/ (missing folder)" for s in splits for d in folders[s] if not d.is_dir()]
    expected, remedies = layout.expected(root, splits), layout.how_to_get(root)
    if missing:
        raise DataNotFoundError(f"{layout.name} ({len(missing)} folder(s) missing)", missing, expected, remedies)
    pairs: dict[str, list[tuple[Path, Path]]] = {}
    for split in splits:
        image_dir, label_dir = folders[split]
        images, labels = layout.scan(image_dir, layout.image_suffixes), layout.scan(label_dir, (layout.label_suffix,))
        if not images:
            where = [f"{image_dir}/", f"{label_dir}/"]
            raise DataNotFoundError(f"{layout.name} {split} images (no image file)", where, expected, remedies)
        image_suffix = layout.image_suffixes[0] if len(layout.image_suffixes) == 1 else ".*"
        unpaired = [
            f"image {images[k]} (no label file {label_dir / k}{layout.label_suffix})"
            for k in sorted(images.keys() - labels)
        ]
        unpaired += [
            f"label file {labels[k]} (no image {image_dir / k}{image_suffix})" for k in sorted(labels.keys() - images)
        ]
        if unpaired:
            shown = unpaired[:10] + ([f"... and {len(unpaired) - 10} more"] if len(unpaired) > 10 else [])
            raise DataNotFoundError(
                f"{layout.name} {split}: {len(unpaired)} unpaired file(s), e.g. the {unpaired[0]}",
                shown,
                expected,
                list(layout.unpaired_fix),
            )
        pairs[split] = [(images[k], labels[k]) for k in sorted(images)]
    return pairs


# ------------------------------------------------------------------------------------------ samples


class SegmentationFolder(Dataset):
    """The ``(image, label)`` pairs of one split, decoded with :func:`~diffkd.data.images.read_image` and checked.

    Args:
        pairs: ``(image path, label path)`` in order.
        transform: called on ``(uint8 image (C, H, W), uint8 label (H, W))``; ``None``: those tensors.
        num_classes: K; label values must be in ``[0, K)`` or equal ``ignore_index`` (without ``label_map``).
        ignore_index: the label of pixels that count nowhere.
        mode: PIL mode the images are converted to (``"RGB"`` or ``"L"``).
        cache: keep every decoded sample in memory after its first read (small data sets; per worker process).
        label_map: uint8 (256,) lookup table from the files' label values to the classes (``ignore_index`` for
            those not evaluated); every value maps, so the values are not checked.
        what: what the label files are, in messages (``"label"``, ``"labelIds"``).

    Items: the transform's output, by default ``(image float32 (C, H, W), label int64 (H, W))``.
    """

    def __init__(
        self,
        pairs: Sequence[tuple[Path, Path]],
        transform: Callable[[Tensor, Tensor], Any] | None,
        num_classes: int,
        ignore_index: int = 255,
        mode: str = "RGB",
        cache: bool = False,
        label_map: Tensor | None = None,
        what: str = "label",
    ) -> None:
        self.pairs = [(Path(i), Path(lbl)) for i, lbl in pairs]
        self.transform = transform
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.mode = mode
        self.cache: dict[int, tuple[Tensor, Tensor]] | None = {} if cache else None
        self.label_map = label_map
        self.what = what

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def images(self) -> list[str]:
        """The image files, in sample order."""
        return [str(image) for image, _ in self.pairs]

    @property
    def transforms(self) -> Callable[[Tensor, Tensor], Any] | None:
        """The transform (torchvision's data sets' name for it)."""
        return self.transform

    def sample_files(self, index: int) -> tuple[str, str]:
        """``(image file, label file)`` of sample ``index``."""
        image, label = self.pairs[index]
        return str(image), str(label)

    def _label_problem(self, label: Image.Image, image_size: tuple[int, int]) -> str | None:
        if label.mode not in ("L", "P"):
            return f"a {self.what} file must be a single-channel 8-bit PNG, got PIL mode {label.mode!r}"
        if label.size != image_size:
            width, height = image_size
            return f"label {label.width}×{label.height} px, its image {width}×{height} px: they differ in size"
        if self.label_map is not None:
            return None
        values = np.unique(np.asarray(label)).tolist()
        bad = [v for v in values if v >= self.num_classes and v != self.ignore_index]
        if bad:
            return f"label values {bad[:8]} are neither classes 0..{self.num_classes - 1} nor {self.ignore_index}"
        return None

    def read(self, index: int) -> tuple[Tensor, Tensor]:
        """Decoded, checked sample ``index``: uint8 image (C, H, W) and uint8 label (H, W) (mapped by
        ``label_map``).

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
        values = TF.pil_to_tensor(label)[0]
        sample = TF.pil_to_tensor(image), values if self.label_map is None else self.label_map[values.long()]
        if self.cache is not None:
            self.cache[index] = sample
        return sample

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        sample = self.read(index)
        return sample if self.transform is None else self.transform(*sample)

    def check_sample(self, index: int) -> list[DataIssue]:
        """Decode sample ``index``: errors when a file does not decode or the label does not fit, a note when an
        RGB data set's image is not RGB."""
        image_path, label_path = self.sample_files(index)
        image, issues = inspect_image(image_path, index, rgb=self.mode == "RGB")
        label, label_issues = inspect_image(label_path, index, what="label", rgb=False)
        issues += label_issues
        if image is not None and label is not None:
            problem = self._label_problem(label, image.size)
            if problem is not None:
                issues.append(DataIssue(label_path, "label", problem, "error", index=index))
        return issues


# ------------------------------------------------------------------------------------------ datamodule


class SegmentationDataModule(ImageFileChecks, DataModuleBase):
    """A segmentation data set of image/label file pairs: a :attr:`layout`, a :meth:`transform` and a
    :meth:`dataset` on the shared loaders (:class:`~diffkd.data.loaders.DataModuleBase`); satisfies
    :class:`~diffkd.data.protocol.DistillDataModule`. Batches ``(images (B, C, H, W), labels (B, H, W) int64)``;
    the test loader is the validation split's.

    ``setup`` pairs the files (names only), checks that the evaluation images (and, without ``crop_size``, the
    training images) share one size when they are batched (file headers only), builds the data sets and passes
    them through ``data.verify`` / ``data.skip_bad_images``.

    Args:
        root: the data set's folder.
        options: the loader settings.
        train_split, val_split: the split folder names.
        crop_size: ``[height, width]`` (an int: square) of the training crops; ``None``: whole images.
        scale_range: ``[lo, hi]`` of the random training scale; ``None``: no rescaling.
        scale_step: spacing of the scale choices.
        hflip_prob: probability of a horizontal flip in training.
        verify, skip_bad_images: see :class:`~diffkd.data.image_checks.ImageFileChecks`.
    """

    task: ClassVar[str] = "segmentation"
    no_class_hint = "the per-pixel labels of the batches (masks), or a method that needs no per-image class"
    #: Seed of the augmentation draws of :meth:`example_batch`, so that it is the same batch every call.
    example_seed: int | None = 0
    example_splits: ClassVar[tuple[str, ...]] = ("train", "val", "test")
    #: What to change when training samples differ in size (a subclass whose training samples can).
    train_size_fix: str = "set data.batch_size=1"
    #: The data set's name in :class:`~diffkd.data.usable.EmptySplitError`.
    checks_name: str = "segmentation"
    #: Where the files are and how they pair.
    layout: ClassVar[PairLayout]

    def __init__(
        self,
        root: str | Path,
        options: LoaderOptions,
        train_split: str = "train",
        val_split: str = "val",
        crop_size: int | Sequence[int] | None = None,
        scale_range: Sequence[float] | None = None,
        scale_step: float = 0.25,
        hflip_prob: float = 0.0,
        verify: bool = False,
        skip_bad_images: bool = False,
    ) -> None:
        super().__init__(options)
        self.init_image_checks(verify, skip_bad_images)
        if not 0.0 <= hflip_prob <= 1.0:
            raise ValueError(f"data.hflip_prob must be in [0, 1], got {hflip_prob}")
        self.root = Path(root)
        self.train_split = train_split
        self.val_split = val_split
        self.crop_size = crop_size_of(crop_size)
        self.scales = discrete_scales(scale_range, float(scale_step))
        self.hflip_prob = float(hflip_prob)

    @property
    def data_dir(self) -> str:
        """The folder, as a string (``root``)."""
        return str(self.root)

    # ------------------------------------------------------------------------------------- what subclasses give
    def transform(self, train: bool) -> Callable[..., Any]:
        """The training (augmenting) or evaluation transform of this configuration."""
        raise NotImplementedError

    def dataset(self, split: str, pairs: Sequence[tuple[Path, Path]], train: bool) -> Dataset:
        """The data set of ``split`` over its checked ``pairs``."""
        raise NotImplementedError

    def find_pairs(self, splits: Sequence[str]) -> dict[str, list[tuple[Path, Path]]]:
        """The checked ``(image, label)`` pairs of ``splits`` (:func:`find_layout_pairs` with :attr:`layout`)."""
        return find_layout_pairs(self.root, splits, self.layout)

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self, stage: str | None = None) -> None:
        """Pair the files and build the data sets (once): both for ``fit``/``None``, the evaluation one otherwise."""
        want_train = stage in (None, "fit") and self.train_set is None
        want_val = self.val_set is None
        if not (want_train or want_val):
            return
        splits = ([self.train_split] if want_train else []) + ([self.val_split] if want_val else [])
        pairs = self.find_pairs(splits)
        built: dict[str, Dataset] = {}
        if want_train:
            if self.crop_size is None:  # whole images: one size only if the files have one
                files = [image for image, _ in pairs[self.train_split]]
                require_one_size("train", files, self.batch_size, "data.batch_size", self.train_size_fix)
            built["train"] = self.dataset(self.train_split, pairs[self.train_split], train=True)
        if want_val:
            self.require_one_val_size(pairs[self.val_split])
            built["val"] = self.dataset(self.val_split, pairs[self.val_split], train=False)
        built = self.guard_image_sets(built)  # data.verify checks both splits before raising
        self.train_set = built.get("train", self.train_set)
        self.val_set = built.get("val", self.val_set)
        for split in dict.fromkeys(splits):
            log.info("%s %s/%s: %d images", self.checks_name, self.root, split, len(pairs[split]))

    def require_one_val_size(self, pairs: Sequence[tuple[Path, Path]]) -> None:
        """Evaluation uses every image at its own size: raise :class:`~diffkd.data.usable.MixedSizeError` at
        setup when they differ and ``val_batch_size`` > 1 would stack them (reads the file headers only)."""
        files = [image for image, _ in pairs]
        require_one_size("val", files, self.val_batch_size, "data.val_batch_size", VAL_SIZE_FIX)

    # ------------------------------------------------------------------------------------- loader hooks
    def size_fix(self, split: str, example: bool) -> str:
        return self.train_size_fix if split == "train" else VAL_SIZE_FIX

    def train_location(self) -> str:
        return f"{self.root} ({self.train_split})"

    def empty_split_name(self) -> str:
        return self.checks_name

    def example_samples(self, dataset: Dataset, size: int, train: bool) -> list[Any]:
        """The first ``size`` samples; for evaluation only those of the first one's size (full-resolution images
        may differ in size with ``val_batch_size: 1``; the batch then holds fewer than ``size``)."""
        samples = [dataset[i] for i in range(size)]
        return samples if train else [s for s in samples if s[0].shape == samples[0][0].shape]
