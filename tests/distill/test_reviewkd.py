"""ReviewKD: agreement with mdistiller's ReviewKD on stored figures, its parameter counts on every CIFAR pair, the
warm-up, the multi-tap point and ``@input`` taps it rests on, a few training steps, and the errors for wrong taps.

The figures in ``tests/fixtures/mdistiller_reviewkd.json`` were computed by running mdistiller's own
``ReviewKD.forward_train`` (its ABF chain and ``hcl_loss``) in float64 (commit and method in its ``provenance``);
mdistiller is not needed here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from diffkd.distill import Distiller, FeatureTaps
from diffkd.distill.registry import build_distance, get_head
from diffkd.models import create_model
from diffkd.train import train
from tests.helpers.parity import as_float64 as _t
from tests.helpers.parity import max_rel

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = json.loads((ROOT / "tests" / "fixtures" / "mdistiller_reviewkd.json").read_text())
RTOL = 1e-5


def _ours(key: str, levels: int) -> str:
    """mdistiller's ``abfs`` are deepest first: its ``j.<param>`` is our ``abfs.<levels-1-j>.<param>``."""
    j, rest = key.split(".", 1)
    return f"abfs.{levels - 1 - int(j)}.{rest}"


def _config(pair: str | None = None) -> dict:
    """conf/distill/reviewkd.yaml, with the pair's conf/pair_distill file merged over it as Hydra does."""
    conf = OmegaConf.load(ROOT / "conf" / "distill" / "reviewkd.yaml")
    if pair is not None:
        conf = OmegaConf.merge(conf, OmegaConf.load(ROOT / "conf" / "pair_distill" / pair / "reviewkd.yaml"))
    conf = OmegaConf.to_container(conf)
    conf.pop("_target_")
    return conf


def _distiller(
    pair: str | None, teacher: str, student: str, **point
) -> tuple[Distiller, torch.nn.Module, torch.nn.Module]:
    conf = _config(pair)
    conf["points"]["review"].update(point)
    distiller = Distiller(**conf)
    s, t = create_model(student, num_classes=100), create_model(teacher, num_classes=100)
    distiller.build(s, t, torch.randn(2, 3, 32, 32))
    return distiller, s, t


# ------------------------------------------------------------------ parity
@pytest.mark.parametrize("case", FIXTURE["cases"], ids=lambda c: f"seed{c['seed']}")
def test_loss_and_gradients_match_mdistiller(case):
    students = [_t(x).requires_grad_(True) for x in case["student"]]
    teachers = [_t(x) for x in case["teacher"]]
    entry = get_head("reviewkd")
    head = entry.build(
        [s.shape[1] for s in students], [t.shape[1] for t in teachers], vector=[False] * len(students)
    ).double()
    assert head.mid_channels == case["mid_channel"]
    levels = len(students)
    state = {_ours(k, levels): _t(v) for k, v in case["abfs"].items()}
    missing, unexpected = head.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in missing)
    head.train()  # BatchNorm on batch statistics, as mdistiller trains
    out = entry.apply(head, students, teachers)
    loss = build_distance("hcl")(out.student, out.teacher)
    loss.backward()
    assert max_rel(loss, _t(case["loss"])) < RTOL
    for ours, ref in zip(students, case["grad_student"]):
        assert max_rel(ours.grad, _t(ref)) < RTOL
    params = dict(head.named_parameters())
    assert len(params) == len(case["grad_abfs"])
    for key, ref in case["grad_abfs"].items():
        assert max_rel(params[_ours(key, levels)].grad, _t(ref)) < RTOL, key


def test_config_carries_mdistillers_settings():
    cfg, point = FIXTURE["cfg"], _config()["points"]["review"]
    assert _config()["task_weight"] == cfg["CE_WEIGHT"] == 1.0
    assert point["weight"] == FIXTURE["cifar_config"]["REVIEWKD_WEIGHT"] == 5.0
    assert point["warmup_epochs"] == cfg["WARMUP_EPOCHS"] == 20
    assert point["head_kwargs"]["max_mid_channels"] == cfg["MAX_MID_CHANNEL"] == 512
    assert point["distance"] == {"name": "hcl", "pyramid": [4, 2, 1]}


# ------------------------------------------------------------------ parameter counts, channels and sizes
@pytest.mark.parametrize("pair", list(FIXTURE["trainable_params"]))
def test_parameter_counts_channels_and_sizes_equal_mdistillers(pair):
    ref = FIXTURE["trainable_params"][pair]
    distiller, _, _ = _distiller(pair, ref["teacher"], ref["student"])
    info = distiller.describe()["review"]
    assert [s[0] for s in info["student_shape"]] == ref["in_channels"]
    assert [t[0] for t in info["teacher_shape"]] == ref["out_channels"]
    assert [s[1] for s in info["student_shape"]][::-1] == ref["shapes"]
    assert [t[1] for t in info["teacher_shape"]][::-1] == ref["out_shapes"]
    assert distiller.heads["review"].mid_channels == ref["mid_channel"]
    assert info["params"] == sum(p.numel() for p in distiller.parameters()) == ref["abfs"]


# ------------------------------------------------------------------ taps, warm-up
def test_input_taps_give_the_pre_activation_and_the_warm_up_ramps_like_mdistillers():
    """ResNet-56 → ResNet-20: the teacher's stage taps are the inputs of each stage's last ReLU (its output is
    the stage output); the term is weight 5 × min(epoch / 20, 1) × hcl, as mdistiller's at its epochs."""
    distiller, student, teacher = _distiller("cifar_res56_res20", "resnet56", "resnet20")
    s_paths, t_paths = distiller.tap_paths()
    assert s_paths == ["layer1", "layer2", "layer3", "avgpool"]
    assert t_paths[2] == "layer3.8.out_relu@input"
    s_taps = FeatureTaps(student, s_paths)
    t_taps = FeatureTaps(teacher, [*t_paths, "layer3"])
    x = torch.randn(4, 3, 32, 32)
    _, s_feats = s_taps(x)
    with torch.no_grad():
        _, t_feats = t_taps(x)
    pre = t_feats["layer3.8.out_relu@input"]
    assert (pre < 0).any()  # a pre-activation, not a ReLU output
    torch.testing.assert_close(torch.relu(pre), t_feats["layer3"])
    terms = {e: distiller(s_feats, t_feats, epoch=e).terms["review/kd"] for e in (1, 10, 20, 40)}
    for ref in FIXTURE["cases"][0]["warmup"]:
        ratio = (terms[ref["epoch"]] / terms[20]).item()
        assert ratio == pytest.approx(ref["factor"], rel=1e-6)
    head, hcl = distiller.heads["review"], distiller.distances["review"]
    students = [s_feats[p] for p in s_paths]
    teachers = [t_feats[p] for p in t_paths]
    out = head(students, [t.shape[-2:] for t in teachers])
    torch.testing.assert_close(terms[20], 5.0 * hcl(out, teachers))


def test_hcl_pools_only_to_sizes_below_the_map():
    """An 8×8 level adds its 4×4, 2×2 and 1×1 pools with weights ½, ¼, ⅛; a 1×1 level is plain MSE."""
    s, t = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    mse = torch.nn.functional.mse_loss
    pool = torch.nn.functional.adaptive_avg_pool2d
    expected = (mse(s, t) + sum(w * mse(pool(s, k), pool(t, k)) for k, w in ((4, 0.5), (2, 0.25), (1, 0.125)))) / (
        1.875
    )
    hcl = build_distance("hcl")
    torch.testing.assert_close(hcl([s], [t]), expected)
    torch.testing.assert_close(hcl([s[..., :1, :1]], [t[..., :1, :1]]), mse(s[..., :1, :1], t[..., :1, :1]))


# ------------------------------------------------------------------ errors for wrong taps
@pytest.mark.parametrize(
    ("point", "error", "match"),
    [
        ({"student": "layer3", "teacher": "layer3"}, ValueError, "give the point lists of taps"),
        ({"teacher": ["layer1", "layer2", "avgpool"]}, ValueError, "4 student taps .* but 3 teacher taps"),
        ({"teacher": "avgpool"}, ValueError, "lists them on both sides"),
        ({"student": ["layer1", "layer2", "@feature", "avgpool"]}, ValueError, "'@feature' in a list of taps"),
        ({"student": ["layer1", "layer2", "layer9", "avgpool"]}, KeyError, "has no module 'layer9'.*layer1"),
        (
            {"teacher": ["layer1.9.out_relu@input", "layer2", "layer3", "avgpool"]},
            KeyError,
            "no module 'layer1.9.out_relu'",
        ),
        ({"align": None}, ValueError, "align=interpolate \\(or align=head"),
    ],
)
def test_wrong_taps_are_refused_with_the_fix(point, error, match):
    """ResNet-32x4 → ShuffleNetV1 (student maps half the teacher's): each wrong point names what to change."""
    conf = _config("cifar_res32x4_shuv1")
    conf["points"]["review"].update(point)
    with pytest.raises(error, match=match):
        distiller = Distiller(**conf)
        distiller.build(
            create_model("ShuffleV1", num_classes=100),
            create_model("resnet32x4", num_classes=100),
            torch.randn(2, 3, 32, 32),
        )


def test_hcl_refuses_single_maps():
    with pytest.raises(ValueError, match="lists of maps"):
        build_distance("hcl")(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4))


# ------------------------------------------------------------------ a few training steps
def test_trains_and_logs_its_term(cifar_cfg):
    metrics, objs = train(cifar_cfg("cifar_res32x4_shuv2", "distill=reviewkd", "trainer.limit_train_batches=3"))
    terms = {k for k in metrics if k.startswith("train/loss/")}
    assert terms == {"train/loss/ce", "train/loss/review/kd"}
    assert all(math.isfinite(metrics[k]) for k in terms) and metrics["train/loss/review/kd"] > 0
    optimized = {id(p) for g in objs["trainer"].optimizers[0].param_groups for p in g["params"]}
    head = objs["module"].distiller.heads["review"]
    assert all(id(p) in optimized for p in head.parameters())


# ------------------------------------------------------------------ multi-tap points in general
def test_a_multi_tap_point_hands_lists_to_any_head_and_distance():
    """Not only ReviewKD: a point listing its taps gives the head builder lists of channels, and its head and
    distance lists of maps (here no head, hcl on the raw maps); the taps and describe() list every level."""
    distiller = Distiller(
        {
            "levels": {"student": ["layer1", "layer3"], "teacher": ["layer1", "layer3"], "distance": {"name": "hcl"}},
            "single": {"student": "layer3", "teacher": "layer3"},
        }
    )
    assert distiller.specs["levels"].multi_tap and not distiller.specs["single"].multi_tap
    assert distiller.specs["single"].tap_addresses("student") == ["layer3"]
    student, teacher = create_model("resnet20", num_classes=10), create_model("resnet20", num_classes=10)
    info = distiller.build(student, teacher, torch.randn(2, 3, 32, 32))
    assert info["levels"]["student"] == ["layer1", "layer3"] and info["levels"]["params"] == 0
    assert info["levels"]["student_shape"] == [[16, 32, 32], [64, 8, 8]]
    assert info["levels"]["layouts"] == [["bchw", "bchw"], ["bchw", "bchw"]]
    assert info["single"]["student_shape"] == [64, 8, 8]  # single-tap points as before
    assert distiller.tap_paths() == (["layer1", "layer3"], ["layer1", "layer3"])
    assert distiller.profile()["levels"] is None
    s = {"layer1": torch.randn(2, 16, 32, 32), "layer3": torch.randn(2, 64, 8, 8)}
    t = {"layer1": torch.randn(2, 16, 32, 32), "layer3": torch.randn(2, 64, 8, 8)}
    terms = distiller(s, t).terms
    hcl = build_distance("hcl")
    torch.testing.assert_close(terms["levels/kd"], hcl([s["layer1"], s["layer3"]], [t["layer1"], t["layer3"]]))
    torch.testing.assert_close(terms["single/kd"], torch.nn.functional.mse_loss(s["layer3"], t["layer3"]))
