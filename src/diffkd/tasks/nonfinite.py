"""The non-finite guard: loss terms that turn NaN/inf stop the run, naming the term, before any checkpoint of the
bad weights is written — without a host sync in the training step.

Flags accumulate on the device (one ``isfinite`` over the stacked scalar terms per step) and are read every
``check_every`` steps and before validation and checkpoints.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["NonFiniteGuard", "NonFiniteLossError"]


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or infinite; training stops without writing a checkpoint of the bad weights."""


class NonFiniteGuard:
    """Device-side flags of the loss terms seen since the last check.

    Args:
        check_every: read the flags every N steps (1 = every step).
    """

    def __init__(self, check_every: int = 50) -> None:
        self.check_every = max(1, int(check_every))
        self.names: list[str] = []
        self.flags: Tensor | None = None
        self.steps_since_check = 0

    def track(self, terms: dict[str, Tensor], where: str) -> None:
        """Add this step's terms (``{name: tensor}``); ``where`` describes the step for a settle-first error."""
        if list(terms) != self.names:
            self.check(where)  # a new term set: settle the old flags first
            self.names, self.flags = list(terms), None
        values = [v.detach() for v in terms.values()]
        if all(v.dim() == 0 for v in values):  # the usual case: one isfinite over all terms, a handful of kernels
            bad = ~torch.isfinite(torch.stack([v.float() for v in values]))
        else:
            bad = torch.stack([~torch.isfinite(v).all() for v in values])
        self.flags = bad if self.flags is None else self.flags | bad

    def step_done(self, where: str, last_good: str) -> None:
        self.steps_since_check += 1
        if self.steps_since_check >= self.check_every:
            self.check(where, last_good)

    def check(self, where: str, last_good: str = "none yet") -> None:
        """Read the flags (one host sync) and raise :class:`NonFiniteLossError` naming the bad terms."""
        if self.flags is None:
            return
        flags = self.flags.tolist()
        self.flags = None
        self.steps_since_check = 0
        bad = [n for n, f in zip(self.names, flags) if f]
        if bad:
            raise NonFiniteLossError(
                f"loss term(s) {', '.join(bad)} became NaN/inf by {where}. Training stopped and no checkpoint of "
                f"these weights was written; the last good checkpoint is {last_good}. Try a lower learning rate, "
                "gradient clipping (trainer.gradient_clip_val=5) or check the inputs."
            )
