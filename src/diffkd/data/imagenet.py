"""ImageNet-1k (ILSVRC-2012) with the official DiffKD pipeline (spec §D.2), transforms from timm.

Two on-disk layouts are read (``layout="auto"`` picks ``list`` when both list files exist, else ``folders``)::

    layout="folders"  (torchvision ImageFolder style)
        <root>/train/<wnid>/*.JPEG        e.g. train/n01440764/n01440764_10026.JPEG
        <root>/val/<wnid>/*.JPEG          e.g. val/n01440764/ILSVRC2012_val_00000293.JPEG
        label = index of <wnid> among the sorted train folders (the standard 0..999 ImageNet order)

    layout="list"     (the official code's ``ImageNetDataset``)
        <root>/meta/train.txt             lines "<path> <label>", <path> relative to <root>/train/
                                          e.g. "n01440764/n01440764_10026.JPEG 0"
        <root>/meta/val.txt               lines "<path> <label>", <path> relative to <root>/val/
                                          e.g. "ILSVRC2012_val_00000001.JPEG 65"
        <root>/train/..., <root>/val/...  the images those paths point at

Paths in the list files are relative to ``train/`` and ``val/`` (not to ``<root>``), exactly as the official
``build_dataloader`` joins them (``ImageNetDataset(<root>/train, <root>/meta/train.txt)``); the label is the last
whitespace-separated field, so paths may contain spaces.

Batches: images (B, 3, S, S) float32 normalised with the ImageNet mean/std (S = ``image_size``, 224), targets
(B,) int64. Train: timm's ``RandomResizedCropAndInterpolation(S, scale=(0.08, 1), ratio=(3/4, 4/3))`` +
horizontal flip, then optionally RandAugment (``auto_augment="rand-m9-mstd0.5"``, translate 100 px, ImageNet-mean
fill) or ColorJitter (timm, like the official code, drops ColorJitter when RandAugment is on), then
``ToTensor`` + ``Normalize`` + optional ``RandomErasing`` (on the CPU here; the official code erases on the GPU).
Val: ``Resize(int(S / crop_pct))`` (256) + ``CenterCrop(S)`` (224). ``train_transform``/``val_transform`` (a
mapping of timm ``create_transform`` arguments or a list of torchvision transforms, see
:mod:`diffkd.data.transforms`) replace the whole pipeline of their split: the recipe keys above (``scale``,
``auto_augment``, ``re_prob``, ``crop_pct``, ...) then no longer apply to it; Mixup/CutMix and label smoothing do.

The ``folders`` layout is scanned by :class:`~diffkd.data.folders.ClassFolders`, as ``ImageFolderDataModule``
scans its folders (torchvision ``ImageFolder`` semantics: sorted non-hidden class folders, image files anywhere
under each, a class folder without images is an error).

Mixup/CutMix run on the device, on whole batches: :meth:`ImageNetDataModule.batch_transform` gives a
``timm.data.Mixup`` that a LightningModule applies to training batches, turning targets into soft (B, K) rows
(label smoothing folded in). Recipes (spec §D.1–D.2):

* B1: defaults (crop + flip, bilinear).
* B2: ``auto_augment="rand-m9-mstd0.5", re_prob=0.2, re_mode="pixel", label_smoothing=0.1``.
* B3: ``auto_augment="rand-m9-mstd0.5", re_prob=0.25, color_jitter=0.4 (unused with RA), mixup=0.8,
  cutmix=1.0, label_smoothing=0.1, interpolation="bicubic"``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from torch.utils.data import Dataset

from diffkd.data.classification import ClassificationDataModule
from diffkd.data.folders import ClassFolders, ImageListDataset
from diffkd.data.image_checks import ImageFileChecks
from diffkd.data.image_folder import IMAGENET_MEAN, IMAGENET_STD
from diffkd.data.images import DataNotFoundError
from diffkd.data.loader_keywords import loader_keywords
from diffkd.data.transforms import TransformSpec

if TYPE_CHECKING:
    from timm.data import Mixup

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageListDataset",
    "ImageNetDataModule",
    "ImageNetLayoutError",
    "read_image_list",
]

log = logging.getLogger(__name__)

IMAGENET_NUM_CLASSES = 1000
_INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "random")


def _expected_layout(root: Path) -> list[str]:
    return [
        f"<root> = {root}",
        'layout="folders":',
        "  <root>/train/<wnid>/*.JPEG   e.g. train/n01440764/n01440764_10026.JPEG",
        "  <root>/val/<wnid>/*.JPEG     e.g. val/n01440764/ILSVRC2012_val_00000293.JPEG",
        'layout="list" (the official code\'s):',
        '  <root>/meta/train.txt        "<path> <label>" per line, <path> relative to <root>/train/,',
        '                               e.g. "n01440764/n01440764_10026.JPEG 0"',
        '  <root>/meta/val.txt          "<path> <label>" per line, <path> relative to <root>/val/,',
        '                               e.g. "ILSVRC2012_val_00000001.JPEG 65"',
        "  <root>/train/, <root>/val/   the images those paths point at",
    ]


class ImageNetLayoutError(ValueError):
    """ImageNet files are there but malformed (a bad list line, unknown val classes, out-of-range labels).

    The message states the problem (with file and line number for list files), then the expected layouts.
    """

    def __init__(self, problem: str, root: str | Path) -> None:
        self.problem = problem
        self.root = str(root)
        lines = [problem, "Expected layout:", *(f"  {row}" for row in _expected_layout(Path(root)))]
        super().__init__("\n".join(lines))

    def __reduce__(self):  # picklable across worker processes despite the custom __init__
        return (type(self), (self.problem, self.root))


_REMEDIES = [
    "download ILSVRC2012_img_train.tar / ILSVRC2012_img_val.tar from https://image-net.org (login required)",
    "extract train into one folder per wnid; sort val into wnid folders, or write meta/val.txt",
    "point data.data_dir at the folder that holds train/ and val/ (and meta/ for layout='list')",
]


def read_image_list(path: str | Path) -> list[tuple[str, int]]:
    """Parse a list file of ``"<relative path> <integer label>"`` lines (blank lines are skipped).

    Raises:
        ValueError: a malformed line, naming the file and its 1-based line number.
    """
    samples: list[tuple[str, int]] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            text = line.strip()
            if not text:
                continue
            parts = text.rsplit(maxsplit=1)
            label = parts[1] if len(parts) == 2 else ""
            if len(parts) != 2 or not label.isdigit():  # isdigit: no sign, so no negative labels
                raise ValueError(
                    f"{path}, line {lineno}: expected '<relative path> <label>' with an integer label >= 0, "
                    f"got {text!r}"
                )
            samples.append((parts[0], int(label)))
    if not samples:
        raise ValueError(f"{path} holds no '<relative path> <label>' lines")
    return samples


@dataclass
class _Index:
    """What a scan of the data folder found."""

    layout: Literal["folders", "list"]
    train: list[tuple[str, int]]
    val: list[tuple[str, int]]
    classes: list[str] | None  # wnids (folders layout); None for list files

    @property
    def num_classes(self) -> int:
        if self.classes is not None:
            return len(self.classes)
        return 1 + max(y for samples in (self.train, self.val) for _, y in samples)


@loader_keywords(after="layout", batch_size=32, num_workers=8)
class ImageNetDataModule(ImageFileChecks, ClassificationDataModule):
    """ImageNet-1k train/val with the official DiffKD transforms (see the module docstring for the layouts).

    ``num_classes`` is a property readable before ``setup``: the explicit ``num_classes`` when given; else
    what the data holds (the number of train wnid folders, or 1 + the largest label in ``meta/{train,val}.txt``),
    which is 1000 on real ImageNet and fewer on small test copies; 1000 while the data cannot be found yet.

    Args:
        data_dir: folder holding ``train/``, ``val/`` (and ``meta/`` for the list layout).
        layout: ``"auto"`` (``list`` when ``meta/train.txt`` and ``meta/val.txt`` exist, else ``folders``),
            ``"folders"`` or ``"list"``.
        batch_size, val_batch_size, num_workers, pin_memory, drop_last: see ``ClassificationDataModule``
            (official B1: 32 per GPU × 8 GPUs, 8 workers).
        image_size: train crop / val centre-crop side S.
        crop_pct: val resize = ``int(S / crop_pct)`` (0.875: 256 → 224).
        interpolation: ``"bilinear"`` (B1/B2), ``"bicubic"`` (B3), ``"nearest"``, or ``"random"`` (train
            only; val then uses bilinear).
        scale, ratio: RandomResizedCrop area and aspect ranges.
        hflip: horizontal-flip probability.
        auto_augment: timm auto-augment string, e.g. ``"rand-m9-mstd0.5"`` (B2/B3); ``None`` for none.
        color_jitter: ColorJitter strength (brightness = contrast = saturation); ``None``/0 for none; ignored
            when ``auto_augment`` is set (as in timm and the official code).
        re_prob, re_mode, re_count: RandomErasing probability (B2 0.2, B3 0.25), fill mode, count.
        mixup, cutmix: Mixup / CutMix alphas (B3: 0.8 / 1.0); either > 0 enables :meth:`batch_transform`.
        cutmix_minmax: CutMix box-ratio bounds (overrides ``cutmix``'s alpha).
        mixup_prob: probability of mixing a batch at all; mixup_switch_prob: of CutMix instead of Mixup.
        mixup_mode: ``"batch"`` (official), ``"pair"`` or ``"elem"``.
        label_smoothing: ε (B2/B3 0.1). With Mixup on it is folded into the soft targets
            (:attr:`loss_label_smoothing` is then 0); without, the loss applies it.
        num_classes: classifier width; ``None`` infers it from the data (see above).
        mean, std: normalisation (ImageNet statistics).
        train_transform, val_transform: None (the recipe's timm pipelines), a mapping of timm
            ``create_transform`` arguments, or a list of torchvision transforms (see :mod:`diffkd.data.transforms`);
            either replaces the recipe's pipeline for its split.
        verify, skip_bad_images: decode every image at setup / replace an undecodable sample by the next readable
            one; see :class:`~diffkd.data.image_checks.ImageFileChecks`.
    """

    in_chans = 3
    checks_name = "ImageNet"

    def __init__(
        self,
        data_dir: str = "data/imagenet",
        layout: Literal["auto", "folders", "list"] = "auto",
        image_size: int = 224,
        crop_pct: float = 0.875,
        interpolation: str = "bilinear",
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        auto_augment: str | None = None,
        color_jitter: float | None = None,
        re_prob: float = 0.0,
        re_mode: str = "pixel",
        re_count: int = 1,
        mixup: float = 0.0,
        cutmix: float = 0.0,
        cutmix_minmax: Sequence[float] | None = None,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
        mixup_mode: Literal["batch", "pair", "elem"] = "batch",
        label_smoothing: float = 0.0,
        num_classes: int | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        train_transform: TransformSpec = None,
        val_transform: TransformSpec = None,
        verify: bool = False,
        skip_bad_images: bool = False,
        **loader_options: Any,
    ) -> None:
        super().__init__(data_dir, train_transform=train_transform, val_transform=val_transform, **loader_options)
        if layout not in ("auto", "folders", "list"):
            raise ValueError(f"layout must be 'auto', 'folders' or 'list', got {layout!r}")
        self.init_image_checks(verify, skip_bad_images)
        if interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {_INTERPOLATIONS}, got {interpolation!r}")
        if mixup_mode not in ("batch", "pair", "elem"):
            raise ValueError(f"mixup_mode must be 'batch', 'pair' or 'elem', got {mixup_mode!r}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.root = Path(data_dir)
        self.layout = layout
        self.image_size = int(image_size)
        self.crop_pct = float(crop_pct)
        self.interpolation = interpolation
        self.scale = tuple(float(s) for s in scale)  # Hydra hands ListConfig; keep plain floats
        self.ratio = tuple(float(r) for r in ratio)
        self.hflip = float(hflip)
        self.auto_augment = auto_augment or None
        self.color_jitter = float(color_jitter) if color_jitter else None
        self.re_prob = float(re_prob)
        self.re_mode = re_mode
        self.re_count = int(re_count)
        self.mixup = float(mixup)
        self.cutmix = float(cutmix)
        self.cutmix_minmax = tuple(float(c) for c in cutmix_minmax) if cutmix_minmax is not None else None
        self.mixup_prob = float(mixup_prob)
        self.mixup_switch_prob = float(mixup_switch_prob)
        self.mixup_mode = mixup_mode
        self.label_smoothing = float(label_smoothing)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._num_classes = int(num_classes) if num_classes is not None else None
        self._index: _Index | None = None
        self._list_cache: dict[str, list[tuple[str, int]]] = {}
        self.folders = ClassFolders(
            self.root / "train",
            self.root / "val",
            dataset="ImageNet",
            layout=_expected_layout(self.root),
            remedies=_REMEDIES,
            val_subset=True,
            layout_error=functools.partial(ImageNetLayoutError, root=self.root),
            flat_hint="sort them into wnid folders, or use layout='list'",
        )
        if self.mixup_active and (self.batch_size % 2 or not self.drop_last):
            raise ValueError(
                "Mixup/CutMix mix each batch with its reverse and need even batches: use an even batch_size "
                f"(got {self.batch_size}) and drop_last=True (got {self.drop_last})"
            )

    # ---------------------------------------------------------------------------------------------- layout
    def _not_found(self, problem: str, searched: Sequence[Path]) -> DataNotFoundError:
        return self.folders.not_found(problem, searched)

    @property
    def _lists(self) -> tuple[Path, Path]:
        return self.root / "meta" / "train.txt", self.root / "meta" / "val.txt"

    def resolved_layout(self) -> Literal["folders", "list"]:
        """The layout in use: ``layout`` itself, or for ``"auto"`` the one found on disk (``"list"`` when both list
        files exist, else ``"folders"``; with neither present, :meth:`scan` reports what is missing)."""
        if self.layout != "auto":
            return self.layout  # type: ignore[return-value]
        if all(p.is_file() for p in self._lists):
            return "list"
        if (self.root / "train").is_dir() and (self.root / "val").is_dir():
            return "folders"
        return "list" if any(p.is_file() for p in self._lists) else "folders"

    def _check_dirs(self, layout: str) -> None:
        files = self._lists if layout == "list" else ()
        self.folders.require(dirs=[self.root / "train", self.root / "val"], files=files, prefix=f"layout={layout!r}: ")

    def _read_list(self, split: str) -> list[tuple[str, int]]:
        if split not in self._list_cache:
            path = self.root / "meta" / f"{split}.txt"
            if not path.is_file():
                raise self._not_found(f"layout='list': missing {path}", [path])
            try:
                self._list_cache[split] = read_image_list(path)
            except ValueError as err:
                raise ImageNetLayoutError(str(err), self.root) from err
        return self._list_cache[split]

    def _check_first_image(self, split: str, samples: list[tuple[str, int]]) -> None:
        first = self.root / split / samples[0][0]
        if not first.is_file():
            raise self._not_found(
                f"the first entry of meta/{split}.txt, {samples[0][0]!r}, is not a file ({first}); list paths are "
                f"relative to {self.root / split}/",
                [first],
            )

    def scan(self) -> _Index:
        """Find every sample (cached): ``(relative path, label)`` lists for both splits.

        Raises:
            DataNotFoundError: missing folders, list files, class folders or images.
            ImageNetLayoutError: a malformed list line (file and line number), val classes unknown to train, or
                labels >= ``num_classes``. A ``ValueError``.
        """
        if self._index is None:
            layout = self.resolved_layout()
            dirs = [self.root / "train", self.root / "val"]
            if self.layout == "auto" and not any(p.exists() for p in (*self._lists, *dirs)):
                raise self._not_found(
                    f"layout='auto' found neither meta/train.txt + meta/val.txt nor train/ + val/ in {self.root}",
                    [*self._lists, *dirs],
                )
            self._check_dirs(layout)
            if layout == "list":
                index = _Index("list", self._read_list("train"), self._read_list("val"), None)
                self._check_first_image("train", index.train)
                self._check_first_image("val", index.val)
            else:
                train, val = self.folders.scan()
                index = _Index("folders", train, val, self.folders.classes)
            k = self.num_classes if self._num_classes is not None else index.num_classes
            for split, samples in (("train", index.train), ("val", index.val)):
                top = max(y for _, y in samples)
                if top >= k:
                    raise ImageNetLayoutError(f"{split} label {top} >= num_classes={k} (layout={layout!r})", self.root)
            self._index = index
        return self._index

    @property
    def classes(self) -> list[str] | None:
        """The wnids in label order (folders layout), ``None`` for list files."""
        return self.scan().classes

    @property
    def num_classes(self) -> int:  # type: ignore[override]
        """Classifier width (see the class docstring); readable before ``setup``."""
        if self._num_classes is not None:
            return self._num_classes
        if self._index is not None:
            return self._index.num_classes
        try:
            layout = self.resolved_layout()
            if layout == "folders":
                return len(self.folders.classes) if (self.root / "train").is_dir() else IMAGENET_NUM_CLASSES
            if not all(p.is_file() for p in self._lists):
                return IMAGENET_NUM_CLASSES
            return 1 + max(y for split in ("train", "val") for _, y in self._read_list(split))
        except DataNotFoundError:
            return IMAGENET_NUM_CLASSES

    # ------------------------------------------------------------------------------------------ transforms
    def train_transform(self) -> Callable:
        """The train transform: ``data.train_transform`` when configured, else the recipe's (timm's ImageNet train
        transform). PIL image → float32 (3, S, S), normalised."""
        return self.make_transform("train", self._recipe_train_transform)

    def val_transform(self) -> Callable:
        """The val transform: ``data.val_transform`` when configured, else the recipe's (``Resize(int(S /
        crop_pct))`` + ``CenterCrop(S)``). PIL image → float32 (3, S, S), normalised."""
        return self.make_transform("val", self._recipe_val_transform)

    def _recipe_train_transform(self) -> Callable:
        from timm.data import create_transform

        return create_transform(
            input_size=self.image_size,
            is_training=True,
            scale=self.scale,
            ratio=self.ratio,
            hflip=self.hflip,
            color_jitter=self.color_jitter,
            auto_augment=self.auto_augment,
            interpolation=self.interpolation,
            mean=self.mean,
            std=self.std,
            re_prob=self.re_prob,
            re_mode=self.re_mode,
            re_count=self.re_count,
        )

    def _recipe_val_transform(self) -> Callable:
        from timm.data import create_transform

        return create_transform(
            input_size=self.image_size,
            is_training=False,
            crop_pct=self.crop_pct,
            interpolation="bilinear" if self.interpolation == "random" else self.interpolation,
            mean=self.mean,
            std=self.std,
        )

    @property
    def mixup_active(self) -> bool:
        """Whether :meth:`batch_transform` returns a Mixup/CutMix transform."""
        on = self.mixup > 0 or self.cutmix > 0 or self.cutmix_minmax is not None
        return on and self.mixup_prob > 0

    @property
    def loss_label_smoothing(self) -> float:
        """The ε the loss should apply: ``label_smoothing`` without Mixup, 0 with it (already in the targets)."""
        return 0.0 if self.mixup_active else self.label_smoothing

    def batch_transform(self) -> Mixup | None:
        """The on-device training-batch transform, or ``None`` when Mixup and CutMix are off.

        Returns:
            ``timm.data.Mixup``: ``images, targets = mix(images, targets)`` maps images (B, 3, S, S) and int64
            targets (B,) to mixed images (same shape, in place) and soft targets (B, num_classes) float whose
            rows sum to 1 (label smoothing included), on the images' device. B must be even. Use a
            soft-target cross-entropy (``timm.loss.SoftTargetCrossEntropy``) on them.
        """
        if not self.mixup_active:
            return None
        from timm.data import Mixup

        return Mixup(
            mixup_alpha=self.mixup,
            cutmix_alpha=self.cutmix,
            cutmix_minmax=self.cutmix_minmax,
            prob=self.mixup_prob,
            switch_prob=self.mixup_switch_prob,
            mode=self.mixup_mode,
            label_smoothing=self.label_smoothing,
            num_classes=self.num_classes,
        )

    # -------------------------------------------------------------------------------------------- datasets
    def build_datasets(self) -> tuple[Dataset, Dataset]:
        index = self.scan()
        train = ImageListDataset(self.root / "train", index.train, self.train_transform(), classes=index.classes)
        val = ImageListDataset(self.root / "val", index.val, self.val_transform(), classes=index.classes)
        log.info(
            "ImageNet (%s layout, %d classes): %d train, %d val images under %s",
            index.layout,
            self.num_classes,
            len(train),
            len(val),
            self.root,
        )
        sets = self.guard_image_sets({"train": train, "val": val})
        return sets["train"], sets["val"]
