"""The embedded demo (``python -m diffkd.train`` with no arguments, ``make demo``).

On Fashion-MNIST — offline from Debian's ``dataset-fashion-mnist`` or torchvision's download — it trains a small
teacher (or reuses the one it trained before), then the same student once per method of ``demo.methods`` (alone,
with KD and with DiffKD) and prints the test accuracies. Every run is a normal :func:`diffkd.training.train` run
with its own folder, composed by Hydra from ``train.yaml`` with the command line's overrides, so that
``python -m diffkd.train distill.diffkd.inference_steps=3`` reaches the DiffKD run (``distill.*`` overrides go to
the runs whose distiller has that key; the others are told so in the log).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from diffkd.training import train

log = logging.getLogger("diffkd.demo")

__all__ = [
    "cpu_supports_bf16",
    "demo_precision",
    "demo_run_config",
    "demo_user_overrides",
    "run_demo",
    "save_student_as_teacher",
    "train_demo_run",
]

CONFIG_DIR = str(Path(__file__).resolve().parent / "conf")


def cpu_supports_bf16() -> bool:
    """True when the CPU has AMX bf16 tiles, where bf16 autocast speeds up small convolutions.

    AVX512-BF16 alone is not enough: on such a 2-core CPU the demo's training step measured 5–15 % slower
    under bf16 autocast than in fp32 (BENCHMARKS.md), so the demo stays in fp32 there.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags


@contextmanager
def _composer() -> Iterator[None]:
    """Hydra's compose API: the running app's (``python -m diffkd.train``), or the packaged ``conf/``."""
    if GlobalHydra.instance().is_initialized():
        yield
        return
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        yield


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def demo_run_config(base: Sequence[str], method: str, fixed: Sequence[str]) -> DictConfig:
    """``train.yaml`` composed with the user's overrides ``base``, ``distill=<method>`` and the demo's ``fixed``
    settings. A ``distill.<key>`` override reaches the run only when its distiller has that key's parent (the
    ``diffkd`` run has ``distill.diffkd``, the ``kd`` run has not)."""
    with _composer():
        plain = [o for o in base if not _key(o).startswith("distill.")]
        probe = compose(config_name="train", overrides=[*plain, f"distill={method}", *fixed])
        kept = list(plain)
        for override in base:
            key = _key(override)
            if not key.startswith("distill."):
                continue
            parent = key.rsplit(".", 1)[0]
            if OmegaConf.select(probe, parent, default=None) is None:
                log.info("demo: %s does not apply to the %s run (its distiller has no %s)", override, method, parent)
                continue
            kept.append(override)
        return compose(config_name="train", overrides=[*kept, f"distill={method}", *fixed])


def _command_line_overrides() -> list[str]:
    if HydraConfig.initialized():
        return list(HydraConfig.get().overrides.task)
    return []


def demo_user_overrides(demo: DictConfig, overrides: Sequence[str] | None) -> list[str]:
    """The command line's overrides for the demo's runs (default: the running Hydra app's), without ``distill=``
    group choices: the demo runs ``demo.methods``, which is said in the log."""
    user = _command_line_overrides() if overrides is None else list(overrides)
    group_overrides = [o for o in user if _key(o) == "distill"]
    if group_overrides:
        log.warning("demo: %s ignored — the demo runs demo.methods=%s", group_overrides, list(demo.methods))
    return [o for o in user if o not in group_overrides]


def demo_precision(demo: DictConfig) -> str:
    """``demo.precision``, with ``auto`` = bf16-mixed where the CPU has AMX, else 32-true."""
    precision = demo.get("precision", "auto")
    if precision == "auto":
        return "bf16-mixed" if cpu_supports_bf16() else "32-true"
    return str(precision)


def train_demo_run(user: Sequence[str], method: str, fixed: Sequence[str]) -> tuple[dict[str, float], str, float]:
    """One demo run: ``train.yaml`` with the user's overrides, ``distill=<method>`` and ``fixed``, trained and
    tested. Returns (metrics, best checkpoint, seconds)."""
    start = time.perf_counter()
    metrics, objs = train(demo_run_config(user, method, ["pipeline=train", *fixed]))
    return metrics, objs["best_ckpt"], time.perf_counter() - start


def save_student_as_teacher(best_ckpt: str, teacher_file: Path, **extra: Any) -> None:
    """The student of a run's checkpoint as a teacher file ``{"model": state_dict, **extra}``."""
    import torch

    ckpt = torch.load(best_ckpt, map_location="cpu", weights_only=True)
    state = {k.removeprefix("student."): v for k, v in ckpt["state_dict"].items() if k.startswith("student.")}
    teacher_file.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state, **extra}, teacher_file)


def run_demo(cfg: DictConfig, overrides: Sequence[str] | None = None) -> float:
    """Teacher (trained or reused), then the student once per method; prints and returns the last accuracy.

    Args:
        cfg: the composed demo config (``experiment=demo``).
        overrides: the overrides it was composed with (default: the running Hydra app's command line).
    """
    demo = cfg.demo
    user = demo_user_overrides(demo, overrides)
    precision = demo_precision(demo)
    out_root = Path(cfg.paths.output_dir)
    wall = time.perf_counter()
    teacher_file = Path(demo.teacher_weights)
    meta_file = teacher_file.with_suffix(".json")
    rows: list[tuple[str, float, float]] = []
    label_names = {"teacher": f"teacher {demo.teacher}", "none": "student alone"}

    def run(label: str, method: str, epochs: int, student: str, extra: Sequence[str] = ()) -> tuple[float, str]:
        fixed = [
            f"trainer.max_epochs={epochs}",
            f"trainer.precision={precision}",
            f"model.student.name={student}",
            f"paths.output_dir={out_root / label}",
            *extra,
        ]
        metrics, best, seconds = train_demo_run(user, method, fixed)
        rows.append((label_names.get(label, label), metrics.get("test/acc", float("nan")), seconds))
        return rows[-1][1], best

    if teacher_file.exists() and meta_file.exists():
        meta = json.loads(meta_file.read_text())
        log.info("reusing the demo teacher %s (test acc %.2f%%)", teacher_file, 100 * meta["test_acc"])
        rows.append((f"teacher {demo.teacher} (reused)", meta["test_acc"], 0.0))
    else:
        acc, best = run("teacher", "none", demo.teacher_epochs, demo.teacher)
        save_student_as_teacher(best, teacher_file, test_acc=acc)
        meta_file.write_text(json.dumps({"test_acc": acc, "source": best, "epochs": demo.teacher_epochs}))
    teacher = [f"model.teacher.name={demo.teacher}", f"model.teacher.weights={teacher_file}"]
    for method in demo.methods:
        label_names.setdefault(method, f"student + {method}")
        run(method, method, demo.student_epochs, demo.student, teacher)
    total = time.perf_counter() - wall
    lines = [
        "",
        f"Fashion-MNIST demo — {demo.student} distilled from {demo.teacher} "
        f"(seed {cfg.seed}, {demo.student_epochs} student epochs, precision {precision})",
    ]
    if user:
        lines.append(f"overrides: {' '.join(user)}")
    lines.append(f"{'run':<34}{'test top-1':>12}{'time (s)':>11}")
    lines += [f"{name:<34}{100 * acc:>11.2f}%{secs:>11.1f}" for name, acc, secs in rows]
    lines.append(f"{'total wall time':<34}{'':>12}{total:>11.1f}")
    lines.append(f"outputs: {out_root}")
    print("\n".join(lines), flush=True)
    return rows[-1][1]
