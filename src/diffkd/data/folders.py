"""Images sorted into class folders, ``<split>/<class>/<image>``: class discovery, the sample scan, the errors.

Shared by :class:`~diffkd.data.image_folder.ImageFolderDataModule` and the ``folders`` layout of
:class:`~diffkd.data.imagenet.ImageNetDataModule`, so both find the same classes and files and word their errors
alike. Semantics are torchvision ``ImageFolder``'s: classes are the sorted sub-folder names (hidden ones
skipped), a class's images are the files with an image extension anywhere under its folder, in ``os.walk``
order (sorted), and a class folder without an image is an error.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from diffkd.data.images import DataIssue, DataNotFoundError, inspect_image, read_image

__all__ = ["IMG_EXTENSIONS", "ClassFolders", "ImageListDataset", "find_images", "list_classes", "list_images"]

#: Extensions (lower case) of the files taken as images: torchvision ``ImageFolder``'s set.
IMG_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff")


def list_classes(folder: str | Path) -> list[str]:
    """Sorted names of the sub-folders of ``folder`` (hidden ones skipped), as ``ImageFolder`` orders them."""
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))


def list_images(folder: str | Path) -> list[str]:
    """Sorted names of the image files directly in ``folder`` (not in its sub-folders)."""
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS))


def find_images(folder: str | Path) -> list[str]:
    """Image files anywhere under ``folder``, as ``/``-separated paths relative to it, in torchvision's order
    (``sorted(os.walk(folder, followlinks=True))``, then the sorted names of each directory)."""
    found = []
    for dirpath, _, names in sorted(os.walk(folder, followlinks=True)):
        rel = os.path.relpath(dirpath, folder)
        prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
        found += [prefix + name for name in sorted(names) if name.lower().endswith(IMG_EXTENSIONS)]
    return found


def _names(names: Sequence[str], limit: int = 10) -> str:
    """``repr`` of a list of names, shortened past ``limit`` entries."""
    if len(names) <= limit:
        return repr(list(names))
    return f"{repr(list(names[:limit]))[:-1]}, ... ({len(names)} in all)]"


class ImageListDataset(Dataset):
    """Images ``root/<relative path>`` with integer labels; items are ``(transform(PIL RGB image), label)``.

    A file that does not decode raises :class:`~diffkd.data.images.ImageReadError` naming it (see
    :class:`~diffkd.data.images.SkipBadImages` to skip such files instead).

    Args:
        root: folder the relative paths start from.
        samples: ``(relative path, label)`` pairs.
        transform: applied to the RGB ``PIL.Image`` (the datamodules' transforms give float32 (3, S, S)).
        classes: class names in label order, when known (the class-folder layouts); kept as ``classes`` and
            ``class_to_idx``, as torchvision's ``ImageFolder`` has them.
    """

    def __init__(
        self,
        root: str | Path,
        samples: Sequence[tuple[str, int]],
        transform: Callable | None = None,
        classes: Sequence[str] | None = None,
    ) -> None:
        self.root = str(root)
        self.samples = list(samples)
        self.targets = [label for _, label in self.samples]
        self.transform = transform
        self.classes = list(classes) if classes is not None else None
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)} if self.classes is not None else None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        rel, label = self.samples[index]
        img = read_image(os.path.join(self.root, rel), "RGB")
        return (self.transform(img) if self.transform is not None else img), label

    def sample_files(self, index: int) -> tuple[str]:
        """The file of sample ``index``."""
        return (os.path.join(self.root, self.samples[index][0]),)

    def check_sample(self, index: int) -> list[DataIssue]:
        """Decode sample ``index``'s file as loading does: an error when it does not, a note when it is not RGB."""
        return inspect_image(self.sample_files(index)[0], index)[1]


class ClassFolders:
    """A training and a validation folder of class sub-folders: classes, samples and what is wrong with them.

    Labels are the indices of the sorted train classes. Every missing-data problem is a
    :class:`~diffkd.data.images.DataNotFoundError` ``"<dataset> (<problem>)"`` with the datamodule's layout and
    remedies; train and val classes that do not line up raise ``layout_error(message)``.

    Args:
        train_dir, val_dir: the two split folders.
        dataset: the data set's name at the head of errors (``"ImageNet"``).
        layout: the expected on-disk layout, one line each (shown by every error).
        remedies: ways to fix missing data.
        val_subset: the val folder may lack train classes (every val class must still be a train class);
            False: both must hold exactly the same classes.
        layout_error: the exception type for mismatched classes (a ``ValueError`` subclass taking the message).
        flat_hint: the advice when a split folder holds images but no class sub-folders.
    """

    def __init__(
        self,
        train_dir: str | Path,
        val_dir: str | Path,
        *,
        dataset: str,
        layout: Sequence[str],
        remedies: Sequence[str],
        val_subset: bool = False,
        layout_error: Callable[[str], Exception] = ValueError,
        flat_hint: str = "sort them into one sub-folder per class",
    ) -> None:
        self.train_dir, self.val_dir = Path(train_dir), Path(val_dir)
        self.dataset = dataset
        self.layout = list(layout)
        self.remedies = list(remedies)
        self.val_subset = val_subset
        self.layout_error = layout_error
        self.flat_hint = flat_hint
        self._classes: list[str] | None = None

    def not_found(self, problem: str, searched: Sequence[str | Path]) -> DataNotFoundError:
        """The error for missing data: ``"<dataset> (<problem>)"``, where we looked, the layout, the remedies."""
        return DataNotFoundError(f"{self.dataset} ({problem})", searched, self.layout, self.remedies)

    def require(self, dirs: Sequence[Path] = (), files: Sequence[Path] = (), prefix: str = "") -> None:
        """Raise ``not_found("<prefix>missing A and B")`` unless every folder in ``dirs`` and file in ``files``
        exists."""
        needed = [*files, *dirs]
        missing = [p for p in files if not p.is_file()] + [d for d in dirs if not d.is_dir()]
        if missing:
            raise self.not_found(prefix + "missing " + " and ".join(str(p) for p in missing), needed)

    def scan_classes(self, folder: Path) -> list[str]:
        """The sorted class sub-folders of ``folder``; a missing folder or one without classes is an error."""
        if not folder.is_dir():
            raise self.not_found(f"missing folder {folder}", [folder])
        classes = list_classes(folder)
        if not classes:
            hint = f" (it holds images directly: {self.flat_hint})" if list_images(folder) else ""
            raise self.not_found(f"no class sub-folders in {folder}{hint}", [folder])
        return classes

    @property
    def classes(self) -> list[str]:
        """Train class names in label order; the folder is scanned the first time (and again by :meth:`scan`)."""
        if self._classes is None:
            self._classes = self.scan_classes(self.train_dir)
        return self._classes

    def class_mismatch(self, train: Sequence[str], val: Sequence[str]) -> str | None:
        """What is wrong with the two class lists (None: nothing)."""
        only_train = sorted(set(train) - set(val))
        only_val = sorted(set(val) - set(train))
        if not only_val and (self.val_subset or not only_train):
            return None
        rule = "every val class must be a train class" if self.val_subset else "both must hold the same classes"
        return (
            f"train and val class folders differ (targets would not line up; {rule}):\n"
            f"  {self.train_dir}: {_names(train)}\n"
            f"  {self.val_dir}: {_names(val)}\n"
            f"  only in train: {_names(only_train)}; only in val: {_names(only_val)}"
        )

    def samples(self, folder: Path, classes: Sequence[str], class_to_idx: dict[str, int]) -> list[tuple[str, int]]:
        """``("<class>/<relative path>", label)`` for every image under ``folder/<class>``; a class folder
        without images is an error."""
        samples: list[tuple[str, int]] = []
        empty: list[str] = []
        for name in classes:
            files = find_images(folder / name)
            empty += [] if files else [name]
            samples += [(f"{name}/{f}", class_to_idx[name]) for f in files]
        if empty:
            raise self.not_found(
                f"no images ({', '.join(e[1:] for e in IMG_EXTENSIONS[:3])}, ...) in "
                + ", ".join(str(folder / c) for c in empty[:5])
                + (f" and {len(empty) - 5} more" if len(empty) > 5 else ""),
                [folder / c for c in empty[:5]],
            )
        return samples

    def scan(self) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
        """Rescan both folders: ``(train samples, val samples)``, each ``("<class>/<path>", label)``.

        Raises:
            DataNotFoundError: a missing folder, no class sub-folders, a class folder without images.
            ``layout_error``: train and val classes that do not line up (see ``val_subset``).
        """
        self._classes = None  # the folder may have changed since `classes` was first read
        train_classes = self.classes
        val_classes = self.scan_classes(self.val_dir)
        problem = self.class_mismatch(train_classes, val_classes)
        if problem is not None:
            raise self.layout_error(problem)
        class_to_idx = {c: i for i, c in enumerate(train_classes)}
        train = self.samples(self.train_dir, train_classes, class_to_idx)
        val = self.samples(self.val_dir, val_classes, class_to_idx)
        return train, val
