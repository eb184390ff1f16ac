"""The official DiffKD implementation's training step, timed on the same machine as ours (``diffkd.bench``).

The official code (https://github.com/hunto/DiffKD: ``diffkd.py``, ``diffkd_modules.py``, ``scheduling_ddim.py``) is
not part of this package; ``python -m diffkd.bench --official-dir <checkout> --methods official_kd,official_diffkd``
imports it from a local clone. Its training loop lives in another repository (``image_classification_sota``:
``kd_loss.py`` and ``tools/train.py``), so this module re-creates that loop's per-step work from the spec (§A.3, §C.2,
§F.3): forward hooks on the named modules, the teacher in eval mode under ``torch.no_grad()``, ``_reshape_BCHW``, one
official ``DiffKD`` per point (feature: kernel 3, MSE; logits: kernel 1, KL at τ = 1), the loss
``CE + Σ_points (L_diff + [L_ae] + L_kd)``, ``p.grad = None``, backward and an SGD step. ``official_kd`` is the same
loop with the KL(τ = 4) logits loss instead. Under ``bf16`` the step runs in ``torch.autocast`` (the official ``--amp``
path), where the official scheduler casts ᾱ to the autocast dtype (spec §F.2 item 3); whether the last loss was
finite is reported.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["OFFICIAL_METHODS", "bench_official_step", "load_official_diffkd"]

OFFICIAL_METHODS = ("official_kd", "official_diffkd")
_OFFICIAL_FILES = ("diffkd.py", "diffkd_modules.py", "scheduling_ddim.py")


def load_official_diffkd(official_dir: str | Path) -> type[nn.Module]:
    """The ``DiffKD`` class of a local clone of hunto/DiffKD, imported under a private module name.

    Its ``diffkd.py`` would shadow this package, so it is loaded from its file as ``_official_diffkd``; its own
    imports (``diffkd_modules``, ``scheduling_ddim``) resolve from ``official_dir``.
    """
    root = Path(official_dir).expanduser().resolve()
    missing = [name for name in _OFFICIAL_FILES if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"--official-dir {root} lacks {', '.join(missing)}; expected a clone of the official code: "
            "git clone https://github.com/hunto/DiffKD <dir> and pass --official-dir <dir>"
        )
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    spec = importlib.util.spec_from_file_location("_official_diffkd", root / "diffkd.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module.DiffKD


def _reshape_bchw(x: torch.Tensor) -> torch.Tensor:
    """(B, C) → (B, C, 1, 1); (B, N, C) tokens → (B, C, √N, √N); 4-D unchanged (official semantics)."""
    if x.dim() == 2:
        return x.view(x.shape[0], x.shape[1], 1, 1)
    if x.dim() == 3:
        b, n, c = x.shape
        side = int(n**0.5)
        return x.transpose(-2, -1).reshape(b, c, side, side)
    return x


def _kl(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """Official ``KLDivergence``: τ² · KL(softmax(t/τ) ‖ softmax(s/τ)), batchmean, teacher detached."""
    log_q = F.log_softmax(student / tau, dim=1)
    p = F.softmax(teacher.detach() / tau, dim=1)
    return F.kl_div(log_q, p, reduction="batchmean") * tau**2


class _Hooked:
    """Stores each named module's output the way the official hook does (``output[0] if len(output) == 1``)."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self.out: dict[str, Any] = {}
        modules = dict(model.named_modules())
        for name in names:
            modules[name].register_forward_hook(self._hook(name))

    def _hook(self, name: str):
        def hook(module, inputs, output):
            self.out[name] = output[0] if len(output) == 1 else output

        return hook


def bench_official_step(
    official_dir: str | Path,
    pair: dict[str, Any],
    method: str,
    precision: str,
    device: str,
    steps: int,
    warmup: int,
    batch: int,
    use_ae: bool,
) -> tuple[float, float | None, bool, int | None]:
    """Seconds per official-style training step, CUDA peak MB (or None), whether the last loss was finite, and
    the matmul/conv FLOPs of one step (forward + backward; counted in the first warm-up step, or None without one).

    The pair gives ``official_points``, the (feature, logits) module names of the official ``KD_MODULES`` table (the
    same names on student and teacher for the pairs benchmarked here), and ``official_channels``, the (student,
    teacher) feature widths.
    """
    from diffkd.models import create_model

    if method not in OFFICIAL_METHODS:
        raise ValueError(f"unknown official method {method!r}; choose from {OFFICIAL_METHODS}")
    points, channels = pair["official_points"], pair["official_channels"]
    dev = torch.device(device)
    torch.manual_seed(0)
    student = create_model(pair["student"], num_classes=pair["classes"]).to(dev)
    teacher = create_model(pair["teacher"], num_classes=pair["classes"]).to(dev).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    names = list(points) if method == "official_diffkd" else [points[1]]
    s_hooks, t_hooks = _Hooked(student, names), _Hooked(teacher, names)
    if method == "official_diffkd":
        official = load_official_diffkd(official_dir)
        student._diff = nn.ModuleDict(  # official: the DiffKD modules are a child of the student (spec §A.5)
            {
                points[0]: official(channels[0], channels[1], kernel_size=3, use_ae=use_ae, ae_channels=1024),
                points[1]: official(pair["classes"], pair["classes"], kernel_size=1),
            }
        ).to(dev)
    student.train()
    params = list(student.parameters())
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(batch, 3, pair["size"], pair["size"], device=dev)
    y = torch.randint(0, pair["classes"], (batch,), device=dev)

    def loss_fn() -> torch.Tensor:
        logits = student(x)
        with torch.no_grad():
            teacher(x)
        ce = F.cross_entropy(logits, y)
        if method == "official_kd":
            return 0.1 * ce + 0.9 * _kl(s_hooks.out[points[1]], t_hooks.out[points[1]], tau=4.0)
        kd = 0.0
        for i, name in enumerate(names):
            s, t = _reshape_bchw(s_hooks.out[name]), _reshape_bchw(t_hooks.out[name])
            refined, ddim_loss, t_latent, rec_loss = student._diff[name](s, t)
            kd = kd + ddim_loss + (rec_loss if rec_loss is not None else 0.0)
            kd = kd + (F.mse_loss(refined, t_latent) if i == 0 else _kl(refined, t_latent, tau=1.0))
        return ce + kd

    def step() -> torch.Tensor:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = loss_fn()
        for p in params:
            p.grad = None
        loss.backward()
        opt.step()
        return loss.detach()

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    flops = None
    for i in range(warmup):
        if i == 0:
            with FlopCounterMode(display=False) as counter:
                step()
            flops = counter.get_total_flops()
        else:
            step()
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    start = time.perf_counter()
    for _ in range(steps):
        last = step()
    sync()
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None
    return seconds, peak, bool(torch.isfinite(last).item()), flops
