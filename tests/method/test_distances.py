"""Distances: pinned regression values (tests/fixtures/distances.json) and naive float64 references."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from diffkd.distill import build_distance
from diffkd.method import DIST, DKD, MSE, KLDivergence

FIXTURE = Path(__file__).parents[1] / "fixtures" / "distances.json"


def inputs():
    g = torch.Generator().manual_seed(1234)
    s, t = torch.randn(6, 10, generator=g) * 3, torch.randn(6, 10, generator=g) * 3
    target = torch.randint(0, 10, (6,), generator=g)
    return s, t, target


CASES = {
    "kl_tau1": lambda s, t, y: KLDivergence(1.0)(s, t),
    "kl_tau4": lambda s, t, y: KLDivergence(4.0)(s, t),
    "kl_tau4_4d": lambda s, t, y: KLDivergence(4.0)(s[:, :, None, None], t[:, :, None, None]),
    "mse": lambda s, t, y: MSE()(s, t),
    "dist": lambda s, t, y: DIST()(s, t),
    "dist_b2_g2_t4": lambda s, t, y: DIST(beta=2.0, gamma=2.0, tau=4.0)(s, t),
    "dkd_a1_b8_t4": lambda s, t, y: DKD(1.0, 8.0, 4.0)(s, t, y),
    "dkd_a1_b2_t1": lambda s, t, y: DKD(1.0, 2.0, 1.0)(s, t, y),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_regression_fixture(name):
    expected = json.loads(FIXTURE.read_text())[name]
    assert CASES[name](*inputs()).item() == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_kl_equals_torch_batchmean_reference():
    s, t, _ = inputs()
    ref = F.kl_div(F.log_softmax(s.double() / 4, 1), F.softmax(t.double() / 4, 1), reduction="batchmean") * 16
    assert KLDivergence(4.0)(s, t).item() == pytest.approx(ref.item(), rel=1e-5)
    assert KLDivergence(1.0)(t, t).item() == pytest.approx(0.0, abs=1e-6)


def _pearson(a, b):
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


def test_dist_equals_naive_reference_and_map_form():
    s, t, _ = inputs()
    p, q = F.softmax(s.double(), 1), F.softmax(t.double(), 1)
    ref = (1 - _pearson(p, q).mean()) + (1 - _pearson(p.T, q.T).mean())
    assert DIST()(s, t).item() == pytest.approx(ref.item(), rel=1e-5)
    # a (B, K, H, W) map is B·H·W distributions
    maps_s, maps_t = s.view(6, 10, 1, 1).repeat(1, 1, 2, 2), t.view(6, 10, 1, 1).repeat(1, 1, 2, 2)
    flat_s = maps_s.permute(0, 2, 3, 1).reshape(-1, 10)
    flat_t = maps_t.permute(0, 2, 3, 1).reshape(-1, 10)
    assert DIST()(maps_s, maps_t).item() == pytest.approx(DIST()(flat_s, flat_t).item(), rel=1e-6)


def test_dkd_equals_naive_reference():
    s, t, y = inputs()
    T, alpha, beta = 4.0, 1.0, 8.0
    sd, td = s.double() / T, t.double() / T
    gt = F.one_hot(y, 10).double()
    ps, pt = F.softmax(sd, 1), F.softmax(td, 1)
    bs = torch.stack([(ps * gt).sum(1), (ps * (1 - gt)).sum(1)], 1)
    bt = torch.stack([(pt * gt).sum(1), (pt * (1 - gt)).sum(1)], 1)
    tckd = (bt * (bt.log() - bs.log())).sum(1).mean()
    ns, nt = F.log_softmax(sd - 1000 * gt, 1), F.softmax(td - 1000 * gt, 1)
    nckd = F.kl_div(ns, nt, reduction="sum") / s.shape[0]
    ref = (alpha * tckd + beta * nckd) * T**2
    assert DKD(alpha, beta, T)(s, t, y).item() == pytest.approx(ref.item(), rel=1e-5)


def test_dkd_stays_finite_where_log_softmax_underflows():
    s = torch.tensor([[200.0, -200.0], [-200.0, 200.0]])  # binary task: no non-target mass at all
    t = torch.tensor([[100.0, -100.0], [-100.0, 100.0]])
    y = torch.tensor([0, 1])
    assert torch.isfinite(DKD(1.0, 8.0, 1.0)(s, t, y))


def test_distances_are_fp32_under_bf16_autocast():
    s, t, y = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for fn in CASES.values():
            assert fn(s.bfloat16(), t.bfloat16(), y).dtype == torch.float32


def test_teacher_gets_no_gradient():
    s, t, y = inputs()
    s.requires_grad_(True)
    t.requires_grad_(True)
    for fn in CASES.values():
        fn(s, t, y).backward()
    assert t.grad is None and s.grad is not None


def test_build_distance():
    assert isinstance(build_distance("dist", tau=2.0), DIST)
    with pytest.raises(ValueError, match=r"unknown distance .cosine.; choose one of .*dist, dkd.*kl.*mse"):
        build_distance("cosine")


if __name__ == "__main__":  # regenerate the fixture: python tests/method/test_distances.py
    FIXTURE.write_text(json.dumps({k: fn(*inputs()).item() for k, fn in sorted(CASES.items())}, indent=2) + "\n")
