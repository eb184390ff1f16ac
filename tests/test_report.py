"""``python -m diffkd.report``: the results table of a real (tiny) sweep, of the demo's runs, and its messages."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
from pathlib import Path

import pytest

from diffkd.paper_results import PAPER_RESULTS, paper_result
from diffkd.report import Run, Skipped, build_table, format_markdown, main
from tests.conftest import CONF_DIR
from tests.test_sweeps import _tiny, run_cli


def _last_logged(job: Path, metric: str) -> float:
    """The last value of ``metric`` in a job's CSV log: the runs' own record, independent of metrics.json."""
    with (job / "csv" / "version_0" / "metrics.csv").open(newline="") as f:
        values = [float(row[metric]) for row in csv.DictReader(f) if row.get(metric)]
    return values[-1]


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, cifar_root) -> Path:
    """A real multirun: 2 methods × 2 seeds of a Table 9 pair, a few batches each (~10 s), plus one job folder
    whose run did not finish (a copy of a finished job without its metrics.json: killed after its last checkpoint)."""
    tmp_path = tmp_path_factory.mktemp("report")
    sweep_dir = tmp_path / "multiruns" / "2024-01-01_00-00-00"
    run_cli(
        ["-m", "experiment=cifar_wrn40_wrn40_1", "distill=kd,fitnet", "seed=0,1", *_tiny(tmp_path, cifar_root),
         "data.download=false", "model.teacher.weights=null", "logger=csv", f"hydra.sweep.dir={sweep_dir}"],
        cwd=tmp_path,
    )  # fmt: skip
    shutil.copytree(sweep_dir / "0", sweep_dir / "4")
    (sweep_dir / "4" / "metrics.json").unlink()
    return sweep_dir


def test_the_table_of_a_real_sweep(sweep, tmp_path, capsys):
    jobs = {j: json.loads((sweep / j / "metrics.json").read_text()) for j in "0123"}
    assert {(r["method"], r["seed"]) for r in jobs.values()} == {("kd", 0), ("kd", 1), ("fitnet", 0), ("fitnet", 1)}
    assert all(
        r["experiment"] == "cifar_wrn40_wrn40_1" and r["optimized_metric"] == "val/acc_best" for r in jobs.values()
    )
    out = tmp_path / "table.md"
    assert main([str(sweep), "--out", str(out)]) == 0  # each run's optimized_metric: val/acc_best, in %
    printed = capsys.readouterr().out
    assert out.read_text() == printed
    lines = printed.splitlines()
    assert lines[0] == "| method | cifar_wrn40_wrn40_1 | paper |"
    for method in ("kd", "fitnet"):
        values = [_last_logged(sweep / j, "val/acc_best") for j, r in jobs.items() if r["method"] == method]
        mean, std = _mean_std(values)
        paper_mean, paper_std = PAPER_RESULTS["cifar_wrn40_wrn40_1"][method]
        [row] = [line for line in lines if line.startswith(f"| {method} |")]
        assert row == f"| {method} | {100 * mean:.2f} ± {100 * std:.2f} (n=2) | {paper_mean:.2f} ± {paper_std:.2f} |"
    assert "| kd | " in printed and "| 73.54 ± 0.20 |" in printed  # the paper's KD on WRN-40-2 → WRN-40-1
    assert "4 runs; metric val/acc_best (%)" in printed and "paper: Table 9" in printed
    assert "skipped 1 folder(s) with no finished run:" in printed
    assert f"- {sweep / '4'}: not finished: a last.ckpt but no metrics.json" in printed
    # another metric (a few batches of training leave the accuracy at chance; the loss differs between seeds)
    assert main([str(sweep), "--metric", "val/loss"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for method in ("kd", "fitnet"):
        values = [_last_logged(sweep / j, "val/loss") for j, r in jobs.items() if r["method"] == method]
        mean, std = _mean_std(values)
        [row] = [line for line in lines if line.startswith(f"| {method} |")]
        assert row == f"| {method} | {mean:.4g} ± {std:.4g} (n=2) | — |"  # the paper's numbers are accuracies
    # JSON on request
    assert main([str(sweep.parent), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    cells = {(c["method"], c["metric"]): c for c in report["cells"]}
    assert set(cells) == {("kd", "val/acc_best"), ("fitnet", "val/acc_best")}
    for (method, _), cell in cells.items():
        values = [_last_logged(sweep / j, "val/acc_best") for j, r in jobs.items() if r["method"] == method]
        assert cell["values"] == pytest.approx(values) and sorted(cell["seeds"]) == [0, 1] and cell["n"] == 2
        assert cell["paper"] == list(paper_result("cifar_wrn40_wrn40_1", method))
    assert [s["folder"] for s in report["skipped"]] == [str(sweep / "4")]


def test_an_unknown_metric_skips_each_run_and_says_what_it_logged(sweep, capsys):
    assert main([str(sweep / "0"), "--metric", "val/nope"]) == 1
    printed = capsys.readouterr().out
    assert printed.startswith("No finished runs found.")
    assert "has no val/nope (it logged: " in printed and "val/acc_best" in printed


def _run(pair: str, method: str, seed: int, metric: str, value: float) -> Run:
    return Run(Path(f"/x/{pair}/{method}/{seed}"), pair, method, seed, {metric: value}, metric, "metrics.json")


def test_mixed_metrics_get_a_column_each_and_a_note():
    runs = [_run("p", "kd", 0, "val/acc_best", 0.5), _run("p", "kd", 1, "test/acc", 0.25)]
    text = format_markdown(build_table(runs, [Skipped(Path("/x/p/3"), "not finished: no metrics.json")]))
    assert text.splitlines()[0] == "| method | p · test/acc | paper | p · val/acc_best | paper |"
    assert "| kd | 25.00 (n=1) | — | 50.00 (n=1) | — |" in text  # one seed: no ±; no paper number for this pair
    assert "note: mixed metrics in p: " in text and "--metric NAME" in text
    assert "- /x/p/3: not finished: no metrics.json" in text


def test_rows_follow_the_papers_order_and_name_the_student_alone():
    runs = [_run("cifar_res56_res20", m, 0, "val/acc_best", 0.7) for m in ("diffkd", "zeta", "kd", "none")]
    lines = format_markdown(build_table(runs, [])).splitlines()
    assert [line.split(" | ")[0] for line in lines[2:6]] == ["| none (student alone)", "| kd", "| diffkd", "| zeta"]
    assert lines[2].endswith("| 69.06 |") and lines[4].endswith("| 71.92 ± 0.14 |")


def test_from_csv_reads_a_run_written_before_metrics_json(sweep, tmp_path, capsys):
    old = tmp_path / "old"
    shutil.copytree(sweep / "1", old / "1")
    (old / "1" / "metrics.json").unlink()
    assert main([str(old)]) == 1
    assert "(--from-csv reads an older run's CSV log)" in capsys.readouterr().out
    assert main([str(old), "--from-csv", "--metric", "val/loss"]) == 0
    printed = capsys.readouterr().out
    assert f"{_last_logged(old / '1', 'val/loss'):.4g} (n=1)" in printed and "--from-csv" in printed


def test_the_demos_runs(tmp_path, fmnist_root, capsys):
    """The demo's folder: ``teacher/`` and ``<method>/seed<k>/`` runs under one folder, no ``.hydra`` of their own."""
    from diffkd.demo import run_demo
    from tests.test_demo import _cfg

    run_demo(*_cfg(tmp_path, fmnist_root, "demo.methods=[none,kd]"))
    capsys.readouterr()
    assert main([str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0] == "| method | demo | paper |"
    for method in ("none", "kd"):
        values = [_last_logged(tmp_path / "out" / method / f"seed{s}", "val/acc") for s in (0, 1)]
        mean, std = _mean_std(values)
        name = "none (student alone)" if method == "none" else method
        assert f"| {name} | {100 * mean:.2f} ± {100 * std:.2f} (n=2) | — |" in printed
    assert "| teacher | " in printed and "5 runs; metric val/acc_best (%)" in printed


def test_the_paper_numbers_agree_with_the_experiment_files_comments():
    """Each experiment file's "Paper Table N: teacher …, student alone …, KD …, DiffKD …" header line."""
    names = {"teacher": "teacher", "student alone": "none", "KD": "kd", "DIST": "dist", "DiffKD": "diffkd"}
    pattern = re.compile(r"(teacher|student alone|KD|DIST|DiffKD) (\d+\.\d+)(?:±(\d+\.\d+))?")
    checked = 0
    for experiment in PAPER_RESULTS:
        text = (CONF_DIR / "experiment" / f"{experiment}.yaml").read_text()
        [line] = [line for line in text.splitlines() if line.startswith("# Paper Table")]
        found = pattern.findall(line.split(":", 1)[1])
        assert found, line
        for name, mean, std in found:
            assert paper_result(experiment, names[name]) == (float(mean), float(std) if std else None), line
            checked += 1
    assert checked >= 3 * len(PAPER_RESULTS)


def test_metrics_json_is_written_at_the_end_and_removed_when_the_folder_trains_again(cifar_cfg, tmp_path, monkeypatch):
    import diffkd.training
    from diffkd.training import train

    cfg = cifar_cfg("cifar_wrn40_wrn16", "distill=kd")
    metrics, objs = train(cfg)
    record = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert record["metrics"] == pytest.approx(metrics) and "test/acc" in record["metrics"]
    assert record["task_name"] == "cifar_wrn40_wrn16" and record["optimized_metric"] == "val/acc_best"
    assert record["method"] is None  # composed outside a Hydra app: the report reads it from .hydra/ or the layout

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(diffkd.training, "_fit_and_test", killed)
    with pytest.raises(KeyboardInterrupt):  # a resume of the finished run, killed: the folder is unfinished again
        train(cifar_cfg("cifar_wrn40_wrn16", "distill=kd", f"paths.output_dir={tmp_path / 'out'}",
                        f"ckpt_path={objs['last_ckpt']}", "trainer.max_epochs=2"))  # fmt: skip
    assert not (tmp_path / "out" / "metrics.json").exists()
    assert not list((tmp_path / "out").glob(".metrics.json.*"))


def test_a_one_seed_task_demos_runs_are_named_by_their_folder(tmp_path):
    """Detection/segmentation demos with one seed write ``<method>/`` beside ``demo_table.txt``; their runs, started
    in-process, record no Hydra choice, so the folder names the method (without the table it stays unknown)."""
    from diffkd.report import Run, Skipped, read_run

    record = {"metrics": {"val/map": 0.25}, "seed": 3, "method": None, "optimized_metric": "val/map"}
    run = tmp_path / "demo" / "kd"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps(record))
    assert isinstance(read_run(run), Skipped)
    (tmp_path / "demo" / "demo_table.txt").write_text("table\n")
    found = read_run(run)
    assert isinstance(found, Run) and (found.method, found.seed, found.metrics["val/map"]) == ("kd", 3, 0.25)
