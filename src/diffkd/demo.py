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
import math
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

CONFIG_DIR = str(Path(__file__).resolve().parent / "conf")

# The groups of a run's config that shape what it learns, and the entries in them that do not: where the run writes,
# how it reports, how fast it loads, what it would do with a teacher (the teacher's own run has none).
_RECIPE_GROUPS = ("seed", "model", "data", "distill", "optim", "trainer", "callbacks")
_NOT_RECIPE = {
    "model": ("teacher", "compile", "compile_mode", "nonfinite_check_every", "iou_table", "input_size"),
    "data": ("data_dir", "root", "num_workers", "pin_memory", "download", "debian_dir", "verify", "cache"),
    "trainer": ("default_root_dir", "log_every_n_steps", "enable_progress_bar", "enable_model_summary", "logger"),
    "callbacks": ("progress_bar", "rich_progress_bar", "lr_monitor", "model_summary"),
}
_CALLBACK_PLACES = ("dirpath", "filename")


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


def teacher_recipe(cfg: DictConfig, **extra: Any) -> dict[str, Any]:
    """What shapes the teacher that the run ``cfg`` trains, as plain data to compare with a cached teacher's.

    The run's seed, model (the teacher is its student; no teacher of its own), data, distiller, optimizer, trainer
    (epochs, precision, clipping, ...) and callbacks, resolved, less the entries that only say where the run writes,
    how it reports or how it loads (``data.root``, ``trainer.log_every_n_steps``, the progress bar, checkpoint
    folders, ...). ``extra``: whatever else shapes it (the scene set's parameters).
    """
    resolved = OmegaConf.to_container(cfg, resolve=True)
    recipe: dict[str, Any] = {}
    for group in _RECIPE_GROUPS:
        value = resolved.get(group)
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if k not in _NOT_RECIPE.get(group, ())}
        recipe[group] = value
    for callback in (recipe.get("callbacks") or {}).values():
        if isinstance(callback, dict):
            for key in _CALLBACK_PLACES:
                callback.pop(key, None)
    return {**recipe, **extra}


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        return {k: v for key, sub in value.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}


def recipe_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``"key: old → new"`` for every entry (dotted keys) where two :func:`teacher_recipe` s differ."""
    a, b = _flat(old), _flat(new)
    missing = object()
    return [
        f"{key}: {a.get(key, '(none)')} → {b.get(key, '(none)')}"
        for key in sorted(a.keys() | b.keys())
        if a.get(key, missing) != b.get(key, missing)
    ]


def cached_teacher(teacher_file: Path, recipe: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """The json of the teacher cached in ``teacher_file`` when it was trained with ``recipe``, else ``None``; and
    the log line that says which happens (reused, or trained again and why).

    The json beside the weights (``<teacher_file>.json``) records the recipe it was trained with; a teacher whose
    json records none (written before the recipe was kept) or another one is trained again and replaces it.
    """
    meta_file = teacher_file.with_suffix(".json")
    if not teacher_file.is_file() or not meta_file.is_file():
        return None, f"no cached demo teacher at {teacher_file}: training one"
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as err:
        return None, f"the cached demo teacher's {meta_file} is unreadable ({err}): training the teacher again"
    if meta.get("recipe") is None:
        return None, (
            f"the cached demo teacher {teacher_file} records no training settings (written by an older diffkd): "
            "training it again, with this run's settings"
        )
    changes = recipe_changes(meta["recipe"], json.loads(json.dumps(recipe)))
    if changes:
        shown = "; ".join(changes[:6]) + (f"; … ({len(changes)} in all)" if len(changes) > 6 else "")
        return None, (
            f"the cached demo teacher {teacher_file} was trained with other settings ({shown}): training a new "
            "one, which replaces it"
        )
    return meta, f"reusing the demo teacher {teacher_file}: trained with this run's settings"


def save_student_as_teacher(best_ckpt: str, teacher_file: Path, **extra: Any) -> None:
    """The student of a run's checkpoint as a teacher file ``{"model": state_dict, **extra}``."""
    import torch

    ckpt = torch.load(best_ckpt, map_location="cpu", weights_only=True)
    state = {k.removeprefix("student."): v for k, v in ckpt["state_dict"].items() if k.startswith("student.")}
    teacher_file.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state, **extra}, teacher_file)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n − 1; 0.0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def demo_seeds(demo: DictConfig, default: int) -> list[int]:
    """``demo.seeds`` as ints; ``null`` (or absent) = ``[default]`` (the run's ``seed``)."""
    seeds = demo.get("seeds")
    seeds = [default] if seeds is None else [int(s) for s in seeds]
    if not seeds:
        raise ValueError("demo.seeds is empty: give at least one seed, e.g. demo.seeds=[0,1,2]")
    return seeds


def seed_summary(per_seed: dict[str, list[float]], metric: str, digits: int) -> list[str]:
    """Lines for a demo table with several seeds: each run's mean ± std of ``metric`` (in %) and the spread
    verdict; nothing for a single seed."""
    if len(next(iter(per_seed.values()), [])) < 2:
        return []
    lines = [f"{metric} over {len(next(iter(per_seed.values())))} seeds (mean ± std):"]
    for name, values in per_seed.items():
        mean, std = mean_std(values)
        lines.append(f"  {name:<38}{100 * mean:>8.{digits}f} ± {100 * std:.{digits}f}")
    return [*lines, spread_verdict(per_seed)]


def spread_verdict(results: dict[str, Sequence[float]], unit: float = 100.0) -> str:
    """One line saying which differences of means exceed the seed-to-seed spread.

    A difference between two runs' means "exceeds the spread" when ``|mean_a − mean_b| > std_a + std_b`` (sample
    standard deviations over the seeds) — a plain, documented rule, not a significance test. ``results`` maps a
    run's name to its per-seed values (in [0, 1]; printed × ``unit``).
    """
    names = list(results)
    if any(len(v) < 2 for v in results.values()):
        return "one seed per run: no spread to compare the differences with (demo.seeds=[0,1,2] gives one)"
    beyond, within = [], []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            (ma, sa), (mb, sb) = mean_std(results[a]), mean_std(results[b])
            text = f"{b} − {a} {unit * (mb - ma):+.2f} (spread {unit * (sa + sb):.2f})"
            (beyond if abs(mb - ma) > sa + sb else within).append(text)
    return (
        "differences beyond the seed spread (|Δ mean| > std₁ + std₂): "
        + ("; ".join(beyond) or "none")
        + " — within it: "
        + ("; ".join(within) or "none")
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
    demo = cfg.demo
    user = demo_user_overrides(demo, overrides)
    precision = demo_precision(demo)
    out_root = Path(cfg.paths.output_dir)
    seeds = demo_seeds(demo, int(cfg.seed))
    wall = time.perf_counter()
    teacher_file = Path(demo.teacher_weights)
    meta_file = teacher_file.with_suffix(".json")
    metric = "val/acc"  # the final weights on Fashion-MNIST's test split (validated once, at the end)

    def settings(epochs: int, student: str, folder: Path, seed: int, extra: Sequence[str] = ()) -> list[str]:
        return [
            f"seed={seed}",
            f"trainer.max_epochs={epochs}",
            f"trainer.precision={precision}",
            f"model.student.name={student}",
            f"paths.output_dir={folder}",
            *extra,
        ]

    def run(method: str, epochs: int, student: str, folder: Path, seed: int, extra: Sequence[str] = ()):
        metrics, best, seconds = train_demo_run(user, method, settings(epochs, student, folder, seed, extra))
        return metrics.get(metric, float("nan")), best, seconds

    teacher_fixed = settings(demo.teacher_epochs, demo.teacher, out_root / "teacher", int(cfg.seed))
    recipe = teacher_recipe(demo_run_config(user, "none", ["pipeline=train", *teacher_fixed]))
    meta, message = cached_teacher(teacher_file, recipe)
    log.info(message)
    if meta is not None:
        log.info("demo teacher %s: test acc %.2f%%", teacher_file, 100 * meta["test_acc"])
        teacher_row = (f"teacher {demo.teacher} (reused)", meta["test_acc"], 0.0)
    else:
        acc, best, seconds = run("none", demo.teacher_epochs, demo.teacher, out_root / "teacher", int(cfg.seed))
        save_student_as_teacher(best, teacher_file, test_acc=acc)
        meta = {"test_acc": acc, "source": best, "epochs": demo.teacher_epochs, "model": demo.teacher}
        meta_file.write_text(json.dumps({**meta, "recipe": recipe}))
        teacher_row = (f"teacher {demo.teacher}", acc, seconds)
    teacher = [f"model.teacher.name={demo.teacher}", f"model.teacher.weights={teacher_file}"]
    names = {"none": "student alone"}
    results: dict[str, list[float]] = {}
    times: dict[str, list[float]] = {}
    for seed in seeds:  # seed-major: an interrupted demo has every method for the seeds it finished
        for method in demo.methods:
            acc, _, seconds = run(method, demo.student_epochs, demo.student, out_root / method / f"seed{seed}", seed,
                                  teacher)  # fmt: skip
            name = names.setdefault(method, f"student + {method}")
            results.setdefault(name, []).append(acc)
            times.setdefault(name, []).append(seconds)
    total = time.perf_counter() - wall
    print("\n".join(demo_table(demo, precision, seeds, user, teacher_row, results, times, total, out_root)),
          flush=True)  # fmt: skip
    return mean_std(results[names[demo.methods[-1]]])[0]


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
    """The demo's printed summary: one row per run (mean ± std and each seed's value, in %), the spread verdict
    and where the runs, metrics and curves are."""
    seed_cols = "".join(f"{f'seed {s}':>9}" for s in seeds)
    lines = [
        "",
        f"Fashion-MNIST demo — {demo.student} distilled from {demo.teacher}: test top-1 (%) of the final weights, "
        f"{demo.student_epochs} student epochs, {len(seeds)} seed(s), precision {precision}",
    ]
    if user:
        lines.append(f"overrides: {' '.join(user)}")
    lines.append(f"{'run':<32}{'mean ± std':>15}{seed_cols}{'s/run':>8}")
    name, acc, secs = teacher_row
    lines.append(f"{name:<32}{100 * acc:>15.2f}{'':>{9 * len(seeds)}}{secs:>8.1f}")
    for name, accs in results.items():
        mean, std = mean_std(accs)
        per_seed = "".join(f"{100 * a:>9.2f}" for a in accs)
        lines.append(f"{name:<32}{f'{100 * mean:.2f} ± {100 * std:.2f}':>15}{per_seed}{mean_std(times[name])[0]:>8.1f}")
    lines.append(spread_verdict(results))
    if demo.get("note"):
        lines.append(f"protocol: {demo.note}")
    lines.append(f"total wall time {total:.0f} s")
    lines.append(
        f"runs: {out_root}/<method>/seed<k>/ — checkpoints/ (last.ckpt), csv/version_0/metrics.csv (every logged "
        "loss term and metric); curves: pandas.read_csv(...) or rerun with logger=tensorboard and "
        f"`tensorboard --logdir {out_root}`"
    )
    return lines
