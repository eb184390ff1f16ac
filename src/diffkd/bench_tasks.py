"""``python -m diffkd.bench_tasks``: the dense tasks' benchmark, now :mod:`diffkd.bench.tasks` (this name stays)."""

from diffkd.bench.tasks import *  # noqa: F403
from diffkd.bench.tasks import __all__, main  # noqa: F401

if __name__ == "__main__":
    main()
