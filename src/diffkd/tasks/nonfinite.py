"""The non-finite guard: a loss term, a parameter, a model output or the validation loss that turns NaN/inf stops
the run, naming what went bad first and at which step, before any checkpoint of the bad weights is written —
without a host sync in the training step.

Loss-term flags accumulate on the device (one ``isfinite`` over the stacked scalar terms per step, and the first
bad step of each term) and are read every ``check_every`` steps; parameters are checked (one max-abs per tensor,
one sync) before validation, at the end of each epoch and before every checkpoint. :class:`OutputWatch` flags, on
the device, the watched modules whose outputs hold NaN/inf — weights can stay finite (1e37) while the outputs they
give overflow. Under DDP every read is reduced over the ranks, so that all ranks stop together.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["ADVICE", "NonFiniteGuard", "NonFiniteLossError", "OutputWatch", "any_rank"]

ADVICE = (
    "Training stopped and no checkpoint of these weights was written; the last good checkpoint is {last}. Try a lower "
    "learning rate, gradient clipping (trainer.gradient_clip_val=5) or check the inputs."
)


def any_rank(flags: Tensor, op: str = "max") -> Tensor:
    """``flags`` reduced over the DDP ranks (``max``: any rank's; ``min``), unchanged in a single process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flags = flags.clone()
        dist.all_reduce(flags, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.MIN)
    return flags


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

    def step_done(self, last_good: str | Callable[[], str]) -> None:
        """Count a finished step; every ``check_every`` steps, :meth:`check` (``last_good`` may be a callable, asked
        only when there is something to report: the training step does no file-system look-up)."""
        self.steps_since_check += 1
        if self.steps_since_check >= self.check_every:
            self.check(last_good=last_good)

    def check(self, where: str = "", last_good: str | Callable[[], str] = "none yet") -> None:
        """Read the flags (one host sync) and raise :class:`NonFiniteLossError` naming the terms that went bad
        first, and the step."""
        if self.first_bad is None:
            return
        never = torch.iinfo(torch.long).max  # -1 ("never") must lose the ranks' min
        merged = any_rank(torch.where(self.first_bad < 0, never, self.first_bad), op="min")
        first = torch.where(merged == never, -1, merged).tolist()
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
                + ADVICE.format(last=last_good() if callable(last_good) else last_good)
            )

    @staticmethod
    def check_parameters(named: Iterable[tuple[str, nn.Parameter]], where: str, last_good: str) -> None:
        """Raise when a parameter holds NaN/inf (one max-abs per tensor, one sync)."""
        named = [(n, p) for n, p in named if p.is_floating_point()]
        if not named:
            return
        norms = torch._foreach_norm([p.detach() for _, p in named], float("inf"))
        bad = any_rank((~torch.isfinite(torch.stack([n.float() for n in norms]))).int()).bool()
        if bool(bad.any()):
            names = [n for (n, _), b in zip(named, bad.tolist()) if b]
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            raise NonFiniteLossError(
                f"parameter(s) {shown} became NaN/inf {where}: the last optimizer step blew the weights up. "
                + ADVICE.format(last=last_good)
            )

    @staticmethod
    def check_value(name: str, value: Tensor, where: str, last_good: str) -> None:
        """Raise when an evaluation value (the validation loss, synchronised over the ranks) is NaN/inf."""
        if not bool(torch.isfinite(value.detach()).all()):
            raise NonFiniteLossError(
                f"{name} is {value.item()} {where}: the student's outputs are not finite, so its metrics mean "
                "nothing. " + ADVICE.format(last=last_good)
            )


def _floats(obj: Any) -> list[Tensor]:
    """The floating-point tensors of a nested output (tensors, tuples, lists, dicts, ImageLists...)."""
    if isinstance(obj, Tensor):
        return [obj] if obj.is_floating_point() else []
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in _floats(v)]
    if isinstance(obj, (tuple, list)):
        return [t for v in obj for t in _floats(v)]
    return []


class OutputWatch:
    """Forward hooks that flag, on the device, every watched module whose output held a NaN/inf.

    A detector's evaluation output cannot show it (torchvision drops NaN scores below its score threshold and clips
    infinite boxes: the mAP of blown weights reads 0.0, a plausible number), so the task watches its backbone and
    heads instead; classification and segmentation watch the student's logits.
    """

    def __init__(self) -> None:
        self.flags: dict[str, Tensor] = {}
        self._handles: list[RemovableHandle] = []

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def start(self, modules: Mapping[str, nn.Module]) -> None:
        """Watch ``{name: module}`` from now on (flags cleared)."""
        self.stop()
        self.flags = {}
        for name, module in modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name: str) -> Callable[[nn.Module, Any, Any], None]:
        def see(module: nn.Module, inputs: Any, output: Any) -> None:
            tensors = _floats(output)
            if not tensors:
                return
            bad = torch.stack([~torch.isfinite(t.detach()).all() for t in tensors]).any()
            self.flags[name] = bad if name not in self.flags else self.flags[name] | bad

        return see

    def stop(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def bad(self, names: Iterable[str], device: torch.device | str = "cpu") -> list[str]:
        """The watched ``names`` that produced a NaN/inf on any rank since :meth:`start` (one host sync; ``device``:
        the module's, where the ranks reduce — a rank that saw no batch has no flag of its own there)."""
        names = list(names)
        if not names:
            return []
        flags = torch.stack([self.flags.get(n, torch.zeros((), dtype=torch.bool, device=device)) for n in names])
        flags = any_rank(flags.int()).bool()
        return [n for n, f in zip(names, flags.tolist()) if f]
