"""Every fix an error message names works when followed as written; misspelled keys and files that are no
checkpoint get messages that say so."""

from __future__ import annotations

import math
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffkd.models import load_weights
from diffkd.models.checkpoint import NotACheckpointError
from diffkd.train import train

REPO = Path(__file__).resolve().parents[1]


def _fix(message: str) -> str:
    """The override an error message tells the user to add (``++key=value``)."""
    found = re.search(r"(\+\+[\w.]+=\S+)", message)
    assert found, f"no override in: {message}"
    return found.group(1).rstrip(".;,)")


def test_spatial_mismatch_fix_runs_as_written(cifar_cfg):
    with pytest.raises(ValueError) as err:
        train(cifar_cfg("cifar_res32x4_shuv2", "distill.points.feature.align=null"))
    fix = _fix(str(err.value))
    assert fix == "++distill.points.feature.align=interpolate"
    metrics, _ = train(cifar_cfg("cifar_res32x4_shuv2", "distill.points.feature.align=null", fix))
    assert math.isfinite(metrics["train/loss"])


def test_teacher_key_fix_runs_as_written(cifar_cfg, tmp_path):
    import shutil

    _, objs = train(cifar_cfg("cifar_wrn40_wrn16", "distill=kd", "test=false"))  # student.* and teacher.* keys
    ckpt = tmp_path / "kd_run.ckpt"
    shutil.copy(objs["last_ckpt"], ckpt)  # the next runs write to the same folder
    as_teacher = ["model.teacher.name=wrn_16_2", f"model.teacher.weights={ckpt}", "test=false"]
    with pytest.raises(RuntimeError, match="distillation checkpoint") as err:
        train(cifar_cfg("cifar_wrn40_wrn16", *as_teacher))
    metrics, objs = train(cifar_cfg("cifar_wrn40_wrn16", *as_teacher, _fix(str(err.value))))
    assert math.isfinite(metrics["train/loss"])
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    torch.testing.assert_close(objs["module"].teacher.fc.weight, state["student.fc.weight"])


def test_random_bytes_are_not_a_checkpoint(tmp_path):
    from diffkd.models import create_model

    junk = tmp_path / "teacher.pth"
    rng = np.random.default_rng(0)
    for _ in range(300):  # random bytes trip the unpickler in several ways (~5 % of them with an IndexError)
        junk.write_bytes(rng.bytes(4096))
        with pytest.raises(NotACheckpointError, match=r"teacher\.pth' is not a checkpoint") as err:
            load_weights(create_model("resnet8"), junk)
        assert "add_safe_globals" not in str(err.value)


class _Payload:
    """Unpickled, it would call os.system: what a malicious checkpoint holds."""

    def __reduce__(self):
        return (os.system, ("true",))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_a_pickle_with_code_is_refused_as_such_not_called_junk(tmp_path, writer):
    from diffkd.models import create_model
    from diffkd.models.checkpoint import RefusedCheckpointError

    evil = tmp_path / "teacher.pth"
    if writer == "torch.save":
        torch.save({"state_dict": create_model("resnet8").state_dict(), "extra": _Payload()}, evil)
    else:  # protocol 4: torch's weights-only loader stops at its first opcode, before it meets the global
        evil.write_bytes(pickle.dumps({"extra": _Payload()}, protocol=4))
    with pytest.raises(RefusedCheckpointError) as err:
        load_weights(create_model("resnet8"), evil)
    message = str(err.value)
    assert re.search(r"teacher\.pth' was refused: it holds Python objects outside what a weights-only load allows "
                     r"\(GLOBAL (posix|nt)\.system\)", message)  # fmt: skip
    assert "may be unsafe" in message and "If you trust the file, re-save its weights as a plain state dict" in message
    assert "not a checkpoint" not in message
    assert isinstance(err.value, RuntimeError)  # callers that caught the former RuntimeError still do


def test_trainer_flags_from_the_readme_are_in_the_config(cifar_cfg):
    # enable_progress_bar=false with the progress-bar callback still configured, max_steps, accumulation
    cfg = cifar_cfg("cifar_wrn40_wrn16", "distill=kd", "trainer.max_steps=2", "trainer.accumulate_grad_batches=2",
                    "trainer.val_check_interval=1.0", "trainer.enable_progress_bar=false", "test=false")  # fmt: skip
    from omegaconf import open_dict

    with open_dict(cfg):  # tiny_overrides drop it: put the default's progress bar back
        cfg.callbacks.progress_bar = {"_target_": "lightning.pytorch.callbacks.TQDMProgressBar"}
    _, objs = train(cfg)
    assert objs["trainer"].global_step == 1  # 2 batches (limit_train_batches) accumulated into one step


def test_misspelled_key_gets_did_you_mean(tmp_path):
    env = {**os.environ, "DIFFKD_ROOT": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "diffkd.train", "trainer.max_epoch=3"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode != 0
    assert "did you mean trainer.max_epochs" in done.stderr


def test_size_mismatch_describes_a_vector_as_a_vector(cifar_cfg):
    with pytest.raises(ValueError, match=r"student 'fc' is a vector of shape \(2, 100\) \(no spatial map\)"):
        train(cifar_cfg("cifar_wrn40_wrn16", "distill=fitnet", "distill.points.feature.student=fc"))


def test_tap_path_error_says_student_or_teacher(cifar_cfg):
    with pytest.raises(KeyError, match=r"student WideResNet has no module 'block9'"):
        train(cifar_cfg("cifar_wrn40_wrn16", "distill.points.feature.student=block9"))
    with pytest.raises(KeyError, match=r"teacher WideResNet has no module 'block9'"):
        train(cifar_cfg("cifar_wrn40_wrn16", "distill.points.feature.teacher=block9"))


@pytest.mark.parametrize("tool", ["export", "evaluate"])
def test_missing_file_is_one_line_not_a_traceback(tool, tmp_path):
    args = [str(tmp_path / "nope.ckpt")] + ([str(tmp_path / "out")] if tool == "export" else [])
    done = subprocess.run([sys.executable, "-m", f"diffkd.{tool}", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode != 0 and "no such file" in done.stderr and "Traceback" not in done.stderr


def test_weights_blown_up_in_the_last_step_stop_before_any_checkpoint(cifar_cfg, tmp_path):
    from diffkd.tasks import NonFiniteLossError

    cfg = cifar_cfg("cifar_wrn40_wrn16", "distill=kd", "optim.optimizer.lr=1e38", "trainer.limit_train_batches=1")
    with pytest.raises(NonFiniteLossError, match=r"parameter\(s\) .* became NaN/inf before validation") as err:
        train(cfg)
    assert "no checkpoint of these weights was written" in str(err.value)
    assert not list((tmp_path / "out" / "checkpoints").glob("*.ckpt"))


def test_the_guard_names_the_first_bad_term_not_every_term(cifar_cfg):
    from diffkd.tasks import NonFiniteLossError

    # the flags are read every 50 steps: a term that overflows poisons every term of the next steps
    cfg = cifar_cfg("cifar_wrn40_wrn16", "distill=diffkd", "distill.points.feature.weight=1e38",
                    "trainer.limit_train_batches=3", "optim.optimizer.lr=1.0")  # fmt: skip
    with pytest.raises(NonFiniteLossError) as err:
        train(cfg)
    first = str(err.value).split(" became NaN/inf first")[0]
    assert first == "loss term(s) feature/kd", str(err.value)
