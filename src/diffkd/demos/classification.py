"""The embedded classification demo (``python -m diffkd.train`` with no arguments, ``make demo``), declared.

On Fashion-MNIST — offline from Debian's ``dataset-fashion-mnist`` or torchvision's download — the demo protocol
(:mod:`diffkd.demos.protocol`) trains a small teacher (or reuses the one it trained before), then the same student
once per seed of ``demo.seeds`` and method of ``demo.methods`` (alone, with KD and with DiffKD) and prints the test
accuracies: one row per method with its mean ± std and a column per seed. The number is the final weights' top-1 on
the 10 000 test images, validated once at the end (``val/acc``; no checkpoint is chosen on them).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

from diffkd.demos.protocol import Column, Demo, RunRow, format_table

__all__ = ["DEMO", "demo_table", "run_demo"]

#: The classification demo, declared: the protocol (:func:`diffkd.demos.protocol.run_protocol`) runs it.
DEMO = Demo(
    title="Fashion-MNIST demo — {student} distilled from {teacher}: test top-1 (%) of the final weights, "
    "{student_epochs} student epochs, {n_seeds} seed(s), precision {precision}",
    columns=(Column("test top-1", "val/acc", "test_acc"),),
    layout="seed_columns",
    name_width=32,
    teacher_name_key="model",
)


def run_demo(cfg: DictConfig, overrides: Sequence[str] | None = None) -> float:
    """Teacher (trained or reused), then the student once per method and seed; prints the table with mean ± std
    over ``demo.seeds`` and returns the last method's mean accuracy.

    The protocol is the same for every method: ``demo.student_epochs`` epochs of the packaged recipe (SGD, cosine
    to 0 stepped every iteration), one evaluation of the final weights on the 10 000 test images (no checkpoint is
    chosen on them), one run per seed.

    Args:
        cfg: the composed demo config (``experiment=demo``).
        overrides: the overrides it was composed with (default: the running Hydra app's command line).
    """
    return DEMO.run(cfg, overrides)


def demo_table(
    demo: DictConfig,
    precision: str,
    seeds: Sequence[int],
    user: Sequence[str],
    teacher_row: tuple[str, float, float],
    results: dict[str, list[float]],
    times: dict[str, list[float]],
    total: float,
    out_root: Path,
) -> list[str]:
    """The classification demo's printed summary from plain values (kept for callers of the former
    ``diffkd.demo.demo_table``): ``teacher_row`` = (name, accuracy, seconds); ``results``/``times``: each run's
    per-seed accuracies in [0, 1] and seconds."""
    metric = DEMO.columns[0].metric
    name, acc, secs = teacher_row
    students = [RunRow(run, None, seed, {metric: value}, seconds)
                for run in results for seed, value, seconds in zip(seeds, results[run], times[run])]  # fmt: skip
    title = DEMO.title.format(student=demo.student, teacher=demo.teacher, student_epochs=demo.student_epochs,
                              n_seeds=len(seeds), precision=precision)  # fmt: skip
    teacher = RunRow(name, None, None, {metric: acc}, secs)
    return format_table(DEMO, title, seeds, user, teacher, students, {"total": total}, out_root, demo.get("note"))
