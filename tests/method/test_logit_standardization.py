"""Logit standardization (Sun et al., CVPR 2024) as an option of the logit distances (``kl``, ``dkd``, ``dist`` and
DiffKD's logits point).

- parity: loss and student gradient against the figures the official repository's ``kd_loss`` / ``dkd_loss`` gave on
  the stored inputs (tests/fixtures/logit_standardization.json says how they were produced);
- regression: with the option off every distance gives what it gave before the option existed;
- the shipped configs ``distill=kd_ls|dkd_ls|dist_ls`` (and DiffKD with the option) train a few steps.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from diffkd.distill import build_distance
from diffkd.method.distances import DIST, DKD, KLDivergence, standardize_logits
from diffkd.train import train

FIXTURE = json.loads((Path(__file__).parents[1] / "fixtures" / "logit_standardization.json").read_text())
PARITY = FIXTURE["parity"]
REGRESSION = FIXTURE["regression_off"]


def _assert_grad_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    """Within ``rel`` relative to the reference: as a whole (L2) and per element on the gradient's scale."""
    actual, expected = actual.double(), expected.double()
    assert ((actual - expected).norm() / expected.norm()).item() <= rel
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * expected.abs().max().item())


# --------------------------------------------------------------------------------------------------- parity


def _parity_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    inputs = PARITY["inputs"]
    student = torch.tensor(inputs["student"], dtype=torch.float32)
    teacher = torch.tensor(inputs["teacher"], dtype=torch.float32)
    return student, teacher, torch.tensor(inputs["labels"])


def _ours(case: dict) -> torch.nn.Module:
    if case["distance"] == "kd":
        return build_distance("kl", tau=case["temperature"], logit_standardization=case["logit_stand"])
    return build_distance(
        "dkd",
        alpha=case["alpha"],
        beta=case["beta"],
        temperature=case["temperature"],
        logit_standardization=case["logit_stand"],
    )


@pytest.mark.parametrize("name", sorted(PARITY["cases"]))
def test_matches_the_official_implementation(name):
    case = PARITY["cases"][name]
    student, teacher, labels = _parity_inputs()
    student.requires_grad_(True)
    distance = _ours(case)
    loss = distance(student, teacher, labels=labels) if case["distance"] == "dkd" else distance(student, teacher)
    loss.backward()
    assert loss.item() == pytest.approx(case["loss"], rel=1e-5)
    _assert_grad_close(student.grad, torch.tensor(case["grad_student"]))


def test_fixture_covers_the_published_settings():
    """KD+LS at base temperatures 2/3/4 and DKD+LS with the WRN-40-2→WRN-40-1 and ResNet32x4→ResNet8x4 weights."""
    ls = {(c["distance"], c.get("alpha"), c.get("beta"), c["temperature"]) for c in PARITY["cases"].values()}
    assert {("kd", None, None, 2.0), ("kd", None, None, 3.0), ("kd", None, None, 4.0)} <= ls
    assert {("dkd", 12.0, 24.0, 2.0), ("dkd", 9.0, 72.0, 2.0)} <= ls
    assert PARITY["source"]["commit"] == "f6e5aa5172bad618e801163c3385322eea673754"


def test_standardize_logits_is_the_official_normalize():
    x = torch.randn(5, 7, dtype=torch.float64) * 3 + 2
    mean = x.mean(-1, keepdim=True)
    std = ((x - mean).square().sum(-1, keepdim=True) / (7 - 1)).sqrt()  # unbiased
    torch.testing.assert_close(standardize_logits(x), (x - mean) / (std + 1e-7), rtol=0, atol=1e-12)
    # maps: per position along the class dimension (dim 1)
    maps = torch.randn(2, 7, 3, 3, dtype=torch.float64)
    flat = maps.permute(0, 2, 3, 1).reshape(-1, 7)
    torch.testing.assert_close(standardize_logits(maps).permute(0, 2, 3, 1).reshape(-1, 7), standardize_logits(flat))
    # invariant to a per-sample shift and positive scale (up to the eps): the student need not match magnitudes
    torch.testing.assert_close(standardize_logits(3 * x + 5), standardize_logits(x), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="at least 2 classes"):
        standardize_logits(torch.randn(4, 1))


def test_dist_with_standardization_equals_dist_of_standardized_logits():
    """No official DIST+LS: the option is exactly DIST on z-scored logits (vectors, maps and masked maps alike)."""
    student, teacher, _ = _parity_inputs()
    z_s, z_t = standardize_logits(student), standardize_logits(teacher)
    for beta, gamma, tau in [(1.0, 1.0, 2.0), (2.0, 2.0, 4.0)]:
        on = DIST(beta, gamma, tau, logit_standardization=True)(student, teacher)
        assert on.item() == pytest.approx(DIST(beta, gamma, tau)(z_s, z_t).item(), rel=1e-6)
        # naive float64 form
        p, q = F.softmax(z_s.double() / tau, 1), F.softmax(z_t.double() / tau, 1)

        def rho(a, b):
            a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
            return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))

        ref = tau**2 * (beta * (1 - rho(p, q).mean()) + gamma * (1 - rho(p.T, q.T).mean()))
        assert on.item() == pytest.approx(ref.item(), rel=1e-5)
    maps_s, maps_t = student[:4].reshape(4, 100, 1, 1).repeat(1, 1, 2, 2), teacher[:4].reshape(4, 100, 1, 1)
    maps_t = maps_t.repeat(1, 1, 2, 2)
    mask = torch.tensor([[[True, False], [True, True]]]).repeat(4, 1, 1)
    dist = DIST(tau=2.0, logit_standardization=True)
    masked = dist(maps_s, maps_t, valid_mask=mask)
    assert masked.item() == pytest.approx(
        DIST(tau=2.0)(*(standardize_logits(m) for m in (maps_s, maps_t)), valid_mask=mask).item()
    )


def test_kl_and_dkd_on_maps_and_logits_points_agree():
    """(B, K, 1, 1) — how a head sees logits, e.g. DiffKD's denoised ones — gives the (B, K) loss."""
    student, teacher, labels = _parity_inputs()
    for distance, kwargs in [
        (KLDivergence(2.0, logit_standardization=True), {}),
        (DKD(12, 24, 2, True), {"labels": labels}),
    ]:
        flat = distance(student, teacher, **kwargs)
        as_map = distance(student[:, :, None, None], teacher[:, :, None, None], **kwargs)
        assert as_map.item() == pytest.approx(flat.item(), rel=1e-6)


def test_option_changes_the_loss_and_reprs_say_so():
    student, teacher, labels = _parity_inputs()
    assert KLDivergence(2.0, True)(student, teacher).item() != pytest.approx(KLDivergence(2.0)(student, teacher).item())
    assert "logit_standardization=True" in repr(DKD(logit_standardization=True))
    assert "logit_standardization" not in repr(DKD()) + repr(KLDivergence()) + repr(DIST())
    # the teacher stays detached and the student's gradient flows through the mean and std
    s = student.clone().requires_grad_(True)
    t = teacher.clone().requires_grad_(True)
    DKD(12, 24, 2, True)(s, t, labels).backward()
    assert t.grad is None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------------- regression

REGRESSION_DISTANCES = {
    "kl_tau1": lambda ls: KLDivergence(1.0, **ls),
    "kl_tau4": lambda ls: KLDivergence(4.0, **ls),
    "kl_tau2_map": lambda ls: KLDivergence(2.0, **ls),
    "kl_tau2_map_masked": lambda ls: KLDivergence(2.0, **ls),
    "dist_default": lambda ls: DIST(**ls),
    "dist_b2_g2_t4": lambda ls: DIST(2.0, 2.0, 4.0, **ls),
    "dist_map_masked": lambda ls: DIST(1.0, 1.0, 2.0, **ls),
    "dkd_a1_b8_t4": lambda ls: DKD(1.0, 8.0, 4.0, **ls),
    "dkd_a12_b24_t2": lambda ls: DKD(12.0, 24.0, 2.0, **ls),
}


@pytest.mark.parametrize("option", [{}, {"logit_standardization": False}], ids=["default", "off"])
@pytest.mark.parametrize("name", sorted(REGRESSION["cases"]))
def test_option_off_gives_what_it_gave_before(name, option):
    case, inputs = REGRESSION["cases"][name], REGRESSION["inputs"]
    is_map = case["kind"].startswith("map")
    student = torch.tensor(inputs["map_student" if is_map else "student"], requires_grad=True)
    teacher = torch.tensor(inputs["map_teacher" if is_map else "teacher"])
    kwargs = {}
    if case["kind"] == "labels":
        kwargs["labels"] = torch.tensor(inputs["labels"])
    if case["kind"] == "map_masked":
        kwargs["valid_mask"] = torch.tensor(inputs["map_valid_mask"])
    loss = REGRESSION_DISTANCES[name](option)(student, teacher, **kwargs)
    loss.backward()
    # recorded on the same float32 code path: equal up to the last bits a different CPU's reductions may change
    assert loss.item() == pytest.approx(case["loss"], rel=1e-6)
    torch.testing.assert_close(student.grad, torch.tensor(case["grad_student"]), rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize(
    ("distill", "extra"),
    [
        ("kd_ls", ()),
        ("dkd_ls", ()),
        ("dist_ls", ()),
        ("diffkd", ("+distill.points.logits.distance.logit_standardization=true",)),
    ],
    ids=["kd_ls", "dkd_ls", "dist_ls", "diffkd_logits_ls"],
)
def test_configs_train_a_few_steps(cifar_cfg, distill, extra):
    cfg = cifar_cfg("cifar_wrn40_wrn16", f"distill={distill}", *extra)
    metrics, objs = train(cfg)
    assert math.isfinite(metrics["train/loss"])
    assert math.isfinite(metrics["train/loss/logits/kd"])
    distance = objs["module"].distiller.distances["logits"]
    assert distance.logit_standardization is True
