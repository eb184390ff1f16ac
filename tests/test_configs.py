"""Every experiment composes, and its data module, LightningModule and trainer instantiate."""

from __future__ import annotations

from pathlib import Path

import hydra
import pytest

from diffkd.train import build_module
from tests.conftest import CONF_DIR, compose_config, tiny_overrides

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
# the ImageNet, Cityscapes and COCO experiments compose, instantiate and run 2 steps each in their own test files
# (tests/test_{imagenet,cityscapes,coco}_experiments.py), on data written in their formats; the structured demos
# build their data sets first (tests/test_demo_{detection,segmentation}.py)
FAST_EXPERIMENTS = [
    e for e in EXPERIMENTS if not e.startswith(("imagenet_", "cityscapes_", "coco_", "demo_detection", "demo_segm"))
]


def test_experiments_exist():
    assert {"demo", "cifar_wrn40_wrn16", "cifar_res32x4_shuv1", "teacher_cifar_wrn_40_2"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", FAST_EXPERIMENTS)
def test_experiment_composes_and_instantiates(experiment, tmp_path, cifar_root):
    overrides = [f"experiment={experiment}", *tiny_overrides(tmp_path, cifar_root)]
    cfg = compose_config(overrides)
    if cfg.model.get("teacher") is not None:
        cfg.model.teacher.weights = None  # the real teacher files are not on CI machines
        cfg.model.teacher.pretrained = False  # nor can they download weights
    assert cfg.trainer.max_epochs == 1
    datamodule = hydra.utils.instantiate(cfg.data)
    module = build_module(cfg, getattr(datamodule, "num_classes", None))
    assert module.student is not None
    assert (module.teacher is not None) == module.distiller.needs_teacher
    hydra.utils.instantiate(cfg.optim.optimizer)(list(module.student.parameters()))
    hydra.utils.instantiate(cfg.trainer, logger=False, enable_progress_bar=False)


@pytest.mark.parametrize("experiment", [e for e in EXPERIMENTS if e.startswith("cifar_")])
def test_cifar_experiments_follow_recipe_a1(experiment, tmp_path):
    cfg = compose_config([f"experiment={experiment}", f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}"])
    assert cfg.trainer.max_epochs == 240 and cfg.data.batch_size == 64
    assert cfg.optim.optimizer.momentum == 0.9 and cfg.optim.optimizer.weight_decay == 5e-4
    assert list(cfg.optim.scheduler.milestones) == [150, 180, 210] and cfg.optim.scheduler.gamma == 0.1
    small_lr = cfg.model.student.name in ("MobileNetV2", "ShuffleV1", "ShuffleV2")
    assert cfg.optim.optimizer.lr == (0.01 if small_lr else 0.05)
    assert cfg.distill.points.feature.head_kwargs.use_ae is False  # no AE on CIFAR (paper App. B.2)
    assert Path(cfg.model.teacher.weights).name == "ckpt_epoch_240.pth"


def test_config_dir_is_packaged_with_the_module():
    import diffkd

    packaged = Path(diffkd.__file__).parent / "conf" / "train.yaml"
    assert packaged.is_file()
