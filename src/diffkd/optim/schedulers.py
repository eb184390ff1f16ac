"""Learning-rate schedules configured in epochs and stepped every iteration, with a linear warm-up.

The ImageNet recipes B2 and B3 (spec §D.1–D.2) change the learning rate at every optimizer step:

* B2: ×0.97 every 2.4 epochs after 3 warm-up epochs from 1e-6 — :class:`WarmupStepLR`;
* B3: cosine to 5e-6 after 20 warm-up epochs from 5e-7 — :class:`WarmupCosineLR`.

Both are ``torch.optim.lr_scheduler.LRScheduler`` subclasses whose lengths are given in (fractional) **epochs**;
the number of optimizer steps per epoch is supplied by :class:`~diffkd.tasks.DistillationModule`, which passes
``steps_per_epoch`` (and ``total_steps``) to any scheduler partial whose signature names them and leaves them
unset (``null``) — computed from the trainer (``estimated_stepping_batches``, ``num_training_batches`` and
``accumulate_grad_batches``), so the same config is right for any data-set size, device count or
``limit_train_batches``. Use them with ``optim.scheduler_interval: step``.

The schedule is a closed form of the step count (``last_epoch``), so resuming from a checkpoint (which restores
``last_epoch``) continues exactly where it stopped. With ``e = step / steps_per_epoch`` and ``w`` warm-up epochs::

    e < w:   lr = warmup_lr + (base_lr − warmup_lr) · e / w          (linear warm-up, every step)
    e ≥ w:   lr = decay(base_lr, e − w)                              (the decay clock starts after warm-up)

as the official ``GradualWarmupScheduler`` hands ``t − warmup_steps`` to the decay schedule (whose cosine
period is ``total_steps − warmup_steps``, spec §D.2). The official code updates the warm-up lr once per epoch;
here it rises every step.

:class:`PolyLR` is the segmentation schedule (CIRKD / MasKD / DIST_KD on Cityscapes): a polynomial decay over a run
given in optimizer steps (``trainer.max_steps``), stepped every iteration, without warm-up.

:class:`WarmupMultiStepLR` is the detection schedule (MMDetection's 1×/2×): linear warm-up over iterations, then ×γ
at epoch milestones.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["EpochWarmupScheduler", "PolyLR", "WarmupCosineLR", "WarmupMultiStepLR", "WarmupStepLR"]


class EpochWarmupScheduler(LRScheduler):
    """Base of the per-iteration schedules: linear warm-up, then :meth:`decay` (see the module docstring).

    Args:
        optimizer: the wrapped optimizer; each group's ``initial_lr`` (else ``lr``) is its base lr.
        steps_per_epoch: optimizer steps per epoch (> 0); ``None`` is an error — the LightningModule fills it.
        warmup_epochs: length of the linear warm-up, in epochs (may be fractional; 0 = none).
        warmup_lr: the learning rate at step 0 of the warm-up (absolute, the same for every group).
        last_epoch: the index of the last step taken (−1 = a fresh start), as in every torch scheduler.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        steps_per_epoch: float | None = None,
        warmup_epochs: float = 0.0,
        warmup_lr: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        if steps_per_epoch is None or steps_per_epoch <= 0:
            raise ValueError(
                f"{type(self).__name__} needs steps_per_epoch > 0 (got {steps_per_epoch}); DistillationModule "
                "passes it when the config leaves it null"
            )
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
        self.steps_per_epoch = float(steps_per_epoch)
        self.warmup_epochs = float(warmup_epochs)
        self.warmup_lr = float(warmup_lr)
        super().__init__(optimizer, last_epoch)

    def epoch_at(self, step: int) -> float:
        """Training progress in epochs after ``step`` optimizer steps."""
        return step / self.steps_per_epoch

    def decay(self, base_lr: float, epochs: float) -> float:
        """The learning rate ``epochs`` (≥ 0) after the end of the warm-up."""
        raise NotImplementedError

    def lr_at(self, base_lr: float, step: int) -> float:
        """The learning rate of a group with base lr ``base_lr`` at optimizer step ``step``."""
        e = self.epoch_at(max(step, 0))
        if e < self.warmup_epochs:
            return self.warmup_lr + (base_lr - self.warmup_lr) * e / self.warmup_epochs
        return self.decay(base_lr, e - self.warmup_epochs)

    def get_lr(self) -> list[float]:
        return [self.lr_at(base, self.last_epoch) for base in self.base_lrs]

    def _get_closed_form_lr(self) -> list[float]:
        return self.get_lr()


class WarmupStepLR(EpochWarmupScheduler):
    """Step decay every ``decay_epochs`` (fractional) epochs by ``decay_rate``, after a linear warm-up.

    ``lr = base_lr · decay_rate ** floor((e − warmup_epochs) / decay_epochs)`` for ``e ≥ warmup_epochs``;
    recipe B2: ``decay_epochs=2.4, decay_rate=0.97, warmup_epochs=3, warmup_lr=1e-6`` (the official
    ``StepLR(step_size=2.4 · iters_per_epoch)`` stepped every iteration).

    Args:
        optimizer, steps_per_epoch, warmup_epochs, warmup_lr, last_epoch: see :class:`EpochWarmupScheduler`.
        decay_epochs: epochs between two decays (> 0).
        decay_rate: multiplicative factor of each decay.
        min_lr: floor of the decayed learning rate (0 = none; the official B2 config's ``min_lr`` is unused by
            its step schedule).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        decay_epochs: float,
        decay_rate: float,
        steps_per_epoch: float | None = None,
        warmup_epochs: float = 0.0,
        warmup_lr: float = 0.0,
        min_lr: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        if decay_epochs <= 0:
            raise ValueError(f"decay_epochs must be > 0, got {decay_epochs}")
        self.decay_epochs = float(decay_epochs)
        self.decay_rate = float(decay_rate)
        self.min_lr = float(min_lr)
        super().__init__(optimizer, steps_per_epoch, warmup_epochs, warmup_lr, last_epoch)

    def decay(self, base_lr: float, epochs: float) -> float:
        # 1e-9: a step landing on a boundary in exact arithmetic (2.4 · 10 / 10 steps) must not fall short of it
        k = math.floor(epochs / self.decay_epochs + 1e-9)
        return max(base_lr * self.decay_rate**k, self.min_lr)


class WarmupCosineLR(EpochWarmupScheduler):
    """Cosine from the base lr to ``min_lr`` over the steps after a linear warm-up.

    ``lr = min_lr + (base_lr − min_lr) · (1 + cos(π · (e − w) / (E − w))) / 2`` for ``w ≤ e ≤ E``, ``min_lr``
    afterwards, with ``E = total_steps / steps_per_epoch`` (or ``max_epochs``) — the official
    ``CosineAnnealingLR(T_max = total_steps − warmup_steps, eta_min=min_lr)`` stepped every iteration. Recipe B3:
    ``warmup_epochs=20, warmup_lr=5e-7, min_lr=5e-6``.

    Args:
        optimizer, steps_per_epoch, warmup_epochs, warmup_lr, last_epoch: see :class:`EpochWarmupScheduler`.
        total_steps: optimizer steps of the whole run (the LightningModule passes the trainer's
            ``estimated_stepping_batches`` when this and ``max_epochs`` are ``None``).
        max_epochs: the run's length in epochs, instead of ``total_steps``.
        min_lr: the final learning rate.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        steps_per_epoch: float | None = None,
        total_steps: int | None = None,
        max_epochs: float | None = None,
        warmup_epochs: float = 0.0,
        warmup_lr: float = 0.0,
        min_lr: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        if steps_per_epoch and total_steps is None and max_epochs is None:
            raise ValueError("WarmupCosineLR needs total_steps or max_epochs")
        self.min_lr = float(min_lr)
        if max_epochs is None and total_steps is not None and steps_per_epoch:
            max_epochs = total_steps / float(steps_per_epoch)
        self.max_epochs = float(max_epochs) if max_epochs is not None else 0.0
        super().__init__(optimizer, steps_per_epoch, warmup_epochs, warmup_lr, last_epoch)

    def decay(self, base_lr: float, epochs: float) -> float:
        span = self.max_epochs - self.warmup_epochs
        if span <= 0:
            return self.min_lr
        progress = min(epochs / span, 1.0)
        return self.min_lr + (base_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


class PolyLR(LRScheduler):
    """Polynomial decay over a fixed number of optimizer steps, stepped every iteration (segmentation's "poly").

    ``lr_k = min_lr + (base_lr − min_lr) · (1 − min(k, T) / T) ** power`` at optimizer step ``k`` (0 = the first
    step) of ``T = total_steps``. ``min_lr=0`` is CIRKD's ``adjust_lr`` (``base · (1 − it/max) ** 0.9`` with
    ``it = iteration − 1``); ``min_lr=1e-4`` is DIST_KD's and MasKD's (a floor of 1e-4). Past ``T`` the rate stays
    at ``min_lr``. Use with ``optim.scheduler_interval: step``.

    Args:
        optimizer: the wrapped optimizer; each group's ``initial_lr`` (else ``lr``) is its base lr.
        total_steps: ``T``, optimizer steps of the whole run (> 0); the Cityscapes configs interpolate
            ``${trainer.max_steps}``.
        power: the exponent (0.9 everywhere in CIRKD / MasKD / DIST_KD).
        min_lr: the floor, absolute and the same for every group.
        last_epoch: the index of the last step taken (−1 = a fresh start), as in every torch scheduler.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int | None = None,
        power: float = 0.9,
        min_lr: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        if total_steps is None or total_steps <= 0:
            raise ValueError(
                f"PolyLR needs total_steps > 0 (got {total_steps}); set optim.scheduler.total_steps or "
                "trainer.max_steps (the Cityscapes configs interpolate it)"
            )
        self.total_steps = int(total_steps)
        self.power = float(power)
        self.min_lr = float(min_lr)
        super().__init__(optimizer, last_epoch)

    def lr_at(self, base_lr: float, step: int) -> float:
        """The learning rate of a group with base lr ``base_lr`` at optimizer step ``step``."""
        remaining = 1.0 - min(max(step, 0), self.total_steps) / self.total_steps
        return self.min_lr + (base_lr - self.min_lr) * remaining**self.power

    def get_lr(self) -> list[float]:
        return [self.lr_at(base, self.last_epoch) for base in self.base_lrs]

    def _get_closed_form_lr(self) -> list[float]:
        return self.get_lr()


class WarmupMultiStepLR(LRScheduler):
    """MMDetection's detection schedule, stepped every iteration: linear warm-up over ``warmup_steps`` iterations
    from ``warmup_ratio × lr``, and ×``gamma`` at each epoch milestone.

    ``lr(step) = base · gamma^#{m ∈ milestones : e ≥ m} · w(step)``, ``e = step / steps_per_epoch``, with
    ``w = 1 − (1 − step / warmup_steps)(1 − warmup_ratio)`` during the warm-up and 1 after (MMDetection's
    ``warmup='linear'``; its ``schedule_2x``: 500 iterations, ratio 0.001, milestones 16 and 22 of 24 epochs), or
    ``w = warmup_ratio`` with ``warmup="constant"`` (MMDetection's FCOS configs: ``ConstantLR`` factor 1/3, 500
    iterations).
    torchvision's references warm up the same way over ``min(1000, epoch length)`` iterations. Use it with
    ``optim.scheduler_interval: step``; :class:`~diffkd.tasks.DistillationModule` fills ``steps_per_epoch``.

    Args:
        optimizer: the wrapped optimizer.
        milestones: epochs at which the learning rate is multiplied by ``gamma``.
        gamma: the decay factor.
        warmup_steps: length of the warm-up in optimizer steps (0: none).
        warmup_ratio: the warm-up's starting fraction of the learning rate.
        warmup: ``"linear"`` (from ``warmup_ratio`` up to 1) or ``"constant"`` (``warmup_ratio`` throughout).
        steps_per_epoch: optimizer steps per epoch (> 0).
        last_epoch: the index of the last step taken (−1: a fresh start).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        milestones: Sequence[float],
        gamma: float = 0.1,
        warmup_steps: int = 500,
        warmup_ratio: float = 0.001,
        steps_per_epoch: float | None = None,
        last_epoch: int = -1,
        warmup: str = "linear",
    ) -> None:
        if warmup not in ("linear", "constant"):
            raise ValueError(f"warmup={warmup!r}; choose linear or constant")
        self.warmup = warmup
        if steps_per_epoch is None or steps_per_epoch <= 0:
            raise ValueError(
                f"WarmupMultiStepLR needs steps_per_epoch > 0 (got {steps_per_epoch}); DistillationModule passes it "
                "when the config leaves it null"
            )
        if list(milestones) != sorted(milestones):
            raise ValueError(f"milestones must be increasing, got {list(milestones)}")
        self.milestones = [float(m) for m in milestones]
        self.gamma = float(gamma)
        self.warmup_steps = int(warmup_steps)
        self.warmup_ratio = float(warmup_ratio)
        self.steps_per_epoch = float(steps_per_epoch)
        super().__init__(optimizer, last_epoch)

    def factor_at(self, step: int) -> float:
        """The learning-rate multiplier after ``step`` optimizer steps."""
        step = max(step, 0)
        # 1e-9: a step landing on an epoch boundary in exact arithmetic must not fall short of it
        decays = bisect.bisect_right(self.milestones, step / self.steps_per_epoch + 1e-9)
        factor = self.gamma**decays
        if step < self.warmup_steps:
            if self.warmup == "constant":
                factor *= self.warmup_ratio
            else:
                factor *= 1.0 - (1.0 - step / self.warmup_steps) * (1.0 - self.warmup_ratio)
        return factor

    def get_lr(self) -> list[float]:
        factor = self.factor_at(self.last_epoch)
        return [base * factor for base in self.base_lrs]

    def _get_closed_form_lr(self) -> list[float]:
        return self.get_lr()
