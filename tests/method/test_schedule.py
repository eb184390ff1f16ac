"""The DDIM schedule: pinned official timesteps, ᾱ values, coefficients, fp32 under any dtype move."""

import math

import pytest
import torch

from diffkd.method import BETA_SCHEDULES, DDIMSchedule, DiffKD


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (1, [0]),
        (3, [332, 166, 0]),
        (5, [400, 300, 200, 100, 0]),
        (10, [450, 400, 350, 300, 250, 200, 150, 100, 50, 0]),
        (20, list(range(475, -1, -25))),
    ],
)
def test_official_timesteps_per_step_count(n, expected):
    assert DDIMSchedule(inference_steps=n).timesteps() == expected


def test_paper_start_500_option():
    s = DDIMSchedule(inference_steps=5, start_timestep=500)
    assert s.timesteps() == [500, 375, 250, 125, 0]
    assert s.steps[-1].alpha_prod_prev == 1.0


def test_last_step_jumps_to_alpha_one():
    s = DDIMSchedule()
    assert [st.t_prev for st in s.steps] == [300, 200, 100, 0, -100]
    assert s.steps[-1].alpha_prod_prev == 1.0
    assert all(st.alpha_prod_prev < 1.0 for st in s.steps[:-1])


def test_alpha_cumprod_matches_spec_table():
    ab = DDIMSchedule().alphas_cumprod
    table = {0: 0.99990, 100: 0.89514, 200: 0.65635, 300: 0.39401, 400: 0.19357, 500: 0.07780, 999: 0.0000404}
    for t, v in table.items():
        assert ab[t].item() == pytest.approx(v, rel=2e-4, abs=2e-7)


def test_step_coefficients_match_spec_table():
    got = [(st.a, st.b) for st in DDIMSchedule().steps]
    spec = [(1.42670, -0.50274), (1.29066, -0.41850), (1.16783, -0.36079), (1.05690, -0.33224), (1.00005, -0.01000)]
    for (a, b), (ea, eb) in zip(got, spec, strict=True):
        assert a == pytest.approx(ea, abs=2e-5)
        assert b == pytest.approx(eb, abs=2e-5)


def test_one_ddim_step_equals_float64_hand_computation():
    s = DDIMSchedule()
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    st = s.steps[0]
    got = st.a * x + st.b * eps
    ab_t = s.alphas_cumprod[400].double()
    ab_p = s.alphas_cumprod[300].double()
    xd, ed = x.double(), eps.double()
    x0 = (xd - (1 - ab_t).sqrt() * ed) / ab_t.sqrt()
    e2 = (xd - ab_t.sqrt() * x0) / (1 - ab_t).sqrt()  # the official "clipped model output" recompute
    ref = ab_p.sqrt() * x0 + (1 - ab_p).sqrt() * e2
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-6)


def test_full_refinement_matches_float64_reference_loop():
    torch.manual_seed(0)
    head = DiffKD(8, 8).eval()
    s, noise = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)
    calls = []

    def fake_model(x, t):  # deterministic stand-in for Φθ, recording which t it is called with
        calls.append(t)
        return torch.tanh(x) * (t + 1) / 1000

    head.model.forward = fake_model
    got = head.refine(s, noise=noise)
    assert calls == [400, 300, 200, 100, 0]
    # float64 reference from the spec's pseudocode (§A.6)
    abar = head.schedule.alphas_cumprod.double()
    with torch.no_grad():
        z = head.trans(s).double()
        gamma = head.gamma(head.trans(s)).double().view(-1, 1, 1, 1)
        x = gamma * z + (1 - gamma) * noise.double()
        for t in [400, 300, 200, 100, 0]:
            e = torch.tanh(x) * (t + 1) / 1000
            a_t, a_p = abar[t], (abar[t - 100] if t - 100 >= 0 else torch.tensor(1.0, dtype=torch.float64))
            x0 = (x - (1 - a_t).sqrt() * e) / a_t.sqrt()
            x = a_p.sqrt() * x0 + (1 - a_p).sqrt() * e
        ref = head.proj(x.float())
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("schedule", BETA_SCHEDULES)
def test_betas_in_range_and_alphas_decreasing(schedule):
    s = DDIMSchedule(beta_schedule=schedule)
    assert s.betas.dtype == torch.float32 and s.betas.shape == (1000,)
    assert (s.betas > 0).all() and (s.betas < 1).all()
    assert (s.alphas_cumprod[1:] < s.alphas_cumprod[:-1]).all()


def test_unknown_schedule_is_a_clear_error():
    with pytest.raises(ValueError, match="squaredcos_cap_v2"):
        DDIMSchedule(beta_schedule="cosine")


def test_buffers_stay_fp32_and_follow_device_moves():
    head = DiffKD(16, 16)
    head.to(torch.bfloat16)
    assert head.schedule.alphas_cumprod.dtype == torch.float32
    assert head.trans.weight.dtype == torch.bfloat16
    head.half().to(torch.float64)
    assert head.schedule.sqrt_alphas_cumprod.dtype == torch.float32
    head.to("meta")
    assert head.schedule.alphas_cumprod.device.type == "meta"
    assert "alphas_cumprod" not in DiffKD(16, 16).state_dict()  # non-persistent: not in checkpoints


def test_fp16_rounding_hazard_is_avoided():
    # ᾱ_0 = 0.9999 rounds to 1.0 in fp16, which made the official code divide 0 by 0 under AMP (spec §F.2.3)
    ab0 = DDIMSchedule().alphas_cumprod[0]
    assert ab0.half().item() == 1.0
    assert ab0.item() < 1.0
    assert all(math.isfinite(st.a) and math.isfinite(st.b) for st in DDIMSchedule().steps)
