"""Exponential moving average (EMA) of the student's weights — recipe B2 (decay 0.9999, spec §D.2).

After every optimizer step ``ema ← decay · ema + (1 − decay) · w`` for each floating-point parameter and buffer of
the student (BatchNorm running statistics included, as timm's ``ModelEma`` that the official code uses does);
integer buffers (``num_batches_tracked``) are not averaged. The update is one ``torch._foreach_lerp_`` on the
device: no host synchronisation, no copy to the CPU.

Validation (and testing) runs with the EMA weights swapped in when ``evaluate=True`` — the official code
validates both the model and its EMA and keeps checkpoints by the EMA's top-1, so ``val/acc`` (and the
checkpoint selection that monitors it) refers to the EMA. The live weights are copied back afterwards.

The EMA is saved in every checkpoint (``checkpoint["callbacks"]["EMA{...}"]["state"]``: the student's
``state_dict`` names → tensors) and restored on resume (``ckpt_path=...``) and by ``trainer.test(ckpt_path=...)``.
``python -m diffkd.evaluate <ckpt> --ema`` evaluates these weights.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

__all__ = ["EMA", "ema_state_from_checkpoint"]

log = logging.getLogger(__name__)


class EMA(L.Callback):
    """EMA of ``pl_module.<attribute>`` (the student), updated after each optimizer step.

    Args:
        decay: the EMA decay (B2: 0.9999); the update is ``ema = decay · ema + (1 − decay) · weights``.
        evaluate: validate and test with the EMA weights (swapped in at the start, out at the end).
        attribute: the LightningModule attribute holding the averaged network (``"student"``); ``""`` averages
            the whole LightningModule.
        every_n_steps: update every N optimizer steps (1 = every step, as the official code).
        start_step: optimizer steps before the first update (until then the EMA copies the weights).

    Attributes:
        num_updates: EMA updates made so far (restored on resume).
    """

    def __init__(
        self,
        decay: float = 0.9999,
        evaluate: bool = True,
        attribute: str = "student",
        every_n_steps: int = 1,
        start_step: int = 0,
    ) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.decay = float(decay)
        self.evaluate = evaluate
        self.attribute = attribute
        self.every_n_steps = int(every_n_steps)
        self.start_step = int(start_step)
        self.num_updates = 0
        self._names: list[str] = []
        self._live: list[Tensor] = []  # the network's floating-point parameters and buffers (same order as names)
        self._ema: list[Tensor] | None = None
        self._backup: list[Tensor] | None = None
        self._pending: dict[str, Tensor] | None = None  # loaded from a checkpoint before the tensors exist
        self._fused: tuple[list[Tensor], list[Tensor]] = ([], [])
        self._mixed: list[tuple[Tensor, Tensor]] = []
        self._last_step = -1
        self._swapped = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(attribute=self.attribute)

    # ------------------------------------------------------------------ tensors
    def network(self, pl_module: L.LightningModule) -> nn.Module:
        """The averaged network."""
        return getattr(pl_module, self.attribute) if self.attribute else pl_module

    def _refresh_live(self, pl_module: L.LightningModule) -> None:
        """(Re)collect the network's floating-point tensors: ``Module.to`` replaces buffers (and parameter data),
        so the list is renewed at every fit/epoch/evaluation start rather than kept from the first call."""
        state = self.network(pl_module).state_dict(keep_vars=True)
        names = [k for k, v in state.items() if torch.is_floating_point(v)]
        if self._names and names != self._names:
            raise RuntimeError("the averaged network's tensors changed since the EMA was created")
        self._names = names
        self._live = [state[k].detach() for k in names]
        self._group()

    def _group(self) -> None:
        """Pair EMA and live tensors: same dtype for the fused update, the rest (fp32 EMA of fp16/bf16) one by one."""
        if self._ema is None:
            return
        pairs = list(zip(self._ema, self._live))
        self._fused = ([e for e, w in pairs if e.dtype == w.dtype], [w for e, w in pairs if e.dtype == w.dtype])
        self._mixed = [(e, w) for e, w in pairs if e.dtype != w.dtype]

    def _ensure(self, pl_module: L.LightningModule) -> None:
        """Create the EMA tensors (a copy of the live ones, on their device), then apply a pending checkpoint."""
        if self._ema is None:
            self._refresh_live(pl_module)
            low = (torch.float16, torch.bfloat16)  # average low-precision weights in fp32
            self._ema = [t.clone() if t.dtype not in low else t.float() for t in self._live]
            self._group()
        if self._pending is not None:
            self._load(self._pending)
            self._pending = None

    def _load(self, state: dict[str, Tensor]) -> None:
        assert self._ema is not None
        missing = [k for k in self._names if k not in state]
        if missing:
            raise KeyError(f"the checkpoint's EMA state lacks {missing[:5]} ({len(missing)} tensors)")
        for name, dst in zip(self._names, self._ema):
            dst.copy_(state[name])

    @torch.no_grad()
    def update(self) -> None:
        """``ema ← decay · ema + (1 − decay) · live`` for every tensor (one fused op per dtype group)."""
        assert self._ema is not None
        weight = 1.0 - self.decay
        ema, live = self._fused
        if ema:
            torch._foreach_lerp_(ema, live, weight)
        for e, w in self._mixed:
            e.lerp_(w.to(e.dtype), weight)
        self.num_updates += 1

    def ema_state_dict(self) -> dict[str, Tensor]:
        """``{state_dict name: EMA tensor}`` of the averaged network's floating-point entries."""
        return dict(zip(self._names, self._ema or []))

    # ------------------------------------------------------------------ training
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._ensure(pl_module)
        rank_zero_info(f"EMA of the {self.attribute or 'module'}: decay {self.decay}, {len(self._names)} tensors")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step  # after a resume restored it

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._ensure(pl_module)
        self._refresh_live(pl_module)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step  # a Python int: no device sync
        if step == self._last_step:  # gradient accumulation: no optimizer step on this batch
            return
        self._ensure(pl_module)
        self._last_step = step
        assert self._ema is not None
        if step <= self.start_step:
            torch._foreach_copy_(self._ema, self._live)
        elif step % self.every_n_steps == 0:
            self.update()

    # ------------------------------------------------------------------ evaluation with the EMA weights
    def _swap_in(self, pl_module: L.LightningModule) -> None:
        if not self.evaluate or self._swapped:
            return
        self._ensure(pl_module)
        self._refresh_live(pl_module)
        assert self._ema is not None
        if self._backup is None:
            self._backup = [t.clone() for t in self._live]
        else:
            torch._foreach_copy_(self._backup, self._live)
        with torch.no_grad():
            torch._foreach_copy_(self._live, self._ema)
        self._swapped = True

    def _swap_out(self) -> None:
        if not self._swapped:
            return
        assert self._backup is not None
        with torch.no_grad():
            torch._foreach_copy_(self._live, self._backup)
        self._swapped = False

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swap_in(pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swap_out()

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swap_in(pl_module)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swap_out()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._swap_out()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        state = self.ema_state_dict() if self._pending is None else self._pending
        return {"decay": self.decay, "num_updates": self.num_updates, "state": dict(state)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.num_updates = int(state_dict.get("num_updates", 0))
        state = state_dict.get("state") or {}
        if not state:
            log.warning("the checkpoint's EMA state is empty; the EMA starts from the current weights")
            return
        if self._ema is not None:
            self._load(state)
        else:
            self._pending = dict(state)  # applied once the network's tensors exist (on their device)
        log.info("EMA restored from the checkpoint (%d updates)", self.num_updates)


def ema_state_from_checkpoint(checkpoint: dict[str, Any], attribute: str = "student") -> dict[str, Tensor] | None:
    """The EMA weights an :class:`EMA` callback saved in a Lightning checkpoint (student ``state_dict`` names →
    tensors), or ``None`` when it holds none."""
    key = EMA(attribute=attribute).state_key
    value = (checkpoint.get("callbacks") or {}).get(key)
    return dict(value["state"]) if isinstance(value, dict) and value.get("state") else None
