"""The embedded demo (``python -m diffkd.train`` with no arguments, ``make demo``) — the former home of the demo kit.

The protocol shared by every demo lives in :mod:`diffkd.demos.protocol` and the classification demo's declaration in
:mod:`diffkd.demos.classification`; this module re-exports both under their old names (``pipeline: demo`` runs
:func:`run_demo`; the notebooks import :func:`train_demo_run`, :func:`demo_run_config`, ...).
"""

from __future__ import annotations

from diffkd.demos.classification import demo_table, run_demo
from diffkd.demos.protocol import (
    cached_teacher,
    cpu_supports_bf16,
    demo_precision,
    demo_run_config,
    demo_seeds,
    demo_user_overrides,
    mean_std,
    recipe_changes,
    save_student_as_teacher,
    seed_summary,
    spread_verdict,
    teacher_recipe,
    train_demo_run,
)

__all__ = [
    "cached_teacher",
    "cpu_supports_bf16",
    "demo_precision",
    "demo_run_config",
    "demo_seeds",
    "demo_table",
    "demo_user_overrides",
    "mean_std",
    "recipe_changes",
    "run_demo",
    "save_student_as_teacher",
    "seed_summary",
    "spread_verdict",
    "teacher_recipe",
    "train_demo_run",
]
