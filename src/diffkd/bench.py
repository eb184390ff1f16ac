"""``python -m diffkd.bench`` — training-step throughput of student alone, KD and DiffKD.

For each pair (CIFAR-100 WRN-40-2 → WRN-16-2 at batch 64, 32²; ImageNet ResNet-34 → ResNet-18 at batch 32, 224²)
and each combination of precision (fp32 / bf16-mixed), channels_last (off / on) and ``torch.compile`` (off / on),
it runs real Lightning training steps of :class:`~diffkd.tasks.ClassificationModule` on synthetic batches already
on the device, and reports img/s, ms/step and peak memory (CUDA: ``max_memory_allocated``; CPU: peak RSS of an
isolated subprocess with ``--isolate``, otherwise not measured), plus the DiffKD/KD step-time ratio and the bf16
speed-up. A table goes to the screen and everything to JSON (``--out``).

It also times the DiffKD head alone (forward + backward) at the CIFAR feature point (128 channels, 8×8,
batch 64, no AE) and the ImageNet feature point (512 → 1024 latent with AE, 7×7, batch 32).

The rows ``official_kd`` / ``official_diffkd`` time the official implementation (a local clone, ``--official-dir``)
in a loop re-created by ``benchmarks/official.py``: development-only code that is not part of the installed package,
loaded from the source checkout (``benchmarks/`` at the repository root, or ``$DIFFKD_BENCHMARKS_DIR``).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from diffkd.utils.cpu_malloc import CPU_MALLOC_MODES, configure_cpu_malloc

__all__ = [
    "OFFICIAL_METHODS",
    "PAIRS",
    "BenchResult",
    "bench_head",
    "bench_step",
    "device_name",
    "load_official_bench",
    "main",
]

OFFICIAL_METHODS = ("official_kd", "official_diffkd")  # rows timed by benchmarks/official.py (source checkout only)
BENCHMARKS_DIR_ENV = "DIFFKD_BENCHMARKS_DIR"
_THIS_FILE = Path(__file__).resolve()


def _benchmarks_dir() -> Path:
    """The source checkout's ``benchmarks/`` folder: ``$DIFFKD_BENCHMARKS_DIR``, else the first folder above this
    file that is a diffkd checkout (``pyproject.toml``, ``src/diffkd/``, ``benchmarks/official.py``)."""
    where = os.environ.get(BENCHMARKS_DIR_ENV)
    if where:
        folder = Path(where).expanduser().resolve()
        if (folder / "official.py").is_file():
            return folder
        raise FileNotFoundError(
            f"{BENCHMARKS_DIR_ENV}={where} has no official.py (it should name the benchmarks/ folder of a source "
            "checkout of diffkd)"
        )
    for parent in _THIS_FILE.parents:
        if all((parent / p).exists() for p in ("pyproject.toml", "src/diffkd", "benchmarks/official.py")):
            return parent / "benchmarks"
    raise FileNotFoundError(
        f"the official-code rows ({', '.join(OFFICIAL_METHODS)}) need a source checkout of diffkd: they run "
        f"benchmarks/official.py, which is development-only and not part of the installed package (no checkout "
        f"above {_THIS_FILE.parent}). Run them from a clone of the diffkd repository (pip install -e <clone>), or "
        f"set {BENCHMARKS_DIR_ENV}=<clone>/benchmarks."
    )


@cache
def _load_file(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("_diffkd_benchmarks_official", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def load_official_bench() -> ModuleType:
    """``benchmarks/official.py`` of the source checkout (see :func:`_benchmarks_dir`); FileNotFoundError saying
    so when there is none, as in an installed wheel."""
    return _load_file(_benchmarks_dir() / "official.py")


PAIRS: dict[str, dict[str, Any]] = {
    # small: the embedded demo's pair and batch (conf/experiment/demo.yaml), grey 28×28 Fashion-MNIST images
    "small": {"teacher": "demo_cnn_teacher", "student": "demo_cnn_student", "classes": 10, "size": 28, "chans": 1,
              "batch": 128},
    # official_points / official_channels: the official KD_MODULES entries (spec §C.1) for --official-dir
    "cifar": {"teacher": "wrn_40_2", "student": "wrn_16_2", "classes": 100, "size": 32, "batch": 64,
              "official_points": ("relu", "fc"), "official_channels": (128, 128)},
    "imagenet": {"teacher": "tv_resnet34", "student": "tv_resnet18", "classes": 1000, "size": 224, "batch": 32,
                 "official_points": ("layer4", "fc"), "official_channels": (512, 512)},
}  # fmt: skip
METHODS = {
    "none": {},
    "kd": {"logits": {"student": "", "teacher": "", "distance": {"name": "kl", "tau": 4.0}, "weight": 0.9}},
    "diffkd": {
        "feature": {"head": "diffkd", "distance": {"name": "mse"}},
        "logits": {"student": "", "teacher": "", "head": "diffkd", "distance": {"name": "kl", "tau": 1.0}},
    },
}


@dataclass
class BenchResult:
    pair: str
    method: str
    precision: str
    channels_last: bool
    compile: bool | str
    batch: int
    ms_per_step: float
    img_per_s: float
    peak_mem_mb: float | None
    device: str
    error: str | None = None
    finite: bool | None = None  # was the last timed step's loss finite
    ms_runs: list[float] | None = None  # every round's ms/step with --repeat
    gflop_per_step: float | None = None  # matmul/conv FLOPs of one step, forward + backward (FlopCounterMode)

    @property
    def gflop_per_s(self) -> float | None:
        """Achieved matmul/conv throughput: GFLOP per step / seconds per step."""
        if self.gflop_per_step is None or not self.ms_per_step > 0:
            return None
        return self.gflop_per_step / (self.ms_per_step / 1000)


class _Repeat:
    """The same device-resident batch ``n`` times (an iterable Lightning takes as a train loader)."""

    def __init__(self, batch: tuple[torch.Tensor, torch.Tensor], n: int) -> None:
        self.batch, self.n = batch, n

    def __iter__(self):
        return iter([self.batch] * self.n)

    def __len__(self) -> int:
        return self.n


def device_name(device: str) -> str:
    """The benchmarked device in words: a GPU's name, or the CPU's model, cores and torch threads."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    models = [ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")]
    name = models[0] if models else name
    return f"{name}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def _build_module(
    pair: dict[str, Any],
    method: str,
    channels_last: bool,
    compile: bool | str,
    ae: bool,
    compile_mode: str | None = None,
):
    from functools import partial

    from diffkd.distill import Distiller
    from diffkd.models import create_model
    from diffkd.tasks import ClassificationModule

    points = json.loads(json.dumps(METHODS[method]))
    if ae and "feature" in points:  # the ImageNet recipe's AE (latent 1024)
        points["feature"]["head_kwargs"] = {"use_ae": True, "ae_channels": 1024}
    student = create_model(pair["student"], num_classes=pair["classes"])
    teacher = create_model(pair["teacher"], num_classes=pair["classes"]) if points else None
    return ClassificationModule(
        student=student,
        teacher=teacher,
        distiller=Distiller(points, task_weight=0.1 if method == "kd" else 1.0),
        optimizer=partial(torch.optim.SGD, lr=0.01, momentum=0.9, weight_decay=5e-4),
        input_size=(pair.get("chans", 3), pair["size"], pair["size"]),
        channels_last=channels_last,
        compile=compile,
        compile_mode=compile_mode,
        teacher_dtype=None,
        nonfinite_check_every=10_000,
    )


def bench_step(
    pair_name: str,
    method: str,
    precision: str,
    channels_last: bool,
    compile: bool | str,
    device: str,
    steps: int,
    warmup: int,
    batch: int | None = None,
    official_dir: str | None = None,
    compile_mode: str | None = None,
) -> BenchResult:
    """Time ``steps`` Lightning training steps after ``warmup`` steps; synchronises only at the two ends.

    ``official_kd`` / ``official_diffkd`` time the official implementation's step instead (``benchmarks/official.py``
    of the source checkout, running the official code of ``official_dir``); it has neither channels_last nor compile.
    """

    pair = PAIRS[pair_name]
    bs = batch or pair["batch"]
    if method in OFFICIAL_METHODS:
        if channels_last or compile:
            raise ValueError(f"{method}: the official code has neither channels_last nor torch.compile")
        official = load_official_bench()
        if official_dir is None:
            raise ValueError(f"{method} needs --official-dir: {official.CLONE_HINT}")
        seconds, peak, finite, flops = official.bench_official_step(
            official_dir, pair, method, precision, device, steps, warmup, bs, use_ae=pair_name == "imagenet"
        )  # fmt: skip
        return BenchResult(pair_name, method, precision, False, False, bs, 1000 * seconds, bs / seconds, peak,
                           device, finite=finite, gflop_per_step=_gflop(flops))  # fmt: skip
    torch.manual_seed(0)
    module = _build_module(pair, method, channels_last, compile, ae=pair_name == "imagenet", compile_mode=compile_mode)
    dev = torch.device(device)
    x = torch.randn(bs, pair.get("chans", 3), pair["size"], pair["size"], device=dev)
    y = torch.randint(0, pair["classes"], (bs,), device=dev)
    batches = _Repeat((x, y), warmup + steps)
    # FLOPs are counted in the first warm-up step, eagerly: compiled graphs bypass the counting dispatch mode
    timed = time_training_steps(
        module, batches, steps, warmup, device, "bf16-mixed" if precision == "bf16" else "32-true", not compile
    )
    seconds = timed.seconds
    return BenchResult(
        pair_name, method, precision, channels_last, compile, bs, 1000 * seconds, bs / seconds, timed.peak_mb, device,
        finite=timed.finite, gflop_per_step=_gflop(timed.flops),
    )  # fmt: skip


@dataclass
class TimedSteps:
    """What :func:`time_training_steps` measured."""

    seconds: float  # per timed step
    flops: int | None  # of the first warm-up step (forward + backward), when counted
    finite: bool | None  # the last step's loss
    peak_mb: float | None  # CUDA peak memory of the timed steps
    losses: dict[str, float]  # the last step's logged train/loss* values


def time_training_steps(
    module: Any,
    loader: Any,
    steps: int,
    warmup: int,
    device: str,
    precision: str = "32-true",
    count_flops: bool = True,
) -> TimedSteps:
    """``warmup`` + ``steps`` real Lightning training steps of ``module`` over ``loader`` (``warmup + steps``
    batches, with a length); the device is synchronised around the timed steps only."""
    import lightning as L

    dev = torch.device(device)
    marks: dict[str, float] = {}
    last_loss: list[torch.Tensor] = []
    counter = FlopCounterMode(display=False) if count_flops and warmup > 0 else None

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0 and counter is not None:
                counter.__enter__()
            if batch_idx == warmup:
                sync()
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dev)
                marks["start"] = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 0 and counter is not None:
                counter.__exit__(None, None, None)
            if batch_idx == warmup + steps - 1:
                sync()
                marks["end"] = time.perf_counter()
                last_loss.append(outputs["loss"].detach())

    trainer = L.Trainer(
        accelerator="gpu" if dev.type == "cuda" else "cpu",
        devices=1,
        precision=precision,
        max_steps=warmup + steps,
        max_epochs=1,  # not -1 (Lightning's default with max_steps): the train loader's length must be read
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[Timer()],
    )
    trainer.fit(module, train_dataloaders=loader)
    return TimedSteps(
        seconds=(marks["end"] - marks["start"]) / steps,
        flops=counter.get_total_flops() if counter is not None else None,
        finite=bool(torch.isfinite(last_loss[0]).item()) if last_loss else None,
        peak_mb=torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None,
        losses={k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/loss")},
    )


def _gflop(flops: int | None) -> float | None:
    return None if flops is None else flops / 1e9


def bench_head(point: str, precision: str, device: str, steps: int = 10, warmup: int = 3) -> dict[str, Any]:
    """Forward + backward of one DiffKD head (MSE + L_diff [+ L_ae]); ms per call and parameter count."""
    import torch.nn.functional as F

    from diffkd import DiffKD

    torch.manual_seed(0)
    dev = torch.device(device)
    if point == "small":  # the demo's feature point: demo_cnn_student 24 → demo_cnn_teacher 32 channels, 4 × 4
        head, bs, cs, ct, hw = DiffKD(24, 32), 128, 24, 32, 4
    elif point == "cifar":
        head, bs, cs, ct, hw = DiffKD(128, 128), 64, 128, 128, 8
    else:
        head, bs, cs, ct, hw = DiffKD(512, 512, use_ae=True, ae_channels=1024), 32, 512, 512, 7
    head.to(dev)
    s = torch.randn(bs, cs, hw, hw, device=dev, requires_grad=True)
    t = torch.randn(bs, ct, hw, hw, device=dev)

    def step() -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = head(s, t)
            loss = F.mse_loss(out.student, out.teacher) + out.diffusion_loss
            if out.ae_loss is not None:
                loss = loss + out.ae_loss
        loss.backward()

    for _ in range(warmup):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    ms = 1000 * (time.perf_counter() - start) / steps
    params = sum(p.numel() for p in head.parameters())
    return {"point": point, "precision": precision, "batch": bs, "ms_fwd_bwd": ms, "params": params, "device": device}


def _run_isolated(args: argparse.Namespace, combo: tuple) -> BenchResult:
    """One configuration in a fresh process, so that its peak RSS is its own."""
    pair, method, prec, cl, comp = combo
    cmd = [sys.executable, "-m", "diffkd.bench", "--one", json.dumps(combo), "--device", args.device,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--cpu-malloc", args.cpu_malloc]  # fmt: skip
    if args.batch:
        cmd += ["--batch", str(args.batch)]
    if args.official_dir:
        cmd += ["--official-dir", args.official_dir]
    if args.compile_mode:
        cmd += ["--compile-mode", args.compile_mode]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return BenchResult(pair, method, prec, cl, comp, 0, float("nan"), float("nan"), None, args.device,
                           error=out.stderr.strip().splitlines()[-1] if out.stderr else "failed")  # fmt: skip
    return BenchResult(**json.loads(out.stdout.strip().splitlines()[-1]))


def _median(runs: list[BenchResult]) -> BenchResult:
    """The run with the median step time (the spread of all rounds kept in ``ms_runs``)."""
    ok = sorted((r for r in runs if not r.error), key=lambda r: r.ms_per_step)
    if not ok:
        return runs[-1]
    best = ok[(len(ok) - 1) // 2]
    best.ms_runs = [round(r.ms_per_step, 1) for r in runs if not r.error]
    best.finite = None if any(r.finite is None for r in ok) else all(r.finite for r in ok)
    return best


def _onoff(value: bool | str) -> str:
    return value if isinstance(value, str) else ("on" if value else "off")


def _table(results: list[BenchResult]) -> str:
    lines = [
        f"{'pair':<9}{'method':<16}{'prec':<6}{'cl':<5}{'compile':<9}{'ms/step':>10}{'img/s':>10}{'peak MB':>10}"
        f"{'GFLOP/step':>12}{'GFLOP/s':>10}"
    ]
    for r in results:
        peak = f"{r.peak_mem_mb:.0f}" if r.peak_mem_mb is not None else "—"
        gflop = f"{r.gflop_per_step:.2f}" if r.gflop_per_step is not None else "—"
        rate = f"{r.gflop_per_s:.0f}" if r.gflop_per_s is not None else "—"
        row = f"{r.pair:<9}{r.method:<16}{r.precision:<6}{'on' if r.channels_last else 'off':<5}"
        row += f"{_onoff(r.compile):<9}{r.ms_per_step:>10.1f}{r.img_per_s:>10.1f}{peak:>10}{gflop:>12}{rate:>10}"
        if r.ms_runs and len(r.ms_runs) > 1:
            row += f"   runs {min(r.ms_runs):.0f}–{max(r.ms_runs):.0f}"
        row += "   loss NaN/inf" if r.finite is False else ""
        lines.append(row + (f"   error: {r.error}" if r.error else ""))
    return "\n".join(lines)


def _share_flops(results: list[BenchResult]) -> None:
    """Give compiled configurations the FLOPs counted in an eager one of the same pair, method and batch.

    The count does not depend on precision, channels_last or compile; only eager steps can be counted.
    """
    counted = {(r.pair, r.method, r.batch): r.gflop_per_step for r in results if r.gflop_per_step is not None}
    for r in results:
        if r.gflop_per_step is None and not r.error:
            r.gflop_per_step = counted.get((r.pair, r.method, r.batch))


def _flop_ratio(a: BenchResult, b: BenchResult | None) -> float | None:
    return a.gflop_per_step / b.gflop_per_step if b and a.gflop_per_step and b.gflop_per_step else None


def _ratios(results: list[BenchResult]) -> list[dict[str, Any]]:
    index = {(r.pair, r.method, r.precision, r.channels_last, r.compile): r for r in results if not r.error}
    out = []
    for (pair, method, prec, cl, comp), r in index.items():
        if method != "diffkd":
            continue
        kd = index.get((pair, "kd", prec, cl, comp))
        fp32 = index.get((pair, "diffkd", "fp32", cl, comp))
        official = index.get((pair, "official_diffkd", prec, False, False))
        official_fp32 = index.get((pair, "official_diffkd", "fp32", False, False))
        out.append(
            {
                "pair": pair,
                "precision": prec,
                "channels_last": cl,
                "compile": comp,
                "diffkd_over_kd": r.ms_per_step / kd.ms_per_step if kd else None,
                # the same ratio in matmul/conv FLOPs: where the time ratio exceeds it, the extra is overhead
                "diffkd_over_kd_flops": _flop_ratio(r, kd),
                "bf16_speedup": fp32.ms_per_step / r.ms_per_step if fp32 and prec == "bf16" else None,
                # official DiffKD step time / ours: at the same precision, and against the official fp32 step
                # (its only setting that stays finite)
                "speedup_vs_official": official.ms_per_step / r.ms_per_step if official else None,
                "speedup_vs_official_fp32": official_fp32.ms_per_step / r.ms_per_step if official_fp32 else None,
            }
        )
    for (pair, method, prec, _, _), r in index.items():
        kd = index.get((pair, "official_kd", prec, False, False))
        if method == "official_diffkd" and kd:
            out.append({"pair": pair, "precision": prec, "method": "official", "channels_last": False,
                        "compile": False, "diffkd_over_kd": r.ms_per_step / kd.ms_per_step,
                        "diffkd_over_kd_flops": _flop_ratio(r, kd)})  # fmt: skip
    return out


def _choices(value: str, allowed: dict[str, Any]) -> list[Any]:
    keys = [v.strip() for v in value.split(",")]
    bad = [k for k in keys if k not in allowed]
    if bad:
        raise SystemExit(f"unknown value(s) {bad}; choose from {', '.join(allowed)}")
    return [allowed[k] for k in keys]


def _check_official(official_dir: str | None) -> None:
    """Fail before any timing when the official rows cannot run: no source checkout, no or a wrong clone."""
    try:
        official = load_official_bench()
        if not official_dir:
            raise SystemExit(f"official_* methods time the official code: {official.CLONE_HINT}")
        official.find_official_code(official_dir)
    except FileNotFoundError as err:
        raise SystemExit(str(err)) from None


def main(argv: list[str] | None = None) -> list[BenchResult]:
    parser = argparse.ArgumentParser(prog="python -m diffkd.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--pairs", default="small,cifar,imagenet", help="small (the demo's), cifar, imagenet")
    parser.add_argument("--methods", default="none,kd,diffkd")
    parser.add_argument("--precision", default="fp32,bf16")
    parser.add_argument("--channels-last", default="off,on")
    parser.add_argument("--compile", default="off", help="off | on | teacher | heads, comma-separated")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. reduce-overhead (CUDA graphs)")
    parser.add_argument(
        "--official-dir",
        default=None,
        help="clone of https://github.com/hunto/DiffKD (at 5367f44, or with its classification submodule), for"
        " --methods official_kd,official_diffkd; needs a source checkout of diffkd (benchmarks/official.py)",
    )
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 10 on GPU, 5 on CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 5 GPU, 2 CPU)")
    parser.add_argument("--batch", type=int, default=None, help="batch size for every pair (default: the pair's)")
    parser.add_argument("--repeat", type=int, default=1, help="rounds over all configurations; the median is kept")
    parser.add_argument("--isolate", action="store_true", help="one process per configuration (CPU peak RSS)")
    parser.add_argument("--no-heads", action="store_true", help="skip the DiffKD-head micro-benchmark")
    parser.add_argument("--out", default=None, help="JSON path (default: bench_results/<time>.json)")
    parser.add_argument(
        "--cpu-malloc",
        default="keep",
        choices=CPU_MALLOC_MODES,
        help="CPU only: keep = glibc keeps freed memory for reuse (as diffkd.train does on the CPU); default = leave"
        " malloc alone (what a plain training loop gets)",
    )
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    gpu = args.device.startswith("cuda")
    args.steps = args.steps or (10 if gpu else 5)
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 2)
    import lightning  # noqa: F401  (its import sets its loggers to INFO: quiet them afterwards)

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger("diffkd").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    # what the CPU's malloc does in this run (None on a GPU, where the setting does not apply)
    malloc_mode = None if gpu else ("keep" if configure_cpu_malloc(args.cpu_malloc) else "default")

    if args.one:  # child of --isolate
        pair, method, prec, cl, comp = json.loads(args.one)
        r = bench_step(pair, method, prec, cl, comp, args.device, args.steps, args.warmup, batch=args.batch,
                       official_dir=args.official_dir, compile_mode=args.compile_mode)  # fmt: skip
        r.peak_mem_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if not gpu else r.peak_mem_mb
        print(json.dumps(asdict(r)))
        return [r]

    onoff = {"off": False, "on": True}
    methods = _choices(args.methods, {k: k for k in (*METHODS, *OFFICIAL_METHODS)})
    if any(m in OFFICIAL_METHODS for m in methods):
        _check_official(args.official_dir)
    combos = [
        c
        for c in itertools.product(
            _choices(args.pairs, {k: k for k in PAIRS}),
            methods,
            _choices(args.precision, {"fp32": "fp32", "bf16": "bf16"}),
            _choices(args.channels_last, onoff),
            _choices(args.compile, {**onoff, "teacher": "teacher", "heads": "heads"}),
        )
        # the official code has neither channels_last nor compile: one configuration per precision;
        # compile=teacher or heads without a teacher or heads would repeat compile=off
        if (c[1] not in OFFICIAL_METHODS or (not c[3] and not c[4]))
        and not (c[1] == "none" and c[4] in ("teacher", "heads"))
        and (c[1] not in OFFICIAL_METHODS or "official_points" in PAIRS[c[0]])  # no official setting for `small`
    ]
    malloc = f" | cpu_malloc={malloc_mode}" if malloc_mode else ""
    print(f"device: {device_name(args.device)} | torch {torch.__version__}{malloc} | {len(combos)} configurations",
          flush=True)  # fmt: skip
    heads = []
    if not args.no_heads:
        for point, prec in itertools.product(
            _choices(args.pairs, {k: k for k in PAIRS}), _choices(args.precision, {"fp32": "fp32", "bf16": "bf16"})
        ):
            h = bench_head(point, prec, args.device)
            heads.append(h)
            print(f"DiffKD head {point:<8} {prec:<5} batch {h['batch']:>3}: {h['ms_fwd_bwd']:8.1f} ms fwd+bwd, "
                  f"{h['params']:,} params", flush=True)  # fmt: skip
    rounds: list[list[BenchResult]] = [[] for _ in combos]
    for _ in range(args.repeat):  # round-robin, so that a slow spell of a shared machine hits every configuration
        for i, combo in enumerate(combos):
            if args.isolate:
                r = _run_isolated(args, combo)
            else:
                try:
                    r = bench_step(*combo, args.device, args.steps, args.warmup, batch=args.batch,
                                   official_dir=args.official_dir, compile_mode=args.compile_mode)  # fmt: skip
                except Exception as err:  # one failing configuration must not lose the others
                    r = BenchResult(*combo, 0, float("nan"), float("nan"), None, args.device, error=repr(err)[:200])
            rounds[i].append(r)
            print(_table([r]).splitlines()[1], flush=True)
    results = [_median(rs) for rs in rounds]
    _share_flops(results)
    print("\n" + _table(results))
    ratios = _ratios(results)
    for q in ratios:
        extra = f" (FLOPs ×{q['diffkd_over_kd_flops']:.2f})" if q.get("diffkd_over_kd_flops") else ""
        extra += f", bf16 speed-up ×{q['bf16_speedup']:.2f}" if q.get("bf16_speedup") else ""
        if q.get("speedup_vs_official"):
            extra += f", ×{q['speedup_vs_official']:.2f} the official step's speed"
        if q.get("speedup_vs_official_fp32") and q["precision"] != "fp32":
            extra += f" (×{q['speedup_vs_official_fp32']:.2f} its fp32 step's)"
        if q["diffkd_over_kd"]:
            who = "official " if q.get("method") == "official" else ""
            cl, comp = _onoff(q["channels_last"]), _onoff(q["compile"])
            print(f"{q['pair']:<9}{q['precision']:<6}cl={cl:<4}compile={comp:<8} "
                  f"{who}DiffKD/KD step time ×{q['diffkd_over_kd']:.2f}{extra}")  # fmt: skip
    out = Path(args.out or f"bench_results/{time.strftime('%Y%m%d-%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "device": device_name(args.device),
        "torch": torch.__version__,
        "argv": sys.argv[1:] if argv is None else argv,
        "compile_mode": args.compile_mode,
        "cpu_count": os.cpu_count(),
        "cpu_malloc": malloc_mode,
    }
    out.write_text(
        json.dumps(
            {
                "meta": meta,
                "heads": heads,
                "steps": [{**asdict(r), "gflop_per_s": r.gflop_per_s} for r in results],
                "ratios": ratios,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
