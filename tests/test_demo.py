"""The embedded demo pipeline: teacher once (then reused), three students, a four-row table."""

from __future__ import annotations

from diffkd.demo import run_demo
from tests.conftest import compose_config, tiny_overrides


def _cfg(tmp_path, fmnist_root):
    overrides = [o for o in tiny_overrides(tmp_path, fmnist_root) if o != "logger=none"]
    return compose_config(
        [*overrides, "data.debian_dir=null", "data.download=false", "demo.teacher_epochs=1", "demo.student_epochs=1",
         "demo.precision=32-true", f"demo.teacher_weights={tmp_path}/demo/teacher.pth"]
    )  # fmt: skip


def test_demo_prints_four_rows_and_reuses_its_teacher(tmp_path, fmnist_root, capsys):
    cfg = _cfg(tmp_path, fmnist_root)
    assert cfg.pipeline == "demo" and cfg.data._target_.endswith("FashionMNISTDataModule")
    acc = run_demo(cfg)
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
    run_demo(_cfg(tmp_path, fmnist_root))
    assert "teacher smallcnn_teacher (reused)" in capsys.readouterr().out
