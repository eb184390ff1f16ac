"""Hydra multiruns through the real command line, and DDP (slow)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[1]
# a DDP run earlier in this pytest process leaves these in os.environ; inherited, a DDP child would join its group
_DDP_VARS = ("MASTER_PORT", "MASTER_ADDR", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")


def run_cli(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m diffkd.train *args`` with this tree's diffkd (whatever is installed); fails unless it exits 0."""
    env = {k: v for k, v in os.environ.items() if k not in _DDP_VARS}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(REPO)]), WANDB_MODE="offline")
    proc = subprocess.run(
        [sys.executable, "-m", "diffkd.train", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _tiny(tmp_path: Path, data: Path) -> list[str]:
    # in a multirun each job writes to its own hydra output dir, so paths.output_dir keeps its default
    return [o for o in tiny_overrides(tmp_path, data) if not o.startswith("paths.output_dir")]


def test_two_job_multirun_over_noise_schedules(tmp_path, cifar_root):
    sweep_dir = tmp_path / "sweep"
    run_cli(
        [
            "-m",
            "experiment=cifar_wrn40_wrn16",
            "distill.diffkd.beta_schedule=linear,squaredcos_cap_v2",
            *_tiny(tmp_path, cifar_root),
            "data.download=false",
            "model.teacher.weights=null",
            "logger=csv",
            "test=false",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        cwd=tmp_path,
    )
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
    assert [j.name for j in jobs] == ["0", "1"]
    for job, schedule in zip(jobs, ["linear", "squaredcos_cap_v2"]):
        assert f"beta_schedule: {schedule}" in (job / ".hydra" / "config.yaml").read_text()
        assert (job / "checkpoints" / "last.ckpt").is_file()
        assert (job / "csv" / "version_0" / "metrics.csv").is_file()


def _test_rows(metrics_csv: Path) -> list[dict[str, str]]:
    with metrics_csv.open(newline="") as f:
        return [row for row in csv.DictReader(f) if row.get("test/acc")]


@pytest.mark.slow
def test_ddp_inside_multirun_keeps_one_folder_per_job(tmp_path, cifar_root):
    """Two jobs, each a DDP run of 2 processes that fits then tests: after job 0's test this process must start job
    1's rank 1 again (Lightning's launcher leaves LOCAL_RANK & co. behind; train() restores them after the test)."""
    sweep_dir = tmp_path / "sweep"
    proc = run_cli(
        [
            "-m",
            "experiment=cifar_wrn40_wrn16",
            "distill=kd,diffkd",
            *_tiny(tmp_path, cifar_root),
            "data.download=false",
            "model.teacher.weights=null",
            "logger=csv",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "trainer.strategy=ddp",  # a plain key of the trainer config
            f"hydra.sweep.dir={sweep_dir}",
        ],
        cwd=tmp_path,
        timeout=900,
    )
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == ["0", "1"]
    for job in ("0", "1"):
        assert (sweep_dir / job / "checkpoints" / "last.ckpt").is_file()
        assert len(_test_rows(sweep_dir / job / "csv" / "version_0" / "metrics.csv")) == 1
    assert not (tmp_path / "logs").exists()  # no rank > 0 run folders scattered elsewhere
    output = proc.stdout + proc.stderr
    assert output.count("Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2") == 2  # one rank 1 per job
    assert "Traceback" not in output


@pytest.mark.slow
def test_ddp_spawn_two_processes_on_cpu(cifar_cfg, tmp_path):
    """Fit and test in spawned processes: train() returns the test metrics in this process, and the CSV logger holds
    the fit's rows and the test's one row in one file."""
    from diffkd.train import train

    cfg = cifar_cfg("cifar_wrn40_wrn16", "trainer=ddp_spawn", "trainer.devices=2", "distill=diffkd", "logger=csv")
    metrics, objs = train(cfg)
    assert objs["trainer"].world_size == 2
    assert Path(objs["last_ckpt"]).is_file()
    [row] = _test_rows(tmp_path / "out" / "csv" / "version_0" / "metrics.csv")
    assert metrics["test/acc"] == pytest.approx(float(row["test/acc"]))
    assert metrics["test/loss"] == pytest.approx(float(row["test/loss"]))
    assert "val/acc_best" in metrics  # the fit's, sent back from the spawned rank 0
