"""Experiment loggers: W&B online when credentials exist, offline (and saying how to sync) when not."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

__all__ = ["wandb_credentials_available", "wandb_logger"]

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
