"""Experiment loggers: W&B online when credentials exist, offline (and saying how to sync) when not; and what spawned
processes (``ddp_spawn``, ``ddp_fork``) need to log one run across fit and test."""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger

__all__ = ["adopt_spawned_logs", "pin_log_dirs", "wandb_credentials_available", "wandb_logger"]

log = logging.getLogger(__name__)


def wandb_credentials_available() -> bool:
    """True when W&B can authenticate: ``WANDB_API_KEY`` or an ``api.wandb.ai`` entry in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def wandb_logger(save_dir: str, offline: bool | None = None, tags: Any = None, **kwargs: Any):
    """A Lightning ``WandbLogger``; ``offline=None`` picks offline mode when no credentials are found
    (or ``WANDB_MODE=offline``), and logs where the run is and how to upload it later."""
    from lightning.pytorch.loggers import WandbLogger

    mode = os.environ.get("WANDB_MODE", "")
    if offline is None:
        offline = mode in ("offline", "dryrun") or not wandb_credentials_available()
        if offline:
            log.warning(
                "W&B: no credentials found (WANDB_API_KEY or `wandb login`), logging offline under %s/wandb. "
                "Upload later with: wandb sync %s/wandb/offline-run-*",
                save_dir,
                save_dir,
            )
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    return WandbLogger(save_dir=save_dir, offline=offline, tags=list(tags or []), **kwargs)


def pin_log_dirs(loggers: Sequence[Logger]) -> None:
    """Fix each logger's version (its ``version_<n>`` folder) in this process, before any process is spawned.

    A spawned process gets a pickled copy of the loggers; one whose version is still unset picks the next free
    folder itself. The fit's process would take ``version_0`` and the test's, spawned later, ``version_1``: one run
    split across two folders.
    """
    for logger in loggers:
        _ = logger.version


def adopt_spawned_logs(loggers: Sequence[Logger]) -> None:
    """After a fit in spawned processes, bring this process's loggers up to date with what they wrote.

    Lightning's multiprocessing launcher (``ddp_spawn``, ``ddp_fork``/``ddp_notebook``) sends back to the main process
    the weights, the callback metrics and the best checkpoint's path, not the loggers: the next spawn (the test) gets
    the main process's loggers as they were before the fit. A ``CSVLogger``'s writer then knows no column of the fit's
    ``metrics.csv`` and rewrites the file under the test's columns alone, which fails on the fit's rows ("dict
    contains fields not in fieldnames"). Its writer learns the file's columns here, so the test's rows are added to
    the fit's file, under the union of both.

    Needs each CSV logger's writer to exist in this process already (``train`` logs the hyperparameters before
    fitting): a new writer would delete the folder's ``metrics.csv``.
    """
    for logger in loggers:
        if not isinstance(logger, CSVLogger):
            continue
        path = Path(logger.log_dir) / "metrics.csv"
        if not path.is_file():
            continue
        with path.open(newline="") as f:
            header = next(csv.reader(f), [])
        writer = logger.experiment
        writer.metrics_keys = sorted(set(writer.metrics_keys) | set(header))
