"""The shared LightningDataModule for image classification: data sets in, data loaders out.

A subclass only says how to build its data sets (``build_datasets``) and what it holds (``num_classes``,
``in_chans``, ``image_size``, ``mean``, ``std``); batching, workers, shuffling, the configured transforms
(``train_transform``/``val_transform``, see :mod:`diffkd.data.transforms`) and the members of the task protocols
(:class:`~diffkd.data.protocol.ClassificationData`: ``example_batch``, ``batch_transform``,
``loss_label_smoothing``) live here once.
Batches are ``(images, targets)`` with images (B, C, H, W) float and targets (B,) int64.

Also here, for every datamodule whose samples are image files (ImageFolder, ImageNet, COCO, Cityscapes): reading a
file with an error that names it (:func:`read_image`, :class:`ImageReadError`), what a check found
(:class:`DataIssue`), and the two opt-in config keys of :class:`ImageFileChecks`: ``data.verify`` (decode every
file at setup, one error listing the bad ones) and ``data.skip_bad_images`` (:class:`SkipBadImages`: an
unreadable sample is replaced by the next readable one, warned about and counted).
"""

from __future__ import annotations

import logging
import os
import warnings
from abc import abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning as L
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate

from diffkd.data.device_loader import DeviceTensorLoader
from diffkd.data.protocol import preserved_rng_state
from diffkd.data.resumable import resume_position, seeded_train_loader
from diffkd.data.sample_index import SampleIndexCapability
from diffkd.data.transforms import TransformSpec, build_transform, check_transform_output, describe_spec
from diffkd.data.usable import SameSizeCollate, SplitProblem, batch_problem, raise_problems, world_size

__all__ = [
    "BadImagesError",
    "ClassificationDataModule",
    "DataIssue",
    "DataNotFoundError",
    "ImageFileChecks",
    "ImageReadError",
    "PreloadableDataModule",
    "SkipBadImages",
    "SkippedImageWarning",
    "inspect_image",
    "read_image",
]

log = logging.getLogger(__name__)


class DataNotFoundError(FileNotFoundError):
    """A data set's files are missing: the message says what was expected, where we looked, and how to fix it.

    It is a ``FileNotFoundError``, so ``except FileNotFoundError`` catches it.

    Args:
        dataset: human name of the data set (``"CIFAR-100"``).
        searched: every place that was looked in, in search order.
        layout: the expected on-disk layout, one path pattern per line.
        remedies: ways to get the data (a download URL, a config switch, a package to install).
    """

    def __init__(
        self,
        dataset: str,
        searched: Sequence[str | Path],
        layout: str | Sequence[str],
        remedies: Sequence[str] = (),
    ) -> None:
        self.dataset = dataset
        self.searched = [str(p) for p in searched]
        self.layout = [layout] if isinstance(layout, str) else list(layout)
        self.remedies = list(remedies)
        lines = [f"{dataset} not found.", "Looked in (in this order):"]
        lines += [f"  - {p}" for p in self.searched]
        lines += ["Expected layout:"] + [f"  {row}" for row in self.layout]
        if self.remedies:
            lines += ["To get it:"] + [f"  - {r}" for r in self.remedies]
        super().__init__("\n".join(lines))

    def __reduce__(self):  # keep it picklable (worker processes, DDP spawn) despite the custom __init__
        return (type(self), (self.dataset, self.searched, self.layout, self.remedies))


# ------------------------------------------------------------------------------------------ image files

#: The hint an unreadable file's error ends with.
BAD_IMAGE_HINT = (
    "python -m diffkd.data.check <data config> lists every bad file; set data.skip_bad_images=true to replace "
    "each unreadable sample by the next readable one"
)
# What PIL raises for a file it cannot open or decode (SyntaxError and ValueError: some malformed headers).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class ImageReadError(OSError):
    """An image (or label) file that cannot be opened or decoded; the message names the file.

    It keeps the plain ``OSError(message)`` constructor: a ``DataLoader`` worker re-raises an error in the main
    process by calling its class with one message string. :func:`read_image` sets the attributes; a re-raised copy
    has the message only.

    Attributes:
        path: the file (``None`` on a copy re-raised from a worker process).
        kind: ``"empty"`` (0 bytes), ``"missing"``, ``"truncated"`` or ``"unreadable"``.
        reason: what went wrong, one line, without the path (``"empty file (0 bytes)"``).
    """

    path: str | None = None
    kind: str = "unreadable"
    reason: str = ""


def _one_line(err: BaseException) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())


def _decode_failure(path: str, err: BaseException) -> tuple[str, str]:
    """``(kind, reason)`` of a file PIL failed on; the size is looked at only now, so reading costs no ``stat``."""
    if isinstance(err, FileNotFoundError):
        return "missing", "no such file"
    try:
        if os.path.getsize(path) == 0:
            return "empty", "empty file (0 bytes)"
    except OSError:
        pass
    if isinstance(err, UnidentifiedImageError):
        return "unreadable", f"not an image file PIL can read ({_one_line(err)})"
    if "truncated" in str(err).lower():  # "image file is truncated", "Truncated File Read"
        return "truncated", f"truncated ({_one_line(err)})"
    return "unreadable", _one_line(err)


def read_image(
    path: str | os.PathLike[str], mode: str | None = "RGB", *, what: str = "image", context: str = ""
) -> Image.Image:
    """Open and fully decode an image file, converted to ``mode`` (``None``: its own mode).

    The pixels are those of ``Image.open(path).convert(mode)``; the file is closed on return.

    Args:
        path: the file.
        mode: the PIL mode to convert to; ``None`` keeps the file's.
        what: what the file is, for the message (``"image"``, ``"label"``).
        context: appended to the path in the message (``" (COCO image id 9)"``).

    Raises:
        ImageReadError: missing, empty, truncated or undecodable; the message names the file, says why, and how
            to find or skip every such file.
    """
    path = os.fspath(path)
    try:
        with Image.open(path) as image:
            if mode is None:
                image.load()
                return image
            return image.convert(mode)
    except _DECODE_ERRORS as err:
        kind, reason = _decode_failure(path, err)
        error = ImageReadError(f"cannot read {what} file {path}{context}: {reason}. ({BAD_IMAGE_HINT})")
        error.path, error.kind, error.reason = path, kind, reason
        raise error from err


@dataclass(frozen=True)
class DataIssue:
    """One thing a data check found.

    Attributes:
        path: the file concerned.
        kind: ``empty``, ``missing``, ``truncated``, ``unreadable`` (the file does not decode), ``label`` (a label
            that decodes but does not fit its image), ``size`` (a COCO image of another size than its json entry),
            ``box`` (COCO boxes outside the image) or ``mode`` (not RGB: converted on load).
        message: what is wrong, one line.
        severity: ``error``: the sample cannot be used (loading it raises); ``warning``: it loads, but something is
            off (the annotations); ``note``: for information.
        skippable: ``data.skip_bad_images=true`` replaces the sample (the file does not decode).
        index: the sample's index in its data set.
    """

    path: str
    kind: str
    message: str
    severity: Literal["error", "warning", "note"] = "error"
    skippable: bool = False
    index: int | None = None

    def line(self) -> str:
        """``"<path>: <message>"``."""
        return f"{self.path}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def inspect_image(
    path: str | os.PathLike[str], index: int | None = None, *, what: str = "image", rgb: bool = True
) -> tuple[Image.Image | None, list[DataIssue]]:
    """Decode ``path`` as loading does, for a check.

    Returns:
        ``(image, issues)``: the decoded image in its own mode (``None`` when it does not decode, with an error
        issue), and a ``mode`` note when ``rgb`` and the file is not RGB (it is converted on load).
    """
    try:
        image = read_image(path, None, what=what)
        if rgb and image.mode != "RGB":
            image.convert("RGB")  # what loading does; some modes cannot be converted
    except ImageReadError as err:
        message = err.reason if what == "image" else f"{what} file: {err.reason}"
        return None, [DataIssue(os.fspath(path), err.kind, message, "error", skippable=True, index=index)]
    except _DECODE_ERRORS as err:
        message = f"cannot convert mode {image.mode!r} to RGB ({_one_line(err)})"
        return None, [DataIssue(os.fspath(path), "unreadable", message, "error", skippable=False, index=index)]
    issues = []
    if rgb and image.mode != "RGB":
        message = f"mode {image.mode} (converted to RGB on load)"
        issues.append(DataIssue(os.fspath(path), "mode", message, "note", index=index))
    return image, issues


class SkippedImageWarning(UserWarning):
    """``data.skip_bad_images=true`` replaced a sample whose file does not decode (the message names the file)."""


class SkipBadImages(Dataset):
    """``dataset`` with every sample whose file does not decode replaced by the next readable one (wrapping).

    ``dataset[i]`` raising :class:`ImageReadError` is answered with ``dataset[i + 1]`` (``i + 2``, ... modulo the
    length): the same index always gives the same sample, and the failed read comes before any random draw of
    the transform, so batch shapes and the random stream stay those of a run without the bad file. Each bad file
    is warned about (:class:`SkippedImageWarning`, naming it) the first time it is met and then not read again.

    The record of bad samples is a shared-memory tensor (one byte per sample: bit ``k`` set when file ``k`` of
    ``dataset.sample_files(i)`` failed), so the loader's worker processes, persistent or not, forked or spawned,
    write to the one the main process reads (:attr:`count`, :attr:`bad_files`). Each bit is written by whichever
    process met the file; it is only ever set, so no lock is needed. Other attributes are the wrapped data set's.

    Args:
        dataset: the data set (its ``sample_files(i)``, when it has one, names the files of sample ``i``).
        name: what the warnings call it (``"train"``).
    """

    def __init__(self, dataset: Dataset, name: str) -> None:
        self.dataset = dataset
        self.name = name
        self.found = torch.zeros(len(dataset), dtype=torch.uint8).share_memory_()

    def __getattr__(self, name: str) -> Any:
        dataset = self.__dict__.get("dataset")  # absent while unpickling
        if dataset is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(dataset, name)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return self.indexed_item(index)[1]

    def indexed_item(self, index: int) -> tuple[int, Any]:
        """``(j, dataset[j])``: the first readable sample ``j`` from ``index`` on (wrapping), with its position."""
        n = len(self.dataset)
        for step in range(n):
            i = (int(index) + step) % n
            if self.found[i]:
                continue
            try:
                return i, self.dataset[i]
            except ImageReadError as err:
                self._record(i, err)
        raise ImageReadError(f"{self.name}: none of the {n} samples can be read (data.skip_bad_images=true)")

    def _files(self, index: int) -> Sequence[str]:
        files = getattr(self.dataset, "sample_files", None)
        return files(index) if callable(files) else ()

    def _record(self, index: int, err: ImageReadError) -> None:
        files = list(self._files(index))
        bit = files.index(err.path) if err.path in files else 0
        if int(self.found[index]) >> bit & 1:
            return
        self.found[index] = int(self.found[index]) | 1 << bit
        warnings.warn(
            f"{self.name}: skipping {err.path} ({err.reason}): sample {index} is replaced by the next readable one "
            "(data.skip_bad_images=true)",
            SkippedImageWarning,
            stacklevel=3,
        )

    @property
    def bad_files(self) -> list[str]:
        """The files found unreadable so far, in sample order (in every process of the loader)."""
        out = []
        for index in self.found.nonzero().flatten().tolist():
            bits, files = int(self.found[index]), self._files(index)
            out += [files[k] if k < len(files) else f"sample {index}" for k in range(8) if bits >> k & 1]
        return out

    @property
    def count(self) -> int:
        """How many distinct unreadable files were met so far (each counted once, however often it is drawn)."""
        return len(self.bad_files)


class BadImagesError(ValueError):
    """``data.verify=true`` found files that cannot be used; the message lists every one and the fix.

    Args:
        dataset: the data set's name (``"ImageFolder"``).
        issues: ``(split, issue)`` of each bad file.
        skipping: ``data.skip_bad_images`` is on (the files it would skip are then not listed as errors).
    """

    def __init__(self, dataset: str, issues: Sequence[tuple[str, DataIssue]], skipping: bool = False) -> None:
        self.dataset = dataset
        self.issues = list(issues)
        self.skipping = skipping
        width = max(len(split) for split, _ in self.issues) + 1 if self.issues else 0
        lines = [f"{dataset}: {len(self.issues)} bad file(s) (data.verify=true decoded every file):"]
        lines += [f"  {split + ':':<{width}} {issue.line()}" for split, issue in self.issues]
        if any(issue.skippable for _, issue in self.issues):
            lines.append(
                "Fix: remove or replace them, or set data.skip_bad_images=true to replace each unreadable sample by "
                "the next readable one."
            )
        if any(not issue.skippable for _, issue in self.issues):
            lines.append(
                "Fix: remove or replace the files that decode but do not fit (data.skip_bad_images does not skip "
                "those)."
            )
        lines.append("python -m diffkd.data.check <data config> lists the same (--json to save it).")
        super().__init__("\n".join(lines))

    def __reduce__(self):  # picklable across worker processes despite the custom __init__
        return (type(self), (self.dataset, self.issues, self.skipping))


class ImageFileChecks:
    """``data.verify`` and ``data.skip_bad_images`` for a datamodule whose samples are image files.

    A subclass calls :meth:`init_image_checks` in ``__init__`` and passes every data set it builds through
    :meth:`guard_image_sets` (``{"train": ..., "val": ...}``); the data sets implement ``check_sample(i) ->
    list[DataIssue]`` and ``sample_files(i)``.

    - ``verify=True``: the new data sets are checked at once (every file decoded, on a thread pool; see
      :mod:`diffkd.data.check`) and :class:`BadImagesError` lists every file that cannot be used. With
      ``skip_bad_images`` as well, the unreadable files are logged as a warning instead (they will be skipped)
      and only what skipping cannot handle raises. Warnings of the check (COCO boxes outside their image) are
      logged. Each process checks everything (every rank in DDP): for a big data set, run
      ``python -m diffkd.data.check`` once instead.
    - ``skip_bad_images=True``: the data sets are wrapped in :class:`SkipBadImages`. :attr:`skipped_images`
      (``{"train": n, "val": m}``) counts the distinct unreadable files met so far, in the main process and the
      loader workers together (per process in DDP); :attr:`bad_image_files` names them. Whoever logs epochs reads
      them there (``trainer.datamodule.skipped_images``). They are cumulative from ``setup``.
    """

    verify: bool = False
    skip_bad_images: bool = False
    #: The data set's name in :class:`BadImagesError`.
    checks_name: str = "data"

    def init_image_checks(self, verify: bool = False, skip_bad_images: bool = False) -> None:
        self.verify = bool(verify)
        self.skip_bad_images = bool(skip_bad_images)

    def guard_image_sets(self, sets: Mapping[str, Dataset]) -> dict[str, Dataset]:
        """Verify (``verify``) and wrap for skipping (``skip_bad_images``) freshly built data sets, by split."""
        sets = dict(sets)
        if self.verify:
            self.verify_image_sets(sets)
        if self.skip_bad_images:
            sets = {split: SkipBadImages(dataset, split) for split, dataset in sets.items()}
        return sets

    def verify_image_sets(self, sets: Mapping[str, Dataset], workers: int | None = None) -> None:
        """Decode every file of ``sets`` and raise :class:`BadImagesError` listing those that cannot be used."""
        from diffkd.data.check import check_dataset

        errors: list[tuple[str, DataIssue]] = []
        skipped: list[tuple[str, DataIssue]] = []
        for split, dataset in sets.items():
            report = check_dataset(dataset, split, workers, lambda line: log.info("data.verify: %s", line))
            for issue in report.issues:
                if issue.severity == "warning":
                    log.warning("%s %s: %s", self.checks_name, split, issue.line())
                elif issue.severity == "error":
                    (skipped if issue.skippable and self.skip_bad_images else errors).append((split, issue))
            log.info("%s: data.verify: %s", self.checks_name, report.summary())
        if skipped:
            listed = "; ".join(f"{split}: {issue.line()}" for split, issue in skipped)
            log.warning("%s: %d unreadable file(s), to be skipped: %s", self.checks_name, len(skipped), listed)
        if errors:
            raise BadImagesError(self.checks_name, errors, self.skip_bad_images)

    def _guarded_sets(self) -> dict[str, SkipBadImages]:
        sets = {"train": getattr(self, "train_set", None), "val": getattr(self, "val_set", None)}
        return {split: ds for split, ds in sets.items() if isinstance(ds, SkipBadImages)}

    @property
    def skipped_images(self) -> dict[str, int]:
        """Distinct unreadable files met so far per split (``{}`` without ``skip_bad_images`` or before setup)."""
        return {split: ds.count for split, ds in self._guarded_sets().items()}

    @property
    def bad_image_files(self) -> dict[str, list[str]]:
        """The unreadable files met so far per split (see :attr:`skipped_images`)."""
        return {split: ds.bad_files for split, ds in self._guarded_sets().items()}


def _check_split(split: str) -> None:
    if split not in ("train", "val"):
        raise ValueError(f"example_batch(split={split!r}): choose 'train' or 'val'")


class ClassificationDataModule(SampleIndexCapability, L.LightningDataModule):
    """Base for classification data; satisfies :class:`~diffkd.data.protocol.ClassificationData`.

    Defaults of the protocol members: ``loss_label_smoothing = 0.0``, ``batch_transform()`` → ``None`` (no
    on-device batch transform), ``example_batch(size)`` → the first ``size`` training samples through the train
    transform and :meth:`collate_fn`, global random states untouched.

    Args:
        data_dir: folder holding (or receiving) the data set.
        batch_size: per-device training batch; the global batch is ``batch_size × devices × num_nodes``.
        val_batch_size: per-device evaluation batch (default: ``batch_size``).
        num_workers: loader worker processes (0 loads in the main process).
        pin_memory: pin host memory for faster host-to-device copies.
        drop_last: drop the last incomplete training batch (keeps BatchNorm batches full).
        train_transform, val_transform: the transforms from the configuration (None: the data set's default);
            a mapping of ``timm.data.create_transform`` arguments or a list of torchvision transforms, see
            :mod:`diffkd.data.transforms`. A subclass builds them with :meth:`make_transform`.
    """

    task: ClassVar[str] = "classification"
    builds_sample_index = True
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
        batch_size: int = 64,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        pin_memory: bool = False,
        drop_last: bool = True,
        *,
        train_transform: TransformSpec = None,
        val_transform: TransformSpec = None,
    ) -> None:
        super().__init__()
        self.data_dir = str(data_dir)
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.drop_last = drop_last
        self.transform_specs: dict[str, TransformSpec] = {"train": train_transform, "val": val_transform}
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

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

    def collate_fn(self) -> Callable[[list[Any]], Any]:
        """How the loaders (and :meth:`example_batch`) turn a list of samples into a batch."""
        return default_collate

    def checked_collate(
        self, split: Literal["train", "val"], batch_size: int, example: bool = False
    ) -> Callable[[list[Any]], Any]:
        """:meth:`collate_fn`, raising :class:`~diffkd.data.usable.MixedSizeError` (the sizes, the split, the fix)
        instead of torch's bare "stack expects each tensor to be equal size" when the transform gives samples of
        several sizes. ``example``: for :meth:`example_batch` (the models' dry run), not a loader."""
        key = "data.batch_size" if split == "train" else "data.val_batch_size"
        batch = f"the models' dry-run example batch of {batch_size}" if example else f"{key}={batch_size}"
        fix = (
            f"make data.{split}_transform give one size, e.g. end it with Resize([{self.image_size}, "
            f"{self.image_size}]) or CenterCrop({self.image_size}) (data.image_size), or set it to null for the "
            "default transform"
        )
        if split == "val" and not example:
            fix += ", or set data.val_batch_size=1"
        return SameSizeCollate(self.collate_fn(), split, batch, fix)

    def example_batch(self, size: int = 2, split: str = "train") -> tuple[Tensor, Tensor]:
        """The first ``size`` samples of ``split`` (``train`` through the train transform, ``val`` through the
        val transform) and :meth:`collate_fn`, on the CPU.

        Sets up the data sets when needed. Every global random state (torch CPU and CUDA, Python, NumPy) is the
        same afterwards as before: the augmentation draws are undone.

        Returns:
            images (size, C, S, S) float32, targets (size,) int64.
        """
        _check_split(split)
        with preserved_rng_state():
            self.setup("fit" if split == "train" else "validate")
            dataset = self.train_set if split == "train" else self.val_set
            self._check_example_size(size, len(dataset), split)
            collate = self.checked_collate(split, size, example=True)  # type: ignore[arg-type]
            if split == "train":
                dataset, collate = self.indexed_train_set(dataset), self.indexed_collate(collate)
            loader = DataLoader(dataset, batch_size=size, shuffle=False, collate_fn=collate)
            return next(iter(loader))

    def _check_example_size(self, size: int, available: int, split: str = "train") -> None:
        if size < 1 or size > available:
            raise ValueError(f"example_batch(size={size}): the {split} split has {available} samples")

    # ------------------------------------------------------------------------------------------- loaders
    def _loader(self, dataset: Dataset, batch_size: int, train: bool) -> DataLoader:
        common = {
            "batch_size": batch_size,
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory,
            "persistent_workers": self.num_workers > 0,
            "collate_fn": self.checked_collate("train" if train else "val", batch_size),
        }
        if not train:
            return DataLoader(dataset, shuffle=False, **common)
        common["collate_fn"] = self.indexed_collate(common["collate_fn"])
        dataset = self.indexed_train_set(dataset)
        return seeded_train_loader(dataset, position_fn=self._resume_position, drop_last=self.drop_last, **common)

    def _resume_position(self) -> tuple[int, int]:
        return resume_position(self.trainer)

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

    def train_batch_problem(self) -> SplitProblem | None:
        """Why the training split gives no batch on this process (``drop_last`` and fewer samples than
        ``batch_size``, where Lightning would skip training with a warning), or None. ``python -m diffkd.data.check``
        reports it; :meth:`train_dataloader` raises it."""
        self.setup("fit")
        where = str(getattr(self, "train_dir", None) or self.data_dir)
        return batch_problem("train", where, len(self.train_set), self.batch_size, self.drop_last, world_size(self))

    def require_a_train_batch(self) -> None:
        """Raise :class:`~diffkd.data.usable.EmptySplitError` for :meth:`train_batch_problem`."""
        raise_problems(type(self).__name__, [self.train_batch_problem()])

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        self.require_a_train_batch()
        return self._loader(self.train_set, self.batch_size, train=True)

    def val_dataloader(self) -> DataLoader:
        self.setup("validate")
        return self._loader(self.val_set, self.val_batch_size, train=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


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
        gpu_preload: keep the data set on the device and augment there (see above).
        others: see ``ClassificationDataModule``.
    """

    fused_normalize: bool = False  # False: torchvision's ToTensor + Normalize order of operations
    builds_sample_index = True

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 64,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        pin_memory: bool = False,
        drop_last: bool = True,
        gpu_preload: bool = False,
        *,
        train_transform: TransformSpec = None,
        val_transform: TransformSpec = None,
    ) -> None:
        super().__init__(
            data_dir,
            batch_size,
            val_batch_size,
            num_workers,
            pin_memory,
            drop_last,
            train_transform=train_transform,
            val_transform=val_transform,
        )
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
        _check_split(split)
        with preserved_rng_state():
            self.setup("fit" if split == "train" else "validate")
            self._check_example_size(size, len(self.device_data[split][1]), split)
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
