"""``python -m diffkd.report <folder> [<folder> ...]`` — the results table of a sweep's runs, in markdown.

Rows are methods (the ``distill`` config choice), columns are pairs (the experiment, else the run's ``task_name``);
each cell is the mean ± sample standard deviation (n − 1) over the runs' seeds and their number, with the paper's
number beside it where :mod:`diffkd.paper_results` has one (for accuracy-like metrics only: the paper's numbers are
top-1 accuracies). E.g. after
``python -m diffkd.train -m experiment=cifar_wrn40_wrn40_1 distill=fitnet,kd,dist,diffkd seed=0,1,2``::

    python -m diffkd.report logs/cifar_wrn40_wrn40_1/multiruns/<time> --out table.md

Where things come from, per job folder (any folder under the given ones that holds ``metrics.json``,
``checkpoints/`` or a ``.hydra/`` of a training job; a folder given may be a multirun folder, a ``runs`` folder,
one run, or the demo's run folder with its ``<method>/seed<k>/`` runs):

- the metrics: ``metrics.json``, which :func:`diffkd.training.train` writes atomically when a run ends (final
  validation and test metrics). A folder without it did not finish (or failed) and is listed as skipped; with
  ``--from-csv`` a run written before ``metrics.json`` existed is read from its CSV log instead (the last value
  logged of each metric — that the run finished is then not checked).
- the metric: ``--metric NAME``, else each run's ``optimized_metric`` (CIFAR/ImageNet ``val/acc_best``, detection
  ``val/map_best``, segmentation ``val/miou_best``; the demo ``val/acc_best``, its one validation at the end).
  Accuracies, mAP and mIoU are shown in percent.
- the method: ``metrics.json``'s ``method`` (Hydra's ``distill`` choice), else ``.hydra/hydra.yaml``'s
  ``runtime.choices.distill``, else a ``distill=`` override, else the demo's layout (``<method>/seed<k>``, and
  ``teacher``); the pair likewise from the ``experiment`` choice, else ``task_name``; the seed from the run's config.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import re
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffkd.paper_results import PAPER_TABLES, paper_result

__all__ = ["Run", "Skipped", "Table", "build_table", "find_runs", "format_markdown", "main", "read_run"]

METRICS_FILE = "metrics.json"
#: Folders inside a run that never hold another run.
_RUN_PARTS = {".hydra", "checkpoints", "csv", "wandb", "tensorboard", "lightning_logs", ".submitit"}
#: Row order: the paper's Table 9 order, then any other method alphabetically.
_METHOD_ORDER = (
    "teacher",
    "none",
    "fitnet",
    "vid",
    "rkd",
    "pkt",
    "crd",
    "kd",
    "dist",
    "dkd",
    "reviewkd",
    "diffkd",
    "diffkd_dist",
)
_METHOD_NAMES = {"none": "none (student alone)"}
_PERCENT = re.compile(r"(^|_)(acc|map|miou|top1|top5)")


@dataclass(frozen=True)
class Run:
    """One finished run: where it is, what it is (pair, method, seed) and its final metrics."""

    folder: Path
    pair: str
    method: str
    seed: int | None
    metrics: dict[str, float]
    optimized_metric: str | None
    source: str  # "metrics.json" or "csv"


@dataclass(frozen=True)
class Skipped:
    """A job folder that holds no usable finished run, and why."""

    folder: Path
    reason: str


@dataclass
class Cell:
    """The runs of one (pair, method, metric): their values and seeds."""

    values: list[float] = field(default_factory=list)
    seeds: list[int | None] = field(default_factory=list)

    @property
    def mean_std(self) -> tuple[float, float | None]:
        """Mean and sample standard deviation (n − 1); ``None`` for one value."""
        n = len(self.values)
        mean = sum(self.values) / n
        if n < 2:
            return mean, None
        return mean, math.sqrt(sum((v - mean) ** 2 for v in self.values) / (n - 1))


@dataclass
class Table:
    """The report: ``cells[(pair, metric)][method]``, the skipped folders and the notes to print."""

    cells: dict[tuple[str, str], dict[str, Cell]]
    skipped: list[Skipped]
    notes: list[str]
    runs: int


# --- finding and reading runs -----------------------------------------------------------------------------------


def _load_yaml(path: Path) -> Any:
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception:  # unreadable or half-written: treated as absent
        return None


def _is_job_folder(folder: Path) -> bool:
    """A folder of one training run (not a container of runs such as the demo's Hydra folder)."""
    if (folder / METRICS_FILE).is_file() or (folder / "checkpoints").is_dir():
        return True
    config = folder / ".hydra" / "config.yaml"
    if config.is_file():
        loaded = _load_yaml(config)
        return not isinstance(loaded, dict) or loaded.get("pipeline", "train") == "train"
    return False


def find_runs(folders: Iterable[Path]) -> list[Path]:
    """The job folders at or under ``folders`` (sorted, each once; a job folder's own sub-folders are not
    searched)."""
    found: set[Path] = set()

    def walk(folder: Path) -> None:
        if _is_job_folder(folder):
            found.add(folder.resolve())
            return
        for child in sorted(p for p in folder.iterdir() if p.is_dir() and p.name not in _RUN_PARTS):
            walk(child)

    for folder in folders:
        if folder.is_dir():
            walk(folder)
    return sorted(found, key=lambda p: [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", str(p))])


def _csv_metrics(folder: Path) -> dict[str, float]:
    """The last value logged of each metric in the run's CSV log(s) (``csv/version_*/metrics.csv``)."""
    metrics: dict[str, float] = {}
    for path in sorted(folder.glob("csv/version_*/metrics.csv")):
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                for key, value in row.items():
                    if key in {"epoch", "step"} or value in (None, ""):
                        continue
                    with contextlib.suppress(ValueError):
                        metrics[key] = float(value)
    return metrics


def _override(overrides: Any, key: str) -> str | None:
    for item in overrides if isinstance(overrides, list) else []:
        name, _, value = str(item).partition("=")
        if name.lstrip("+~") == key:
            return value
    return None


def _demo_layout(folder: Path) -> tuple[str | None, int | None]:
    """The demo's run folders: ``<method>/seed<k>`` → (method, k); ``teacher`` → ("teacher", None); a one-seed
    detection/segmentation demo's ``<method>`` beside its ``demo_table.txt`` → (method, None)."""
    match = re.fullmatch(r"seed(\d+)", folder.name)
    if match:
        return folder.parent.name, int(match.group(1))
    if folder.name == "teacher":
        return "teacher", None
    if (folder.parent / "demo_table.txt").is_file():
        return folder.name, None
    return None, None


def read_run(folder: Path, from_csv: bool = False) -> Run | Skipped:
    """The finished run in ``folder``, or why it cannot be read as one."""
    record: dict[str, Any] = {}
    source = METRICS_FILE
    metrics_file = folder / METRICS_FILE
    if metrics_file.is_file():
        try:
            record = json.loads(metrics_file.read_text())
        except (OSError, ValueError) as err:
            return Skipped(folder, f"{METRICS_FILE} is unreadable ({err})")
        metrics = {k: float("nan") if v is None else float(v) for k, v in (record.get("metrics") or {}).items()}
    elif from_csv and list(folder.glob("csv/version_*/metrics.csv")):
        metrics, source = _csv_metrics(folder), "csv"
    else:
        has_ckpt = (folder / "checkpoints" / "last.ckpt").is_file()
        what = "a last.ckpt but " if has_ckpt else ""
        hint = " (--from-csv reads an older run's CSV log)" if list(folder.glob("csv/version_*/metrics.csv")) else ""
        return Skipped(folder, f"not finished: {what}no {METRICS_FILE}{hint}")
    config = _load_yaml(folder / ".hydra" / "config.yaml") or {}
    hydra = _load_yaml(folder / ".hydra" / "hydra.yaml") or {}
    overrides = _load_yaml(folder / ".hydra" / "overrides.yaml")
    choices = ((hydra.get("hydra") or {}).get("runtime") or {}).get("choices") or {}
    demo_method, demo_seed = _demo_layout(folder)
    method = record.get("method") or choices.get("distill") or _override(overrides, "distill") or demo_method
    pair = record.get("experiment") or choices.get("experiment") or record.get("task_name") or config.get("task_name")
    seed = record.get("seed", config.get("seed"))
    if seed is None:
        seed = demo_seed
    if method is None:
        return Skipped(folder, "its method (distill choice) is recorded nowhere (no .hydra/, not the demo's layout)")
    return Run(
        folder=folder,
        pair=str(pair or folder.name),
        method=str(method),
        seed=None if seed is None else int(seed),
        metrics=metrics,
        optimized_metric=record.get("optimized_metric") or config.get("optimized_metric"),
        source=source,
    )


# --- the table ----------------------------------------------------------------------------------------------------


def build_table(runs: Sequence[Run], skipped: Sequence[Skipped], metric: str | None = None) -> Table:
    """Group ``runs`` by (pair, metric, method): ``metric``, else each run's ``optimized_metric``."""
    cells: dict[tuple[str, str], dict[str, Cell]] = defaultdict(dict)
    skipped = list(skipped)
    notes: list[str] = []
    used = 0
    for run in runs:
        name = metric or run.optimized_metric
        if not name:
            skipped.append(Skipped(run.folder, "no optimized_metric recorded: give --metric NAME"))
            continue
        value = run.metrics.get(name)
        if value is None or math.isnan(value):
            logged = ", ".join(sorted(run.metrics)) or "nothing"
            skipped.append(Skipped(run.folder, f"has no {name} (it logged: {logged})"))
            continue
        cell = cells[(run.pair, name)].setdefault(run.method, Cell())
        if run.seed is not None and run.seed in cell.seeds:
            notes.append(f"{run.pair} / {run.method}: seed {run.seed} appears more than once ({run.folder})")
        cell.values.append(value)
        cell.seeds.append(run.seed)
        used += 1
    by_pair: dict[str, list[str]] = defaultdict(list)
    for pair, name in cells:
        by_pair[pair].append(name)
    for pair, names in by_pair.items():
        if len(names) > 1:
            counts = ", ".join(f"{n} ({sum(len(c.values) for c in cells[(pair, n)].values())} runs)" for n in names)
            notes.append(
                f"mixed metrics in {pair}: {counts} — one column each; --metric NAME puts every run on one metric"
            )
    if any(run.source == "csv" for run in runs):
        notes.append("some runs were read from their CSV logs (--from-csv): that they finished was not checked")
    return Table(cells=dict(cells), skipped=skipped, notes=notes, runs=used)


def _percent(metric: str) -> bool:
    return bool(_PERCENT.search(metric.rsplit("/", 1)[-1]))


def _number(value: float, std: float | None, metric: str) -> str:
    spec = ".2f" if _percent(metric) else ".4g"  # percent: 2 decimals as the paper; anything else: 4 digits
    scale = 100.0 if _percent(metric) else 1.0
    text = f"{scale * value:{spec}}"
    return text if std is None else f"{text} ± {scale * std:{spec}}"


def _paper(value: tuple[float, float | None] | None) -> str:
    if value is None:
        return "—"
    mean, std = value
    return f"{mean:g}" if std is None else f"{mean:.2f} ± {std:.2f}"


def _method_key(method: str) -> tuple[int, str]:
    return (_METHOD_ORDER.index(method) if method in _METHOD_ORDER else len(_METHOD_ORDER), method)


def _columns(table: Table) -> list[tuple[str, str]]:
    return sorted(table.cells)


def format_markdown(table: Table) -> str:
    """The table in markdown, with the metric, the paper tables used, the notes and the skipped folders below it."""
    columns = _columns(table)
    if not columns:
        lines = ["No finished runs found."]
    else:
        pairs = [pair for pair, _ in columns]
        mixed = len(set(pairs)) < len(pairs)
        head = ["method"]
        for pair, metric in columns:
            head += [f"{pair} · {metric}" if mixed else pair, "paper"]
        methods = sorted({m for cells in table.cells.values() for m in cells}, key=_method_key)
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
        for method in methods:
            row = [_METHOD_NAMES.get(method, method)]
            for pair, metric in columns:
                cell = table.cells[(pair, metric)].get(method)
                if cell is None:
                    row.append("")
                else:
                    mean, std = cell.mean_std
                    row.append(f"{_number(mean, std, metric)} (n={len(cell.values)})")
                row.append(_paper(paper_result(pair, method) if _percent(metric) else None))
            lines.append("| " + " | ".join(row) + " |")
        metrics = sorted({metric for _, metric in columns})
        unit = " (%)" if all(_percent(m) for m in metrics) else ""
        lines += [
            "",
            f"{table.runs} runs; metric {', '.join(metrics)}{unit}: mean ± sample std over seeds (n = seeds).",
        ]
        sources = sorted({PAPER_TABLES[p] for p in set(pairs) if p in PAPER_TABLES})
        if sources:
            lines.append(f"paper: {'; '.join(sources)} (mean ± std as printed).")
    lines += [f"note: {note}" for note in table.notes]
    if table.skipped:
        lines += ["", f"skipped {len(table.skipped)} folder(s) with no finished run:"]
        lines += [f"- {s.folder}: {s.reason}" for s in table.skipped]
    return "\n".join(lines) + "\n"


def format_json(table: Table) -> str:
    """The table as JSON: one entry per (pair, metric, method) with the values, seeds, mean, std and paper number."""
    cells = []
    for pair, metric in _columns(table):
        for method, cell in sorted(table.cells[(pair, metric)].items(), key=lambda kv: _method_key(kv[0])):
            mean, std = cell.mean_std
            paper = paper_result(pair, method)
            cells.append(
                {"pair": pair, "metric": metric, "method": method, "n": len(cell.values), "mean": mean, "std": std,
                 "values": cell.values, "seeds": cell.seeds, "paper": None if paper is None else list(paper)}
            )  # fmt: skip
    skipped = [{"folder": str(s.folder), "reason": s.reason} for s in table.skipped]
    return json.dumps({"cells": cells, "skipped": skipped, "notes": table.notes}, indent=2) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit status (1 when no finished run was found)."""
    parser = argparse.ArgumentParser(
        prog="python -m diffkd.report",
        description="The results table (methods × pairs, mean ± std over seeds, the paper's numbers) of the runs "
        "under the given folders: multirun folders, runs folders, single runs or the demo's run folder.",
    )
    parser.add_argument("folders", nargs="+", type=Path, help="folders holding run folders (searched recursively)")
    parser.add_argument("--metric", help="the metric to report (default: each run's optimized_metric)")
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    parser.add_argument("--json", action="store_true", help="JSON instead of markdown")
    parser.add_argument(
        "--from-csv", action="store_true", help="read runs without metrics.json from their CSV logs (older runs)"
    )
    args = parser.parse_args(argv)
    missing = [str(f) for f in args.folders if not f.is_dir()]
    if missing:
        parser.error(f"no such folder: {', '.join(missing)}")
    runs: list[Run] = []
    skipped: list[Skipped] = []
    for folder in find_runs(args.folders):
        result = read_run(folder, from_csv=args.from_csv)
        (runs if isinstance(result, Run) else skipped).append(result)  # type: ignore[arg-type]
    table = build_table(runs, skipped, args.metric)
    text = format_json(table) if args.json else format_markdown(table)
    sys.stdout.write(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0 if table.runs else 1


if __name__ == "__main__":
    sys.exit(main())
