"""Image files that may be broken, for every data module whose samples are files (ImageFolder, ImageNet, COCO,
Cityscapes, segmentation folders): reading a file with an error that names it (:func:`read_image`,
:class:`ImageReadError`), what a check found (:class:`DataIssue`, :func:`inspect_image`), skipping unreadable samples
(:class:`SkipBadImages`, the ``data.skip_bad_images`` key), the error listing every bad file (:class:`BadImagesError`,
``data.verify``), and the error of a data set whose files are missing (:class:`DataNotFoundError`).

It imports nothing of the rest of :mod:`diffkd.data`: the data check (:mod:`diffkd.data.check`) and the data modules
(through :class:`~diffkd.data.image_checks.ImageFileChecks`) build on it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

__all__ = [
    "BAD_IMAGE_HINT",
    "BadImagesError",
    "DataIssue",
    "DataNotFoundError",
    "ImageReadError",
    "SkipBadImages",
    "SkippedImageWarning",
    "inspect_image",
    "read_image",
]


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
