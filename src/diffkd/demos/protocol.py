"""The demo protocol, written once: reuse or train the teacher → the student once per seed and method → the table.

Every embedded demo (Fashion-MNIST classification, the detection scenes, the segmentation scenes) is a :class:`Demo`
declaration — its title, its metric columns, how its methods are named and, where it has one, its data step
(writing the scenes) — run by :func:`run_protocol`:

1. the data step (``Demo.prepare``), whose settings also key the teacher's cache;
2. the teacher ``demo.teacher``: reused from ``demo.teacher_weights`` when the json beside it records the recipe this
   run would train it with (:func:`teacher_recipe`, :func:`cached_teacher`), else trained with the run's ``seed``
   for ``demo.teacher_epochs`` and cached with its metrics;
3. ``demo.student`` once per seed of ``demo.seeds`` and method of ``demo.methods`` (seed-major: an interrupted demo
   has every method for the seeds it finished), each for ``demo.student_epochs`` epochs of the same recipe;
4. one table: each run's metrics, mean ± std over the seeds, which differences exceed the seed-to-seed spread;
   printed and written to ``<paths.output_dir>/demo_table.txt``.

Every run is a normal :func:`diffkd.training.train` run in its own folder (``teacher/``, ``<method>/seed<k>/``),
composed by Hydra from ``train.yaml`` with the command line's overrides, ``distill=<method>`` and the protocol's
settings (:func:`demo_run_config`: ``distill.*`` overrides reach the runs whose distiller has that key).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hydra import compose
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from diffkd.config import PRIMARY_CONFIG, packaged_config
from diffkd.training import train

# The kit's log records keep the name they had when it lived in ``diffkd.demo``: log settings name it.
log = logging.getLogger("diffkd.demo")

__all__ = [
    "TABLE_FILE",
    "Column",
    "Demo",
    "Prepared",
    "RunRow",
    "cached_teacher",
    "cpu_supports_bf16",
    "demo_precision",
    "demo_run_config",
    "demo_seeds",
    "demo_user_overrides",
    "format_table",
    "mean_std",
    "recipe_changes",
    "run_protocol",
    "save_student_as_teacher",
    "seed_summary",
    "spread_verdict",
    "teacher_recipe",
    "train_demo_run",
]

#: The table, as printed, in the demo's output folder.
TABLE_FILE = "demo_table.txt"

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


# ---------------------------------------------------------------------------------------------------- declarations


@dataclass(frozen=True)
class Column:
    """One metric of a demo's table.

    Attributes:
        title: the column's header; also the name of the seed summary (``"AP"``, ``"mIoU"``).
        metric: the run's metric it shows (a key of :func:`diffkd.training.train`'s metrics, e.g. ``test/map``).
        key: its name in the cached teacher's json and weights file (``map``, ``miou``, ``test_acc``).
        width: characters, right-aligned (the ``run_rows`` layout).
        digits: decimals of the value, printed in percent.
        suffix: printed after the value (``"%"``).
    """

    title: str
    metric: str
    key: str
    width: int = 9
    digits: int = 2
    suffix: str = ""

    def format(self, value: float | None) -> str:
        """``value`` (in [0, 1]) in percent; ``n/a`` for none, NaN or < 0 (torchmetrics' -1: no ground truth)."""
        if value is None or math.isnan(value) or value < 0:
            return "n/a"
        return f"{100 * value:.{self.digits}f}{self.suffix}"


@dataclass(frozen=True)
class Prepared:
    """What a demo's data step hands the protocol.

    Attributes:
        overrides: added to every run's overrides (e.g. ``data.root=<scenes>``).
        recipe: what else shapes the teacher (``{"scenes": {...}}``): keys its cache, and is recorded in its json.
        fields: named values for the demo's title (``{train}``, ``{canvas}``).
    """

    overrides: tuple[str, ...] = ()
    recipe: Mapping[str, Any] = field(default_factory=dict)
    fields: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Demo:
    """A demo, declared: the protocol (:func:`run_protocol`) does the rest.

    Attributes:
        title: the table's heading, a ``str.format`` template of ``student``, ``teacher``, ``student_epochs``,
            ``n_seeds``, ``seed_text`` (``seed 0`` / ``seeds 0 1 2``), ``precision`` and the data step's ``fields``.
        columns: the metrics shown; the first is the one compared over seeds and returned.
        layout: ``seed_columns``: one row per method with its mean ± std and a column per seed (first metric
            only), the runs always in ``<method>/seed<k>/``; ``run_rows``: one row per run with every column, then
            the mean ± std over seeds, the runs in ``<method>/`` with one seed and ``<method>/seed<k>/`` with more.
        name_width: width of the table's first column (the run's name).
        method_names: row names of methods; a method not named here is ``student + <method less
            method_suffix>``, and ``none`` is ``student alone``.
        method_suffix: left off a method's name in its row name (``_seg``: ``kd_seg`` → ``student + kd``).
        teacher_metrics_in: the key of the teacher json's entry that holds its metrics (``test``); ``None``:
            they are top-level entries.
        teacher_name_key: the teacher json's key for the teacher's model name.
        prepare: the data step, ``prepare(cfg) -> Prepared``, run first (timed); ``None``: none.
        prepare_row: the name of a table row with the data step's seconds (``run_rows``); ``None``: no row.
    """

    title: str
    columns: tuple[Column, ...]
    layout: Literal["seed_columns", "run_rows"] = "run_rows"
    name_width: int = 34
    method_names: Mapping[str, str] = field(default_factory=dict)
    method_suffix: str = ""
    teacher_metrics_in: str | None = None
    teacher_name_key: str = "teacher"
    prepare: Callable[[DictConfig], Prepared] | None = None
    prepare_row: str | None = None

    def __post_init__(self) -> None:
        if not self.columns:
            raise ValueError("a Demo needs at least one Column: the metric it compares")
        if self.layout not in ("seed_columns", "run_rows"):
            raise ValueError(f"Demo.layout={self.layout!r}: choose 'seed_columns' or 'run_rows'")

    def method_name(self, method: str) -> str:
        """The row name of ``method``'s student runs."""
        if method in self.method_names:
            return self.method_names[method]
        return "student alone" if method == "none" else f"student + {method.removesuffix(self.method_suffix)}"

    def teacher_record(self, metrics: Mapping[str, float]) -> dict[str, Any]:
        """The teacher's metrics (by :attr:`Column.metric`) as its json records them (by :attr:`Column.key`)."""
        values = {c.key: metrics.get(c.metric, float("nan")) for c in self.columns}
        return {self.teacher_metrics_in: values} if self.teacher_metrics_in else values

    def teacher_metrics(self, record: Mapping[str, Any]) -> dict[str, float]:
        """The inverse of :meth:`teacher_record`: a cached teacher's json → its metrics (missing ones NaN)."""
        values = record.get(self.teacher_metrics_in) or {} if self.teacher_metrics_in else record
        return {c.metric: values.get(c.key, float("nan")) for c in self.columns}

    def run(self, cfg: DictConfig, overrides: Sequence[str] | None = None) -> float:
        """:func:`run_protocol` of this demo."""
        return run_protocol(self, cfg, overrides)


@dataclass(frozen=True)
class RunRow:
    """One run of a demo: its row name, method (``None``: the teacher), seed, metrics and seconds."""

    name: str
    method: str | None
    seed: int | None
    metrics: Mapping[str, float]
    seconds: float


# ---------------------------------------------------------------------------------------------- composing the runs


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


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def demo_run_config(base: Sequence[str], method: str, fixed: Sequence[str]) -> DictConfig:
    """``train.yaml`` composed with the user's overrides ``base``, ``distill=<method>`` and the demo's ``fixed``
    settings. A ``distill.<key>`` override reaches the run only when its distiller has that key's parent (the
    ``diffkd`` run has ``distill.diffkd``, the ``kd`` run has not)."""
    with packaged_config(keep_running_app=True):
        plain = [o for o in base if not _key(o).startswith("distill.")]
        probe = compose(config_name=PRIMARY_CONFIG, overrides=[*plain, f"distill={method}", *fixed])
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
        return compose(config_name=PRIMARY_CONFIG, overrides=[*kept, f"distill={method}", *fixed])


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


def demo_seeds(demo: DictConfig, default: int) -> list[int]:
    """``demo.seeds`` as ints; ``null`` (or absent) = ``[default]`` (the run's ``seed``)."""
    seeds = demo.get("seeds")
    seeds = [default] if seeds is None else [int(s) for s in seeds]
    if not seeds:
        raise ValueError("demo.seeds is empty: give at least one seed, e.g. demo.seeds=[0,1,2]")
    return seeds


def train_demo_run(user: Sequence[str], method: str, fixed: Sequence[str]) -> tuple[dict[str, float], str, float]:
    """One demo run: ``train.yaml`` with the user's overrides, ``distill=<method>`` and ``fixed``, trained and
    tested. Returns (metrics, best checkpoint, seconds)."""
    start = time.perf_counter()
    metrics, objs = train(demo_run_config(user, method, ["pipeline=train", *fixed]))
    return metrics, objs["best_ckpt"], time.perf_counter() - start


# ------------------------------------------------------------------------------------------------ the teacher cache


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


# ------------------------------------------------------------------------------------------------------ statistics


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n − 1; 0.0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


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


def _per_seed(students: Sequence[RunRow], metric: str) -> dict[str, list[float]]:
    """Each method's row name → its runs' ``metric``, in seed order."""
    values: dict[str, list[float]] = {}
    for row in students:
        values.setdefault(row.name, []).append(row.metrics.get(metric, float("nan")))
    return values


# ------------------------------------------------------------------------------------------------------- the table


def format_table(
    spec: Demo,
    title: str,
    seeds: Sequence[int],
    user: Sequence[str],
    teacher: RunRow,
    students: Sequence[RunRow],
    seconds: Mapping[str, float],
    out_root: Path,
    note: str | None = None,
) -> list[str]:
    """The demo's summary, in ``spec.layout``: the runs, mean ± std over ``seeds`` and the spread verdict.

    Args:
        title: the heading (``spec.title`` filled in).
        user: the command line's overrides, shown when there are any.
        teacher: its row (``(reused)`` in its name when it was).
        students: one row per student run, seed-major; rows of the same method share a name.
        seconds: ``total`` (the whole demo) and ``prepare`` (the data step) wall times.
        note: ``demo.note``, printed as ``protocol: ...`` (``seed_columns``).
    """
    lines = ["", title]
    if user:
        lines.append(f"overrides: {' '.join(user)}")
    main = spec.columns[0]
    per_seed = _per_seed(students, main.metric)
    width = spec.name_width
    if spec.layout == "seed_columns":
        times = {name: [r.seconds for r in students if r.name == name] for name in per_seed}
        lines.append(
            f"{'run':<{width}}{'mean ± std':>15}" + "".join(f"{f'seed {s}':>9}" for s in seeds) + f"{'s/run':>8}"
        )
        value = teacher.metrics.get(main.metric, float("nan"))
        lines.append(f"{teacher.name:<{width}}{100 * value:>15.2f}{'':>{9 * len(seeds)}}{teacher.seconds:>8.1f}")
        for name, values in per_seed.items():
            mean, std = mean_std(values)
            cells = f"{f'{100 * mean:.2f} ± {100 * std:.2f}':>15}" + "".join(f"{100 * v:>9.2f}" for v in values)
            lines.append(f"{name:<{width}}{cells}{mean_std(times[name])[0]:>8.1f}")
        lines.append(spread_verdict(per_seed))
        if note:
            lines.append(f"protocol: {note}")
        lines.append(f"total wall time {seconds['total']:.0f} s")
        lines.append(
            f"runs: {out_root}/<method>/seed<k>/ — checkpoints/ (last.ckpt), csv/version_0/metrics.csv (every logged "
            "loss term and metric); curves: pandas.read_csv(...) or rerun with logger=tensorboard and "
            f"`tensorboard --logdir {out_root}`"
        )
        return lines
    several = len(seeds) > 1
    cells_width = sum(c.width for c in spec.columns)
    lines.append(f"{'run':<{width}}" + "".join(f"{c.title:>{c.width}}" for c in spec.columns) + f"{'time (s)':>10}")
    for row in (teacher, *students):
        name = f"{row.name}, seed {row.seed}" if several and row.method is not None else row.name
        cells = "".join(f"{c.format(row.metrics.get(c.metric)):>{c.width}}" for c in spec.columns)
        lines.append(f"{name:<{width}}{cells}{row.seconds:>10.1f}")
    lines += seed_summary(per_seed, main.title, digits=main.digits)
    if spec.prepare_row:
        lines.append(f"{spec.prepare_row:<{width}}{'':>{cells_width}}{seconds['prepare']:>10.1f}")
    lines.append(f"{'total wall time':<{width}}{'':>{cells_width}}{seconds['total']:>10.1f}")
    lines.append(f"outputs: {out_root}" + (" (<method>/seed<k>/)" if several else ""))
    return lines


# ---------------------------------------------------------------------------------------------------- the protocol


def run_protocol(spec: Demo, cfg: DictConfig, overrides: Sequence[str] | None = None) -> float:
    """The demo ``spec`` on the composed config ``cfg``: data step, teacher (trained or reused), the student once
    per seed and method; prints the table (and writes it to ``<paths.output_dir>/demo_table.txt``).

    The protocol is the same for every method: ``demo.student_epochs`` epochs of the experiment's recipe, the
    packaged distill configs as they are, one run per seed of ``demo.seeds`` (``null``: the run's ``seed``).

    Args:
        spec: the demo's declaration.
        cfg: the composed demo config (``experiment=demo``, ``demo_detection``, ...): its ``demo`` block names
            ``teacher``, ``student``, ``teacher_epochs``, ``student_epochs``, ``methods``, ``seeds``,
            ``precision``, ``teacher_weights`` (and optionally ``note``).
        overrides: the overrides it was composed with (default: the running Hydra app's command line).

    Returns:
        The last method's mean over the seeds of the first column's metric (in [0, 1]).
    """
    demo = cfg.demo
    missing = [k for k in ("teacher", "student", "teacher_epochs", "student_epochs", "methods", "teacher_weights")
               if OmegaConf.select(demo, k, default=None) is None]  # fmt: skip
    if missing:
        raise ValueError(f"the demo block lacks {missing}: set them in the experiment file (demo.<key>: ...)")
    if not demo.methods:
        raise ValueError("demo.methods is empty: give at least one method, e.g. demo.methods=[none,kd]")
    user = demo_user_overrides(demo, overrides)
    precision = demo_precision(demo)
    seeds = demo_seeds(demo, int(cfg.seed))
    out_root = Path(cfg.paths.output_dir)
    wall = time.perf_counter()
    prepared = spec.prepare(cfg) if spec.prepare is not None else Prepared()
    seconds = {"prepare": time.perf_counter() - wall}

    def settings(folder: str, epochs: int, model: str, seed: int, extra: Sequence[str] = ()) -> list[str]:
        return [f"seed={seed}", f"trainer.max_epochs={epochs}", f"trainer.precision={precision}",
                f"model.student.name={model}", f"paths.output_dir={out_root / folder}", *prepared.overrides,
                *extra]  # fmt: skip

    teacher_file = Path(demo.teacher_weights)
    teacher_settings = settings("teacher", demo.teacher_epochs, demo.teacher, int(cfg.seed))
    recipe = teacher_recipe(demo_run_config(user, "none", ["pipeline=train", *teacher_settings]), **prepared.recipe)
    meta, message = cached_teacher(teacher_file, recipe)
    log.info(message)
    if meta is not None:
        metrics = spec.teacher_metrics(meta)
        main = spec.columns[0]
        log.info("demo teacher %s: %s %s", teacher_file, main.title, main.format(metrics[main.metric]))
        teacher = RunRow(f"teacher {demo.teacher} (reused)", None, None, metrics, 0.0)
    else:
        metrics, best, secs = train_demo_run(user, "none", teacher_settings)
        record = spec.teacher_record(metrics)
        save_student_as_teacher(best, teacher_file, **record)
        info = {
            spec.teacher_name_key: demo.teacher,
            **record,
            "epochs": demo.teacher_epochs,
            "source": best,
            **prepared.recipe,
        }
        teacher_file.with_suffix(".json").write_text(json.dumps({**info, "recipe": recipe}, indent=1))
        teacher = RunRow(f"teacher {demo.teacher}", None, None, metrics, secs)

    with_teacher = [f"model.teacher.name={demo.teacher}", f"model.teacher.weights={teacher_file}"]
    students: list[RunRow] = []
    for seed in seeds:  # seed-major: an interrupted demo has every method for the seeds it finished
        for method in demo.methods:
            folder = method if len(seeds) == 1 and spec.layout == "run_rows" else f"{method}/seed{seed}"
            fixed = settings(folder, demo.student_epochs, demo.student, seed, with_teacher)
            metrics, _, secs = train_demo_run(user, method, fixed)
            students.append(RunRow(spec.method_name(method), method, seed, metrics, secs))
    seconds["total"] = time.perf_counter() - wall

    fields = {"student": demo.student, "teacher": demo.teacher, "student_epochs": demo.student_epochs,
              "n_seeds": len(seeds), "precision": precision,
              "seed_text": f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {' '.join(map(str, seeds))}",
              **prepared.fields}  # fmt: skip
    lines = format_table(spec, spec.title.format(**fields), seeds, user, teacher, students, seconds, out_root,
                         demo.get("note"))  # fmt: skip
    print("\n".join(lines), flush=True)
    out_root.mkdir(parents=True, exist_ok=True)
    (out_root / TABLE_FILE).write_text("\n".join(lines[1:]) + "\n")
    last = spec.method_name(demo.methods[-1])
    return mean_std(_per_seed(students, spec.columns[0].metric)[last])[0]
