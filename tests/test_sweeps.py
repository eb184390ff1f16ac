"""Hydra multiruns through the real command line, and DDP (slow)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import tiny_overrides


def run_cli(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "WANDB_MODE": "offline"}
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


@pytest.mark.slow
def test_ddp_inside_multirun_keeps_one_folder_per_job(tmp_path, cifar_root):
    sweep_dir = tmp_path / "sweep"
    run_cli(
        [
            "-m",
            "experiment=cifar_wrn40_wrn16",
            "distill=kd,diffkd",
            *_tiny(tmp_path, cifar_root),
            "data.download=false",
            "model.teacher.weights=null",
            "logger=csv",
            "test=false",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "+trainer.strategy=ddp",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        cwd=tmp_path,
        timeout=900,
    )
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == ["0", "1"]
    for job in ("0", "1"):
        assert (sweep_dir / job / "checkpoints" / "last.ckpt").is_file()
    assert not (tmp_path / "logs").exists()  # no rank > 0 run folders scattered elsewhere


@pytest.mark.slow
def test_ddp_spawn_two_processes_on_cpu(cifar_cfg):
    from diffkd.train import train

    cfg = cifar_cfg("cifar_wrn40_wrn16", "trainer=ddp_spawn", "trainer.devices=2", "distill=diffkd", "test=false")
    _metrics, objs = train(cfg)
    assert objs["trainer"].world_size == 2
    assert Path(objs["last_ckpt"]).is_file()
