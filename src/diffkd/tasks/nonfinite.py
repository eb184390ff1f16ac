"""The non-finite guard: a loss term, a parameter or the validation loss that turns NaN/inf stops the run, naming
what went bad first and at which step, before any checkpoint of the bad weights is written — without a host sync
in the training step.

Loss-term flags accumulate on the device (one ``isfinite`` over the stacked scalar terms per step, and the first
bad step of each term) and are read every ``check_every`` steps; parameters are checked (one max-abs per tensor,
one sync) before validation, at the end of each epoch and before every checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

__all__ = ["NonFiniteGuard", "NonFiniteLossError"]

_ADVICE = (
    "Training stopped and no checkpoint of these weights was written; the last good checkpoint is {last}. Try a lower "
    "learning rate, gradient clipping (trainer.gradient_clip_val=5) or check the inputs."
)


class NonFiniteLossError(RuntimeError):
    """A loss term, a parameter or the validation loss became NaN or infinite; training stops without writing a
    checkpoint of the bad weights."""


class NonFiniteGuard:
    """Device-side flags of the loss terms seen since the last check.

    Args:
        check_every: read the flags every N steps (1 = every step).
    """

    def __init__(self, check_every: int = 50) -> None:
        self.check_every = max(1, int(check_every))
        self.names: list[str] = []
        self.first_bad: Tensor | None = None  # (T,) int64: the first step each term was non-finite, -1 if never
        self.steps_since_check = 0

    def track(self, terms: dict[str, Tensor], step: int, where: str = "") -> None:
        """Add step ``step``'s terms (``{name: tensor}``)."""
        if list(terms) != self.names:
            self.check(where)  # a new term set: settle the old flags first
            self.names, self.first_bad = list(terms), None
        values = [v.detach() for v in terms.values()]
        if all(v.dim() == 0 for v in values):  # the usual case: one isfinite over all terms, a handful of kernels
            bad = ~torch.isfinite(torch.stack([v.float() for v in values]))
        else:
            bad = torch.stack([~torch.isfinite(v).all() for v in values])
        if self.first_bad is None:
            self.first_bad = torch.full(bad.shape, -1, dtype=torch.long, device=bad.device)
        self.first_bad = torch.where(bad & (self.first_bad < 0), step, self.first_bad)

    def step_done(self, last_good: str) -> None:
        self.steps_since_check += 1
        if self.steps_since_check >= self.check_every:
            self.check(last_good=last_good)

    def check(self, where: str = "", last_good: str = "none yet") -> None:
        """Read the flags (one host sync) and raise :class:`NonFiniteLossError` naming the terms that went bad
        first, and the step."""
        if self.first_bad is None:
            return
        first = self.first_bad.tolist()
        self.first_bad = None
        self.steps_since_check = 0
        bad = {n: s for n, s in zip(self.names, first) if s >= 0}
        if bad:
            step = min(bad.values())
            firsts = [n for n, s in bad.items() if s == step]
            later = [n for n, s in bad.items() if s != step]
            also = f" ({', '.join(later)} followed)" if later else ""
            raise NonFiniteLossError(
                f"loss term(s) {', '.join(firsts)} became NaN/inf first, at global step {step}{also}. "
                + _ADVICE.format(last=last_good)
            )

    @staticmethod
    def check_parameters(named: Iterable[tuple[str, nn.Parameter]], where: str, last_good: str) -> None:
        """Raise when a parameter holds NaN/inf (one max-abs per tensor, one sync)."""
        named = [(n, p) for n, p in named if p.is_floating_point()]
        if not named:
            return
        norms = torch._foreach_norm([p.detach() for _, p in named], float("inf"))
        bad = ~torch.isfinite(torch.stack([n.float() for n in norms]))
        if bool(bad.any()):
            names = [n for (n, _), b in zip(named, bad.tolist()) if b]
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            raise NonFiniteLossError(
                f"parameter(s) {shown} became NaN/inf {where}: the last optimizer step blew the weights up. "
                + _ADVICE.format(last=last_good)
            )

    @staticmethod
    def check_value(name: str, value: Tensor, where: str, last_good: str) -> None:
        """Raise when a logged evaluation value (the validation loss) is NaN/inf."""
        if not bool(torch.isfinite(value.detach()).all()):
            raise NonFiniteLossError(
                f"{name} is {value.item()} {where}: the student's outputs are not finite, so its metrics mean "
                "nothing. " + _ADVICE.format(last=last_good)
            )
