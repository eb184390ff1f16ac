"""COCO experiments on MMDetection's own models (paper Tables 4/5 as the paper ran them): each composes with its
recipe and zoo teacher file, builds, and trains a few steps with DiffKD on a COCO folder in the real format."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from diffkd.train import train
from tests.conftest import compose_config, tiny_overrides
from tests.helpers.fake_coco import write_fake_coco

# experiment → (student, teacher, zoo file of the teacher, optim config, lr, gradient clip, regression KD weight)
EXPERIMENTS = {
    "coco_mmdet_frcnn_r101_r50": ("mmdet_faster_rcnn_r50_fpn", "mmdet_faster_rcnn_r101_fpn",
                                  "faster_rcnn_r101_fpn_2x_coco_bbox_mAP-0.398_20200504_210455-1d2dac9c.pth",
                                  0.02, None, 1.0),
    "coco_mmdet_retina_r101_r50": ("mmdet_retinanet_r50_fpn", "mmdet_retinanet_r101_fpn",
                                   "retinanet_r101_fpn_2x_coco_20200131-5560aee8.pth", 0.01, 35.0, 0.0),
    "coco_mmdet_fcos_r101_r50": ("mmdet_fcos_r50_caffe_fpn_gn", "mmdet_fcos_r101_caffe_fpn_gn",
                                 "fcos_r101_caffe_fpn_gn-head_mstrain_640-800_2x_coco-511424d6.pth", 0.01, 35.0, 0.0),
    "coco_mmdet_retina_x101_r50": ("mmdet_retinanet_r50_fpn", "mmdet_retinanet_x101_64x4d_fpn",
                                   "retinanet_x101_64x4d_fpn_1x_coco_20200130-366f5af1.pth", 0.01, 35.0, 0.0),
    "coco_mmdet_frcnn_cascade_x101_r50": ("mmdet_faster_rcnn_r50_fpn", "mmdet_fpn_teacher_x101_64x4d",
                                          "cascade_mask_rcnn_x101_64x4d_fpn_20e_coco_20200512_161033-bdb5126a.pth",
                                          0.02, None, 0.0),
}  # fmt: skip


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_with_the_zoo_teacher_and_the_mmdetection_recipe(experiment, tmp_path):
    student, teacher, zoo_file, lr, clip, reg = EXPERIMENTS[experiment]
    cfg = compose_config([f"experiment={experiment}", f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}"])
    assert cfg.model.student.name == student and cfg.model.teacher.name == teacher
    assert cfg.model.teacher.weights == f"{tmp_path}/teachers/mmdet/{zoo_file}"
    assert cfg.data.contiguous_labels is True and cfg.model.student.num_classes is None
    assert cfg.optim.optimizer.lr == lr and cfg.trainer.gradient_clip_val == clip
    assert cfg.model.regression_kd_weight == reg and cfg.trainer.max_epochs == 24
    assert cfg.optim.scheduler.milestones == [16, 22] and cfg.optim.lr_base_batch_size == 16
    header = (Path(__file__).parents[1] / "conf" / "experiment" / f"{experiment}.yaml").read_text()
    assert zoo_file in header and "https://download.openmmlab.com/mmdetection/v2.0/" in header
    assert "Paper Table" in header and "MMDetection zoo:" in header
    if "fcos" in experiment:  # MMDetection's FCOS recipe: ms 640/800, biases ×2 lr without decay, lr/3 warm-up
        assert list(cfg.model.student.min_size) == [640, 800] and cfg.optim.bias_lr_mult == 2.0
        assert cfg.optim.bias_decay_mult == 0.0 and cfg.optim.scheduler.warmup == "constant"
        assert cfg.model.student.weights_backbone.endswith("pretrained/mmdet/resnet50_caffe-788b5fa3.pth")
    else:
        assert cfg.model.student.weights_backbone == "IMAGENET1K_V1"


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory) -> Path:
    return write_fake_coco(tmp_path_factory.mktemp("coco") / "coco").root


def _tiny(tmp_path: Path, coco_root: Path, experiment: str, *extra: str):
    sizes = [f"model.{s}.{k}={v}" for s in ("student", "teacher") for k, v in (("min_size", 64), ("max_size", 96))]
    return compose_config([
        f"experiment={experiment}", *tiny_overrides(tmp_path, tmp_path), f"data.root={coco_root}",
        "data.batch_size=2", "data.val_batch_size=2", "model.student.weights_backbone=null",
        "model.teacher.weights=null", *sizes, "test=false", *extra,
    ])  # fmt: skip


@pytest.mark.parametrize(
    "experiment",
    [
        "coco_mmdet_fcos_r101_r50",
        "coco_mmdet_frcnn_cascade_x101_r50",
        pytest.param("coco_mmdet_frcnn_r101_r50", marks=pytest.mark.slow),
        pytest.param("coco_mmdet_retina_r101_r50", marks=pytest.mark.slow),
        pytest.param("coco_mmdet_retina_x101_r50", marks=pytest.mark.slow),
    ],
)
def test_experiment_trains_and_validates_with_diffkd(experiment, tmp_path, coco_root):
    metrics, objs = train(_tiny(tmp_path, coco_root, experiment))
    assert math.isfinite(metrics["train/loss"]) and 0.0 <= metrics["val/map"] <= 1.0
    assert any(k.startswith("train/loss/fpn_") for k in metrics)  # DiffKD on the FPN levels
    module = objs["module"]
    assert type(module.student).__module__.startswith("diffkd.models.mmdet")
    assert objs["datamodule"].num_classes == 6  # 5 categories of the fake COCO, contiguous, + background: the models'


def test_the_fpn_only_teacher_refuses_the_regression_kd(tmp_path, coco_root):
    cfg = _tiny(tmp_path, coco_root, "coco_mmdet_frcnn_cascade_x101_r50", "model.regression_kd_weight=1.0")
    with pytest.raises(ValueError, match=r"provides FPN features only .*regression_kd_weight=1\.0"):
        train(cfg)


STUDENTS = ["mmdet_faster_rcnn_r50_fpn", "mmdet_retinanet_r50_fpn", "mmdet_fcos_r50_caffe_fpn_gn"]
LARGER = ["mmdet_faster_rcnn_r101_fpn", "mmdet_faster_rcnn_x101_64x4d_fpn", "mmdet_retinanet_r101_fpn",
          "mmdet_retinanet_x101_64x4d_fpn", "mmdet_fcos_r101_caffe_fpn_gn"]  # fmt: skip


def test_every_mmdet_detector_is_listed_here():
    from diffkd.models import list_models

    detectors = {n for n in list_models(tag="mmdet") if not n.startswith("mmdet_fpn_teacher_")}
    assert detectors == set(STUDENTS) | set(LARGER)


@pytest.mark.parametrize("name", [*STUDENTS, *(pytest.param(n, marks=pytest.mark.slow) for n in LARGER)])
def test_each_detector_trains_and_validates_as_the_student_with_diffkd(name, tmp_path, coco_root):
    # the R50 → R50 pair of its family (a teacher of the same model), DiffKD on every FPN level
    cfg = _tiny(tmp_path, coco_root, "coco_mmdet_retina_r101_r50", f"model.student.name={name}",
                f"model.teacher.name={name}", "model.student.weights_backbone=null")  # fmt: skip
    metrics, objs = train(cfg)
    assert math.isfinite(metrics["train/loss"]) and 0.0 <= metrics["val/map"] <= 1.0
    assert sum(k.startswith("train/loss/fpn_") and k.endswith("/diff") for k in metrics) == 5  # five FPN levels
    assert type(objs["module"].student).__module__.startswith("diffkd.models.mmdet")
