"""VID, PKT and RKD: agreement with mdistiller's loss code on stored figures, its hyper-parameters and parameter
counts, and a few training steps each through ``diffkd.train``.

The figures in ``tests/fixtures/mdistiller_{vid,pkt,rkd}.json`` were computed by running mdistiller's own loss
functions (commit and method recorded in each file's ``provenance``) in float64; mdistiller is not needed here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from diffkd.distill import Distiller
from diffkd.distill.registry import build_distance, get_head
from diffkd.models import create_model
from diffkd.train import train
from tests.helpers.parity import as_float64 as _t
from tests.helpers.parity import max_rel

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
CONF = Path(__file__).resolve().parents[2] / "conf" / "distill"
RTOL = 1e-5


def _fixture(method: str) -> dict:
    return json.loads((FIXTURES / f"mdistiller_{method}.json").read_text())


def _conf(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml"))


# ------------------------------------------------------------------ parity: PKT, RKD
@pytest.mark.parametrize("method", ["pkt", "rkd"])
def test_relational_losses_match_mdistiller(method):
    fixture = _fixture(method)
    point = _conf(method)["points"]["embedding"]
    distance = build_distance(**point["distance"])
    for case in fixture["cases"]:
        student = _t(case["student"]).requires_grad_(True)
        teacher = _t(case["teacher"])
        # as the distiller hands pooled taps: (B, C, 1, 1)
        loss = distance(student[:, :, None, None], teacher[:, :, None, None])
        loss.backward()
        assert max_rel(loss, _t(case["loss"])) < RTOL
        assert max_rel(student.grad, _t(case["grad_student"])) < RTOL


def test_pkt_rkd_configs_carry_mdistillers_weights():
    pkt, rkd = _fixture("pkt")["cfg"], _fixture("rkd")["cfg"]
    conf = _conf("pkt")
    assert conf["task_weight"] == pkt["LOSS"]["CE_WEIGHT"] == 1.0
    assert conf["points"]["embedding"]["weight"] == pkt["LOSS"]["FEAT_WEIGHT"] == 30000.0
    conf = _conf("rkd")
    assert conf["task_weight"] == rkd["LOSS"]["CE_WEIGHT"]
    assert conf["points"]["embedding"]["weight"] == rkd["LOSS"]["FEAT_WEIGHT"]
    d = conf["points"]["embedding"]["distance"]
    assert (d["distance_weight"], d["angle_weight"]) == (rkd["DISTANCE_WEIGHT"], rkd["ANGLE_WEIGHT"])
    assert (d["squared"], d["eps"]) == (rkd["PDIST"]["SQUARED"], rkd["PDIST"]["EPSILON"])
    # the defaults of the classes are mdistiller's too
    default = build_distance("rkd")
    assert (default.distance_weight, default.angle_weight, default.squared, default.eps) == (25.0, 50.0, False, 1e-12)
    assert build_distance("pkt").eps == 1e-7


def test_relational_losses_reject_maps_and_take_unequal_widths():
    with pytest.raises(ValueError, match="pooled"):
        build_distance("pkt")(torch.randn(4, 8, 2, 2), torch.randn(4, 8, 2, 2))
    loss = build_distance("rkd")(torch.randn(4, 8), torch.randn(4, 16))
    assert torch.isfinite(loss)


# ------------------------------------------------------------------ parity: VID
def _vid_head(cs: int, ct: int, cfg: dict, **kwargs):
    entry = get_head("vid")
    head = entry.build(cs, ct, vector=False, init_pred_var=cfg["INIT_PRED_VAR"], eps=cfg["EPS"], **kwargs)
    return entry, head.double()


def test_vid_matches_mdistiller():
    fixture = _fixture("vid")
    distance = build_distance("vid")
    for case in fixture["cases"]:
        student = _t(case["student"]).requires_grad_(True)
        teacher = _t(case["teacher"])
        entry, head = _vid_head(student.shape[1], teacher.shape[1], fixture["cfg"])
        head.regressor.load_state_dict({k: _t(v) for k, v in case["regressor"].items()})
        with torch.no_grad():
            head.log_scale.copy_(_t(case["log_scale"]))
        out = entry.apply(head, student, teacher)
        loss = distance(out.student, out.teacher)
        loss.backward()
        assert max_rel(loss, _t(case["loss"])) < RTOL
        assert max_rel(student.grad, _t(case["grad_student"])) < RTOL
        assert max_rel(head.log_scale.grad, _t(case["grad_log_scale"])) < RTOL
        for name, p in head.regressor.named_parameters():
            assert max_rel(p.grad, _t(case["grad_regressor"][name])) < RTOL


def test_vid_initial_variance_and_fixed_variance_option():
    cfg = _fixture("vid")["cfg"]
    _, head = _vid_head(4, 6, cfg)
    ref = _fixture("vid")["trainable_params"]["wrn_40_2->wrn_40_1"]["log_scale_init"]
    assert max_rel(head.log_scale[0], torch.tensor(ref)) < 1e-6  # mdistiller's is stored in float32
    torch.testing.assert_close(head.variance(), torch.full((6,), 5.0, dtype=torch.float64))
    _, fixed = _vid_head(4, 6, cfg, learn_variance=False)
    assert "log_scale" not in dict(fixed.named_parameters()) and "log_scale" in dict(fixed.named_buffers())


def test_vid_config_carries_mdistillers_weights():
    cfg, conf = _fixture("vid")["cfg"], _conf("vid")
    assert conf["task_weight"] == cfg["LOSS"]["CE_WEIGHT"]
    assert list(conf["points"]) == ["stage1", "stage2", "stage3"]
    for point in conf["points"].values():
        assert point["weight"] == cfg["LOSS"]["FEAT_WEIGHT"]
        assert point["head_kwargs"] == {"init_pred_var": cfg["INIT_PRED_VAR"], "eps": cfg["EPS"]}


# ------------------------------------------------------------------ parameter counts
STAGES = {"wrn": ["block1", "block2", "block3"], "resnet": ["layer1", "layer2", "layer3"]}
PAIRS = {
    "wrn_40_2->wrn_40_1": ("wrn_40_2", "wrn_40_1", "wrn"),
    "wrn_40_2->wrn_16_2": ("wrn_40_2", "wrn_16_2", "wrn"),
    "resnet32x4->resnet8x4": ("resnet32x4", "resnet8x4", "resnet"),
    "resnet56->resnet20": ("resnet56", "resnet20", "resnet"),
}


def _built(name: str, teacher: str, student: str, **overrides) -> Distiller:
    conf = _conf(name)
    conf.pop("_target_")
    for point, addresses in overrides.items():
        conf["points"][point].update(addresses)
    distiller = Distiller(**conf)
    s, t = create_model(student, num_classes=100), create_model(teacher, num_classes=100)
    distiller.build(s, t, torch.randn(2, 3, 32, 32))
    return distiller


@pytest.mark.parametrize("pair", list(PAIRS))
def test_vid_parameter_counts_equal_mdistillers(pair):
    teacher, student, family = PAIRS[pair]
    ref = _fixture("vid")["trainable_params"][pair]
    stages = STAGES[family]
    overrides = {f"stage{i + 1}": {"student": s, "teacher": s} for i, s in enumerate(stages)}
    distiller = _built("vid", teacher, student, **overrides)
    heads = distiller.heads
    assert len(heads) == ref["stages"]
    assert sum(p.numel() for h in heads.values() for p in h.regressor.parameters()) == ref["regressors"]
    # mdistiller's log-scales are not in its count (nor in its optimizer); here they are trained head parameters
    assert sum(h.log_scale.numel() for h in heads.values()) == ref["log_scales"]
    described = sum(p["params"] for p in distiller.describe().values())
    assert described == ref["regressors"] + ref["log_scales"]


@pytest.mark.parametrize("method", ["pkt", "rkd"])
def test_pkt_rkd_have_no_trainable_modules_like_mdistiller(method):
    distiller = _built(method, "wrn_40_2", "wrn_40_1")
    assert _fixture(method)["trainable_params"]["wrn_40_2->wrn_40_1"] == 0
    assert len(distiller.heads) == 0 and sum(p.numel() for p in distiller.parameters()) == 0
    assert distiller.describe()["embedding"]["student_shape"][0] == 64  # WRN-40-1's pooled width
    assert distiller.describe()["embedding"]["teacher_shape"][0] == 128


# ------------------------------------------------------------------ a few training steps
@pytest.mark.parametrize(
    ("distill", "experiment", "extra"),
    [
        ("pkt", "cifar_wrn40_wrn16", ()),
        ("rkd", "cifar_wrn40_wrn16", ()),
        ("vid", "cifar_res56_res20", ()),
        (
            "vid",
            "cifar_wrn40_wrn16",
            tuple(f"distill.points.stage{i}.{side}=block{i}" for i in (1, 2, 3) for side in ("student", "teacher")),
        ),
    ],
)
def test_trains_and_logs_its_terms(cifar_cfg, distill, experiment, extra):
    metrics, objs = train(cifar_cfg(experiment, f"distill={distill}", *extra))
    assert math.isfinite(metrics["train/loss"])
    terms = {k for k in metrics if k.startswith("train/loss/")}
    points = ["stage1", "stage2", "stage3"] if distill == "vid" else ["embedding"]
    assert terms == {"train/loss/ce"} | {f"train/loss/{p}/kd" for p in points}
    assert all(math.isfinite(metrics[k]) for k in terms)
    assert metrics["train/loss"] == pytest.approx(sum(metrics[k] for k in terms), rel=1e-5, abs=1e-6)
    module = objs["module"]
    if distill == "vid":
        assert {f"train/pred_var/{p}" for p in points} <= set(metrics)
        optimized = {id(p) for g in objs["trainer"].optimizers[0].param_groups for p in g["params"]}
        assert all(id(h.log_scale) in optimized for h in module.distiller.heads.values())
