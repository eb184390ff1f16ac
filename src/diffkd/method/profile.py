"""Size and cost of a distillation head: parameters and multiply-accumulates (MACs) per sample.

MACs are those of one **training** forward of the head for one sample, counted as in spec §B.7 ("MACs/iter"):
for a DiffKD point that is the student projection ``trans``, the autoencoder (encoder + decoder), the noise
adapter, ``N`` denoiser calls of the DDIM refinement plus one for the diffusion loss (6 with the official 5 steps)
and the output projection ``proj``. Only matrix products count (convolutions, linear layers, ``bmm``; one MAC =
two FLOPs of :class:`torch.utils.flop_counter.FlopCounterMode`); the timestep-embedding lookup, BatchNorm,
activations and the DDIM arithmetic are free — the convention that gives §B.7's ≈1.11 G for ResNet-34 → ResNet-18.

The count runs one forward of a single zero sample in eval mode under ``torch.no_grad`` (≈0.05 s for the
ResNet-34 → ResNet-18 feature head on a CPU core), restoring the training flags and the random-number generator
state afterwards, so profiling changes neither BatchNorm statistics nor the training run's random stream.
``fake=True`` counts on fake tensors instead (``FakeTensorMode``: no arithmetic and no activation memory, but
about a second of one-off set-up per process), falling back to the real forward where an op has no fake kernel.

>>> head = DiffKD(512, 512, use_ae=True, ae_channels=1024)      # ResNet-34 → ResNet-18, layer4
>>> p = profile_head(head, (512, 7, 7), (512, 7, 7))
>>> p.params, round(p.macs / 1e9, 2)
(7644418, 1.11)
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from diffkd.method.head import DiffKD

__all__ = [
    "HeadProfile",
    "count_parameters",
    "diffkd_head_profile",
    "format_count",
    "profile_head",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeadProfile:
    """What a head costs.

    Attributes:
        params: number of parameters (conv/linear weights and biases, BatchNorm affine weights, the embedding;
            BatchNorm running statistics are buffers and do not count).
        macs: multiply-accumulates of one training forward for one sample (see the module docstring).
        macs_by_module: ``macs`` split by the head's direct children (``trans``, ``ae``, ``model``,
            ``noise_adapter``, ``proj`` for DiffKD); children without MACs are left out.
    """

    params: int
    macs: int
    macs_by_module: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{format_count(self.params)} params, {format_count(self.macs)} MACs/sample"


def format_count(n: float) -> str:
    """``7644418`` → ``"7.64M"``, ``1.1119e9`` → ``"1.11G"``, ``8300`` → ``"8.3k"``."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


def count_parameters(module: nn.Module) -> int:
    """Number of parameters of ``module`` (shared parameters counted once; buffers excluded)."""
    return sum(p.numel() for p in module.parameters())


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode for the duration (a single sample through BatchNorm on (1, C, 1, 1) logits fails in train mode;
    MACs are the same in both modes), restoring every submodule's own flag afterwards."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


def _device_of(module: nn.Module) -> torch.device:
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


def _count(head: nn.Module, inputs: Sequence[torch.Tensor]) -> FlopCounterMode:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        head(*inputs)
    return counter


def _child_macs(counter: FlopCounterMode, head: nn.Module) -> dict[str, int]:
    """Per direct child: FlopCounterMode keys its table by ``<root class>.<child>[.…]``."""
    table = counter.get_flop_counts()
    root = type(head).__name__
    out: dict[str, int] = {}
    for name, _ in head.named_children():
        flops = sum(table.get(f"{root}.{name}", {}).values())
        if flops:
            out[name] = int(flops) // 2
    return out


def profile_head(
    head: nn.Module,
    student_shape: Sequence[int],
    teacher_shape: Sequence[int] | None = None,
    *,
    fake: bool = False,
) -> HeadProfile:
    """Parameters and per-sample training MACs of a distillation head.

    Args:
        head: a :class:`~diffkd.method.DiffKD` (called as ``head(student, teacher)``) or any single-input head
            (``head(student)``, e.g. a FitNet 1×1 adapter).
        student_shape: one student sample as the head receives it, without the batch dimension: (C_s, H, W)
            for maps, (C_s,) for vectors such as logits (any layout the head accepts, e.g. (H, W, C)).
        teacher_shape: one teacher sample, same conventions (DiffKD only; default: ``student_shape``).
        fake: count on fake tensors (no compute) instead of one real single-sample forward.

    Returns:
        :class:`HeadProfile`. The head's training flags, BatchNorm statistics and the RNG are left as they were.
    """
    params = count_parameters(head)
    device = _device_of(head)
    dtype = next((p.dtype for p in head.parameters() if p.is_floating_point()), torch.float32)
    shapes = [tuple(student_shape)]
    if isinstance(head, DiffKD):
        shapes.append(tuple(teacher_shape if teacher_shape is not None else student_shape))

    def make_inputs() -> list[torch.Tensor]:
        return [torch.zeros((1, *s), device=device, dtype=dtype) for s in shapes]

    counter = None
    with _eval_mode(head):
        if fake:
            from torch._subclasses.fake_tensor import FakeTensorMode

            try:
                with FakeTensorMode(allow_non_fake_inputs=True):
                    counter = _count(head, make_inputs())
            except Exception as err:  # an op without a fake implementation: count for real instead
                log.debug(
                    "fake-tensor MAC count failed (%s: %s); counting with a real forward", type(err).__name__, err
                )
                counter = None
        if counter is None:
            devices = [device] if device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                counter = _count(head, make_inputs())
    return HeadProfile(params, int(counter.get_total_flops()) // 2, _child_macs(counter, head))


def diffkd_head_profile(
    student_channels: int,
    teacher_channels: int,
    spatial: tuple[int, int] = (7, 7),
    *,
    fake: bool = True,
    **head_kwargs: Any,
) -> HeadProfile:
    """Profile of a freshly built :class:`~diffkd.method.DiffKD` head (on the CPU) for the given point.

    Args:
        student_channels, teacher_channels: C_s and C_t.
        spatial: (H, W) of the point; (1, 1) for logits (``kernel_size=1`` is then the default).
        fake: count on fake tensors (default here: the 4 G-MAC heads of §B.7 take seconds for real on a CPU).
        **head_kwargs: passed to ``DiffKD`` (``use_ae``, ``ae_channels``, ``inference_steps``, ...).

    Example — spec §B.7, ResNet-34 → ResNet-18 logits: ``diffkd_head_profile(1000, 1000, (1, 1))`` gives
    23,323,002 parameters and ≈0.10 G MACs.
    """
    h, w = spatial
    head_kwargs.setdefault("kernel_size", 1 if (h, w) == (1, 1) else 3)
    head = DiffKD(student_channels, teacher_channels, **head_kwargs)
    return profile_head(head, (student_channels, h, w), (teacher_channels, h, w), fake=fake)
