"""The demo protocol: a new demo is only its declaration (title, columns, names, data step); the protocol trains or
reuses the teacher, runs seeds × methods and writes the table."""

from __future__ import annotations

import json
import logging

import pytest
from omegaconf import DictConfig

from diffkd.demos.protocol import TABLE_FILE, Column, Demo, Prepared
from tests.test_demo import _cfg


def _toy(size: int, calls: list[str]) -> Demo:
    """A demo declared from scratch on the tiny Fashion-MNIST: a data step whose ``size`` shapes the teacher."""

    def prepare(cfg: DictConfig) -> Prepared:
        calls.append(str(cfg.paths.output_dir))
        return Prepared(recipe={"toy": {"size": size}}, fields={"size": size})

    return Demo(
        title="Toy demo — {student} from {teacher} on {size} px items; {seed_text}, {student_epochs} epoch(s)",
        columns=(Column("acc", "val/acc", "acc", width=8, digits=1), Column("top-5", "val/acc_top5", "acc5", width=8)),
        name_width=30,
        method_names={"kd": "student + toy KD"},
        teacher_metrics_in="val",
        prepare=prepare,
        prepare_row="toy data",
    )


def test_a_new_demo_is_only_its_declaration(tmp_path, fmnist_root, capsys, caplog):
    caplog.set_level(logging.INFO, logger="diffkd.demo")
    calls: list[str] = []
    cfg, overrides = _cfg(tmp_path, fmnist_root, "demo.methods=[none,kd]", "demo.seeds=[0,1]")
    acc = _toy(3, calls).run(cfg, overrides)
    printed = capsys.readouterr().out
    out = tmp_path / "out"
    assert calls == [str(out)]
    table = (out / TABLE_FILE).read_text()
    assert table.splitlines() == printed[printed.index("Toy demo — ") :].splitlines()
    assert table.startswith(f"Toy demo — {cfg.demo.student} from {cfg.demo.teacher} on 3 px items; seeds 0 1, 1 epoch")
    rows = [line for line in table.splitlines() if line.startswith(("teacher ", "student "))]
    assert [r[:30].rstrip() for r in rows] == [
        f"teacher {cfg.demo.teacher}",
        "student alone, seed 0",
        "student + toy KD, seed 0",
        "student alone, seed 1",
        "student + toy KD, seed 1",
    ]
    assert table.splitlines()[2] == f"{'run':<30}{'acc':>8}{'top-5':>8}{'time (s)':>10}"
    per_seed = [float(r.split()[-3]) for r in rows[2::2]]  # the acc cells of the toy KD runs
    assert acc == pytest.approx(sum(per_seed) / 200, abs=1e-3)
    assert "acc over 2 seeds (mean ± std):" in table and "differences beyond the seed spread" in table
    assert any(line.startswith("toy data ") for line in table.splitlines())
    for method in ("none", "kd"):
        for seed in (0, 1):
            assert (out / method / f"seed{seed}" / "checkpoints" / "last.ckpt").is_file()
    meta = json.loads((tmp_path / "demo" / "teacher.json").read_text())
    assert meta["teacher"] == cfg.demo.teacher and set(meta["val"]) == {"acc", "acc5"} and meta["toy"] == {"size": 3}
    assert meta["recipe"]["toy"] == {"size": 3} and meta["epochs"] == 1

    # the same declaration again: the teacher is reused, its cached metrics fill its row
    again, overrides = _cfg(tmp_path, fmnist_root, "demo.methods=[kd]", "demo.seeds=[5]", out="again")
    _toy(3, calls).run(again, overrides)
    table = (tmp_path / "again" / TABLE_FILE).read_text()
    reused = next(line for line in table.splitlines() if line.startswith("teacher "))
    assert reused.startswith(f"teacher {cfg.demo.teacher} (reused)") and reused.split()[-3:-1] == rows[0].split()[-3:-1]
    assert "student + toy KD " in table and "seed 5" in table and "over 1 seeds" not in table
    assert (tmp_path / "again" / "kd" / "checkpoints" / "last.ckpt").is_file()  # one seed: <method>/
    assert "n/a" not in table
    capsys.readouterr()
    # what the data step says shapes the teacher keys its cache
    caplog.clear()
    _toy(4, calls).run(*_cfg(tmp_path, fmnist_root, "demo.methods=[none]", "demo.seeds=[0]", out="bigger"))
    assert "toy.size: 3 → 4" in caplog.text and "(reused)" not in capsys.readouterr().out


def test_a_declaration_or_demo_block_that_cannot_run_says_what_to_fix(tmp_path, fmnist_root):
    with pytest.raises(ValueError, match="at least one Column"):
        Demo(title="empty", columns=())
    with pytest.raises(ValueError, match="choose 'seed_columns' or 'run_rows'"):
        Demo(title="x", columns=(Column("acc", "val/acc", "acc"),), layout="grid")  # type: ignore[arg-type]
    toy = _toy(3, [])
    with pytest.raises(ValueError, match=r"demo.methods is empty"):
        toy.run(*_cfg(tmp_path, fmnist_root, "demo.methods=[]"))
    with pytest.raises(ValueError, match=r"the demo block lacks \['student'\]"):
        toy.run(*_cfg(tmp_path, fmnist_root, "demo.student=null"))
    assert not (tmp_path / "out").exists()  # refused before any run
