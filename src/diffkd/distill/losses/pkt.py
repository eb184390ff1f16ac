"""Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018; ``distance: {name: pkt}``), as mdistiller
implements it (megvii-research/mdistiller @a08d46f ``mdistiller/distillers/PKT.py``).

On the penultimate (pooled) embeddings of a batch, s (B, Cs) and t (B, Ct) — their widths may differ — each sample's
cosine similarities to the batch, rescaled to [0, 1], become a distribution over the batch; the loss is the KL from
the teacher's to the student's, averaged over the B² entries::

    K(x)_ij = (1 + cos(x_i, x_j)) / 2,    P(x)_ij = K(x)_ij / Σ_j K(x)_ij
    L = mean_ij P(t)_ij · log((P(t)_ij + ε) / (P(s)_ij + ε))

with mdistiller's ε = 1e-7 (also added to the norms). mdistiller's CIFAR weights: CE 1, PKT 30000.

Relational distances (PKT, RKD) compare embeddings of any two widths, so their points take ``head: none``,
registered here: no head and, unlike ``identity``, no equal-width check.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from diffkd.distill.registry import register_distance, register_head

__all__ = ["PKT", "build_none", "cosine_probabilities", "embedding"]


@register_head("none")
def build_none(student_channels: int, teacher_channels: int, *, vector: bool, **kwargs: Any) -> None:
    """No head, for distances that compare tensors of unequal widths (PKT, RKD: batch-relational kernels)."""
    if kwargs:
        raise TypeError(f"head none takes no head_kwargs, got {sorted(kwargs)}")
    return None


def embedding(x: Tensor, name: str) -> Tensor:
    """(B, C) from a pooled tap — (B, C), or (B, C, 1, 1) as the distiller hands vectors and ``avgpool`` outputs —
    in fp32 at least (fp64 stays fp64)."""
    if x.dim() == 4 and x.shape[-2:] != (1, 1):
        raise ValueError(
            f"{name} needs pooled embeddings (B, C) or (B, C, 1, 1), got a map {tuple(x.shape)}; tap the pooled "
            "feature (e.g. 'avgpool') rather than a feature map"
        )
    x = x.reshape(x.shape[0], -1)
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def cosine_probabilities(x: Tensor, eps: float) -> Tensor:
    """Row-normalised (1 + cosine similarity) / 2 between the rows of ``x`` (B, C) → (B, B)."""
    x = x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)
    x = x.masked_fill(x.isnan(), 0.0)  # as mdistiller: a NaN entry (a NaN input) becomes 0
    kernel = (x @ x.t() + 1.0) / 2.0
    return kernel / kernel.sum(dim=1, keepdim=True)


@register_distance("pkt")
class PKT(nn.Module):
    """``mean_ij P(t)·log((P(t)+ε)/(P(s)+ε))`` of the cosine-similarity distributions (see the module docstring).

    Args:
        eps: ε of the norms and of the logarithm (mdistiller: 1e-7).
    """

    def __init__(self, eps: float = 1e-7) -> None:
        super().__init__()
        self.eps = float(eps)

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        """student (B, Cs), teacher (B, Ct) pooled embeddings (or (B, C, 1, 1)) → scalar."""
        s, t = embedding(student, "pkt"), embedding(teacher.detach(), "pkt")
        if s.shape[0] != t.shape[0] or s.shape[0] < 2:
            raise ValueError(f"pkt needs one batch of ≥ 2 samples on both sides, got {s.shape[0]} and {t.shape[0]}")
        p_s, p_t = cosine_probabilities(s, self.eps), cosine_probabilities(t, self.eps)
        return (p_t * torch.log((p_t + self.eps) / (p_s + self.eps))).mean()

    def extra_repr(self) -> str:
        return f"eps={self.eps}"
