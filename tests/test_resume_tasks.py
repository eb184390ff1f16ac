"""Detection and segmentation resume exactly too: killed with SIGKILL after a mid-epoch checkpoint and resumed, a
DiffKD run ends with the uninterrupted run's weights, bit for bit on the CPU (random flips, scales and crops on)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_overrides
from tests.helpers.fake_coco import write_fake_coco
from tests.helpers.fake_segmentation import write_grey_scenes

REPO = Path(__file__).resolve().parents[1]


def _run(tmp_path: Path, out: Path, overrides: list[str], *extra: str) -> subprocess.CompletedProcess:
    common = [o for o in tiny_overrides(tmp_path, tmp_path) if not o.startswith(("paths.output_dir", "trainer.limit"))]
    cmd = [
        sys.executable, "-m", "diffkd.train", *common, *overrides, f"paths.output_dir={out}",
        "trainer.max_epochs=2", "trainer.limit_val_batches=1", "trainer.deterministic=true", "test=false",
        *extra,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _kill_resume_compare(tmp_path: Path, overrides: list[str], steps_per_epoch: int) -> None:
    every_n = steps_per_epoch + 2  # the newest checkpoint: two batches into the second epoch
    overrides = [*overrides, f"callbacks.last_checkpoint.every_n_train_steps={every_n}"]
    full = _run(tmp_path, tmp_path / "full", overrides)
    assert full.returncode == 0, full.stderr[-3000:]

    out = tmp_path / "killed"
    kill_at = every_n + 1
    killer = ["+callbacks.killer._target_=tests.helpers.killer.KillAtStep", f"+callbacks.killer.step={kill_at}"]
    killed = _run(tmp_path, out, overrides, *killer)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    saved = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == every_n  # killed after a mid-epoch checkpoint

    resumed = _run(tmp_path, out, overrides, "ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = (
        torch.load(d / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        for d in (tmp_path / "full", out)
    )
    assert a["global_step"] == b["global_step"] == 2 * steps_per_epoch
    different = [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.mark.slow
def test_detection_sigkill_mid_epoch_and_resume(tmp_path):
    coco = write_fake_coco(tmp_path / "coco")
    overrides = [
        "experiment=demo_detection", "pipeline=train", f"data.root={coco.root}", "data.batch_size=2",
        "data.val_batch_size=2", "data.contiguous_labels=true", "data.hflip_prob=0.5", "data.multiscale=false",
        "model.teacher.weights=null",
        *(f"model.{s}.{k}=64" for s in ("student", "teacher") for k in ("min_size", "max_size")),
    ]  # fmt: skip
    _kill_resume_compare(tmp_path, overrides, steps_per_epoch=6)  # 12 usable training images


@pytest.mark.slow
def test_segmentation_sigkill_mid_epoch_and_resume(tmp_path):
    write_grey_scenes(tmp_path / "scenes", n_train=20)
    overrides = [
        "experiment=demo_segmentation", "pipeline=train", f"data.root={tmp_path / 'scenes'}", "data.batch_size=4",
        "data.val_batch_size=4", "data.crop_size=[24,24]", "data.scale_range=[0.75,1.5]", "data.hflip_prob=0.5",
    ]  # fmt: skip
    _kill_resume_compare(tmp_path, overrides, steps_per_epoch=5)
