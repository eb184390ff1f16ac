"""Every CIFAR-100 pair of paper Table 9 with every implemented method: ``experiment=<pair> distill=<method>``.

What a method needs on a pair (VID's stages, FitNet's hint layer, DKD's β, the logit-standardization settings,
``align`` for small students) comes from ``conf/pair_distill/<pair>/<method>.yaml``, merged by the defaults-list
interpolation of ``conf/train.yaml``. Each (pair, method) here composes, builds the module (dry run on a 32×32
batch, untrained teacher) and computes finite loss terms with gradients; VID on ResNet-32x4 → ShuffleNetV1, whose
stage maps differ in size (``align: head``), trains a few steps.
CRD gets a memory bank of 8 samples and the batch's sample indices.
"""

from __future__ import annotations

import functools
import itertools
import math

import pytest
import torch
from omegaconf import OmegaConf

from diffkd.paper_results import PAPER_RESULTS
from diffkd.train import build_module, train
from tests.conftest import CONF_DIR, compose_config

# every CIFAR model pair an experiment names (conf/pair/cifar_*.yaml): Table 9's six and WRN-40-2 → WRN-16-2
PAIRS = sorted(p.stem for p in (CONF_DIR / "pair").glob("cifar_*.yaml"))
METHODS = [
    "none",
    "kd",
    "dist",
    "dkd",
    "fitnet",
    "diffkd",
    "diffkd_dist",
    "vid",
    "pkt",
    "rkd",
    "kd_ls",
    "dkd_ls",
    "dist_ls",
    "reviewkd",
    "crd",
]
SMALL_STUDENTS = {"cifar_res50_mbv2", "cifar_res32x4_shuv1", "cifar_res32x4_shuv2"}  # MobileNetV2/ShuffleNet: lr 0.01
# building the whole matrix takes ~35 s on 2 CPU cores: the default suite builds a subset that has every pair, every
# method and each pair-specific mechanism (unequal VID stages and ResNet-50's fourth stage, FitNet's resized hint,
# DKD's β, the LS settings, DiffKD's align); the rest is marked slow. The settings test composes the whole matrix.
FAST = [
    ("cifar_wrn40_wrn16", "vid"),
    ("cifar_wrn40_wrn40_1", "dkd"),
    ("cifar_res56_res20", "dkd_ls"),
    ("cifar_res32x4_res8x4", "kd_ls"),
    ("cifar_res50_mbv2", "vid"),
    ("cifar_res50_mbv2", "fitnet"),
    ("cifar_res32x4_shuv1", "kd"),
    ("cifar_res32x4_shuv1", "diffkd"),
    ("cifar_res32x4_shuv2", "vid"),
    ("cifar_res32x4_shuv2", "pkt"),
    ("cifar_res56_res20", "rkd"),
    ("cifar_wrn40_wrn40_1", "dist"),
    ("cifar_res32x4_res8x4", "diffkd_dist"),
    ("cifar_wrn40_wrn16", "dist_ls"),
    ("cifar_res56_res20", "none"),
    ("cifar_res50_mbv2", "reviewkd"),
    ("cifar_res32x4_shuv2", "crd"),
]
MATRIX = list(itertools.product(PAIRS, METHODS))
SLOW = [p for p in MATRIX if p not in FAST]

# (pair, method) → {dotted key under distill: value} the pair's file must set (sources in conf/pair_distill/)
EXPECTED = {
    ("cifar_wrn40_wrn16", "vid"): {"points.stage1.student": "block1", "points.stage3.teacher": "block3"},
    ("cifar_wrn40_wrn40_1", "fitnet"): {"points.feature.student": "block2", "points.feature.teacher": "block2"},
    ("cifar_res56_res20", "fitnet"): {"points.feature.student": "layer2", "points.feature.align": None},
    ("cifar_res50_mbv2", "vid"): {
        "points.stage1.student": "blocks.1",
        "points.stage4.student": "blocks.6",
        "points.stage4.teacher": "layer4",
        "points.stage4.align": "head",
    },
    ("cifar_res50_mbv2", "fitnet"): {"points.feature.student": "blocks.2", "points.feature.align": "interpolate"},
    ("cifar_res32x4_shuv1", "vid"): {"points.stage2.student": "layer2", "points.stage2.align": "head"},
    ("cifar_res32x4_shuv2", "diffkd"): {"points.feature.align": "interpolate"},
    ("cifar_res32x4_shuv1", "diffkd_dist"): {"points.feature.align": "interpolate"},
    ("cifar_wrn40_wrn16", "dkd"): {"points.logits.distance.beta": 6.0},
    ("cifar_res32x4_shuv2", "dist"): {"points.logits.distance.tau": 4.0, "points.logits.weight": 2.0},
    ("cifar_wrn40_wrn40_1", "dkd"): {"points.logits.distance.beta": 6.0},
    ("cifar_res56_res20", "dkd"): {"points.logits.distance.beta": 2.0},
    ("cifar_res32x4_shuv1", "dkd"): {"points.logits.distance.beta": 8.0},
    ("cifar_res50_mbv2", "kd_ls"): {"points.logits.distance.tau": 3.0, "points.logits.weight": 1.0},
    ("cifar_res56_res20", "dkd_ls"): {
        "points.logits.distance.alpha": 18.0,
        "points.logits.distance.beta": 36.0,
        "points.logits.distance.temperature": 3.0,
    },
    ("cifar_res32x4_res8x4", "dkd_ls"): {"points.logits.distance.alpha": 9.0, "points.logits.distance.beta": 72.0},
}


def _compose(pair: str, method: str, *extra: str):
    return compose_config([f"experiment={pair}", f"distill={method}", "model.teacher.weights=null", *extra])


def _build_and_step(
    pair: str, method: str, shape: tuple[int, ...] = (4, 3, 32, 32), classes: int = 100, extra: tuple[str, ...] = ()
) -> dict:
    torch.manual_seed(0)
    cfg = _compose(pair, method, *extra)
    module = build_module(cfg, classes)
    x, y = torch.randn(*shape), torch.randint(0, classes, (shape[0],))
    module.build(x)
    module.train()
    s_out, s_feats = module.student_taps.collect(module.student(x))
    terms = {}
    if module.distiller.needs_teacher:
        t_feats = module.teacher_features(x)
        inputs = {"labels": y}
        if module.distiller.points_needing("sample_index"):  # CRD: the memory bank of a training set of 8
            module.distiller.bind_data({"num_train_samples": 8, "train_labels": torch.arange(8) % 4})
            inputs["sample_index"] = torch.arange(4)
        terms, _ = module.distiller(s_feats, t_feats, inputs, epoch=1)
    loss = torch.nn.functional.cross_entropy(s_out, y) + sum(terms.values())
    assert math.isfinite(loss.item()), (pair, method, {k: v.item() for k, v in terms.items()})
    loss.backward()
    return module.distiller.describe()


@pytest.mark.parametrize(("pair", "method"), FAST)
def test_pair_method_builds_and_steps(pair, method):
    _build_and_step(pair, method)


@pytest.mark.slow
@pytest.mark.parametrize(("pair", "method"), SLOW)
def test_pair_method_builds_and_steps_all(pair, method):
    _build_and_step(pair, method)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_on_the_demo_pair(method):
    """The embedded demo's pair (Fashion-MNIST, demo_cnn_teacher → demo_cnn_student) runs every method: the README's
    table of all methods comes from ``python -m diffkd.train demo.methods=[...]`` (conf/pair_distill/demo/)."""
    # the demo sets its models per run (demo.teacher, demo.student), as here
    models = ("model.student.name=demo_cnn_student", "model.teacher.name=demo_cnn_teacher")
    _build_and_step("demo", method, shape=(4, 1, 28, 28), classes=10, extra=models)


def test_demo_pair_settings():
    """The demo pair's files: the warm-ups scaled to its 3 epochs, CRD's CPU concession, VID/ReviewKD's stages."""
    assert _compose("demo", "dkd").distill.points.logits.warmup_epochs == 1
    assert _compose("demo", "reviewkd").distill.points.review.warmup_epochs == 1
    assert _compose("demo", "crd").distill.points.embedding.distance.num_negatives == 1024
    assert _compose("demo", "vid").distill.points.stage3.student == "features.conv4"


@functools.cache
def _own_points(method: str) -> frozenset[str]:
    """The method's points on the demo experiment (no pair file)."""
    return frozenset(compose_config([f"distill={method}"]).distill.points)


@pytest.mark.parametrize(("pair", "method"), MATRIX)
def test_pair_settings_and_no_stray_points(pair, method):
    cfg = _compose(pair, method)
    own = set(_own_points(method))
    extra = {"stage4"} if (pair, method) == ("cifar_res50_mbv2", "vid") else set()
    assert set(cfg.distill.points) == own | extra  # a pair adds no point to a method that does not have it
    for key, value in EXPECTED.get((pair, method), {}).items():
        assert OmegaConf.select(cfg.distill, key) == value, key
    assert cfg.optim.optimizer.lr == (0.01 if pair in SMALL_STUDENTS else 0.05)  # mdistiller's lr per student


def test_command_line_still_overrides_pair_settings():
    cfg = _compose("cifar_res32x4_shuv1", "vid", "distill.points.stage1.align=null")
    assert cfg.distill.points.stage1.align is None


def test_vid_trains_on_unequal_stage_sizes(cifar_cfg):
    """ResNet-32x4 → ShuffleNetV1: every student stage is half its teacher stage's size; the VID head pools."""
    metrics, _ = train(cifar_cfg("cifar_res32x4_shuv1", "distill=vid", "trainer.limit_train_batches=3"))
    assert math.isfinite(metrics["train/loss"])
    for i in (1, 2, 3):
        assert math.isfinite(metrics[f"train/loss/stage{i}/kd"])


def test_align_head_is_needed_for_unequal_maps_and_checked():
    """``align: head`` lets maps of unequal size reach a head that aligns them itself; without it the build
    refuses (naming both fixes), and an unknown ``align`` is an error."""
    x = torch.randn(2, 3, 32, 32)
    module = build_module(_compose("cifar_res32x4_shuv1", "vid", "distill.points.stage1.align=null"), 100)
    with pytest.raises(ValueError, match=r"stage1.*align=interpolate \(or align=head"):
        module.build(x)
    module = build_module(_compose("cifar_res32x4_shuv1", "vid", "distill.points.stage1.align=pool"), 100)
    with pytest.raises(ValueError, match="align must be null, 'interpolate' or 'head'"):
        module.build(x)
    module = build_module(_compose("cifar_res32x4_shuv1", "vid"), 100)
    module.build(x)
    info = module.distiller.describe()["stage1"]
    assert info["student_shape"] == [240, 16, 16] and info["teacher_shape"] == [64, 32, 32]


def test_every_paper_cifar_pair_is_in_the_matrix():
    assert {e for e in PAPER_RESULTS if e.startswith("cifar_")} | {"cifar_wrn40_wrn16"} <= set(PAIRS)
    assert len(PAIRS) == 7
