"""The embedded demo pipeline: teacher once (then reused), three students per seed, mean ± std and the spread."""

from __future__ import annotations

import math

import pytest

from diffkd.demo import mean_std, run_demo, spread_verdict
from tests.conftest import compose_config, tiny_overrides


def _overrides(tmp_path, fmnist_root, *extra):
    overrides = [o for o in tiny_overrides(tmp_path, fmnist_root) if o != "logger=none"]
    return [*overrides, "data.debian_dir=null", "data.download=false", "demo.teacher_epochs=1",
            "demo.student_epochs=1", "demo.precision=32-true", f"demo.teacher_weights={tmp_path}/demo/teacher.pth",
            "demo.seeds=[0,1]", *extra]  # fmt: skip


def _cfg(tmp_path, fmnist_root, *extra):
    overrides = _overrides(tmp_path, fmnist_root, *extra)
    return compose_config(overrides), overrides


def test_demo_prints_four_rows_with_the_spread_and_reuses_its_teacher(tmp_path, fmnist_root, capsys):
    cfg, overrides = _cfg(tmp_path, fmnist_root)
    assert cfg.pipeline == "demo" and cfg.data._target_.endswith("FashionMNISTDataModule")
    acc = run_demo(cfg, overrides)
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("teacher ", "student "))]
    assert [r.split("  ")[0] for r in rows] == [
        f"teacher {cfg.demo.teacher}",
        "student alone",
        "student + kd",
        "student + diffkd",
    ]
    # each student row: mean ± std, then one value per seed, then seconds per run
    cells = rows[-1].split()
    pm = cells.index("±")
    mean, std, seeds = float(cells[pm - 1]), float(cells[pm + 1]), [float(v) for v in cells[pm + 2 : pm + 4]]
    assert mean == pytest.approx(sum(seeds) / 2, abs=0.01)
    assert std == pytest.approx(abs(seeds[0] - seeds[1]) / math.sqrt(2), abs=0.01)
    assert acc == pytest.approx(mean / 100, abs=1e-4)
    assert "differences beyond the seed spread" in out and "runs: " in out and "metrics.csv" in out
    for method in ("none", "kd", "diffkd"):
        for seed in (0, 1):
            run = tmp_path / "out" / method / f"seed{seed}"
            assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "demo" / "teacher.pth").is_file() and (tmp_path / "demo" / "teacher.json").is_file()
    run_demo(*_cfg(tmp_path, fmnist_root))
    assert f"teacher {cfg.demo.teacher} (reused)" in capsys.readouterr().out


def test_a_cached_teacher_of_another_model_is_trained_again(tmp_path, fmnist_root, capsys):
    run_demo(*_cfg(tmp_path, fmnist_root, "demo.methods=[none]", "demo.seeds=[0]"))
    capsys.readouterr()
    run_demo(*_cfg(tmp_path, fmnist_root, "demo.methods=[none]", "demo.seeds=[0]", "demo.teacher=smallcnn_teacher"))
    assert "teacher smallcnn_teacher " in capsys.readouterr().out  # trained, not "(reused)"


def test_mean_std_and_the_spread_rule():
    assert mean_std([0.5]) == (0.5, 0.0)
    mean, std = mean_std([0.80, 0.82, 0.84])
    assert mean == pytest.approx(0.82) and std == pytest.approx(0.02)
    line = spread_verdict({"alone": [0.80, 0.81], "kd": [0.85, 0.86], "diffkd": [0.851, 0.859]})
    beyond, within = line.split(" — within it: ")
    assert "kd − alone +5.00" in beyond and "diffkd − alone" in beyond
    assert "diffkd − kd" in within and "diffkd − kd" not in beyond
    assert "no spread" in spread_verdict({"alone": [0.8], "kd": [0.9]})


def test_overrides_reach_the_demo_runs_that_have_the_key(tmp_path, fmnist_root, capsys):
    import torch

    extra = ("distill.diffkd.inference_steps=3", "distill.points.logits.weight=2.0", "demo.methods=[kd,diffkd]")
    cfg, overrides = _cfg(tmp_path, fmnist_root, *extra)
    run_demo(cfg, overrides)
    assert "overrides: " in capsys.readouterr().out
    out = tmp_path / "out"
    diffkd = torch.load(out / "diffkd" / "seed0" / "checkpoints" / "last.ckpt", weights_only=True)
    kd = torch.load(out / "kd" / "seed0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert diffkd["diffkd"]["config"]["distill"]["diffkd"]["inference_steps"] == 3
    assert diffkd["diffkd"]["config"]["distill"]["points"]["logits"]["weight"] == 2.0
    assert "diffkd" not in kd["diffkd"]["config"]["distill"]  # kd's distiller has no such key: not applied
    assert kd["diffkd"]["config"]["distill"]["points"]["logits"]["weight"] == 2.0
