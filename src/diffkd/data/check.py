"""The data check: decode every file of a data set up front and report what is bad.

``python -m diffkd.data.check <data config> [options]`` runs it from the command line (:mod:`diffkd.check`, which
composes the data config from the packaged ``conf/`` as training does). Here: :func:`check_datamodule` sets a
datamodule up and checks every sample of each split on a thread pool (PIL decodes outside the GIL):

* image files (ImageFolder, ImageNet, COCO, Cityscapes): decoded and converted as loading does; a missing,
  empty (0-byte), truncated or undecodable file is an error. Files that are not RGB are notes (they are converted
  on load).
* Cityscapes labels: the labelIds PNG must decode, be single-channel 8-bit and have its image's size (errors).
* COCO annotations: an image whose size differs from its json ``width``/``height``, and boxes reaching more than
  1 px outside their image, are warnings (training clamps or drops such boxes; evaluation keeps them). What the
  training split leaves out is counted, one note per reason: boxes dropped (crowd, zero width or height, outside
  the image, too small), images left out, images kept without a box (training logs the same counts at setup).
* in-memory data sets (CIFAR-100, Fashion-MNIST): nothing to decode; ``setup`` has read every sample already.

Setting the datamodule up applies the rules training applies (:mod:`diffkd.data.usable`): a split with no usable
sample (a COCO json without annotations, every box dropped) and evaluation images of several sizes batched together
fail the check as they would fail training, with the same message; a training split smaller than one batch (with
``drop_last``, for this config's ``batch_size``) is an error of the train split.

The command line's options, exit status and examples: :mod:`diffkd.check`.

The same check runs inside training with ``data.verify=true`` (see :class:`~diffkd.data.base.ImageFileChecks`);
``data.skip_bad_images=true`` trains past unreadable files instead.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any

from diffkd.data.images import DataIssue

__all__ = ["CheckReport", "SplitReport", "check_datamodule", "check_dataset", "default_workers", "format_report"]

SPLITS = ("train", "val")
_CHUNK = 64  # samples per pool task: few enough futures for ImageNet, small enough to spread over the threads
_PROGRESS_EVERY_S = 10.0
_SHOWN_PER_KIND = 10  # warnings and notes of one kind shown in the text report (the JSON has all)


def default_workers() -> int:
    """Threads of a check: ``ThreadPoolExecutor``'s default, ``min(32, CPUs + 4)``."""
    return min(32, (os.cpu_count() or 1) + 4)


@dataclass
class SplitReport:
    """What the check of one split found.

    Attributes:
        split: ``train`` or ``val``.
        where: the split's folder (and split name), as the data set knows it.
        samples: samples in the split.
        checked: whether its files were decoded (``False``: an in-memory data set, see ``note``).
        issues: everything found, in sample order.
        seconds: wall time of the check.
        note: why nothing was decoded, for an in-memory data set.
    """

    split: str
    where: str
    samples: int
    checked: bool = True
    issues: list[DataIssue] = field(default_factory=list)
    seconds: float = 0.0
    note: str = ""

    def of(self, severity: str) -> list[DataIssue]:
        return [i for i in self.issues if i.severity == severity]

    @property
    def bad(self) -> bool:
        return any(i.severity in ("error", "warning") for i in self.issues)

    def summary(self) -> str:
        """One line: samples, time, and the count of each severity."""
        if not self.checked:
            return f"{self.split}: {self.samples} samples, {self.note}"
        counts = ", ".join(f"{len(self.of(s))} {s}(s)" for s in ("error", "warning", "note") if self.of(s))
        return f"{self.split}: {self.samples} samples checked in {self.seconds:.1f} s: {counts or 'clean'}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "where": self.where,
            "samples": self.samples,
            "checked": self.checked,
            "seconds": round(self.seconds, 3),
            "note": self.note,
            **{f"{s}s": [i.to_dict() for i in self.of(s)] for s in ("error", "warning", "note")},
        }


@dataclass
class CheckReport:
    """The check of a data config: its splits and what was found."""

    data: str
    target: str
    settings: dict[str, Any]
    splits: list[SplitReport] = field(default_factory=list)
    failure: str | None = None  # the data set could not be set up (not found, malformed, not usable)
    failure_reason: str | None = None  # the summary's words for it, when more is known than "could not be set up"

    def count(self, severity: str) -> int:
        return sum(len(s.of(severity)) for s in self.splits)

    @property
    def ok(self) -> bool:
        return self.failure is None and not any(s.bad for s in self.splits)

    def summary(self) -> str:
        """The last line of the output."""
        if self.failure is not None:
            if self.failure_reason is not None:
                return f"FAILED: {self.data}: {self.failure_reason} (see above)"
            return f"FAILED: {self.data} could not be set up (see above)"
        samples = sum(s.samples for s in self.splits)
        names = ", ".join(s.split for s in self.splits)
        errors, warnings, notes = self.count("error"), self.count("warning"), self.count("note")
        tail = f" ({notes} note(s))" if notes else ""
        if not any(s.checked for s in self.splits):
            return f"OK: {self.data}: {samples} samples in {names}, in memory: nothing to decode"
        if self.ok:
            return f"OK: {self.data}: {samples} samples in {names}, nothing bad{tail}"
        fix = ""
        if any(i.skippable for s in self.splits for i in s.issues):
            fix = "; remove or replace the unreadable files, or train with data.skip_bad_images=true"
        return f"FAILED: {self.data}: {errors} error(s), {warnings} warning(s) in {samples} samples{tail}{fix}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "data": self.data,
            "target": self.target,
            "settings": self.settings,
            "ok": self.ok,
            "failure": self.failure,
            "errors": self.count("error"),
            "warnings": self.count("warning"),
            "notes": self.count("note"),
            "splits": {s.split: s.to_dict() for s in self.splits},
        }


# ------------------------------------------------------------------------------------------------ the check


def _where(dataset: Any) -> str:
    root = getattr(dataset, "root", None)
    split = getattr(dataset, "split", None)
    where = str(root) if root is not None else type(dataset).__name__
    return f"{where} ({split})" if isinstance(split, str) else where


def check_dataset(
    dataset: Any,
    split: str,
    workers: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> SplitReport:
    """Check every sample of ``dataset`` with its ``check_sample(i)`` on ``workers`` threads, and add what its
    ``split_issues()`` reports about the split as a whole (COCO: what training drops).

    Args:
        dataset: a data set of image files (``check_sample(i) -> list[DataIssue]``); one without ``check_sample``
            (in-memory tensors) is reported as not checked.
        split: the split's name in the report.
        workers: threads (default :func:`default_workers`).
        progress: called with a line every ~10 s of a long check.
    """
    n = len(dataset)
    check = getattr(dataset, "check_sample", None)
    if not callable(check):
        note = f"in memory ({type(dataset).__name__}): nothing to decode, setup read every sample"
        return SplitReport(split, _where(dataset), n, checked=False, note=note)
    start = last = time.monotonic()
    done, bad = 0, 0
    issues: list[DataIssue] = []

    def run(first: int) -> list[DataIssue]:
        return [issue for i in range(first, min(first + _CHUNK, n)) for issue in check(i)]

    with ThreadPoolExecutor(max_workers=max(1, workers or default_workers())) as pool:
        futures = {pool.submit(run, first): first for first in range(0, n, _CHUNK)}
        for future in as_completed(futures):
            found = future.result()
            issues += found
            done += min(_CHUNK, n - futures[future])
            bad += sum(i.severity != "note" for i in found)
            now = time.monotonic()
            if progress is not None and now - last >= _PROGRESS_EVERY_S:
                last = now
                progress(f"{split}: {done}/{n} samples checked, {bad} bad, {done / (now - start):.0f}/s")
    issues.sort(key=lambda i: (i.index if i.index is not None else -1, i.path))
    split_issues = getattr(dataset, "split_issues", None)
    if callable(split_issues):
        issues += split_issues()
    return SplitReport(split, _where(dataset), n, issues=issues, seconds=time.monotonic() - start)


def check_datamodule(
    dm: Any,
    splits: Sequence[str] = SPLITS,
    workers: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[SplitReport]:
    """Set ``dm`` up (``fit`` when ``train`` is asked for, else ``validate``) and check its ``train_set`` /
    ``val_set``; an error when the training split gives no batch (its ``train_batch_problem()``)."""
    dm.setup("fit" if "train" in splits else "validate")
    reports = []
    for split in splits:
        dataset = getattr(dm, f"{split}_set", None)
        if dataset is None:
            raise ValueError(f"{type(dm).__name__} has no {split}_set after setup")
        reports.append(check_dataset(dataset, split, workers, progress))
    batch_problem = getattr(dm, "train_batch_problem", None)
    problem = batch_problem() if "train" in splits and callable(batch_problem) else None
    if problem is not None:  # what the training loader would refuse: not one batch with this config
        message = f"{problem.why}. Fix: {problem.fix}"
        reports[splits.index("train")].issues.append(DataIssue(problem.where, "batch", message, "error"))
    return reports


# ------------------------------------------------------------------------------------------------ the report


def format_report(report: CheckReport) -> str:
    """The text report: each split's summary, every error and warning, notes grouped by kind."""
    lines = [f"{report.data} ({report.target})"]
    lines += [f"  {key} = {value}" for key, value in report.settings.items()]
    for split in report.splits:
        lines.append(f"{split.summary()}  [{split.where}]")
        lines += [f"  error    {i.line()}" for i in split.of("error")]
        for severity in ("warning", "note"):
            found = split.of(severity)
            by_kind = Counter(i.kind for i in found)
            for kind, total in sorted(by_kind.items()):
                shown = [i for i in found if i.kind == kind][:_SHOWN_PER_KIND]
                lines += [f"  {severity:<8} {i.line()}" for i in shown]
                if total > len(shown):
                    lines.append(f"  {severity:<8} ... and {total - len(shown)} more {kind} {severity}(s) (--json)")
    lines.append(report.summary())
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ the command

if __name__ == "__main__":
    # `python -m diffkd.data.check` runs the command line, diffkd.check (it composes configs: the data layer knows no
    # config files and imports nothing above it, hence by name). It runs as diffkd.check's own __main__, so the
    # classes here keep one copy (the data sets import this module through ImageFileChecks).
    import runpy

    runpy.run_module("diffkd.check", run_name="__main__", alter_sys=True)
