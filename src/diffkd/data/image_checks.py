"""``data.verify`` and ``data.skip_bad_images`` for a data module whose samples are image files: one mixin,
:class:`ImageFileChecks`, on top of :mod:`diffkd.data.images` and the data check (:mod:`diffkd.data.check`)."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from torch.utils.data import Dataset

from diffkd.data.check import check_dataset
from diffkd.data.images import BadImagesError, DataIssue, SkipBadImages

__all__ = ["ImageFileChecks"]

log = logging.getLogger("diffkd.data.base")  # the logger name of these lines before the split: filters keep working


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
