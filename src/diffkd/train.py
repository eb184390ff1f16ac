"""``python -m diffkd.train [experiment=<name>] [overrides]`` — compose the Hydra config and train.

With no arguments it runs the embedded demo (``experiment=demo``): Fashion-MNIST, offline, on the CPU.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from lightning.pytorch.accelerators import CPUAccelerator
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

log = logging.getLogger("diffkd.train")

CONFIG_DIR = str(Path(__file__).resolve().parent / "conf")


def _instantiate_list(cfg: DictConfig | None) -> list[Any]:
    if not cfg:
        return []
    return [hydra.utils.instantiate(c) for c in cfg.values() if c is not None and "_target_" in c]


def build_module(cfg: DictConfig, num_classes: int | None) -> L.LightningModule:
    """The task LightningModule from ``cfg.model``, ``cfg.distill`` and ``cfg.optim``."""
    distiller = _instantiate(cfg.distill, _convert_="all")
    student_cfg = cfg.model.student
    nc = {"num_classes": num_classes} if student_cfg.get("num_classes") is None and num_classes else {}
    student = _instantiate(student_cfg, **nc)
    teacher = None
    if distiller.needs_teacher:  # plain training builds no teacher at all: no wasted teacher work
        if cfg.model.get("teacher") is None:
            raise ValueError(f"distill={cfg.distill.get('_target_')} needs a teacher: set model.teacher")
        t_cfg = cfg.model.teacher
        nc_t = {"num_classes": num_classes} if t_cfg.get("num_classes") is None and num_classes else {}
        teacher = _instantiate(t_cfg, **nc_t)
        if t_cfg.get("weights") is None and not t_cfg.get("pretrained"):
            log.warning("the teacher %s has no weights (model.teacher.weights is null): it is untrained", t_cfg.name)
    module_cls = hydra.utils.get_class(cfg.model._target_)
    options = {k: v for k, v in cfg.model.items() if k not in ("_target_", "student", "teacher")}
    options = OmegaConf.to_container(OmegaConf.create(options), resolve=True)
    optim = cfg.optim
    return module_cls(
        student=student,
        teacher=teacher,
        distiller=distiller,
        optimizer=hydra.utils.instantiate(optim.optimizer),
        scheduler=hydra.utils.instantiate(optim.scheduler) if optim.get("scheduler") else None,
        scheduler_interval=optim.get("scheduler_interval", "epoch"),
        no_decay_bias_norm=optim.get("no_decay_bias_norm", False),
        lr_base_batch_size=optim.get("lr_base_batch_size"),
        **options,
    )


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


def _instantiate(cfg: DictConfig, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that raises the target's own error (e.g. a checkpoint mismatch) rather than
    Hydra's wrapper, so messages and exception types reach the user unchanged."""
    try:
        return hydra.utils.instantiate(cfg, **kwargs)
    except InstantiationException as err:
        if err.__cause__ is not None:
            raise err.__cause__ from None
        raise


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


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """One training run. Returns (metrics, {"trainer", "module", "datamodule", "best_ckpt", "last_ckpt"})."""
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    datamodule = _instantiate(cfg.data)
    num_classes = getattr(datamodule, "num_classes", None)
    module = build_module(cfg, num_classes)
    module.run_config = OmegaConf.to_container(cfg, resolve=True)
    callbacks = _instantiate_list(cfg.get("callbacks"))
    loggers = _instantiate_list(cfg.get("logger"))
    if not loggers:  # LearningRateMonitor refuses to run without a logger
        callbacks = [c for c in callbacks if type(c).__name__ != "LearningRateMonitor"]
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    _check_sync_batchnorm(cfg, trainer)
    for lg in loggers:
        lg.log_hyperparams(module.run_config)
    launches_children = type(trainer.strategy.launcher).__name__ == "_SubprocessScriptLauncher"
    if launches_children:  # strategy=ddp re-runs the script for ranks > 0
        _pin_ddp_children_to_this_job()
    ddp_env = {k: os.environ.get(k) for k in _DDP_ENV} if launches_children and "LOCAL_RANK" not in os.environ else {}
    try:
        if cfg.get("train", True):
            trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    finally:
        # the launcher leaves LOCAL_RANK & co. in this process's environment; the next job of a multirun would
        # then believe an external launcher started it and never start its children
        for key, value in ddp_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    ckpt_cb = trainer.checkpoint_callback
    # read before testing: trainer.test(ckpt_path=best) restores the callback's state as of that checkpoint
    best = getattr(ckpt_cb, "best_model_path", "") if cfg.get("train", True) else ""
    last = getattr(ckpt_cb, "last_model_path", "") if cfg.get("train", True) else ""
    if not last and ckpt_cb is not None and ckpt_cb.dirpath and (Path(ckpt_cb.dirpath) / "last.ckpt").is_file():
        last = str(Path(ckpt_cb.dirpath) / "last.ckpt")  # ddp_spawn hands back only the best path
    if cfg.get("test", False):
        trainer.test(module, datamodule=datamodule, ckpt_path=best or None)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    _release_process_group()
    objects = {"trainer": trainer, "module": module, "datamodule": datamodule, "best_ckpt": best, "last_ckpt": last}
    return metrics, objects


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    if cfg.get("print_config"):
        log.info("config:\n%s", OmegaConf.to_yaml(cfg))
    if cfg.get("pipeline") == "demo":
        from diffkd.demo import run_demo

        return run_demo(cfg)
    metrics, _ = train(cfg)
    name = cfg.get("optimized_metric")
    if name and name not in metrics:
        log.warning("optimized_metric %r was not logged; available: %s", name, sorted(metrics))
    return metrics.get(name) if name else None


if __name__ == "__main__":
    main()
