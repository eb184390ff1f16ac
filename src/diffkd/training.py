"""One training run from a composed config: ``train(cfg)`` (used by ``python -m diffkd.train``, the demo, tests).

Instantiates the datamodule, the task module, callbacks, loggers and the trainer from ``cfg``; fits; tests the
best checkpoint when ``cfg.test``; returns the metrics and the objects.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher, _SubprocessScriptLauncher
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from diffkd.callbacks.checkpointing import AtomicCheckpointIO
from diffkd.runs import check_resume, check_run_dir, from_checkpoint_values
from diffkd.utils.instantiate import build_module, instantiate, instantiate_list
from diffkd.utils.loggers import adopt_spawned_logs, pin_log_dirs

__all__ = ["train"]

log = logging.getLogger("diffkd.train")


def _pin_ddp_children_to_this_job() -> None:
    """In a Hydra multirun, Lightning's DDP launcher re-runs ``sys.argv`` (a whole sweep) for ranks > 0 with
    ``hydra.run.dir`` = the *run* dir pattern, scattering folders. Make the children run exactly this job, in
    this job's folder."""
    if not HydraConfig.initialized():
        return
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return
    with read_write(hc), open_dict(hc):
        hc.run.dir = hc.runtime.output_dir
    sys.argv = [sys.argv[0], *hc.overrides.task]
    import __main__

    if getattr(__main__.__spec__, "name", None) == "submitit.core._submit":
        # hydra/launcher=local: this process is submitit's job runner; the children must run diffkd.train
        __main__.__spec__ = importlib.util.find_spec("diffkd.train")


_DDP_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


def _release_process_group() -> None:
    """Tear down the DDP process group, so that the next job of a multirun can start its own."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _check_sync_batchnorm(cfg: DictConfig, trainer: L.Trainer) -> None:
    """Fail before any work where DDP would fail deep inside with "SyncBatchNorm layers only work with GPU modules"."""
    if cfg.trainer.get("sync_batchnorm") and isinstance(trainer.accelerator, CPUAccelerator):
        raise ValueError(
            "trainer.sync_batchnorm=true needs GPUs: torch's SyncBatchNorm has no CPU kernel. On the CPU add "
            "trainer.sync_batchnorm=false (e.g. trainer=ddp trainer.accelerator=cpu trainer.sync_batchnorm=false)"
        )


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    """``ckpt_path`` as a file: ``last`` is this run folder's ``checkpoints/last.ckpt`` when it exists (a requeued
    job), else the newest ``last.ckpt`` of this task's runs (``<log_dir>/<task_name>/{runs,multiruns}/**``)."""
    value = cfg.get("ckpt_path")
    own = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    if value is None and os.environ.get("SUBMITIT_EXECUTOR") and own.is_file():
        # hydra/launcher=slurm|local: submitit runs a preempted or timed-out job again, in the same folder
        log.info("requeued job: resuming %s", own)
        return str(own)
    if value is None or str(value) != "last":
        if value is not None and not Path(str(value)).is_file():
            raise FileNotFoundError(f"ckpt_path={value}: no such file (ckpt_path=last resumes this task's newest run)")
        return None if value is None else str(value)
    if own.is_file():
        return str(own)
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        raise FileNotFoundError(
            f"ckpt_path=last in a multirun resumes each job from its own folder, and {own.parent} has no last.ckpt "
            "(another sweep point's run is never resumed); give the file instead: ckpt_path=<run>/checkpoints/last.ckpt"
        )
    task_dir = Path(cfg.paths.log_dir) / str(cfg.task_name)
    found = sorted(task_dir.glob("*runs/**/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(
            f"ckpt_path=last: no checkpoints/last.ckpt under {task_dir} (runs/ or multiruns/) nor in "
            f"{own.parent}; give the file instead: ckpt_path=<run>/checkpoints/last.ckpt"
        )
    log.info("ckpt_path=last: resuming %s", found[-1])
    return str(found[-1])


def _stored_run(ckpt_path: str | None) -> dict[str, Any]:
    """The ``diffkd`` entry of a checkpoint (its run's config, W&B id, points); ``{}`` without one."""
    if ckpt_path is None:
        return {}
    import torch

    # memory-mapped: only the small dict is read here; Lightning reads the tensors when it restores
    return torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True).get("diffkd") or {}


def _resume_wandb(cfg: DictConfig, stored_run: dict[str, Any]) -> None:
    """A resumed run logs to the W&B run it started (the id stored in the checkpoint), unless logger.wandb.id is
    set."""
    wandb_cfg = (cfg.get("logger") or {}).get("wandb")
    if wandb_cfg is None or wandb_cfg.get("id"):
        return
    stored = stored_run.get("wandb_id")
    if stored:
        with open_dict(cfg):
            cfg.logger.wandb.id = stored
            cfg.logger.wandb.resume = "allow"
        log.info("W&B: resuming run %s", stored)


def _last_checkpoint(trainer: L.Trainer) -> str:
    for cb in trainer.callbacks:
        if type(cb).__name__ == "LastCheckpoint":
            return str(cb.path) if cb.path.is_file() else ""
    ckpt_cb = trainer.checkpoint_callback
    last = getattr(ckpt_cb, "last_model_path", "")
    if not last and ckpt_cb is not None and ckpt_cb.dirpath and (Path(ckpt_cb.dirpath) / "last.ckpt").is_file():
        last = str(Path(ckpt_cb.dirpath) / "last.ckpt")  # ddp_spawn hands back only the best path
    return last


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """One training run. Returns (metrics, {"trainer", "module", "datamodule", "best_ckpt", "last_ckpt"})."""
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    ckpt_path = resolve_ckpt_path(cfg) if cfg.get("train", True) else None
    check_run_dir(cfg, ckpt_path)
    stored_run = _stored_run(ckpt_path)
    run_config = OmegaConf.to_container(cfg, resolve=True)
    changes = []
    if ckpt_path is not None:
        mode = str(cfg.get("resume_changes") or "refuse")
        changes = check_resume(stored_run.get("config"), run_config, ckpt_path, mode)
        run_config = from_checkpoint_values(stored_run.get("config"), run_config)
    _resume_wandb(cfg, stored_run)
    datamodule = instantiate(cfg.data)
    num_classes = getattr(datamodule, "num_classes", None)
    module = build_module(cfg, num_classes)
    module.run_config = run_config
    module.resume_changes = changes
    callbacks = instantiate_list(cfg.get("callbacks"))
    loggers = instantiate_list(cfg.get("logger"))
    if not loggers:  # LearningRateMonitor refuses to run without a logger
        callbacks = [c for c in callbacks if type(c).__name__ != "LearningRateMonitor"]
    if cfg.trainer.get("enable_progress_bar") is False:  # the progress-bar callback follows the trainer flag
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    # every checkpoint file is written whole or not at all (diffkd.callbacks.AtomicCheckpointIO)
    plugins = [*(hydra.utils.instantiate(cfg.trainer.get("plugins")) or []), AtomicCheckpointIO()]
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=plugins
    )
    _check_sync_batchnorm(cfg, trainer)
    for lg in loggers:
        lg.log_hyperparams(module.run_config)
    if trainer.global_rank == 0:  # a resumed run's folder: its metrics.json says finished only once this run is
        (Path(str(cfg.paths.output_dir)) / METRICS_FILE).unlink(missing_ok=True)
    metrics, best, last = _fit_and_test(cfg, trainer, module, datamodule, ckpt_path)
    if trainer.global_rank == 0:
        write_run_metrics(cfg, metrics)
    objects = {"trainer": trainer, "module": module, "datamodule": datamodule, "best_ckpt": best, "last_ckpt": last}
    return metrics, objects


def _fit_and_test(
    cfg: DictConfig,
    trainer: L.Trainer,
    module: L.LightningModule,
    datamodule: L.LightningDataModule,
    ckpt_path: str | None,
) -> tuple[dict[str, float], str, str]:
    """Fit (``cfg.train``), then test the best checkpoint (``cfg.test``), under any strategy: one process, the
    script launcher (``ddp``: ranks > 0 re-run the command), spawned processes (``ddp_spawn``, ``ddp_fork``) or
    processes started outside (SLURM, torchrun). Returns (metrics, best checkpoint, last checkpoint); in spawned
    runs the metrics are the ones rank 0 sent back to this process."""
    if trainer.global_rank == 0:  # what `auto` chose (the printed config shows the precision's resolver)
        log.info(
            "trainer: %s × %d device(s) × %d node(s), strategy %s, precision %s",
            type(trainer.accelerator).__name__.removesuffix("Accelerator").lower(),
            trainer.num_devices,
            trainer.num_nodes,
            type(trainer.strategy).__name__,
            trainer.precision,
        )
    launcher = trainer.strategy.launcher
    spawns = isinstance(launcher, _MultiProcessingLauncher)
    launches_children = isinstance(launcher, _SubprocessScriptLauncher)
    if launches_children:  # strategy=ddp re-runs the script for ranks > 0
        _pin_ddp_children_to_this_job()
    if spawns:
        pin_log_dirs(trainer.loggers)
    ddp_env = {k: os.environ.get(k) for k in _DDP_ENV} if launches_children and "LOCAL_RANK" not in os.environ else {}
    metrics: dict[str, float] = {}
    best = last = ""
    try:
        if cfg.get("train", True):
            with warnings.catch_warnings():
                # the frozen teacher is in eval mode on purpose; Lightning warns about any eval-mode module
                warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
                trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
            if spawns:
                adopt_spawned_logs(trainer.loggers)
            ckpt_cb = trainer.checkpoint_callback
            # read before testing: trainer.test(ckpt_path=best) restores the callback's state as of that checkpoint
            best = getattr(ckpt_cb, "best_model_path", "") or ""
            last = _last_checkpoint(trainer)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        if cfg.get("test", False):
            trainer.test(module, datamodule=datamodule, ckpt_path=best or None)
            metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    finally:
        # only now, after the test too: the launcher leaves LOCAL_RANK & co. in this process's environment, and while
        # they are there the test's launch knows its children are running (without them it would start them again:
        # "The launcher can only create subprocesses once"). Removed, the next job of a multirun does not believe an
        # external launcher started it, and starts its own children.
        for key, value in ddp_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    _release_process_group()
    return metrics, best, last


# --- metrics.json: the finished run's final metrics, for `python -m diffkd.report` -----------------------------------

METRICS_FILE = "metrics.json"


def _hydra_choices(cfg: DictConfig) -> dict[str, Any]:
    """The running Hydra app's config-group choices when this run is that app's own job (its folder is Hydra's output
    folder); ``{}`` for a run composed otherwise (the demo's runs, tests)."""
    if not HydraConfig.initialized():
        return {}
    hc = HydraConfig.get()
    try:
        own = Path(str(hc.runtime.output_dir)).resolve() == Path(str(cfg.paths.output_dir)).resolve()
    except Exception:  # an unresolvable paths.output_dir
        return {}
    return dict(hc.runtime.choices) if own else {}


def write_run_metrics(cfg: DictConfig, metrics: dict[str, float]) -> Path:
    """Write ``<paths.output_dir>/metrics.json`` atomically at the end of a run: its final (and test) metrics, with
    what identifies it — ``task_name``, ``experiment`` and ``method`` (the ``distill`` group choice, when Hydra ran
    this job), ``seed``, ``optimized_metric``. Its presence says the run finished; ``diffkd.report`` reads it."""
    import json
    import math
    import tempfile
    from datetime import UTC, datetime

    choices = _hydra_choices(cfg)
    record = {
        "task_name": cfg.get("task_name"),
        "experiment": choices.get("experiment"),
        "method": choices.get("distill"),
        "seed": cfg.get("seed"),
        "optimized_metric": cfg.get("optimized_metric"),
        "train": bool(cfg.get("train", True)),
        "test": bool(cfg.get("test", False)),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "metrics": {k: (v if math.isfinite(v) else None) for k, v in sorted(metrics.items())},
    }
    folder = Path(str(cfg.paths.output_dir))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / METRICS_FILE
    with tempfile.NamedTemporaryFile("w", dir=folder, prefix=f".{METRICS_FILE}.", delete=False) as tmp:
        json.dump(record, tmp, indent=2)
    os.replace(tmp.name, path)
    return path
