"""The Distiller on toy models: heads sized from a dry run, terms per point, config validation."""

import pytest
import torch
from torch import nn

from diffkd.distill import Distiller, FeatureTaps
from diffkd.method import DiffKD


def toy(width: int, classes: int = 5) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, classes)
    )


def run(distiller, student, teacher, x, y=None):
    distiller.build(student, teacher, x[:2])
    s_paths, t_paths = distiller.tap_paths()
    _, sf = FeatureTaps(student, ["", *s_paths])(x)
    with torch.no_grad():
        _, tf = FeatureTaps(teacher, ["", *t_paths])(x)
    return distiller(sf, tf, y)


def test_diffkd_points_inferred_channels_and_kernel_sizes():
    d = Distiller(
        points={
            "feature": {"head": "diffkd", "distance": {"name": "mse"}},
            "logits": {"student": "", "teacher": "", "head": "diffkd", "distance": {"name": "kl", "tau": 1.0}},
        },
        diffkd={"beta_schedule": "scaled_linear", "inference_steps": 3},
    )
    out = run(d, toy(8), toy(16).eval(), torch.randn(4, 3, 6, 6))
    assert set(out.terms) == {"feature/kd", "feature/diff", "logits/kd", "logits/diff"}
    feat, logits = d.heads["feature"], d.heads["logits"]
    assert isinstance(feat, DiffKD) and feat.trans.in_channels == 8 and feat.latent_channels == 16
    assert feat.kernel_size == 3 and logits.kernel_size == 1
    assert feat.schedule.beta_schedule == "scaled_linear" and feat.schedule.timesteps() == [332, 166, 0]
    assert d.student_paths["feature"] == "1" and d.describe()["feature"]["params"] > 0
    assert set(out.stats) == {"gamma/feature", "gamma/logits"}


def test_weights_and_warmup_scale_terms():
    x, y = torch.randn(4, 3, 6, 6), torch.tensor([0, 1, 2, 3])
    s, t = toy(8), toy(8).eval()
    plain = Distiller({"logits": {"student": "", "teacher": "", "distance": {"name": "dkd"}}})
    ramped = Distiller({"logits": {"student": "", "teacher": "", "distance": {"name": "dkd"}, "warmup_epochs": 4}})
    a = run(plain, s, t, x, y).terms["logits/kd"]
    ramped.build(s, t, x[:2])
    _, sf = FeatureTaps(s, [""])(x)
    _, tf = FeatureTaps(t, [""])(x)
    b = ramped(sf, tf, y, epoch=1).terms["logits/kd"]
    torch.testing.assert_close(b, a / 4)


def test_config_errors_are_clear():
    with pytest.raises(TypeError, match=r"unknown keys \['temperature'\]"):
        Distiller({"logits": {"temperature": 4}})
    with pytest.raises(ValueError, match=r"unknown distance .cosine.; choose one of .*dist, dkd.*kl.*mse"):
        Distiller({"logits": {"distance": {"name": "cosine"}}})
    d = Distiller({"feature": {"head": "identity"}})
    with pytest.raises(ValueError, match=r"8 channels and teacher 16.*head: conv1x1"):
        d.build(toy(8), toy(16), torch.randn(2, 3, 6, 6))
    with pytest.raises(ValueError, match="need a teacher"):
        Distiller({"feature": {}}).build(toy(8), None, torch.randn(2, 3, 6, 6))
    with pytest.raises(RuntimeError, match="must run before"):
        Distiller({"feature": {}})({}, {})
