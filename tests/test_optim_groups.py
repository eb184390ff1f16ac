"""MMDetection's optimiser settings: biases outside normalisation layers at their own lr/decay multipliers, and the
constant warm-up of its FCOS configs."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from diffkd.distill import Distiller
from diffkd.optim import WarmupMultiStepLR
from diffkd.tasks import ClassificationModule
from tests.conftest import compose_config


def test_fcos_optim_config_composes_the_mmdetection_recipe():
    cfg = compose_config(["experiment=coco_fcos_r101_r50", "optim=sgd_det_2x_fcos"]).optim
    assert cfg.optimizer.lr == 0.01 and cfg.optimizer.weight_decay == 1e-4 and cfg.optimizer.momentum == 0.9
    assert cfg.scheduler.warmup == "constant" and cfg.scheduler.warmup_ratio == pytest.approx(1 / 3)
    assert cfg.scheduler.milestones == [16, 22] and cfg.scheduler.warmup_steps == 500
    assert cfg.bias_lr_mult == 2.0 and cfg.bias_decay_mult == 0.0


def test_constant_warmup_holds_the_ratio_then_the_milestones_decay():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.03)
    sched = WarmupMultiStepLR(opt, [2], warmup_steps=3, warmup_ratio=1 / 3, steps_per_epoch=4, warmup="constant")
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.01, 0.01, 0.01, 0.03, 0.03, 0.03, 0.03, 0.03, 0.003, 0.003])
    with pytest.raises(ValueError, match="warmup='cosine'; choose linear or constant"):
        WarmupMultiStepLR(opt, [2], steps_per_epoch=4, warmup="cosine")


def test_bias_multipliers_apply_to_plain_biases_not_to_norm_layers():
    student = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    student(torch.zeros(1, 3, 5, 5))
    module = ClassificationModule(
        student, Distiller(), optimizer=functools.partial(torch.optim.SGD, lr=0.01, weight_decay=1e-4),
        bias_lr_mult=2.0, bias_decay_mult=0.0,
    )  # fmt: skip
    opt = module._build_optimizer()
    plain, biased = opt.param_groups
    assert {id(p) for p in biased["params"]} == {id(student[0].bias), id(student[4].bias)}
    assert biased["lr"] == pytest.approx(0.02) and biased["weight_decay"] == 0.0
    assert plain["lr"] == 0.01 and plain["weight_decay"] == 1e-4
    assert any(p is student[1].bias for p in plain["params"]) and any(p is student[2].bias for p in plain["params"])
