"""Distances between student and teacher outputs: KL, MSE, DIST and DKD.

Each is a small ``nn.Module`` computing in fp32 (also under autocast) with log-softmax/logsumexp forms, so no
log of a rounded-to-zero probability appears. Inputs are logits (B, K) or maps (B, K, H, W); for maps the class
dimension is dim 1.

Each class declares what else it reads: ``needs`` (required keyword inputs, e.g. DKD's ``labels``) and ``accepts``
(optional ones: ``valid_mask``, a (B, H', W') bool map — False at ignored pixels such as segmentation's label 255 —
resized to the map's size with nearest-neighbour sampling; masked positions are left out of the loss).

The logit distances (KD ``kl``, ``dkd``, ``dist``) take ``logit_standardization`` (default False): the student's and
the teacher's logits are z-scored per distribution with :func:`standardize_logits` before the temperature-scaled
softmax (Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024); τ is then the paper's *base
temperature* and the τ² factor of each loss stays as it is. With the option off nothing changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DIST", "DKD", "MSE", "KLDivergence", "mask_like", "standardize_logits"]


def _flatten_classes(x: Tensor) -> Tensor:
    """(B, K) → (B, K); (B, K, H, W) → (B·H·W, K): every spatial position is one distribution."""
    if x.dim() == 2:
        return x
    if x.dim() == 4:
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    raise ValueError(f"expected logits (B, K) or maps (B, K, H, W), got shape {tuple(x.shape)}")


def standardize_logits(x: Tensor, dim: int = 1, eps: float = 1e-7) -> Tensor:
    """Logit standardization: ``(x − mean) / (std + eps)`` along the class dimension ``dim``.

    As the official ``normalize``: the mean is subtracted, the std is the unbiased (Bessel-corrected, K − 1) one and
    ``eps`` = 1e-7 is added to the std, not under the square root. Gradients flow through the mean and the std.
    """
    if x.shape[dim] < 2:
        raise ValueError(f"logit standardization needs at least 2 classes along dim {dim}, got shape {tuple(x.shape)}")
    mean = x.mean(dim=dim, keepdim=True)
    std = x.std(dim=dim, keepdim=True)
    return (x - mean) / (std + eps)


def _ls_repr(enabled: bool) -> str:
    return ", logit_standardization=True" if enabled else ""


def mask_like(valid_mask: Tensor, x: Tensor) -> Tensor:
    """``valid_mask`` (B, H', W') bool as (B, H, W) at the spatial size of the map ``x`` (B, K, H, W)
    (nearest-neighbour); a 1-D (B,) mask for vectors (B, K) passes through."""
    if x.dim() == 2:
        return valid_mask.reshape(x.shape[0]).bool()
    size = tuple(x.shape[-2:])
    if tuple(valid_mask.shape[-2:]) == size:
        return valid_mask.bool()
    resized = F.interpolate(valid_mask[:, None].float(), size=size, mode="nearest")
    return resized[:, 0] > 0.5


class KLDivergence(nn.Module):
    """Hinton KD: ``τ² · KL(softmax(t/τ) ‖ softmax(s/τ))``, summed over classes and positions, divided by B.

    This is the official ``KLDivergence`` (``reduction='batchmean'``); for (B, K, 1, 1) inputs it equals the
    2-D loss. The teacher is detached. With ``valid_mask`` the masked positions add nothing to the sum.
    ``logit_standardization=True`` z-scores both inputs per position first (the official KD+LS ``kd_loss``).
    """

    accepts = ("valid_mask",)

    def __init__(self, tau: float = 1.0, logit_standardization: bool = False) -> None:
        super().__init__()
        self.tau = float(tau)
        self.logit_standardization = bool(logit_standardization)

    def forward(self, student: Tensor, teacher: Tensor, valid_mask: Tensor | None = None) -> Tensor:
        s, t = student.float(), teacher.detach().float()
        if self.logit_standardization:
            s, t = standardize_logits(s), standardize_logits(t)
        log_q = F.log_softmax(s / self.tau, dim=1)
        log_p = F.log_softmax(t / self.tau, dim=1)
        pointwise = log_p.exp() * (log_p - log_q)
        if valid_mask is not None:
            pointwise = pointwise * mask_like(valid_mask, student).unsqueeze(1)
        kl = pointwise.sum()
        return kl / student.shape[0] * self.tau**2

    def extra_repr(self) -> str:
        return f"tau={self.tau}{_ls_repr(self.logit_standardization)}"


class MSE(nn.Module):
    """Mean squared error over all elements, ``mean((s − t)²)`` (official ``nn.MSELoss()``); with ``valid_mask``
    the mean over the elements of the valid positions."""

    accepts = ("valid_mask",)

    def forward(self, student: Tensor, teacher: Tensor, valid_mask: Tensor | None = None) -> Tensor:
        if valid_mask is None:
            return F.mse_loss(student.float(), teacher.detach().float())
        mask = mask_like(valid_mask, student).unsqueeze(1).to(torch.float32)
        squared = (student.float() - teacher.detach().float()).square() * mask
        return squared.sum() / (mask.sum() * student.shape[1]).clamp_min(1.0)


def _pearson_rows(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


class DIST(nn.Module):
    """DIST (Huang et al., 2022): match relations instead of values.

    With p = softmax(s/τ), q = softmax(t/τ) as (N, K) matrices,
    ``L = τ² · (β · (1 − mean_n ρ(p_n, q_n)) + γ · (1 − mean_k ρ(p_{:,k}, q_{:,k})))`` where ρ is the Pearson
    correlation: the inter-class term correlates each sample's class distribution, the intra-class term each
    class's scores across the batch. Maps (B, K, H, W) are treated as B·H·W distributions; with ``valid_mask``
    only the valid positions' distributions. ``logit_standardization=True`` z-scores each distribution's logits
    before the softmax (the official repository has no DIST+LS: same pre-process, no published figure).
    """

    accepts = ("valid_mask",)

    def __init__(
        self, beta: float = 1.0, gamma: float = 1.0, tau: float = 1.0, logit_standardization: bool = False
    ) -> None:
        super().__init__()
        self.beta, self.gamma, self.tau = float(beta), float(gamma), float(tau)
        self.logit_standardization = bool(logit_standardization)

    def forward(self, student: Tensor, teacher: Tensor, valid_mask: Tensor | None = None) -> Tensor:
        s, t = _flatten_classes(student), _flatten_classes(teacher.detach())
        if valid_mask is not None:
            keep = mask_like(valid_mask, student).reshape(-1)
            s, t = s[keep], t[keep]
        s, t = s.float(), t.float()
        if self.logit_standardization:
            s, t = standardize_logits(s), standardize_logits(t)
        p = F.softmax(s / self.tau, dim=1)
        q = F.softmax(t / self.tau, dim=1)
        inter = 1 - _pearson_rows(p, q).mean()
        intra = 1 - _pearson_rows(p.t(), q.t()).mean()
        return self.tau**2 * (self.beta * inter + self.gamma * intra)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, gamma={self.gamma}, tau={self.tau}{_ls_repr(self.logit_standardization)}"


class DKD(nn.Module):
    """Decoupled KD (Zhao et al., 2022): ``α·TCKD + β·NCKD``, each ×T² and averaged over the batch.

    - TCKD = KL([p_gt, 1−p_gt]_teacher ‖ [p_gt, 1−p_gt]_student), the binary target-vs-rest distribution.
    - NCKD = KL(teacher ‖ student) over the non-target classes, renormalised (gt masked out).

    Computed with logsumexp, so it stays finite where the reference's ``log(softmax)`` turns to inf/NaN.
    ``forward(student, teacher, target)`` with logits (B, K) and target (B,) int64.
    ``logit_standardization=True`` z-scores both logits before dividing by T (the official DKD+LS ``dkd_loss``).
    """

    needs = ("labels",)

    def __init__(
        self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0, logit_standardization: bool = False
    ) -> None:
        super().__init__()
        self.alpha, self.beta, self.temperature = float(alpha), float(beta), float(temperature)
        self.logit_standardization = bool(logit_standardization)

    def forward(self, student: Tensor, teacher: Tensor, labels: Tensor) -> Tensor:
        target = labels.argmax(dim=1) if labels.dim() == 2 else labels  # soft (Mixup) targets → their argmax
        T = self.temperature
        s, t = student.float().flatten(1), teacher.detach().float().flatten(1)
        if self.logit_standardization:
            s, t = standardize_logits(s), standardize_logits(t)
        s, t = s / T, t / T
        gt = F.one_hot(target, s.shape[1]).bool()
        neg_inf = torch.finfo(s.dtype).min

        def binary_log_probs(z: Tensor) -> Tensor:
            lse_all = torch.logsumexp(z, dim=1)
            log_gt = z[gt] - lse_all
            log_rest = torch.logsumexp(z.masked_fill(gt, neg_inf), dim=1) - lse_all
            return torch.stack([log_gt, log_rest], dim=1)

        log_bs, log_bt = binary_log_probs(s), binary_log_probs(t)
        tckd = (log_bt.exp() * (log_bt - log_bs)).sum(1).mean()
        log_ns = F.log_softmax(s.masked_fill(gt, neg_inf), dim=1)
        log_nt = F.log_softmax(t.masked_fill(gt, neg_inf), dim=1)
        p_nt = log_nt.exp()  # exactly 0 at the target class, which then contributes nothing
        nckd = (p_nt * (log_nt - log_ns)).masked_fill(gt, 0.0).sum(1).mean()
        return (self.alpha * tckd + self.beta * nckd) * T**2

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, beta={self.beta}, temperature={self.temperature}"
            f"{_ls_repr(self.logit_standardization)}"
        )
