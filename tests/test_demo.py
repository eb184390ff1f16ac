"""The embedded demo pipeline: teacher once (then reused), three students per seed, mean ± std and the spread."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest

from diffkd.demo import (
    cached_teacher,
    demo_run_config,
    mean_std,
    recipe_changes,
    run_demo,
    spread_verdict,
    teacher_recipe,
)
from tests.conftest import compose_config, tiny_overrides


def _overrides(tmp_path, fmnist_root, *extra, out: str = "out"):
    """The demo's overrides for a tiny run; ``out``: the runs' folder (each demo call needs its own, as each
    ``python -m diffkd.train`` gets its own)."""
    overrides = [o for o in tiny_overrides(tmp_path, fmnist_root) if o != "logger=none"]
    overrides = [
        o if not o.startswith("paths.output_dir=") else f"paths.output_dir={tmp_path / out}" for o in overrides
    ]
    return [*overrides, "data.debian_dir=null", "data.download=false", "demo.teacher_epochs=1",
            "demo.student_epochs=1", "demo.precision=32-true", f"demo.teacher_weights={tmp_path}/demo/teacher.pth",
            "demo.seeds=[0,1]", *extra]  # fmt: skip


def _cfg(tmp_path, fmnist_root, *extra, out: str = "out"):
    overrides = _overrides(tmp_path, fmnist_root, *extra, out=out)
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
    run_demo(*_cfg(tmp_path, fmnist_root, out="again"))
    assert f"teacher {cfg.demo.teacher} (reused)" in capsys.readouterr().out


def test_a_cached_teacher_trained_otherwise_is_trained_again(tmp_path, fmnist_root, capsys, caplog):
    caplog.set_level(logging.INFO, logger="diffkd.demo")
    one = ("demo.methods=[none]", "demo.seeds=[0]")
    run_demo(*_cfg(tmp_path, fmnist_root, *one))
    assert "no cached demo teacher at" in caplog.text
    capsys.readouterr()
    caplog.clear()
    run_demo(*_cfg(tmp_path, fmnist_root, *one, "demo.teacher=smallcnn_teacher", out="other_model"))
    assert "teacher smallcnn_teacher " in capsys.readouterr().out  # trained, not "(reused)"
    assert "model.student.name: demo_cnn_teacher → smallcnn_teacher" in caplog.text
    caplog.clear()
    run_demo(*_cfg(tmp_path, fmnist_root, *one, "demo.teacher=smallcnn_teacher", "demo.teacher_epochs=2",
                   out="more_epochs"))  # fmt: skip
    assert "teacher smallcnn_teacher (reused)" not in capsys.readouterr().out
    changes = (
        "(trainer.check_val_every_n_epoch: 1 → 2; trainer.max_epochs: 1 → 2): training a new one, which replaces it"
    )
    assert f"was trained with other settings {changes}" in caplog.text
    assert json.loads((tmp_path / "demo" / "teacher.json").read_text())["recipe"]["trainer"]["max_epochs"] == 2
    caplog.clear()
    run_demo(*_cfg(tmp_path, fmnist_root, "demo.methods=[kd]", "demo.seeds=[5]", "demo.teacher=smallcnn_teacher",
                   "demo.teacher_epochs=2", "trainer.log_every_n_steps=3", out="students_only"))  # fmt: skip
    assert "teacher smallcnn_teacher (reused)" in capsys.readouterr().out  # what the students do is no teacher's
    assert "reusing the demo teacher" in caplog.text and "trained with this run's settings" in caplog.text


def _teacher_recipe(tmp_path: Path, *extra: str, epochs: int = 8, out: str = "teacher") -> dict:
    """The recipe of the classification demo's teacher run under the user's overrides ``extra``."""
    user = _overrides(tmp_path, tmp_path, *extra)
    fixed = ["pipeline=train", "seed=0", f"trainer.max_epochs={epochs}", "trainer.precision=32-true",
             "model.student.name=demo_cnn_teacher", f"paths.output_dir={tmp_path / out}"]  # fmt: skip
    return teacher_recipe(demo_run_config(user, "none", fixed))


def test_the_teacher_cache_is_keyed_by_what_shapes_the_teacher(tmp_path):
    base = _teacher_recipe(tmp_path)
    assert base["trainer"]["max_epochs"] == 8 and base["seed"] == 0 and "teacher" not in base["model"]
    # where the runs write, how they report and what the students do: the same teacher
    same = _teacher_recipe(tmp_path, "data.num_workers=2", "trainer.log_every_n_steps=7", "demo.seeds=[5]",
                           "distill.diffkd.inference_steps=2", "demo.student_epochs=9", out="elsewhere")  # fmt: skip
    assert recipe_changes(base, same) == []
    changed = {
        ("optim.optimizer.lr=0.1",): ["optim.optimizer.lr: 0.05 → 0.1"],
        ("data.batch_size=32",): ["data.batch_size: 8 → 32"],
        ("data.subset=100",): ["data.subset: None → 100"],
        ("model.label_smoothing=0.1",): ["model.label_smoothing: 0.0 → 0.1"],
    }
    for extra, expected in changed.items():
        assert recipe_changes(base, _teacher_recipe(tmp_path, *extra)) == expected, extra
    assert "trainer.max_epochs: 8 → 2" in recipe_changes(base, _teacher_recipe(tmp_path, epochs=2))

    teacher = tmp_path / "cache" / "teacher.pth"
    assert cached_teacher(teacher, base) == (None, f"no cached demo teacher at {teacher}: training one")
    teacher.parent.mkdir()
    teacher.write_bytes(b"weights")
    teacher.with_suffix(".json").write_text(json.dumps({"test_acc": 0.9, "epochs": 8}))  # written before the recipe
    meta, message = cached_teacher(teacher, base)
    assert meta is None and "records no training settings" in message
    teacher.with_suffix(".json").write_text(json.dumps({"test_acc": 0.9, "recipe": base}))
    meta, message = cached_teacher(teacher, base)
    assert (
        meta["test_acc"] == 0.9 and message == f"reusing the demo teacher {teacher}: trained with this run's settings"
    )
    meta, message = cached_teacher(teacher, _teacher_recipe(tmp_path, "optim.optimizer.lr=0.1"))
    assert meta is None and message == (
        f"the cached demo teacher {teacher} was trained with other settings (optim.optimizer.lr: 0.05 → 0.1): "
        "training a new one, which replaces it"
    )


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
