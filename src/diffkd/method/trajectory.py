"""The states of one DiffKD refinement, for looking at what the denoiser does to a student feature.

:meth:`DiffKD.refine <diffkd.method.head.DiffKD.refine>` returns only the end point; :func:`trajectory` runs the
same computation with the head's public pieces and keeps every state on the way::

    traj = trajectory(head, student_feat, noise=eps)
    traj.states          # [Z_s = trans(S), γ·Z_s + (1 − γ)·ε, after DDIM step 1, ..., after step N]
    traj.refined         # proj(states[-1]) — equal to head.refine(student_feat, noise=eps)

Every state lives in the head's latent space (C channels, the teacher latent's), so each can be compared with the
teacher latent ``head.encode_teacher(teacher_feat)[0]`` (:func:`distances_to`). The spec's Fig. 1 / Table 7 claim is
that the student latent is a noisy version of the teacher's and that the denoising steps bring it closer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from diffkd.method.head import DiffKD, _randn_like
from diffkd.method.layout import to_bchw

__all__ = ["Trajectory", "distances_to", "trajectory"]


@dataclass
class Trajectory:
    """What :func:`trajectory` returns.

    Attributes:
        states: the DDIM state (B, C, H, W), fp32, at each stage: the student latent after ``trans``, after the
            noise adapter's mix (only when the head has ANM), then after each DDIM step.
        labels: one name per state: ``"student latent"``, ``"noise mix"``, ``"step 1 (t=400)"``, ...
        refined: ``proj`` of the last state: Ẑ_s, what the KD distance compares with the teacher latent.
        gamma: γ (B,) of the noise adapter, or ``None`` without ANM.
        noise: the ε_T used by the mix (B, C, H, W), or ``None`` without ANM.
    """

    states: list[Tensor]
    labels: list[str]
    refined: Tensor
    gamma: Tensor | None
    noise: Tensor | None


def trajectory(head: DiffKD, student_feat: Tensor, noise: Tensor | None = None) -> Trajectory:
    """Run ``head``'s refinement on ``student_feat`` and keep every intermediate state.

    The arithmetic is that of :meth:`DiffKD.refine` (``trans``, γ, the mix, ``a·x + b·ε̂`` per step of
    ``head.schedule.steps``, ``proj``), so ``trajectory(head, s, eps).refined`` equals ``head.refine(s, eps)`` in the
    same train/eval mode (tests/test_trajectory.py). Gradients flow as in ``refine``; wrap the call in
    ``torch.no_grad()`` to only look.

    Args:
        head: a DiffKD point (e.g. ``module.distiller.heads["feature"]``).
        student_feat: the student feature (B, C_s, H, W) (or logits (B, C_s), tokens, ... as ``refine`` takes).
        noise: ε_T (B, C, H, W) of the noise mix; default: drawn as ``refine`` draws it.
    """
    s = head.trans(to_bchw(student_feat, head.input_layout))
    x = s.float()
    states, labels = [x], ["student latent"]
    g = head.gamma(s)
    eps = None
    if g is not None:
        eps = _randn_like(x) if noise is None else noise.float()
        g4 = g.view(-1, 1, 1, 1)
        if head.anm_mix == "linear":
            x = torch.lerp(eps, x, g4)
        else:
            x = g4.sqrt() * x + (1 - g4).sqrt() * eps
        states.append(x)
        labels.append("noise mix")
    for i, step in enumerate(head.schedule.steps, start=1):
        eps_hat = head.model(x, step.t)
        x = (x * step.a).add_(eps_hat.float(), alpha=step.b)
        states.append(x)
        labels.append(f"step {i} (t={step.t})")
    return Trajectory(states=states, labels=labels, refined=head.proj(x), gamma=g, noise=eps)


def distances_to(teacher_latent: Tensor, state: Tensor) -> dict[str, float]:
    """How far a latent ``state`` (B, C, H, W) is from ``teacher_latent`` (same shape).

    Returns:
        ``mse``: the mean squared difference; ``cosine``: the cosine similarity of each sample's flattened latent,
        averaged over the batch (1 = same direction); ``pixel_cosine``: the same per pixel over the channels.
    """
    t, x = teacher_latent.detach().float(), state.detach().float()
    if t.shape != x.shape:
        raise ValueError(f"teacher latent {tuple(t.shape)} and state {tuple(x.shape)} differ in shape")
    return {
        "mse": F.mse_loss(x, t).item(),
        "cosine": F.cosine_similarity(x.flatten(1), t.flatten(1), dim=1).mean().item(),
        "pixel_cosine": F.cosine_similarity(x, t, dim=1).mean().item(),
    }
