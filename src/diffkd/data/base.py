"""Old home of the classification base and the image-file robustness, kept so that every old import works.

The code now lives in :mod:`diffkd.data.classification` (:class:`ClassificationDataModule`,
:class:`PreloadableDataModule`), :mod:`diffkd.data.images` (reading image files, :class:`DataIssue`,
:class:`SkipBadImages`, the errors) and :mod:`diffkd.data.image_checks` (:class:`ImageFileChecks`).
"""

from diffkd.data.classification import ClassificationDataModule, PreloadableDataModule
from diffkd.data.image_checks import ImageFileChecks
from diffkd.data.images import (
    BAD_IMAGE_HINT,
    BadImagesError,
    DataIssue,
    DataNotFoundError,
    ImageReadError,
    SkipBadImages,
    SkippedImageWarning,
    inspect_image,
    read_image,
)

__all__ = [
    "BAD_IMAGE_HINT",
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
