"""The embedded demo (``python -m diffkd.train`` with no arguments, ``make demo``).

On Fashion-MNIST — offline from Debian's ``dataset-fashion-mnist`` or torchvision's download — it trains a small
teacher (or reuses the one it trained before), then the same student three times: alone, with KD and with DiffKD,
and prints the four test accuracies. Every run is a normal :func:`diffkd.train.train` run with its own folder.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger("diffkd.demo")

__all__ = ["cpu_supports_bf16", "run_demo"]


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


def _distill_cfg(name: str) -> DictConfig:
    return OmegaConf.load(Path(__file__).resolve().parent / "conf" / "distill" / f"{name}.yaml")


def _run(cfg: DictConfig, label: str, distill: str, epochs: int, student: str) -> tuple[float, float, str]:
    from diffkd.train import train

    run_cfg = cfg.copy()
    with open_dict(run_cfg):
        run_cfg.distill = _distill_cfg(distill)
        run_cfg.trainer.max_epochs = epochs
        run_cfg.model.student.name = student
        run_cfg.paths.output_dir = str(Path(cfg.paths.output_dir) / label)
        run_cfg.trainer.default_root_dir = run_cfg.paths.output_dir
        for cb in run_cfg.get("callbacks", {}).values():
            if cb is not None and "dirpath" in cb:
                cb.dirpath = str(Path(run_cfg.paths.output_dir) / "checkpoints")
        for lg in run_cfg.get("logger", {}).values():
            if lg is not None and "save_dir" in lg:
                lg.save_dir = run_cfg.paths.output_dir
    start = time.perf_counter()
    metrics, objs = train(run_cfg)
    seconds = time.perf_counter() - start
    best = objs["best_ckpt"]
    return metrics.get("test/acc", float("nan")), seconds, best


def run_demo(cfg: DictConfig) -> float:
    """Teacher (trained or reused), then student alone / KD / DiffKD; prints and returns DiffKD's accuracy."""
    demo = cfg.demo
    with open_dict(cfg):
        if demo.get("precision", "auto") == "auto":
            cfg.trainer.precision = "bf16-mixed" if cpu_supports_bf16() else "32-true"
        else:
            cfg.trainer.precision = demo.precision
    wall = time.perf_counter()
    teacher_file = Path(demo.teacher_weights)
    meta_file = teacher_file.with_suffix(".json")
    rows: list[tuple[str, float, float]] = []
    if teacher_file.exists() and meta_file.exists():
        meta = json.loads(meta_file.read_text())
        log.info("reusing the demo teacher %s (test acc %.2f%%)", teacher_file, 100 * meta["test_acc"])
        rows.append((f"teacher {demo.teacher} (reused)", meta["test_acc"], 0.0))
    else:
        acc, secs, best = _run(cfg, "teacher", "none", demo.teacher_epochs, demo.teacher)
        import torch

        ckpt = torch.load(best, map_location="cpu", weights_only=True)
        teacher_file.parent.mkdir(parents=True, exist_ok=True)
        state = {k.removeprefix("student."): v for k, v in ckpt["state_dict"].items() if k.startswith("student.")}
        torch.save({"model": state, "test_acc": acc}, teacher_file)
        meta_file.write_text(json.dumps({"test_acc": acc, "source": best, "epochs": demo.teacher_epochs}))
        rows.append((f"teacher {demo.teacher}", acc, secs))
    with open_dict(cfg):
        cfg.model.teacher.name = demo.teacher
        cfg.model.teacher.weights = str(teacher_file)
    for method in demo.methods:
        label = {"none": "student alone"}.get(method, f"student + {method}")
        acc, secs, _ = _run(cfg, method, method, demo.student_epochs, demo.student)
        rows.append((label, acc, secs))
    total = time.perf_counter() - wall
    lines = [
        "",
        f"Fashion-MNIST demo — {demo.student} distilled from {demo.teacher} "
        f"(seed {cfg.seed}, {demo.student_epochs} student epochs, precision {cfg.trainer.precision})",
        f"{'run':<34}{'test top-1':>12}{'time (s)':>11}",
    ]
    lines += [f"{name:<34}{100 * acc:>11.2f}%{secs:>11.1f}" for name, acc, secs in rows]
    lines.append(f"{'total wall time':<34}{'':>12}{total:>11.1f}")
    lines.append(f"outputs: {cfg.paths.output_dir}")
    print("\n".join(lines), flush=True)
    return rows[-1][1]
