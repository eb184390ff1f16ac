"""``python -m diffkd.data.check`` (or ``python -m diffkd.check``) — decode every file of a data set up front and
report what is bad.

The command line of the data check: the data config is composed from the packaged ``conf/`` as training composes
it (:func:`diffkd.config.compose`: ``train.yaml`` with ``~experiment data=<name>`` and the ``--set`` overrides),
the datamodule is instantiated and set up, and :func:`diffkd.data.check.check_datamodule` checks every sample of
each split (what it checks is described in :mod:`diffkd.data.check`, which knows no config files).

Exit status: 0 when nothing is bad (notes allowed), 1 when there is an error or a warning (or the data set is not
found or not usable), 2 for a usage error. The last line is the summary; ``--json out.json`` writes the whole
report.

Examples::

    python -m diffkd.data.check imagenet --data-dir /data/imagenet --workers 32
    python -m diffkd.data.check image_folder --root ~/my_images --json bad.json
    python -m diffkd.data.check ~/my_images                       # a folder: image_folder with that root
    python -m diffkd.data.check coco --root /data/coco --splits val --set val_split=val2017
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from diffkd.config import absolute, add_set_option, compose, data_config_name, declares
from diffkd.data.check import SPLITS, CheckReport, check_datamodule, default_workers, format_report

__all__ = ["UsageError", "data_config", "main"]


class UsageError(Exception):
    """A bad command line or config: printed as one line, exit status 2."""


def _compose(overrides: Sequence[str]) -> DictConfig:
    """``train.yaml`` of the packaged ``conf/`` with ``overrides``; Hydra's refusals as :class:`UsageError`."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        return compose(overrides, "check")
    except (HydraException, OmegaConfBaseException) as err:
        raise UsageError(" ".join(str(err).split())) from None


def data_config(args: argparse.Namespace) -> tuple[DictConfig, str, list[str]]:
    """``(composed config, data config name, what the flags set)`` of the command line."""
    try:
        name, folder = data_config_name(args.data)
    except ValueError as bad:
        raise UsageError(f"{bad}") from None
    base = ["~experiment", f"data={name}"]
    first = _compose(base)
    sets = [absolute(s, first, "data") for s in args.overrides]
    cfg = _compose([*base, *sets]) if sets else first
    applied = [f"{s} (--set)" for s in sets]
    root = args.root if args.root is not None else folder
    for key, value, flag in (("data_dir", args.data_dir, "--data-dir"), ("root", root, "--root")):
        if value is None:
            continue
        if not declares(cfg.data, key):
            other = "--root" if key == "data_dir" else "--data-dir"
            raise UsageError(f"{flag}: the data config {name} has no {key} (use {other})")
        OmegaConf.update(cfg, f"data.{key}", str(Path(value).expanduser()), merge=False)
        applied.append(f"data.{key}={value} ({flag})")
    for key in ("verify", "skip_bad_images"):  # the check reports every file itself; nothing is skipped
        if declares(cfg.data, key):
            cfg.data[key] = False
    return cfg, name, applied


def _settings(cfg: DictConfig) -> dict[str, Any]:
    keys = ("data_dir", "root", "layout", "train_dir", "val_dir", "train_split", "val_split")
    data = OmegaConf.to_container(cfg.data, resolve=True)
    return {k: data[k] for k in keys if k in data}


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
    add_set_option(parser, "val_split=val2017")
    parser.add_argument("--splits", default="train,val", help="comma-separated splits to check (default train,val)")
    parser.add_argument(
        "--workers", type=int, default=None, help=f"decoding threads (default min(32, CPUs + 4) = {default_workers()})"
    )
    parser.add_argument("--json", dest="json_path", help="also write the report to this JSON file")
    return parser


def _write_json(path: str | None, report: CheckReport) -> None:
    if path is not None:
        Path(path).write_text(json.dumps(report.to_dict(), indent=2) + "\n")


def _failed(report: CheckReport, err: Exception, message: str, json_path: str | None) -> int:
    """A data set that could not be set up: the error on stderr, the summary line, exit status 1."""
    report.failure = f"{type(err).__name__}: {err}"
    print(message, file=sys.stderr)
    print(report.summary())
    _write_json(json_path, report)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Check as the command line says; print the report; return the exit status (0 clean, 1 bad, 2 usage)."""
    from omegaconf.errors import MissingMandatoryValue

    from diffkd.data.base import DataNotFoundError
    from diffkd.data.usable import EmptySplitError, MixedSizeError
    from diffkd.utils.instantiate import instantiate

    parser = _parser()
    args = parser.parse_args(argv)
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    if not splits or any(s not in SPLITS for s in splits):
        parser.error(f"--splits {args.splits!r}: choose from {', '.join(SPLITS)}")
    if args.workers is not None and args.workers < 1:
        parser.error("--workers must be >= 1")
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
        if isinstance(err, EmptySplitError):
            report.failure_reason = f"no usable sample in {', '.join(err.splits)}"
        else:
            report.failure_reason = "samples of several sizes in one batch"
        return _failed(report, err, str(err), args.json_path)
    except (DataNotFoundError, ValueError, OSError) as err:  # missing files, malformed lists or annotations
        hint = "\n(point to the data with --data-dir / --root)" if isinstance(err, FileNotFoundError) else ""
        return _failed(report, err, f"{err}{hint}", args.json_path)
    print(format_report(report))
    _write_json(args.json_path, report)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
