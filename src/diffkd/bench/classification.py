"""``python -m diffkd.bench`` — training-step throughput of student alone, KD and DiffKD.

For each pair — a packaged experiment: ``small`` (``experiment=demo``, its Fashion-MNIST pair, batch 128, 28²),
``cifar`` (``experiment=cifar_wrn40_wrn16``, WRN-40-2 → WRN-16-2, batch 64, 32²), ``imagenet``
(``experiment=imagenet_r34_r18``, ResNet-34 → ResNet-18, batch 32, 224²) or any other classification experiment by
name — each method (a ``conf/distill`` name: ``none``, ``kd``, ``diffkd``, ...) and each combination of precision
(fp32 / bf16-mixed), channels_last (off / on) and ``torch.compile`` (off / on / teacher / heads), it runs real
Lightning training steps of the experiment's module on the task's synthetic batch already on the device, and
reports img/s, ms/step and peak memory (CUDA: ``max_memory_allocated``; CPU: peak RSS of an isolated subprocess
with ``--isolate``, otherwise not measured), plus the DiffKD/KD step-time ratio and the bf16 speed-up. A table goes
to the screen and everything to JSON (``--out``). Teachers are untrained (no weight files).

It also times the DiffKD feature head alone (forward + backward of its loss) at each pair's feature point, as the
pair's ``distill=diffkd`` builds it (CIFAR: 128 channels, 8×8, no AE; ImageNet: 512 → 1024 latent with AE, 7×7).

The rows ``official_kd`` / ``official_diffkd`` time the official implementation (a local clone, ``--official-dir``)
in a loop re-created by ``benchmarks/official.py``: development-only code that is not part of the installed package,
loaded from the source checkout (``benchmarks/`` at the repository root, or ``$DIFFKD_BENCHMARKS_DIR``).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import resource
import subprocess
import sys
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from diffkd.bench.common import (
    Measured,
    add_common_options,
    as_row,
    bench_config,
    build_bench_module,
    check_configs,
    cpu_malloc_mode,
    data_facts,
    device_name,
    median_round,
    quiet_logs,
    repeat_loader,
    time_point_heads,
    time_training_steps,
    write_report,
)

__all__ = [
    "OFFICIAL_METHODS",
    "PAIRS",
    "BenchResult",
    "bench_head",
    "bench_step",
    "device_name",
    "load_official_bench",
    "main",
    "pair_config",
]

OFFICIAL_METHODS = ("official_kd", "official_diffkd")  # rows timed by benchmarks/official.py (source checkout only)
BENCHMARKS_DIR_ENV = "DIFFKD_BENCHMARKS_DIR"
_THIS_FILE = Path(__file__).resolve()

# the benchmark's short names of packaged experiments (any other experiment is named as it is)
PAIRS: dict[str, str] = {"small": "demo", "cifar": "cifar_wrn40_wrn16", "imagenet": "imagenet_r34_r18"}
# the official code's KD_MODULES entries (spec §C.1) of an experiment's pair: (module names, their channels)
OFFICIAL_KD_MODULES: dict[str, tuple[tuple[str, str], tuple[int, int]]] = {
    "cifar_wrn40_wrn16": (("relu", "fc"), (128, 128)),
    "imagenet_r34_r18": (("layer4", "fc"), (512, 512)),
}


def experiment_of(pair: str) -> str:
    """The experiment a ``--pairs`` entry names: a short name of :data:`PAIRS`, else the experiment itself."""
    return PAIRS.get(pair, pair)


# ------------------------------------------------------------------------------------------------ the official code


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


def official_pair(pair: str) -> dict[str, Any]:
    """What ``benchmarks/official.py`` needs of a pair (models, classes, image side, the official KD_MODULES),
    read from the composed experiment."""
    experiment = experiment_of(pair)
    if experiment not in OFFICIAL_KD_MODULES:
        raise ValueError(f"the official code has no setting for {pair!r}; it has {sorted(OFFICIAL_KD_MODULES)}")
    cfg = bench_config(experiment, "diffkd")
    nc, shape = data_facts(cfg)
    points, channels = OFFICIAL_KD_MODULES[experiment]
    return {"teacher": cfg.model.teacher.name, "student": cfg.model.student.name, "classes": nc, "size": shape[-1],
            "batch": cfg.data.batch_size, "official_points": points, "official_channels": channels,
            "use_ae": bool(cfg.distill.points.feature.head_kwargs.get("use_ae"))}  # fmt: skip


# ------------------------------------------------------------------------------------------------ a training step


@dataclass
class BenchResult(Measured):
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


def _compile_value(compile: bool | str) -> str:
    return str(compile).lower() if isinstance(compile, bool) else compile


def pair_config(
    pair: str,
    method: str,
    channels_last: bool = False,
    compile: bool | str = False,
    compile_mode: str | None = None,
) -> Any:
    """The pair's experiment with ``distill=<method>`` as training composes it, untrained, with the measured
    settings (channels_last, compile, compile_mode; the teacher in fp32; the non-finite flags read once)."""
    return bench_config(
        experiment_of(pair),
        method,
        [f"model.channels_last={str(channels_last).lower()}", f"model.compile={_compile_value(compile)}",
         f"model.compile_mode={compile_mode or 'null'}", "model.teacher_dtype=null",
         "model.nonfinite_check_every=10000"],
    )  # fmt: skip


def pair_module(
    pair: str, method: str, batch: int | None = None, device: str = "cpu", **settings: Any
) -> tuple[Any, Any]:
    """``(module, batch)``: the pair's module for ``method`` (:func:`pair_config`) and ``batch`` samples (default:
    the experiment's ``data.batch_size``) of the task's synthetic batch, on ``device``."""
    cfg = pair_config(pair, method, **settings)
    nc, shape = data_facts(cfg)
    if shape is None:
        raise ValueError(f"{pair}: the data module of experiment={experiment_of(pair)} declares no image size")
    return build_bench_module(cfg, nc, shape, batch or int(cfg.data.batch_size), device)


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
    if method in OFFICIAL_METHODS:
        if channels_last or compile:
            raise ValueError(f"{method}: the official code has neither channels_last nor torch.compile")
        official = load_official_bench()
        if official_dir is None:
            raise ValueError(f"{method} needs --official-dir: {official.CLONE_HINT}")
        pair = official_pair(pair_name)
        bs = batch or pair["batch"]
        seconds, peak, finite, flops = official.bench_official_step(
            official_dir, pair, method, precision, device, steps, warmup, bs, use_ae=pair["use_ae"]
        )
        return BenchResult(pair_name, method, precision, False, False, bs, 1000 * seconds, bs / seconds, peak,
                           device, finite=finite, gflop_per_step=_gflop(flops))  # fmt: skip
    module, data = pair_module(pair_name, method, batch, device, channels_last=channels_last, compile=compile,
                               compile_mode=compile_mode)  # fmt: skip
    bs = len(data[1])
    # FLOPs are counted in the first warm-up step, eagerly: compiled graphs bypass the counting dispatch mode
    timed = time_training_steps(
        module, repeat_loader(data, warmup + steps), steps, warmup, device,
        "bf16-mixed" if precision == "bf16" else "32-true", not compile,
    )  # fmt: skip
    seconds = timed.seconds
    return BenchResult(
        pair_name, method, precision, channels_last, compile, bs, 1000 * seconds, bs / seconds, timed.peak_mb, device,
        finite=timed.finite, gflop_per_step=_gflop(timed.flops),
    )  # fmt: skip


def _gflop(flops: int | None) -> float | None:
    return None if flops is None else flops / 1e9


def bench_head(
    point: str, precision: str, device: str, steps: int = 10, warmup: int = 3, batch: int | None = None
) -> dict[str, Any]:
    """Forward + backward of the DiffKD feature head of pair ``point`` as its ``distill=diffkd`` builds it (MSE +
    L_diff [+ L_ae], weighted as the experiment weighs them) at the experiment's batch; ms per call and the head's
    parameter count."""
    module, data = pair_module(point, "diffkd", batch)
    distiller = module.distiller
    info = distiller.points["feature"]
    bs = len(data[1])
    times = time_point_heads(distiller, bs, steps, warmup, device, points=["feature"], precision=precision)
    params = sum(p.numel() for p in distiller.heads[info.head].parameters())
    return {"point": point, "precision": precision, "batch": bs, "ms_fwd_bwd": sum(times) / len(times),
            "params": params, "device": device}  # fmt: skip


# ------------------------------------------------------------------------------------------------ the report


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
        lines.append(row + r.notes())
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


def _ratio_line(q: dict[str, Any]) -> str | None:
    if not q["diffkd_over_kd"]:
        return None
    extra = f" (FLOPs ×{q['diffkd_over_kd_flops']:.2f})" if q.get("diffkd_over_kd_flops") else ""
    extra += f", bf16 speed-up ×{q['bf16_speedup']:.2f}" if q.get("bf16_speedup") else ""
    if q.get("speedup_vs_official"):
        extra += f", ×{q['speedup_vs_official']:.2f} the official step's speed"
    if q.get("speedup_vs_official_fp32") and q["precision"] != "fp32":
        extra += f" (×{q['speedup_vs_official_fp32']:.2f} its fp32 step's)"
    who = "official " if q.get("method") == "official" else ""
    cl, comp = _onoff(q["channels_last"]), _onoff(q["compile"])
    return (f"{q['pair']:<9}{q['precision']:<6}cl={cl:<4}compile={comp:<8} "
            f"{who}DiffKD/KD step time ×{q['diffkd_over_kd']:.2f}{extra}")  # fmt: skip


def _check_official(official_dir: str | None) -> None:
    """Fail before any timing when the official rows cannot run: no source checkout, no or a wrong clone."""
    try:
        official = load_official_bench()
        if not official_dir:
            raise SystemExit(f"official_* methods time the official code: {official.CLONE_HINT}")
        official.find_official_code(official_dir)
    except FileNotFoundError as err:
        raise SystemExit(str(err)) from None


def _pairs(value: str) -> list[str]:
    from diffkd.bench.common import parse_names

    pairs = parse_names(value, what="pair")
    check_configs("experiment", [experiment_of(p) for p in pairs])
    return pairs


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m diffkd.bench", description=__doc__.splitlines()[0])
    add = parser.add_argument
    # fmt: off
    add("--pairs", default="small,cifar,imagenet", help="small (the demo's), cifar, imagenet, or any classification "
        "experiment's name")
    add("--methods", default="none,kd,diffkd", help="distill configs (none, kd, diffkd, dkd, ...), official_kd, "
        "official_diffkd")
    add("--precision", default="fp32,bf16")
    add("--channels-last", default="off,on")
    add("--compile", default="off", help="off | on | teacher | heads, comma-separated")
    add("--compile-mode", default=None, help="torch.compile mode, e.g. reduce-overhead (CUDA graphs)")
    add("--official-dir", default=None, help="clone of https://github.com/hunto/DiffKD (at 5367f44, or with its "
        "classification submodule), for --methods official_kd,official_diffkd; needs a source checkout of diffkd "
        "(benchmarks/official.py)")
    add("--steps", type=int, default=None, help="timed steps (default: 10 on GPU, 5 on CPU)")
    add("--warmup", type=int, default=None, help="untimed steps first (default: 5 GPU, 2 CPU)")
    add("--batch", type=int, default=None, help="batch size for every pair (default: the pair's)")
    add("--repeat", type=int, default=1, help="rounds over all configurations; the median is kept")
    add("--isolate", action="store_true", help="one process per configuration (CPU peak RSS)")
    add("--no-heads", action="store_true", help="skip the DiffKD-head micro-benchmark")
    add("--one", default=None, help=argparse.SUPPRESS)
    # fmt: on
    add_common_options(parser, "<time>")
    return parser


def _combos(args: argparse.Namespace) -> list[tuple]:
    from diffkd.bench.common import parse_names

    onoff = {"off": False, "on": True}
    methods = parse_names(args.methods, what="method")
    check_configs("distill", [m for m in methods if m not in OFFICIAL_METHODS])
    if any(m in OFFICIAL_METHODS for m in methods):
        _check_official(args.official_dir)
    flags = {"precision": ["fp32", "bf16"], "channels-last": list(onoff), "compile": [*onoff, "teacher", "heads"]}
    values = {k: parse_names(getattr(args, k.replace("-", "_")), allowed, k) for k, allowed in flags.items()}
    compiles = [onoff.get(c, c) for c in values["compile"]]
    return [
        c
        for c in itertools.product(
            _pairs(args.pairs), methods, values["precision"], [onoff[v] for v in values["channels-last"]], compiles
        )
        # the official code has neither channels_last nor compile: one configuration per precision;
        # compile=teacher or heads without a teacher or heads would repeat compile=off
        if (c[1] not in OFFICIAL_METHODS or (not c[3] and not c[4]))
        and not (c[1] == "none" and c[4] in ("teacher", "heads"))
        and (c[1] not in OFFICIAL_METHODS or experiment_of(c[0]) in OFFICIAL_KD_MODULES)  # none for `small`
    ]


def main(argv: list[str] | None = None) -> list[BenchResult]:
    args = _parser().parse_args(argv)
    gpu = args.device.startswith("cuda")
    args.steps = args.steps or (10 if gpu else 5)
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 2)
    quiet_logs()
    malloc_mode = cpu_malloc_mode(args.device, args.cpu_malloc)

    if args.one:  # child of --isolate
        pair, method, prec, cl, comp = json.loads(args.one)
        r = bench_step(pair, method, prec, cl, comp, args.device, args.steps, args.warmup, batch=args.batch,
                       official_dir=args.official_dir, compile_mode=args.compile_mode)  # fmt: skip
        r.peak_mem_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if not gpu else r.peak_mem_mb
        print(json.dumps(asdict(r)))
        return [r]

    combos = _combos(args)
    malloc = f" | cpu_malloc={malloc_mode}" if malloc_mode else ""
    print(f"device: {device_name(args.device)} | torch {torch.__version__}{malloc} | {len(combos)} configurations",
          flush=True)  # fmt: skip
    heads = []
    if not args.no_heads:
        for point, prec in itertools.product(_pairs(args.pairs), args.precision.split(",")):
            h = bench_head(point, prec.strip(), args.device)
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
    results = [median_round(rs) for rs in rounds]
    _share_flops(results)
    print("\n" + _table(results))
    ratios = _ratios(results)
    for q in ratios:
        line = _ratio_line(q)
        if line:
            print(line)
    meta = {"compile_mode": args.compile_mode, "cpu_malloc": malloc_mode,
            "experiments": {p: experiment_of(p) for p in _pairs(args.pairs)}}  # fmt: skip
    out = write_report(args, argv, "", meta, {"heads": heads, "steps": [as_row(r) for r in results], "ratios": ratios})
    print(f"wrote {out}")
    return results
