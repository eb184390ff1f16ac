"""The embedded demo pipeline: teacher once (then reused), three students, a four-row table."""

from __future__ import annotations

from diffkd.demo import run_demo
from tests.conftest import compose_config, tiny_overrides


def _overrides(tmp_path, fmnist_root, *extra):
    overrides = [o for o in tiny_overrides(tmp_path, fmnist_root) if o != "logger=none"]
    return [*overrides, "data.debian_dir=null", "data.download=false", "demo.teacher_epochs=1",
            "demo.student_epochs=1", "demo.precision=32-true", f"demo.teacher_weights={tmp_path}/demo/teacher.pth",
            *extra]  # fmt: skip


def _cfg(tmp_path, fmnist_root, *extra):
    overrides = _overrides(tmp_path, fmnist_root, *extra)
    return compose_config(overrides), overrides


def test_demo_prints_four_rows_and_reuses_its_teacher(tmp_path, fmnist_root, capsys):
    cfg, overrides = _cfg(tmp_path, fmnist_root)
    assert cfg.pipeline == "demo" and cfg.data._target_.endswith("FashionMNISTDataModule")
    acc = run_demo(cfg, overrides)
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("teacher ", "student "))]
    assert [r.split("  ")[0] for r in rows] == [
        "teacher smallcnn_teacher",
        "student alone",
        "student + kd",
        "student + diffkd",
    ]
    assert 0.0 <= acc <= 1.0
    assert (tmp_path / "demo" / "teacher.pth").is_file() and (tmp_path / "demo" / "teacher.json").is_file()
    run_demo(*_cfg(tmp_path, fmnist_root))
    assert "teacher smallcnn_teacher (reused)" in capsys.readouterr().out


def test_overrides_reach_the_demo_runs_that_have_the_key(tmp_path, fmnist_root, capsys):
    import torch

    extra = ("distill.diffkd.inference_steps=3", "distill.points.logits.weight=2.0", "demo.methods=[kd,diffkd]")
    cfg, overrides = _cfg(tmp_path, fmnist_root, *extra)
    run_demo(cfg, overrides)
    assert "overrides: " in capsys.readouterr().out
    out = tmp_path / "out"
    diffkd = torch.load(next((out / "diffkd" / "checkpoints").glob("last.ckpt")), weights_only=True)
    kd = torch.load(next((out / "kd" / "checkpoints").glob("last.ckpt")), weights_only=True)
    assert diffkd["diffkd"]["config"]["distill"]["diffkd"]["inference_steps"] == 3
    assert diffkd["diffkd"]["config"]["distill"]["points"]["logits"]["weight"] == 2.0
    assert "diffkd" not in kd["diffkd"]["config"]["distill"]  # kd's distiller has no such key: not applied
    assert kd["diffkd"]["config"]["distill"]["points"]["logits"]["weight"] == 2.0
