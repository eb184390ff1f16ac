"""Issue 21's guards in every task: a blow-up stops before any checkpoint of its weights (detection and
segmentation too), every checkpoint is written atomically, a run folder holding another run's checkpoints is
refused, and a resume with a changed config stops or applies the change for real."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffkd.tasks import NonFiniteLossError
from diffkd.train import train
from tests.conftest import compose_config, tiny_overrides
from tests.helpers.fake_coco import write_fake_coco
from tests.helpers.fake_segmentation import write_grey_scenes


def segmentation_cfg(tmp_path: Path, *extra: str):
    scenes = write_grey_scenes(tmp_path / "scenes")
    return compose_config([
        "experiment=demo_segmentation", "pipeline=train", *tiny_overrides(tmp_path, tmp_path),
        f"data.root={scenes}", "data.batch_size=4", "data.val_batch_size=4", *extra,
    ])  # fmt: skip


def detection_cfg(tmp_path: Path, *extra: str):
    coco = write_fake_coco(tmp_path / "coco")
    return compose_config([
        "experiment=demo_detection", "pipeline=train", *tiny_overrides(tmp_path, tmp_path),
        f"data.root={coco.root}", "data.batch_size=2", "data.val_batch_size=2", "data.contiguous_labels=true",
        "data.multiscale=false", "model.teacher.weights=null",
        *(f"model.{s}.{k}=64" for s in ("student", "teacher") for k in ("min_size", "max_size")), *extra,
    ])  # fmt: skip


def _max_abs_weight(path: Path) -> float:
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return max(float(v.abs().max()) for k, v in state.items() if k.startswith("student.") and v.is_floating_point())


BLOW_UP = ["optim.optimizer.lr=1e38", "trainer.limit_train_batches=1"]


@pytest.mark.parametrize("epochs", [1, 2])
def test_segmentation_blow_up_stops_at_validation_with_no_checkpoint(tmp_path, epochs):
    cfg = segmentation_cfg(tmp_path, *BLOW_UP, f"trainer.max_epochs={epochs}")
    with pytest.raises(NonFiniteLossError) as err:
        train(cfg)
    message = str(err.value)
    assert message.startswith("val/loss is nan after global step 1 (epoch 0)"), message
    assert "no checkpoint of these weights was written; the last good checkpoint is none yet" in message
    assert not list((tmp_path / "out" / "checkpoints").glob("*.ckpt*"))


def test_detection_blow_up_stops_at_validation_with_no_checkpoint(tmp_path):
    # SGD with no warm-up: the demo's AdamW warms up from 1e-5 (no blow-up in one step)
    cfg = detection_cfg(tmp_path, *BLOW_UP, "optim=sgd_det_2x", "optim.scheduler=null")
    with pytest.raises(NonFiniteLossError) as err:
        train(cfg)
    message = str(err.value)
    assert message.startswith("the student's outputs (backbone, head) held NaN/inf in validation after global step 1")
    assert "the last good checkpoint is none yet" in message
    assert not list((tmp_path / "out" / "checkpoints").glob("*.ckpt*"))


def test_weights_that_overflow_are_never_checkpointed_mid_epoch(tmp_path):
    # every step writes last.ckpt: the blown weights are finite (1e37), the outputs they give are not
    cfg = segmentation_cfg(tmp_path, *BLOW_UP, "callbacks.last_checkpoint.every_n_train_steps=1")
    with pytest.raises(NonFiniteLossError, match=r"on the dry run's batch, before writing a checkpoint, after global"):
        train(cfg)
    assert not list((tmp_path / "out" / "checkpoints").glob("*.ckpt*"))


def test_the_last_good_checkpoint_named_is_a_good_file(cifar_cfg, tmp_path):
    blow = ["+callbacks.blow_up._target_=tests.helpers.blow_up.BlowUpAtEpoch", "+callbacks.blow_up.epoch=1"]
    cfg = cifar_cfg("cifar_wrn40_wrn16", "distill=kd", "trainer.max_epochs=2", *blow)
    with pytest.raises(NonFiniteLossError) as err:
        train(cfg)
    named = str(err.value).split("the last good checkpoint is ")[1].split(". Try")[0]
    assert Path(named).is_file(), str(err.value)
    saved = torch.load(named, map_location="cpu", weights_only=True)
    assert saved["epoch"] == 0 and _max_abs_weight(Path(named)) < 100  # epoch 0's weights, not the blown ones
    for path in (tmp_path / "out" / "checkpoints").glob("*.ckpt"):  # nothing of epoch 1 was written
        assert torch.load(path, map_location="cpu", weights_only=True)["epoch"] == 0


# ---------------------------------------------------------------------------------------------------- checkpoints
def test_a_failed_checkpoint_write_leaves_the_old_file_whole(tmp_path, monkeypatch):
    import errno

    from diffkd.callbacks import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    target = tmp_path / "ckpts" / "epoch_000.ckpt"
    io.save_checkpoint({"epoch": 0, "w": torch.ones(3)}, target)

    def full_disk(obj, file):
        file.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match=r"writing the checkpoint .*epoch_000\.ckpt failed \(No space left on device\): "
                                      r"nothing was written there and the checkpoints written before are whole"):  # fmt: skip
        io.save_checkpoint({"epoch": 1, "w": torch.zeros(3)}, target)
    assert sorted(p.name for p in target.parent.iterdir()) == ["epoch_000.ckpt"]  # no partial or temporary file
    assert torch.load(target, weights_only=True)["epoch"] == 0


def test_a_full_disk_mid_run_leaves_only_whole_checkpoints(cifar_cfg, tmp_path, monkeypatch):
    import errno

    real_save = torch.save
    calls = []

    def save_then_fill_the_disk(obj, file, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # epoch 0: best, last; epoch 1: the best fails half-way
            file.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, file, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_then_fill_the_disk)
    cfg = cifar_cfg(
        "cifar_wrn40_wrn16", "distill=kd", "trainer.max_epochs=2", "callbacks.model_checkpoint.save_top_k=-1"
    )
    with pytest.raises(OSError, match="No space left on device"):
        train(cfg)
    names = sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir())
    assert names == ["epoch_000.ckpt", "last.ckpt"], names
    for name in names:
        assert torch.load(tmp_path / "out" / "checkpoints" / name, weights_only=True)["epoch"] == 0


# ---------------------------------------------------------------------------------------------------- run folders
def test_a_folder_holding_another_runs_checkpoints_is_refused(cifar_cfg, tmp_path):
    from diffkd.runs import RunDirInUseError

    same = f"paths.output_dir={tmp_path / 'out'}"
    _, objs = train(cifar_cfg("cifar_wrn40_wrn16", "distill=kd", "test=false"))
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out" / "checkpoints").iterdir()}
    with pytest.raises(RunDirInUseError) as err:
        train(cifar_cfg("cifar_wrn40_wrn16", "distill=kd", same))
    message = str(err.value)
    assert f"{tmp_path / 'out' / 'checkpoints'} already holds another run (epoch_000.ckpt, last.ckpt)" in message
    assert "Start this run in a new folder" in message and f"ckpt_path={objs['last_ckpt']}" in message
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out" / "checkpoints").iterdir()} == before
    # resuming that run in its own folder is what the message offers, and it runs
    train(cifar_cfg("cifar_wrn40_wrn16", "distill=kd", same, "trainer.max_epochs=2", f"ckpt_path={objs['last_ckpt']}"))


# ---------------------------------------------------------------------------------------------------- resume
def _lr(path: str | Path) -> float:
    return torch.load(path, map_location="cpu", weights_only=True)["optimizer_states"][0]["param_groups"][0]["lr"]


def _stored(path: str | Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["diffkd"]["config"]


def test_resume_with_a_changed_config_lists_the_keys_and_both_ways(cifar_cfg):
    from diffkd.runs import ResumeConfigError

    _, objs = train(cifar_cfg("cifar_wrn40_wrn16", "distill=kd", "test=false"))
    last = objs["last_ckpt"]
    changed = ["optim.optimizer.lr=0.5", "data.batch_size=4", "distill=dist", "data.num_workers=1"]
    with pytest.raises(ResumeConfigError) as err:
        train(cifar_cfg("cifar_wrn40_wrn16", *changed, "trainer.max_epochs=2", f"ckpt_path={last}"))
    message = str(err.value)
    assert "  optim.optimizer.lr: 0.05 → 0.5\n" in message and "  data.batch_size: 8 → 4\n" in message
    assert "distill.points.logits.distance.name: 'kl' → 'dist'" in message
    assert "num_workers" not in message  # how fast, not what is trained
    assert "optim.optimizer.lr=0.05" in message and "data.batch_size=8" in message
    assert "resume_changes=apply" in message


def test_resume_changes_apply_sets_the_new_lr_in_the_restored_schedule(cifar_cfg):
    decay = ["optim.scheduler.milestones=[1]", "test=false"]
    _, objs = train(cifar_cfg("cifar_wrn40_wrn16", "distill=kd", *decay))
    assert _lr(objs["last_ckpt"]) == pytest.approx(0.005)  # 0.05 decayed ×0.1 at epoch 1
    resumed = cifar_cfg("cifar_wrn40_wrn16", "distill=kd", *decay, "trainer.max_epochs=2", "optim.optimizer.lr=0.5",
                        "resume_changes=apply", f"ckpt_path={objs['last_ckpt']}")  # fmt: skip
    _, objs2 = train(resumed)
    assert objs2["trainer"].optimizers[0].param_groups[0]["lr"] == pytest.approx(0.05)  # the new 0.5, decayed
    assert objs2["trainer"].optimizers[0].param_groups[0]["initial_lr"] == pytest.approx(0.5)
    assert _stored(objs2["last_ckpt"])["optim"]["optimizer"]["lr"] == 0.5  # the stored config says what happened
    assert _stored(objs2["last_ckpt"])["resume_changes"] == "apply"


def test_resume_unchanged_and_moved_teacher_weights_resume_quietly(cifar_cfg, tmp_path):
    from diffkd.models import create_model

    weights = tmp_path / "teacher.pth"
    torch.save({"model": create_model("wrn_40_2", num_classes=100).state_dict()}, weights)
    _, objs = train(cifar_cfg("cifar_wrn40_wrn16", "distill=kd", "test=false", f"model.teacher.weights={weights}"))
    # the teacher's file moved: on resume the checkpoint holds the teacher, and the stored config keeps the source
    resumed = cifar_cfg("cifar_wrn40_wrn16", "distill=kd", "test=false", "trainer.max_epochs=2",
                        "model.teacher.weights=null", f"ckpt_path={objs['last_ckpt']}")  # fmt: skip
    _, objs2 = train(resumed)
    assert objs2["trainer"].current_epoch == 2
    assert _stored(objs2["last_ckpt"])["model"]["teacher"]["weights"] == str(weights)
    torch.testing.assert_close(objs2["module"].teacher.fc.weight, objs["module"].teacher.fc.weight)


def test_the_cli_refuses_a_used_run_folder_before_hydra_writes_into_it(tmp_path, cifar_root):
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    run_dir = tmp_path / "run"
    common = [o for o in tiny_overrides(tmp_path, cifar_root) if not o.startswith("paths.output_dir")]
    base = [sys.executable, "-m", "diffkd.train", "experiment=cifar_wrn40_wrn16", "distill=kd", *common,
            "model.teacher.weights=null", "data.download=false", f"hydra.run.dir={run_dir}"]  # fmt: skip

    def run(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([*base, *extra], cwd=repo, capture_output=True, text=True, timeout=600)

    first = run("test=false")
    assert first.returncode == 0, first.stderr[-3000:]
    hydra_files = {p.name: p.read_text() for p in (run_dir / ".hydra").iterdir()}
    second = run("optim.optimizer.lr=0.2")
    assert second.returncode == 1
    assert (
        f"Error: {run_dir} already holds another run (.hydra, checkpoints/epoch_000.ckpt, checkpoints/last.ckpt)"
        in second.stderr
    )
    assert f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}" in second.stderr
    assert {p.name: p.read_text() for p in (run_dir / ".hydra").iterdir()} == hydra_files  # the first run's config
    resumed = run("optim.optimizer.lr=0.2", "trainer.max_epochs=2", "ckpt_path=last")
    assert resumed.returncode == 1 and "optim.optimizer.lr: 0.05 → 0.2" in resumed.stderr
    assert "Either resume unchanged" in resumed.stderr and "resume_changes=apply" in resumed.stderr
    assert {p.name: p.read_text() for p in (run_dir / ".hydra").iterdir()} == hydra_files  # refused before Hydra wrote
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 0  # untouched


def test_a_split_of_one_sample_evaluates(tmp_path):
    cfg = segmentation_cfg(tmp_path, "train=false", "test=true")
    for kind in ("images", "labels"):
        for extra in sorted((tmp_path / "scenes" / "val" / kind).iterdir())[1:]:
            extra.unlink()
    metrics, _ = train(cfg)
    assert 0.0 <= metrics["test/miou"] <= 1.0
