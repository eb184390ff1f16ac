"""Relational knowledge distillation (Park et al., CVPR 2019; ``distance: {name: rkd}``), distance-wise and
angle-wise, as mdistiller implements it (megvii-research/mdistiller @a08d46f ``mdistiller/distillers/RKD.py``).

On the pooled embeddings of a batch, s (B, Cs) and t (B, Ct) (widths may differ):

- distance-wise: the pairwise Euclidean distances ψ_D (clamped below at ε = 1e-12 before the square root, zero on
  the diagonal), each divided by its mean over the non-zero entries, compared with the smooth-L1 (Huber, β = 1)
  loss averaged over the B² entries;
- angle-wise: for every triple (i, j, k) the cosine of the angle at i, ⟨(x_j − x_i)/‖·‖, (x_k − x_i)/‖·‖⟩
  (F.normalize, eps 1e-12), compared with the smooth-L1 loss averaged over the B³ entries::

    L = w_d · smoothL1(ψ_D(s), ψ_D(t)) + w_a · smoothL1(ψ_A(s), ψ_A(t))

mdistiller's weights: w_d 25, w_a 50 (its ``RKD.DISTANCE_WEIGHT``/``ANGLE_WEIGHT``), CE 1, point weight 1.
The teacher side carries no gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffkd.distill.losses.pkt import embedding
from diffkd.distill.registry import register_distance

__all__ = ["RKD", "pairwise_distances", "triplet_angles"]


def pairwise_distances(x: Tensor, squared: bool = False, eps: float = 1e-12) -> Tensor:
    """(B, B) Euclidean (or squared) distances between the rows of ``x``, clamped below at ``eps``, zero diagonal."""
    sq = x.pow(2).sum(dim=1)
    dist = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * x @ x.t()).clamp(min=eps)
    if not squared:
        dist = dist.sqrt()
    eye = torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    return dist.masked_fill(eye, 0.0)


def _normalised(dist: Tensor) -> Tensor:
    # divided by the mean of the positive entries; a sum and a count rather than boolean indexing: no host sync
    positive = dist > 0
    return dist / ((dist * positive).sum() / positive.sum())


def triplet_angles(x: Tensor) -> Tensor:
    """(B³,) cosines of the angle at i between x_j − x_i and x_k − x_i, entry (i, j, k) flattened."""
    diff = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), p=2, dim=2)
    return torch.bmm(diff, diff.transpose(1, 2)).reshape(-1)


@register_distance("rkd")
class RKD(nn.Module):
    """``w_d · distance-wise + w_a · angle-wise`` relational loss on pooled embeddings (see the module docstring).

    Args:
        distance_weight, angle_weight: w_d and w_a (mdistiller: 25 and 50).
        squared: compare squared distances (mdistiller: False).
        eps: lower clamp of the squared distances (mdistiller: 1e-12).
    """

    def __init__(
        self, distance_weight: float = 25.0, angle_weight: float = 50.0, squared: bool = False, eps: float = 1e-12
    ) -> None:
        super().__init__()
        if not isinstance(squared, bool):
            raise TypeError(f"squared must be a bool, got {squared!r}")
        self.distance_weight = float(distance_weight)
        self.angle_weight = float(angle_weight)
        self.squared = squared
        self.eps = float(eps)

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        """student (B, Cs), teacher (B, Ct) pooled embeddings (or (B, C, 1, 1)) → scalar."""
        s, t = embedding(student, "rkd"), embedding(teacher.detach(), "rkd")
        if s.shape[0] != t.shape[0] or s.shape[0] < 2:
            raise ValueError(f"rkd needs one batch of ≥ 2 samples on both sides, got {s.shape[0]} and {t.shape[0]}")
        loss_d = F.smooth_l1_loss(
            _normalised(pairwise_distances(s, self.squared, self.eps)),
            _normalised(pairwise_distances(t, self.squared, self.eps)),
        )
        loss_a = F.smooth_l1_loss(triplet_angles(s), triplet_angles(t))
        return self.distance_weight * loss_d + self.angle_weight * loss_a

    def extra_repr(self) -> str:
        return (
            f"distance_weight={self.distance_weight}, angle_weight={self.angle_weight}, squared={self.squared}, "
            f"eps={self.eps}"
        )
