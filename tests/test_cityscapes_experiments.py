"""Cityscapes experiments (DiffKD for DeepLabV3 / PSPNet students, Table 6): configs compose with the recipe,
instantiate, and train two steps + validate on a tiny fake Cityscapes; the segmentation baselines (pixel KD, CWD)
run through the same framework.

Training runs use the fake Cityscapes of ``tests/helpers/fake_cityscapes.py`` (64×128 images, 4 train and 3 val),
32×64 crops, batch 2, an untrained CIRKD DeepLabV3-R18 as the teacher (the R101 teacher: marked slow), two steps
and one validation batch.
"""

from __future__ import annotations

import math
from pathlib import Path

import hydra
import pytest
import torch

from diffkd.optim import PolyLR
from diffkd.tasks import SegmentationModule
from diffkd.train import build_module, train
from tests.conftest import compose_config, tiny_overrides
from tests.helpers.fake_cityscapes import write_fake_cityscapes

# experiment → (student, backbone file, distillation points, weight decay)
RECIPES = {
    "cityscapes_dlv3r101_dlv3r18": ("cirkd_deeplabv3_resnet18", "resnet18-imagenet.pth", ["out", "aux"], 5e-4),
    "cityscapes_dlv3r101_pspr18": ("cirkd_psp_resnet18", "resnet18-imagenet.pth", ["out", "aux"], 5e-4),
    "cityscapes_dlv3r101_dlv3mbv2": ("cirkd_deeplabv3_mobilenetv2", "mobilenetv2-imagenet.pth", ["out"], 2e-4),
}
EXPERIMENTS = list(RECIPES)


@pytest.fixture(scope="module")
def cityscapes_data(tmp_path_factory) -> Path:
    """A data dir holding ``cityscapes/`` (the fake one: 64×128, 4 train and 3 val images)."""
    root = tmp_path_factory.mktemp("cityscapes_data")
    write_fake_cityscapes(root / "cityscapes")
    return root


def _overrides(tmp_path: Path, data: Path, experiment: str, *extra: str) -> list[str]:
    return [
        f"experiment={experiment}",
        *tiny_overrides(tmp_path, data),
        "model.student.backbone_weights=null",
        "model.teacher.weights=null",
        "model.teacher.name=cirkd_deeplabv3_resnet18",  # untrained and small; the R101 run is marked slow
        "data.batch_size=2",
        "data.crop_size=[32,64]",
        "data.pin_memory=false",
        "++distill.diffkd.inference_steps=2",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "test=false",
        "~callbacks.model_checkpoint",
        "trainer.enable_checkpointing=false",
        "++trainer.enable_model_summary=false",
        *extra,
    ]


# ------------------------------------------------------------------------------------------------ configs


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_with_its_recipe(experiment, tmp_path):
    cfg = compose_config([f"experiment={experiment}", f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}"])
    student, backbone, points, wd = RECIPES[experiment]
    assert cfg.model._target_ == "diffkd.tasks.SegmentationModule" and cfg.model.num_classes == 19
    assert cfg.model.student.name == student and cfg.model.teacher.name == "cirkd_deeplabv3_resnet101"
    assert cfg.model.teacher.weights == f"{tmp_path}/teachers/cirkd/deeplabv3_resnet101_citys_best_model.pth"
    assert cfg.model.student.backbone_weights == f"{tmp_path}/pretrained/cirkd/{backbone}"
    assert (cfg.model.ignore_index, cfg.model.aux_weight, cfg.model.flip_eval) == (255, 0.4, False)
    assert cfg.data._target_ == "diffkd.data.cityscapes.CityscapesDataModule"
    assert list(cfg.data.crop_size) == [512, 1024] and cfg.data.normalization == "cirkd"
    # global batch 16 = 2 per GPU × 8, lr 0.02 scaled from it; 40k iterations, poly 0.9 per step
    assert cfg.data.batch_size * 8 == cfg.optim.lr_base_batch_size == 16
    o, s = cfg.optim.optimizer, cfg.optim.scheduler
    assert (o._target_, o.lr, o.momentum, o.weight_decay) == ("torch.optim.SGD", 0.02, 0.9, wd)
    assert (s._target_, s.total_steps, s.power, s.min_lr) == ("diffkd.optim.PolyLR", 40000, 0.9, 1e-4)
    assert cfg.optim.scheduler_interval == "step" and cfg.optim.no_decay_bias_norm is False
    assert (cfg.trainer.max_steps, cfg.trainer.max_epochs, cfg.trainer.val_check_interval) == (40000, -1, 400)
    assert cfg.trainer.check_val_every_n_epoch is None
    assert cfg.callbacks.model_checkpoint.monitor == "val/miou" and cfg.callbacks.model_checkpoint.mode == "max"
    assert cfg.optimized_metric == "val/miou_best"
    assert list(cfg.distill.points) == points
    for name in points:
        p = cfg.distill.points[name]
        assert (p.student, p.teacher, p.head) == (f":{name}", f":{name}", "diffkd")
        assert p.head_kwargs.use_ae is False and p.head_kwargs.kernel_size == 3
        assert dict(p.distance) == {"name": "dist", "beta": 1.0, "gamma": 1.0, "tau": 1.0}
        scale = 1.0 if name == "out" else 0.4  # λ1 = λ3 = 1; the aux logits × 0.4 (DIST_KD / MasKD)
        assert (p.weight, p.diff_weight) == (scale, scale)


def test_ddp_trainer_turns_on_sync_batchnorm(tmp_path):
    cfg = compose_config(["experiment=cityscapes_dlv3r101_dlv3r18", "trainer=ddp", "trainer.devices=8",
                          f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}"])  # fmt: skip
    assert cfg.trainer.sync_batchnorm is True and cfg.trainer.devices * cfg.data.batch_size == 16
    assert cfg.trainer.max_steps == 40000  # the experiment's trainer keys survive the trainer group


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_instantiates(experiment, tmp_path, cityscapes_data):
    """The module of the real recipe (R101 teacher) on the meta device: no memory, no init cost."""
    cfg = compose_config(
        _overrides(tmp_path, cityscapes_data, experiment, "model.teacher.name=cirkd_deeplabv3_resnet101")
    )
    dm = hydra.utils.instantiate(cfg.data)
    assert dm.num_classes == 19 and len(dm.class_names) == 19
    with torch.device("meta"):
        module = build_module(cfg, dm.num_classes)
    assert isinstance(module, SegmentationModule)
    assert sum(p.numel() for p in module.teacher.parameters()) == 61_118_950  # 61.12M (Table 6)
    assert not any(p.requires_grad for p in module.teacher.parameters())
    assert module.aux_weight == 0.4 and module.align_corners is True
    assert list(module.distiller.specs) == RECIPES[experiment][2]


# ------------------------------------------------------------------------------------------------ training


def _check_run(metrics: dict, objs: dict, points: list[str], aux: bool) -> None:
    module, trainer = objs["module"], objs["trainer"]
    assert trainer.global_step == 2
    assert 0.0 <= metrics["val/miou"] <= 1.0 and metrics["val/miou_best"] == metrics["val/miou"]
    assert math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["val/loss"])
    expected = {"train/loss/ce"} | {f"train/loss/{p}/{t}" for p in points for t in ("kd", "diff")}
    if aux:
        expected.add("train/loss/aux_ce")
    assert expected <= set(metrics), sorted(metrics)
    assert all(math.isfinite(metrics[k]) for k in expected)
    assert ("train/loss/aux_ce" in metrics) == aux
    # poly over trainer.max_steps = 2 from lr 0.02 × 2 / 16 with the 1e-4 floor: after the 2 steps, the floor
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert isinstance(scheduler, PolyLR) and scheduler.total_steps == 2
    assert scheduler.base_lrs[0] == pytest.approx(0.02 * 2 / 16)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-4)
    assert module.distiller.teacher_paths == {p: f":{p}" for p in points}
    for info in module.distiller.points.values():  # 19-channel logits at 1/8 of the 32×64 crops
        assert info.student_shape == info.teacher_shape == (19, 4, 8)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_trains_two_steps_and_validates(experiment, tmp_path, cityscapes_data, capsys):
    cfg = compose_config(_overrides(tmp_path, cityscapes_data, experiment))
    metrics, objs = train(cfg)
    points = RECIPES[experiment][2]
    _check_run(metrics, objs, points, aux="aux" in points)
    out = capsys.readouterr().out
    assert "traffic light" in out and "mIoU" in out  # the per-class table, with Cityscapes' names


def test_one_image_per_device_is_refused_with_the_fix(tmp_path, cityscapes_data):
    experiment = EXPERIMENTS[0]
    cfg = compose_config(_overrides(tmp_path, cityscapes_data, experiment, "data.batch_size=1"))
    with pytest.raises(ValueError, match=r"one value per channel.*data\.batch_size is per device"):
        train(cfg)


@pytest.mark.parametrize(
    ("distill", "distance"),
    [("kd_seg", "pixel_kd"), ("cwd", "cwd"), ("diffkd_seg", "dist")],
)
def test_segmentation_baselines_train(distill, distance, tmp_path, cityscapes_data):
    cfg = compose_config(
        _overrides(
            tmp_path, cityscapes_data, "cityscapes_dlv3r101_dlv3r18", f"distill={distill}", "model.iou_table=false"
        )
    )
    metrics, objs = train(cfg)
    distiller = objs["module"].distiller
    assert list(distiller.points) == ["out"] and distiller.specs["out"].distance["name"] == distance
    assert math.isfinite(metrics["train/loss/out/kd"]) and metrics["train/loss/out/kd"] > 0
    assert ("train/loss/out/diff" in metrics) == (distill == "diffkd_seg")
    assert {"train/loss/ce", "train/loss/aux_ce", "val/miou"} <= set(metrics)


def test_best_checkpoint_follows_val_miou(tmp_path, cityscapes_data):
    """With the experiment's checkpoint callback: monitored on val/miou, step-named files, the test split run."""
    dropped = ("~callbacks.model_checkpoint", "trainer.enable_checkpointing=false", "test=false")
    overrides = [o for o in _overrides(tmp_path, cityscapes_data, "cityscapes_dlv3r101_dlv3mbv2") if o not in dropped]
    cfg = compose_config([*overrides, "model.iou_table=false", "trainer.val_check_interval=1"])
    metrics, objs = train(cfg)
    callback = objs["trainer"].checkpoint_callback
    assert callback.monitor == "val/miou" and Path(objs["best_ckpt"]).name in ("step_000001.ckpt", "step_000002.ckpt")
    assert callback.best_model_score == pytest.approx(metrics["val/miou_best"])
    assert 0.0 <= metrics["test/miou"] <= 1.0


@pytest.mark.slow
def test_r101_teacher_trains_two_steps(tmp_path, cityscapes_data):
    cfg = compose_config(
        _overrides(
            tmp_path, cityscapes_data, "cityscapes_dlv3r101_dlv3r18", "model.teacher.name=cirkd_deeplabv3_resnet101"
        )
    )
    metrics, objs = train(cfg)
    _check_run(metrics, objs, ["out", "aux"], aux=True)
