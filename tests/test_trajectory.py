"""diffkd.method.trajectory: the refinement's intermediate states end where DiffKD.refine ends."""

from __future__ import annotations

import pytest
import torch

from diffkd.method import DiffKD
from diffkd.method.trajectory import distances_to, trajectory


def _trained_like(head: DiffKD) -> DiffKD:
    """BN running statistics away from (0, 1), so that eval mode is not the identity."""
    head.train()
    with torch.no_grad():
        for _ in range(3):
            head.proj(torch.randn(4, head.latent_channels, 5, 5) * 3 + 1)
    return head


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"anm_mix": "variance_preserving", "inference_steps": 3},
        {"anm": False, "beta_schedule": "squaredcos_cap_v2"},
        {"use_ae": True, "start_timestep": 500, "kd_grad_through_diffusion": False},
    ],
)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_last_state_after_proj_equals_refine(kwargs, mode):
    torch.manual_seed(0)
    head = _trained_like(DiffKD(6, 16, **kwargs))
    head.train(mode == "train")
    s = torch.randn(4, 6, 5, 5)
    eps = torch.randn(4, head.latent_channels, 5, 5)
    with torch.no_grad():
        traj = trajectory(head, s, noise=eps)
        ref = head.refine(s, noise=eps)
    n = head.schedule.inference_steps
    has_anm = kwargs.get("anm", True)
    assert len(traj.states) == len(traj.labels) == 1 + has_anm + n
    assert traj.labels[0] == "student latent"
    assert traj.labels[-1] == f"step {n} (t={head.schedule.steps[-1].t})"
    torch.testing.assert_close(traj.refined, ref, rtol=0, atol=0)
    torch.testing.assert_close(head.proj(traj.states[-1]), ref, rtol=0, atol=0)
    torch.testing.assert_close(traj.states[0], head.trans(s))
    assert (traj.gamma is None) == (not has_anm) == (traj.noise is None)
    if has_anm:
        torch.testing.assert_close(traj.gamma, head.gamma(head.trans(s)))


def test_default_noise_is_drawn_as_refine_draws_it():
    torch.manual_seed(1)
    head = DiffKD(4, 8, inference_steps=2).eval()
    s = torch.randn(2, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    torch.manual_seed(7)
    with torch.no_grad():
        traj = trajectory(head, s)
    torch.manual_seed(7)
    with torch.no_grad():
        ref = head.refine(s)
    torch.testing.assert_close(traj.refined, ref, rtol=0, atol=0)


def test_logits_head_and_gradients_flow_like_refine():
    torch.manual_seed(2)
    head = DiffKD(10, 10, kernel_size=1, inference_steps=2)
    logits = torch.randn(3, 10, requires_grad=True)
    eps = torch.randn(3, 10, 1, 1)
    traj = trajectory(head, logits, noise=eps)
    assert [tuple(x.shape) for x in traj.states] == [(3, 10, 1, 1)] * 4
    traj.refined.sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert head.model.parameters().__next__().grad is not None


def test_distances_to():
    t = torch.randn(2, 3, 4, 4)
    same = distances_to(t, t)
    assert same["mse"] == 0.0
    assert same["cosine"] == pytest.approx(1.0)
    assert same["pixel_cosine"] == pytest.approx(1.0)
    flipped = distances_to(t, -t)
    assert flipped["cosine"] == pytest.approx(-1.0)
    assert flipped["mse"] == pytest.approx(4 * t.pow(2).mean().item())
    with pytest.raises(ValueError, match="differ in shape"):
        distances_to(t, t[:, :2])
