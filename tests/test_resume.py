"""Killed with SIGKILL at any point and resumed from the newest checkpoint, a run ends with the same weights as the
uninterrupted run — bit for bit on the CPU — for KD and for DiffKD, from an end-of-epoch and a mid-epoch
checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[1]

# 256 training images, batch 32: 8 steps an epoch, 3 epochs
STEPS_PER_EPOCH = 8


def _run(tmp_path: Path, data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    overrides = [o for o in tiny_overrides(tmp_path, data) if not o.startswith(("paths.output_dir", "trainer.limit"))]
    cmd = [
        sys.executable, "-m", "diffkd.train", "experiment=demo", "pipeline=train",
        *overrides, f"paths.output_dir={out}", "data.batch_size=32", "data.debian_dir=null", "data.download=false",
        "trainer.max_epochs=3", "trainer.deterministic=true", "test=false",
        "model.teacher.name=smallcnn_teacher", "model.student.name=smallcnn_student", *extra,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _weights(out: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["global_step"] == 3 * STEPS_PER_EPOCH
    return ckpt["state_dict"]


@pytest.mark.parametrize(
    ("distill", "kill_at", "every_n"),
    [
        # the default suite keeps one (~15 s): a mid-epoch resume is the case that breaks silently
        pytest.param("kd", 13, 4, id="mid-epoch-ckpt-kd"),
        pytest.param("diffkd", 13, 4, id="mid-epoch-ckpt-diffkd", marks=pytest.mark.slow),
        pytest.param("kd", 11, None, id="epoch-end-ckpt-kd", marks=pytest.mark.slow),
        pytest.param("diffkd", 11, None, id="epoch-end-ckpt-diffkd", marks=pytest.mark.slow),
    ],
)
def test_sigkill_and_resume_gives_the_uninterrupted_weights(tmp_path, fmnist_root, distill, kill_at, every_n):
    extra = [f"distill={distill}", f"callbacks.last_checkpoint.every_n_train_steps={every_n or 'null'}"]
    full = _run(tmp_path, fmnist_root, tmp_path / "full", *extra)
    assert full.returncode == 0, full.stderr[-3000:]

    out = tmp_path / "killed"
    killer = ["+callbacks.killer._target_=tests.helpers.killer.KillAtStep", f"+callbacks.killer.step={kill_at}"]
    killed = _run(tmp_path, fmnist_root, out, *extra, *killer)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    saved = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    newest = (kill_at // every_n) * every_n if every_n else (kill_at // STEPS_PER_EPOCH) * STEPS_PER_EPOCH
    assert saved["global_step"] == newest  # killed in epoch 2, after the newest checkpoint
    assert not list((out / "checkpoints").glob("*.tmp"))

    resumed = _run(tmp_path, fmnist_root, out, *extra, "ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = _weights(tmp_path / "full"), _weights(out)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
