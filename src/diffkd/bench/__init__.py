"""The benchmarks: ``python -m diffkd.bench`` (classification pairs: student / KD / DiffKD steps, the DiffKD head,
the official code) and ``python -m diffkd.bench_tasks`` (segmentation and detection: the heads' cost, steps).

Both compose the packaged experiments (``experiment=<name> distill=<name>``) and time the task's own module on its
own synthetic batch (:mod:`diffkd.bench.common`); :mod:`diffkd.bench.classification` and :mod:`diffkd.bench.tasks`
only say what is measured and how it is reported. Figures measured with them are in ``BENCHMARKS.md``.
"""

from diffkd.bench.classification import (
    BENCHMARKS_DIR_ENV,
    OFFICIAL_METHODS,
    PAIRS,
    BenchResult,
    bench_head,
    bench_step,
    load_official_bench,
    main,
    pair_config,
)
from diffkd.bench.common import TimedSteps, device_name, time_training_steps

__all__ = [
    "BENCHMARKS_DIR_ENV",
    "OFFICIAL_METHODS",
    "PAIRS",
    "BenchResult",
    "TimedSteps",
    "bench_head",
    "bench_step",
    "device_name",
    "load_official_bench",
    "main",
    "pair_config",
    "time_training_steps",
]
