"""``python -m diffkd.data.check`` — decode every file of a data set up front and report what is bad.

The data config is composed from the packaged ``conf/`` as training composes it (``train.yaml`` with
``~experiment data=<name>``), the datamodule is instantiated and set up, and every sample of each split is checked
on a thread pool (PIL decodes outside the GIL):

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

Exit status: 0 when nothing is bad (notes allowed), 1 when there is an error or a warning (or the data set is not
found or not usable), 2 for a usage error. The last line is the summary; ``--json out.json`` writes the whole
report.

Examples::

    python -m diffkd.data.check imagenet --data-dir /data/imagenet --workers 32
    python -m diffkd.data.check image_folder --root ~/my_images --json bad.json
    python -m diffkd.data.check ~/my_images                       # a folder: image_folder with that root
    python -m diffkd.data.check coco --root /data/coco --splits val --set val_split=val2017

The same check runs inside training with ``data.verify=true`` (see :class:`~diffkd.data.base.ImageFileChecks`);
``data.skip_bad_images=true`` trains past unreadable files instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffkd.data.base import DataIssue
from diffkd.data.usable import EmptySplitError, MixedSizeError

__all__ = ["CheckReport", "SplitReport", "check_datamodule", "check_dataset", "default_workers", "main"]

CONFIG_DIR = Path(__file__).resolve().parents[1] / "conf"
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


# ------------------------------------------------------------------------------------------------ the config


class UsageError(Exception):
    """A bad command line or config: printed as one line, exit status 2."""


def _compose(overrides: Sequence[str]) -> Any:
    """``train.yaml`` of the packaged ``conf/`` with ``overrides`` (no Hydra app, no run folder)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from diffkd.utils.instantiate import compose_packaged

    try:
        return compose_packaged(overrides, "check")
    except (HydraException, OmegaConfBaseException) as err:
        raise UsageError(" ".join(str(err).split())) from None


def _data_name(data: str) -> tuple[str, str | None]:
    """``(data config name, image_folder root or None)``: a config name, or a folder (``image_folder``)."""
    from diffkd.utils.instantiate import data_config_name

    try:
        return data_config_name(data)
    except ValueError as bad:
        raise UsageError(f"{bad}") from None


def _absolute(override: str, groups: Sequence[str]) -> str:
    """``override`` with its key made absolute: a key whose first part is not a top-level key is under data."""
    prefix = override[: len(override) - len(override.lstrip("~+"))]
    body = override[len(prefix) :]
    first = body.split("=", 1)[0].split(".", 1)[0]
    return override if first in groups else f"{prefix}data.{body}"


def _declares(node: Any, key: str) -> bool:
    """Whether a config node has ``key``, even as ``???``: ``key in node`` is False for a missing value (the root
    of ``image_folder``)."""
    return key in list(node)


def data_config(args: argparse.Namespace) -> tuple[Any, str, list[str]]:
    """``(composed config, data config name, what the flags set)`` of the command line."""
    from omegaconf import OmegaConf

    name, folder = _data_name(args.data)
    base = ["~experiment", f"data={name}"]
    groups = list(_compose(base).keys())
    sets = [_absolute(s, groups) for s in args.overrides]
    cfg = _compose([*base, *sets])
    applied = [f"{s} (--set)" for s in sets]
    root = args.root if args.root is not None else folder
    for key, value, flag in (("data_dir", args.data_dir, "--data-dir"), ("root", root, "--root")):
        if value is None:
            continue
        if not _declares(cfg.data, key):
            other = "--root" if key == "data_dir" else "--data-dir"
            raise UsageError(f"{flag}: the data config {name} has no {key} (use {other})")
        OmegaConf.update(cfg, f"data.{key}", str(Path(value).expanduser()), merge=False)
        applied.append(f"data.{key}={value} ({flag})")
    for key in ("verify", "skip_bad_images"):  # the check reports every file itself; nothing is skipped
        if _declares(cfg.data, key):
            cfg.data[key] = False
    return cfg, name, applied


def _settings(cfg: Any) -> dict[str, Any]:
    from omegaconf import OmegaConf

    keys = ("data_dir", "root", "layout", "train_dir", "val_dir", "train_split", "val_split")
    data = OmegaConf.to_container(cfg.data, resolve=True)
    return {k: data[k] for k in keys if k in data}


# ------------------------------------------------------------------------------------------------ the command


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m diffkd.data.check",
        description="Decode every image (and label) of a data set's splits as training loads them; report every "
        "missing, empty, truncated or undecodable file (and labels or boxes that do not fit their image). Exit "
        "status 0: nothing bad; 1: something bad, or the data set is not found; 2: a usage error.",
    )
    parser.add_argument("data", help="data config (conf/data/<name>.yaml), or a folder of class folders (image_folder)")
    parser.add_argument("--data-dir", help="the data config's data_dir (cifar100, fashion_mnist, imagenet)")
    parser.add_argument("--root", help="the data config's root (image_folder, coco, cityscapes)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Hydra override, e.g. --set val_split=val2017 (repeatable; a key not starting with a config group is "
        "under data; +key= adds, ~key deletes)",
    )
    parser.add_argument("--splits", default="train,val", help="comma-separated splits to check (default train,val)")
    parser.add_argument(
        "--workers", type=int, default=None, help=f"decoding threads (default min(32, CPUs + 4) = {default_workers()})"
    )
    parser.add_argument("--json", dest="json_path", help="also write the report to this JSON file")
    return parser


def _write_json(path: str | None, report: CheckReport) -> None:
    if path is not None:
        Path(path).write_text(json.dumps(report.to_dict(), indent=2) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Check as the command line says; print the report; return the exit status (0 clean, 1 bad, 2 usage)."""
    from diffkd.data.base import DataNotFoundError
    from diffkd.utils.instantiate import instantiate

    parser = _parser()
    args = parser.parse_args(argv)
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    if not splits or any(s not in SPLITS for s in splits):
        parser.error(f"--splits {args.splits!r}: choose from {', '.join(SPLITS)}")
    if args.workers is not None and args.workers < 1:
        parser.error("--workers must be >= 1")
    from omegaconf.errors import MissingMandatoryValue

    name = args.data
    try:
        cfg, name, applied = data_config(args)
        target = str(cfg.data.get("_target_", "?"))
        dm = instantiate(cfg.data)
    except UsageError as err:
        print(f"diffkd.data.check: {err}", file=sys.stderr)
        return 2
    except MissingMandatoryValue as err:
        key = getattr(err, "full_key", None) or "a value"
        print(f"diffkd.data.check: data config {name}: {key} is not set (--root, --data-dir or --set)", file=sys.stderr)
        return 2
    except (TypeError, ValueError) as err:  # an entry the datamodule does not take, or a value it refuses
        print(f"diffkd.data.check: data config {name}: {err}", file=sys.stderr)
        return 2
    report = CheckReport(name, target, _settings(cfg))
    if applied:
        report.settings["overrides"] = applied
    try:
        report.splits = check_datamodule(
            dm, splits, args.workers, progress=lambda line: print(line, file=sys.stderr, flush=True)
        )
    except (EmptySplitError, MixedSizeError) as err:  # found, but training would refuse it: the message has the fix
        report.failure = f"{type(err).__name__}: {err}"
        if isinstance(err, EmptySplitError):
            report.failure_reason = f"no usable sample in {', '.join(err.splits)}"
        else:
            report.failure_reason = "samples of several sizes in one batch"
        print(err, file=sys.stderr)
        print(report.summary())
        _write_json(args.json_path, report)
        return 1
    except (DataNotFoundError, ValueError, OSError) as err:  # missing files, malformed lists or annotations
        report.failure = f"{type(err).__name__}: {err}"
        hint = "\n(point to the data with --data-dir / --root)" if isinstance(err, FileNotFoundError) else ""
        print(f"{err}{hint}", file=sys.stderr)
        print(report.summary())
        _write_json(args.json_path, report)
        return 1
    print(format_report(report))
    _write_json(args.json_path, report)
    return 0 if report.ok else 1


if __name__ == "__main__":
    # Run the imported module's main, not this __main__ copy: the data sets import diffkd.data.check (through
    # ImageFileChecks), and one copy of its classes keeps isinstance and except clauses right.
    from diffkd.data.check import main as _main

    sys.exit(_main())
