"""Contrastive representation distillation (Tian et al., ICLR 2020; ``head: crd`` with ``distance: {name: crd}``), as
mdistiller implements it for CIFAR-100 (megvii-research/mdistiller @a08d46f ``mdistiller/distillers/CRD.py``, the
contrast indices of ``mdistiller/dataset/cifar100.py``).

The head embeds the pooled penultimate features of both networks, ``v_s = ℓ2(W_s s + b_s)`` and
``v_t = ℓ2(W_t t + b_t)`` (linear to ``feat_dim``, L2-normalised; both embeddings are trained). The distance keeps
one memory bank per side over the whole training set, ``M_s`` and ``M_t`` (N × feat_dim), and for each sample i of
the batch contrasts it with its own bank row and K negatives ``j_1..j_K`` (drawn from samples of other classes)::

    P_s(i, j) = exp(⟨M_t[j], v_s(i)⟩ / T) / Z_s        P_t(i, j) = exp(⟨M_s[j], v_t(i)⟩ / T) / Z_t
    h(P) = P / (P + K/N + ε)   (positive),   1 − h(P) ≈ (K/N) / (P + K/N + ε)   (negatives)
    L = −(1/B) Σ_i [log h(P(i, i)) + Σ_k log((K/N) / (P(i, j_k) + K/N + ε))]     for P_s and for P_t, summed

with ε = 1e-7. ``Z_s``, ``Z_t`` are set once, from the first batch, to ``N · mean(exp(score / T))`` (mdistiller:
"set Z if haven't been set yet") and kept. After the scores, each sample's bank rows move towards its embeddings,
``M[i] ← ℓ2(m · M[i] + (1 − m) · v(i))``; the banks start uniform in ±1/√(feat_dim/3). Defaults are mdistiller's
CIFAR ones (``engine/cfg.py`` CRD): feat_dim 128, K 16384, T 0.07, momentum 0.5, CE weight 1, CRD weight 0.8.

**The sample index**: the distance declares ``needs = ("sample_index",)`` — each sample's position in the training
set, which the task splits off the batch (``datamodule.enable_sample_index()``) — and ``data_facts``, what it reads
from the data module before training: ``num_train_samples`` (N, the banks' rows) and, for the ``exact`` and
``relax`` modes, ``train_labels`` (the class of each sample, to draw negatives from other classes); see
:meth:`CRDLoss.bind_data`. The banks and Z are registered buffers: they are in every checkpoint, and a resumed run
continues with the interrupted run's banks.

**Negatives** are drawn on the device inside the step from the global generator, which the training step reseeds
from (seed, epoch, batch, rank): a resumed run draws the same ones. ``mode``:

- ``exact`` (default; mdistiller's CIFAR setting): the positive is the sample itself, the K negatives a uniform
  draw *without replacement* from the samples of other classes (with replacement where K exceeds their number, as
  mdistiller; here decided once for the training set — by its largest class — not per class, which only differs
  for unbalanced sets with K between the per-class negative counts);
- ``relax`` (mdistiller's other ``CRD.MODE``): the positive is a random sample of the same class, negatives as
  ``exact``; the banks are still updated at the sample's own row;
- ``uniform`` (mdistiller's ``ContrastMemory`` without contrast indices): all K + 1 drawn uniformly from the whole
  training set with replacement, the first replaced by the sample; needs no labels (detection, segmentation data).

**On purpose unlike mdistiller**: mdistiller draws the contrast indices in its data loader workers with NumPy;
here they are drawn on the device (same distribution, other numbers). mdistiller is single-process; under DDP the
batch's embeddings and indices are all-gathered before the bank update, so every rank applies the same update and
the banks stay identical, and Z is the ranks' average of their first batch's estimates (with a
``DistributedSampler`` that pads the last batch, a sample may then appear twice in one update; which of its two
rows is written is unspecified, as with any ``index_copy_`` of repeated indices). The scores and the loss run in
the banks' dtype (fp32) under autocast too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from diffkd.distill.losses.pkt import embedding
from diffkd.distill.registry import HeadOutput, register_distance, register_head

__all__ = ["CRDEmbed", "CRDHead", "CRDLoss", "build_crd", "l2_normalize"]

MODES = ("exact", "relax", "uniform")


def l2_normalize(x: Tensor) -> Tensor:
    """Rows of ``x`` (B, D) divided by their L2 norm (no ε, as mdistiller's ``Normalize``)."""
    return x / x.pow(2).sum(dim=1, keepdim=True).sqrt()


class CRDEmbed(nn.Module):
    """``ℓ2(W x + b)``: a linear map of pooled features (B, C) (or (B, C, 1, 1)) to (B, feat_dim), L2-normalised."""

    def __init__(self, in_channels: int, feat_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_channels, feat_dim)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, C) or (B, C, 1, 1) → (B, feat_dim) of unit rows."""
        x = embedding(x, "crd")
        return l2_normalize(self.linear(x.to(self.linear.weight.dtype)))


class CRDHead(nn.Module):
    """CRD's two embedding heads: ``student`` (Cs → feat_dim) and ``teacher`` (Ct → feat_dim), both trained."""

    def __init__(self, student_channels: int, teacher_channels: int, feat_dim: int = 128) -> None:
        super().__init__()
        if int(feat_dim) < 1:
            raise ValueError(f"head crd: feat_dim must be a positive int, got {feat_dim!r}")
        self.feat_dim = int(feat_dim)
        self.student = CRDEmbed(student_channels, self.feat_dim)
        self.teacher = CRDEmbed(teacher_channels, self.feat_dim)

    def forward(self, student: Tensor) -> Tensor:
        """The student embedding alone (B, feat_dim); training goes through ``apply`` (both sides)."""
        return self.student(student)


def _apply_crd(head: nn.Module, student: Tensor, teacher: Tensor) -> HeadOutput:
    """Both embeddings (B, feat_dim): the teacher's features are detached, its embedding head is trained."""
    return HeadOutput(head.student(student), head.teacher(teacher.detach()), {}, {})


@register_head("crd", apply=_apply_crd)
def build_crd(student_channels: int, teacher_channels: int, *, vector: bool, **kwargs: Any) -> CRDHead:
    """CRD's embedding heads (``head_kwargs``: ``feat_dim``, default 128 — the ``crd`` distance's must match)."""
    unknown = sorted(set(kwargs) - {"feat_dim"})
    if unknown:
        raise TypeError(f"head crd takes head_kwargs feat_dim only, got {unknown}")
    return CRDHead(student_channels, teacher_channels, **kwargs)


@register_distance("crd")
class CRDLoss(nn.Module):
    """CRD's memory banks, normalisation constants and NCE loss in both directions (see the module docstring).

    Args:
        feat_dim: width of the embeddings and bank rows (mdistiller: 128); the ``crd`` head's must be the same.
        num_negatives: K (mdistiller: 16384).
        temperature: T (mdistiller: 0.07).
        momentum: m of the bank update (mdistiller: 0.5).
        mode: ``exact`` | ``relax`` | ``uniform``: how the contrast indices are drawn (module docstring).
        eps: ε of the NCE terms (mdistiller: 1e-7).

    Buffers (in the state_dict): ``memory_student``, ``memory_teacher`` (N, feat_dim) — mdistiller's
    ``memory_v1``/``memory_v2`` — and ``z_student``, ``z_teacher`` (scalars; < 0 until the first batch sets them).
    Until :meth:`bind_data` they have 0 rows; loading a state_dict into an unbound loss takes the stored banks.
    """

    needs = ("sample_index",)

    def __init__(
        self,
        feat_dim: int = 128,
        num_negatives: int = 16384,
        temperature: float = 0.07,
        momentum: float = 0.5,
        mode: Literal["exact", "relax", "uniform"] = "exact",
        eps: float = 1e-7,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"distance crd: mode must be one of {', '.join(MODES)}, got {mode!r}")
        if int(num_negatives) < 1 or int(feat_dim) < 1:
            raise ValueError(f"distance crd: num_negatives and feat_dim must be ≥ 1, got {num_negatives}, {feat_dim}")
        if not 0.0 <= momentum < 1.0 or temperature <= 0:
            raise ValueError(f"distance crd: momentum in [0, 1) and temperature > 0, got {momentum}, {temperature}")
        self.feat_dim = int(feat_dim)
        self.num_negatives = int(num_negatives)
        self.temperature = float(temperature)
        self.momentum = float(momentum)
        self.mode = mode
        self.eps = float(eps)
        self.register_buffer("memory_student", torch.zeros(0, self.feat_dim))
        self.register_buffer("memory_teacher", torch.zeros(0, self.feat_dim))
        self.register_buffer("z_student", torch.tensor(-1.0))
        self.register_buffer("z_teacher", torch.tensor(-1.0))
        self._z_checked = False  # Z is set (or was loaded) once this process has run a step
        self._largest_class = 0  # samples in the training set's largest class (bind_data): decides replacement
        # the sampler's view of the labels: derived from the data module at every start, so not in the checkpoint
        self.register_buffer("train_labels", torch.zeros(0, dtype=torch.int64), persistent=False)
        self.register_buffer("class_order", torch.zeros(0, dtype=torch.int64), persistent=False)
        self.register_buffer("class_start", torch.zeros(0, dtype=torch.int64), persistent=False)
        self.register_buffer("class_count", torch.zeros(0, dtype=torch.int64), persistent=False)

    # ------------------------------------------------------------------ data facts
    @property
    def data_facts(self) -> tuple[str, ...]:
        """What the task reads from the data module for :meth:`bind_data` (method names of the data module)."""
        return ("num_train_samples",) if self.mode == "uniform" else ("num_train_samples", "train_labels")

    @property
    def num_samples(self) -> int:
        """N, the banks' rows (0 before :meth:`bind_data`)."""
        return int(self.memory_student.shape[0])

    def bind_data(self, num_train_samples: int, train_labels: Tensor | None = None) -> None:
        """Size the banks for a training set of N samples (initialised as mdistiller: uniform in ±1/√(feat_dim/3),
        from the global generator) and keep its labels (N,) int64 for the ``exact``/``relax`` sampling.

        Called by the task before the heads are built. Banks already of N rows (loaded from a checkpoint, or bound
        before) are kept.
        """
        n = int(num_train_samples)
        if n < 2:
            raise ValueError(f"distance crd needs a training set of ≥ 2 samples for its memory bank, got {n}")
        if self.mode != "uniform":
            if train_labels is None:
                raise ValueError(f"distance crd (mode {self.mode}) needs the training labels; or use mode: uniform")
            labels = torch.as_tensor(train_labels).to(torch.int64).flatten()
            if labels.shape[0] != n:
                raise ValueError(f"distance crd: {labels.shape[0]} training labels for {n} training samples")
            if (labels < 0).any():
                raise ValueError("distance crd: the training labels must be class indices ≥ 0")
            device = self.z_student.device
            counts = torch.bincount(labels)
            self._largest_class = int(counts.max())  # once, here: never a host sync in the step
            if self._largest_class == n:
                raise ValueError(
                    f"distance crd (mode {self.mode}) draws negatives from other classes, but all {n} training "
                    "samples have one class; use distance.mode: uniform"
                )
            self.train_labels = labels.to(device)
            self.class_order = torch.argsort(labels, stable=True).to(device)
            self.class_count = counts.to(device)
            self.class_start = (torch.cumsum(counts, 0) - counts).to(device)
        if self.num_samples == n:
            return
        if self.num_samples:
            raise ValueError(
                f"distance crd: its memory bank has {self.num_samples} rows (a checkpoint's training set), but this "
                f"training set has {n} samples; resume with the training set the checkpoint was trained on"
            )
        stdv = 1.0 / math.sqrt(self.feat_dim / 3)
        dtype, device = self.memory_student.dtype, self.memory_student.device
        self.memory_student = torch.rand(n, self.feat_dim, dtype=dtype).mul_(2 * stdv).add_(-stdv).to(device)
        self.memory_teacher = torch.rand(n, self.feat_dim, dtype=dtype).mul_(2 * stdv).add_(-stdv).to(device)

    def _load_from_state_dict(
        self, state_dict: Mapping[str, Any], prefix: str, local_metadata: Any, strict: bool, *args: Any
    ) -> None:
        # an unbound loss (evaluation, a hand-built module) takes the stored banks' size
        for name in ("memory_student", "memory_teacher"):
            stored = state_dict.get(prefix + name)
            current = getattr(self, name)
            if stored is not None and stored.shape != current.shape:
                if current.shape[0] != 0:
                    raise ValueError(
                        f"distance crd: the checkpoint's {name} is {tuple(stored.shape)}, this run's is "
                        f"{tuple(current.shape)}: it was trained on another training set (N) or feat_dim"
                    )
                setattr(self, name, torch.empty_like(stored, dtype=current.dtype, device=current.device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, *args)

    # ------------------------------------------------------------------ contrast indices
    def sample_contrast(self, sample_index: Tensor) -> Tensor:
        """(B, K + 1) int64 training-set positions: column 0 the positive, then K negatives (see ``mode``), drawn
        on ``sample_index``'s device from its global generator."""
        n, k = self.num_samples, self.num_negatives
        device = sample_index.device
        b = sample_index.shape[0]
        if self.mode == "uniform":
            idx = torch.randint(0, n, (b, k + 1), device=device)
            idx[:, 0] = sample_index
            return idx
        labels = self.train_labels[sample_index]  # (B,)
        if k <= n - self._largest_class:  # without replacement: the K smallest of random keys
            keys = torch.rand(b, n, device=device)
            keys.masked_fill_(self.train_labels.unsqueeze(0) == labels.unsqueeze(1), 2.0)
            negatives = keys.topk(k, dim=1, largest=False).indices
        else:  # with replacement: uniform positions among the other classes in class order
            others = n - self.class_count[labels]  # (B,)
            r = (torch.rand(b, k, device=device) * others.unsqueeze(1)).long()
            start = self.class_start[labels].unsqueeze(1)
            r = torch.where(r >= start, r + self.class_count[labels].unsqueeze(1), r)
            negatives = self.class_order[r]
        if self.mode == "exact":
            positive = sample_index
        else:  # relax: a random sample of the same class
            offset = (torch.rand(b, device=device) * self.class_count[labels]).long()
            positive = self.class_order[self.class_start[labels] + offset]
        return torch.cat([positive.unsqueeze(1), negatives], dim=1)

    # ------------------------------------------------------------------ loss
    def nce(self, scores: Tensor) -> Tensor:
        """mdistiller's ``ContrastLoss`` of normalised scores (B, K + 1) (column 0 the positive) → scalar."""
        b, m = scores.shape[0], scores.shape[1] - 1
        mpn = m / float(self.num_samples)
        positive = torch.log(scores[:, 0] / (scores[:, 0] + mpn + self.eps))
        negative = torch.log(mpn / (scores[:, 1:] + mpn + self.eps))
        return -(positive.sum() + negative.sum()) / b

    def forward(
        self, student: Tensor, teacher: Tensor, sample_index: Tensor, contrast_index: Tensor | None = None
    ) -> Tensor:
        """The two NCE losses, then the bank update.

        Args:
            student, teacher: the ``crd`` head's embeddings (B, feat_dim), unit rows.
            sample_index: (B,) int64 training-set positions of the batch's samples.
            contrast_index: (B, K + 1) int64 (positive first); drawn per ``mode`` when ``None``.
        Returns:
            scalar ``L_s + L_t``.
        """
        if self.num_samples == 0:
            raise RuntimeError(
                "distance crd has no memory bank yet: the task gives it the training set's size and labels "
                "(bind_data) before training; build the module through a task with a datamodule that gives "
                "sample indices, or call distiller.bind_data({...}) yourself"
            )
        if student.dim() != 2 or student.shape != teacher.shape or student.shape[1] != self.feat_dim:
            raise ValueError(
                f"distance crd reads the crd head's embeddings (B, {self.feat_dim}), got {tuple(student.shape)} and "
                f"{tuple(teacher.shape)}; use head: crd with the same feat_dim as the distance"
            )
        sample_index = sample_index.to(device=student.device, dtype=torch.int64).flatten()
        if sample_index.shape[0] != student.shape[0]:
            raise ValueError(f"distance crd: {sample_index.shape[0]} sample indices for a batch of {student.shape[0]}")
        if contrast_index is None:
            contrast_index = self.sample_contrast(sample_index)
        b, k1 = contrast_index.shape
        dtype = self.memory_student.dtype
        with torch.autocast(student.device.type, enabled=False):
            v_s, v_t = student.to(dtype), teacher.to(dtype)
            flat = contrast_index.reshape(-1)
            rows_t = self.memory_teacher.index_select(0, flat).view(b, k1, self.feat_dim)
            rows_s = self.memory_student.index_select(0, flat).view(b, k1, self.feat_dim)
            out_s = torch.exp(torch.bmm(rows_t, v_s.unsqueeze(2)).squeeze(2) / self.temperature)
            out_t = torch.exp(torch.bmm(rows_s, v_t.unsqueeze(2)).squeeze(2) / self.temperature)
            if not self._z_checked:
                self._set_z(out_s, out_t)
            loss = self.nce(out_s / self.z_student) + self.nce(out_t / self.z_teacher)
            self.update_memory(v_s.detach(), v_t.detach(), sample_index)
        return loss

    @torch.no_grad()
    def _set_z(self, out_s: Tensor, out_t: Tensor) -> None:
        """Z ← N · mean(exp(score / T)) where not set yet (< 0), at this process's first step, without a host sync;
        under DDP the ranks' means are averaged, so that every rank keeps the same Z."""
        candidates = torch.stack([out_s.mean(), out_t.mean()]) * float(self.num_samples)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(candidates)
            candidates /= dist.get_world_size()
        z = torch.stack([self.z_student, self.z_teacher])
        z = torch.where(z < 0, candidates.to(z.dtype), z)
        self.z_student.copy_(z[0])
        self.z_teacher.copy_(z[1])
        self._z_checked = True

    @torch.no_grad()
    def update_memory(self, student: Tensor, teacher: Tensor, sample_index: Tensor) -> None:
        """``M[i] ← ℓ2(m · M[i] + (1 − m) · v(i))`` for both banks; under DDP over every rank's batch."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            student, teacher, sample_index = (_all_gather(t) for t in (student, teacher, sample_index))
        for bank, v in ((self.memory_student, student), (self.memory_teacher, teacher)):
            rows = bank.index_select(0, sample_index).mul_(self.momentum).add_(v * (1.0 - self.momentum))
            bank.index_copy_(0, sample_index, l2_normalize(rows))

    def extra_repr(self) -> str:
        return (
            f"feat_dim={self.feat_dim}, num_negatives={self.num_negatives}, temperature={self.temperature}, "
            f"momentum={self.momentum}, mode={self.mode!r}, num_samples={self.num_samples}"
        )


def _all_gather(x: Tensor) -> Tensor:
    """Every rank's ``x`` (equal shapes), concatenated along dim 0 in rank order."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)
