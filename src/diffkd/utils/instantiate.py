"""Public instantiation helpers shared by the entry points (``train``, ``evaluate``, the demo).

Hydra composes ``conf/`` into a config (:mod:`diffkd.config`, whose ``compose_packaged``, ``data_config_name`` and
``CONFIG_DIR`` stay importable from here); these turn its groups into objects: the datamodule, the task
LightningModule (student, teacher, distiller, optimizer), callbacks and loggers.
"""

from __future__ import annotations

import logging
from typing import Any

import hydra
import lightning as L
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from diffkd.config import CONFIG_DIR, compose_packaged, data_config_name

__all__ = ["CONFIG_DIR", "build_module", "compose_packaged", "data_config_name", "instantiate", "instantiate_list"]

log = logging.getLogger("diffkd")


def instantiate(cfg: DictConfig, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that raises the target's own error (e.g. a checkpoint mismatch) rather than
    Hydra's wrapper, so messages and exception types reach the user unchanged."""
    try:
        return hydra.utils.instantiate(cfg, **kwargs)
    except InstantiationException as err:
        if err.__cause__ is not None:
            raise err.__cause__ from None
        raise


def instantiate_list(cfg: DictConfig | None) -> list[Any]:
    """The objects of a config group holding several ``_target_`` entries (callbacks, loggers); ``null`` entries
    are skipped."""
    if not cfg:
        return []
    return [instantiate(c) for c in cfg.values() if c is not None and "_target_" in c]


def build_module(cfg: DictConfig, num_classes: int | None = None, teacher: bool = True) -> L.LightningModule:
    """The task LightningModule from ``cfg.model``, ``cfg.distill`` and ``cfg.optim``.

    Args:
        cfg: the composed config.
        num_classes: the data's number of classes, used where ``model.student/teacher.num_classes`` is null.
        teacher: build the teacher when the distiller needs one (``False``: evaluation of the student alone).
    """
    distiller = instantiate(cfg.distill, _convert_="all")
    student_cfg = cfg.model.student
    nc = {"num_classes": num_classes} if student_cfg.get("num_classes") is None and num_classes else {}
    student = instantiate(student_cfg, **nc)
    teacher_net = None
    if distiller.needs_teacher and teacher:  # plain training builds no teacher at all: no wasted teacher work
        if cfg.model.get("teacher") is None:
            raise ValueError(f"distill={cfg.distill.get('_target_')} needs a teacher: set model.teacher")
        t_cfg = cfg.model.teacher
        nc_t = {"num_classes": num_classes} if t_cfg.get("num_classes") is None and num_classes else {}
        teacher_net = instantiate(t_cfg, **nc_t)
        if t_cfg.get("weights") is None and not t_cfg.get("pretrained"):
            log.warning("the teacher %s has no weights (model.teacher.weights is null): it is untrained", t_cfg.name)
    elif distiller.needs_teacher:  # the student alone (evaluation): no points, no heads, no teacher
        from diffkd.distill import Distiller

        distiller = Distiller(task_weight=distiller.task_weight)
    module_cls = hydra.utils.get_class(cfg.model._target_)
    options = {k: v for k, v in cfg.model.items() if k not in ("_target_", "student", "teacher")}
    options = OmegaConf.to_container(OmegaConf.create(options), resolve=True)
    optim = cfg.optim
    return module_cls(
        student=student,
        teacher=teacher_net,
        distiller=distiller,
        optimizer=hydra.utils.instantiate(optim.optimizer),
        scheduler=hydra.utils.instantiate(optim.scheduler) if optim.get("scheduler") else None,
        scheduler_interval=optim.get("scheduler_interval", "epoch"),
        no_decay_bias_norm=optim.get("no_decay_bias_norm", False),
        bias_lr_mult=optim.get("bias_lr_mult", 1.0),
        bias_decay_mult=optim.get("bias_decay_mult", 1.0),
        lr_base_batch_size=optim.get("lr_base_batch_size"),
        **options,
    )
