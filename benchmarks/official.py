"""Development-only: the official DiffKD implementation's training step, timed beside ours by ``diffkd.bench``.

This file is not part of the installed ``diffkd`` package. ``python -m diffkd.bench --methods
...,official_kd,official_diffkd --official-dir <clone>`` loads it from the source checkout (``benchmarks/`` at the
repository root, or ``$DIFFKD_BENCHMARKS_DIR``), and it imports the official code (https://github.com/hunto/DiffKD:
``diffkd.py``, ``diffkd_modules.py``, ``scheduling_ddim.py``) from a local clone. Two layouts of that clone load:

- **root** — the files at the top of the clone, as up to commit ``5367f44`` (:data:`PINNED_COMMIT`, the one the docs
  pin): plain modules with absolute imports, ``DiffKD.forward`` returning ``(refined, L_diff, teacher, L_ae)``;
- **package** — the layout since ``904a465`` (the current head): the files moved into the ``classification`` git
  submodule (hunto/image_classification_sota) as the package ``lib/models/losses/diffkd`` with relative imports,
  ``DiffKD.forward`` returning ``(refined, teacher, L_diff, L_ae)``. It is imported on its own as a package under a
  private name (not through ``lib``, whose ``__init__`` files pull in the rest of that repository). A clone of
  image_classification_sota itself is accepted too.

The official training loop lives in image_classification_sota (``lib/models/losses/kd_loss.py`` and
``tools/train.py``), so this module re-creates that loop's per-step work from the spec (§A.3, §C.2, §F.3): forward
hooks on the named modules, the teacher in eval mode under ``torch.no_grad()``, ``_reshape_BCHW``, one official
``DiffKD`` per point (feature: kernel 3, MSE; logits: kernel 1, KL at τ = 1), the loss
``CE + Σ_points (L_diff + [L_ae] + L_kd)``, ``p.grad = None``, backward and an SGD step. ``official_kd`` is the same
loop with the KL(τ = 4) logits loss instead. Under ``bf16`` the step runs in ``torch.autocast`` (the official ``--amp``
path), where the official scheduler casts ᾱ to the autocast dtype (spec §F.2 item 3); whether the last loss was
finite is reported.
"""

from __future__ import annotations

import importlib.util
import itertools
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "CLONE_HINT",
    "OFFICIAL_METHODS",
    "PACKAGE_PATH",
    "PINNED_COMMIT",
    "SUBMODULE_PATH",
    "OfficialDiffKD",
    "bench_official_step",
    "find_official_code",
    "load_official_diffkd",
]

OFFICIAL_METHODS = ("official_kd", "official_diffkd")
OFFICIAL_REPO = "https://github.com/hunto/DiffKD"
# the last commit of hunto/DiffKD with the code at the root ("add results on res34-res18", 2023-06-11); the next one
# (904a465, "add classification implementation") moved it into the submodule
PINNED_COMMIT = "5367f445c2a9fcedd3ac75e99a925bcdd7e8a5fa"
SUBMODULE_PATH = "classification"  # hunto/image_classification_sota, at 6cb1441 in DiffKD's head
PACKAGE_PATH = "lib/models/losses/diffkd"  # the package inside image_classification_sota
OFFICIAL_FILES = ("diffkd.py", "diffkd_modules.py", "scheduling_ddim.py")
CLONE_HINT = (
    f"clone the official code at the commit with its files at the root: git clone {OFFICIAL_REPO} .official/DiffKD "
    f"&& git -C .official/DiffKD checkout {PINNED_COMMIT}, then pass --official-dir .official/DiffKD "
    f"(a clone of the current head needs its submodule: git clone --recurse-submodules {OFFICIAL_REPO} <dir>)"
)

Layout = Literal["root", "package"]


@dataclass(frozen=True)
class OfficialDiffKD:
    """The official ``DiffKD`` class of one clone, and how to read its outputs."""

    cls: type[nn.Module]
    layout: Layout
    directory: Path  # where its three files are

    def unpack(self, out: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(refined student, L_diff, teacher latent, L_ae or None)`` from either layout's ``forward`` result."""
        refined, second, third, rec_loss = out
        ddim_loss, teacher = (second, third) if self.layout == "root" else (third, second)
        if ddim_loss.dim() != 0 or teacher.dim() == 0:
            raise RuntimeError(
                f"the official DiffKD in {self.directory} ({self.layout} layout) did not return its diffusion loss "
                f"where this layout has it: got shapes {[tuple(t.shape) for t in out if t is not None]}"
            )
        return refined, ddim_loss, teacher, rec_loss


def find_official_code(official_dir: str | Path) -> tuple[Layout, Path]:
    """Which layout ``official_dir`` has, and the directory holding the official files; a clear error otherwise."""
    root = Path(official_dir).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"--official-dir {root} does not exist; {CLONE_HINT}")
    if all((root / name).is_file() for name in OFFICIAL_FILES):
        return "root", root
    for package in (root / SUBMODULE_PATH / PACKAGE_PATH, root / PACKAGE_PATH):
        if all((package / name).is_file() for name in (*OFFICIAL_FILES, "__init__.py")):
            return "package", package
    submodule = root / SUBMODULE_PATH
    if submodule.is_dir() and not any(submodule.iterdir()):
        raise FileNotFoundError(
            f"--official-dir {root} is hunto/DiffKD's current layout, whose code is in the git submodule "
            f"{SUBMODULE_PATH}/, and that submodule was not checked out: either "
            f"git -C {root} checkout {PINNED_COMMIT} (the files at the root) or "
            f"git -C {root} submodule update --init {SUBMODULE_PATH}"
        )
    missing = [name for name in OFFICIAL_FILES if not (root / name).is_file()]
    raise FileNotFoundError(
        f"--official-dir {root} lacks {', '.join(missing)} (and has no {SUBMODULE_PATH}/{PACKAGE_PATH}/); "
        f"expected a clone of the official code: {CLONE_HINT}"
    )


_private_names = itertools.count()


def _module_from_file(name: str, path: Path, package_dir: Path | None = None) -> ModuleType:
    """Execute ``path`` as module ``name`` (a package searching ``package_dir`` when given), registered under it."""
    locations = [str(package_dir)] if package_dir is not None else None
    spec = importlib.util.spec_from_file_location(name, path, submodule_search_locations=locations)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


@cache
def _load(layout: Layout, directory: Path) -> type[nn.Module]:
    name = f"_diffkd_official_{next(_private_names)}"  # private and unique: its diffkd.py must not shadow ours
    if layout == "package":  # relative imports (from .diffkd_modules import ...) resolve inside the package
        return _module_from_file(name, directory / "__init__.py", package_dir=directory).DiffKD
    # root layout: diffkd.py imports its siblings by their bare names (from diffkd_modules import ...); give it
    # exactly this clone's files under those names while it loads, then put back whatever held them before
    siblings = ("diffkd_modules", "scheduling_ddim")
    saved = {s: sys.modules[s] for s in siblings if s in sys.modules}
    try:
        for sibling in siblings:
            _module_from_file(sibling, directory / f"{sibling}.py")
        return _module_from_file(name, directory / "diffkd.py").DiffKD
    finally:
        for sibling in siblings:
            sys.modules.pop(sibling, None)
        sys.modules.update(saved)


def load_official_diffkd(official_dir: str | Path) -> OfficialDiffKD:
    """The official ``DiffKD`` of a local clone (either layout), imported under a private module name."""
    layout, directory = find_official_code(official_dir)
    return OfficialDiffKD(_load(layout, directory), layout, directory)


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

    def _hook(self, name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
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
    official = load_official_diffkd(official_dir) if method == "official_diffkd" else None
    if official is not None:
        student._diff = nn.ModuleDict(  # official: the DiffKD modules are a child of the student (spec §A.5)
            {
                points[0]: official.cls(channels[0], channels[1], kernel_size=3, use_ae=use_ae, ae_channels=1024),
                points[1]: official.cls(pair["classes"], pair["classes"], kernel_size=1),
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
        assert official is not None
        kd = 0.0
        for i, name in enumerate(names):
            s, t = _reshape_bchw(s_hooks.out[name]), _reshape_bchw(t_hooks.out[name])
            refined, ddim_loss, t_latent, rec_loss = official.unpack(student._diff[name](s, t))
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
