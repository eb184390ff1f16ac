"""The benchmarks: ``python -m diffkd.bench`` (classification pairs: student / KD / DiffKD steps, the DiffKD head,
the official code) and ``python -m diffkd.bench_tasks`` (segmentation and detection: the heads' cost, steps).

Both compose the packaged experiments (``experiment=<name> distill=<name>``) and time the task's own module on its
own synthetic batch (:mod:`diffkd.bench.common`); :mod:`diffkd.bench.classification` and :mod:`diffkd.bench.tasks`
only say what is measured and how it is reported. Figures measured with them are in ``BENCHMARKS.md``.
"""

from diffkd.bench import classification as _classification
from diffkd.bench.classification import *  # noqa: F403  (``import diffkd.bench`` keeps its former names)
from diffkd.bench.classification import BENCHMARKS_DIR_ENV
from diffkd.bench.common import TimedSteps, time_training_steps

__all__ = [*_classification.__all__, "BENCHMARKS_DIR_ENV", "TimedSteps", "time_training_steps"]
