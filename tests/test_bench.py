"""The benchmark harness runs real training steps and reports what it measured (no targets asserted)."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffkd.bench import OFFICIAL_METHODS, bench_head, bench_step, load_official_bench, main


def test_bench_step_measures_a_real_training_step():
    r = bench_step(
        "cifar", "diffkd", "fp32", channels_last=True, compile=False, device="cpu", steps=1, warmup=1, batch=4
    )
    assert r.error is None and r.batch == 4
    assert r.ms_per_step > 0 and math.isclose(r.img_per_s, 4 / (r.ms_per_step / 1000), rel_tol=1e-6)


def test_bench_head_reports_official_sizes():
    # trans 16,512 + time embedding 163,840 + denoiser body 52,736 + noise adapter 7,138 + proj 16,768 (spec §B.7)
    assert bench_head("cifar", "fp32", "cpu", steps=1, warmup=0)["params"] == 256_994


def test_cli_writes_json_with_ratios(tmp_path, capsys):
    out = tmp_path / "b.json"
    main(["--pairs", "cifar", "--methods", "kd,diffkd", "--precision", "fp32", "--channels-last", "off",
          "--no-heads", "--steps", "1", "--warmup", "0", "--out", str(out)])  # fmt: skip
    data = json.loads(out.read_text())
    assert [s["method"] for s in data["steps"]] == ["kd", "diffkd"]
    assert data["ratios"][0]["diffkd_over_kd"] > 0
    assert "DiffKD/KD step time" in capsys.readouterr().out


_STAND_IN_DIFFKD = """
from torch import nn
from diffkd.method import DiffKD as Ours

class DiffKD(nn.Module):
    def __init__(self, student_channels, teacher_channels, kernel_size=3, inference_steps=5,
                 num_train_timesteps=1000, use_ae=False, ae_channels=None):
        super().__init__()
        self.head = Ours(student_channels, teacher_channels, kernel_size=kernel_size,
                         use_ae=use_ae, ae_channels=ae_channels)

    def forward(self, s, t):
        out = self.head(s, t)
        return {returns}
"""


def _stand_in_official(root, layout="root"):
    """A clone with the official file names whose ``DiffKD`` has the official API (built on our head), in the layout
    of hunto/DiffKD up to 5367f44 (``root``: the files at the top, absolute imports) or of its head (``package``: the
    ``classification`` submodule's ``lib/models/losses/diffkd`` package, relative imports, another return order)."""
    if layout == "root":
        where = root
        imports = "import diffkd_modules, scheduling_ddim  # resolved from this directory"
        returns = "out.student, out.diffusion_loss, out.teacher, out.ae_loss"
    else:
        where = root / "classification" / "lib" / "models" / "losses" / "diffkd"
        imports = "from . import diffkd_modules, scheduling_ddim"
        returns = "out.student, out.teacher, out.diffusion_loss, out.ae_loss"
    where.mkdir(parents=True)
    if layout == "package":
        (where / "__init__.py").write_text("from .diffkd import DiffKD\n")
        # importing through lib/ would run the rest of that repository: the loader must not
        (root / "classification" / "lib" / "__init__.py").write_text("raise ImportError('not this way')\n")
    (where / "diffkd_modules.py").write_text("")
    (where / "scheduling_ddim.py").write_text("")
    (where / "diffkd.py").write_text(imports + "\n" + _STAND_IN_DIFFKD.format(returns=returns))
    return root


@pytest.mark.parametrize("layout", ["root", "package"])
def test_official_step_runs_a_clone_of_the_official_api(tmp_path, layout):
    official = _stand_in_official(tmp_path / "DiffKD", layout)
    for method in ("official_kd", "official_diffkd"):
        r = bench_step("cifar", method, "fp32", False, False, "cpu", steps=1, warmup=1, batch=4,
                       official_dir=str(official))  # fmt: skip
        assert r.error is None and r.finite is True and r.ms_per_step > 0
    import diffkd

    assert diffkd.__file__.endswith("diffkd/__init__.py")  # the official diffkd.py did not shadow this package


def test_official_methods_explain_where_the_code_comes_from(tmp_path):
    official = load_official_bench()
    pin = official.PINNED_COMMIT
    assert len(pin) == 40 and pin.startswith("5367f44")
    clone = rf"git clone https://github\.com/hunto/DiffKD \.official/DiffKD && git -C \.official/DiffKD checkout {pin}"
    with pytest.raises(SystemExit, match=clone):
        main(["--methods", "official_diffkd", "--no-heads", "--out", str(tmp_path / "b.json")])
    with pytest.raises(SystemExit, match=r"lacks diffkd\.py, diffkd_modules\.py, scheduling_ddim\.py"):
        main(["--methods", "official_diffkd", "--official-dir", str(tmp_path), "--out", str(tmp_path / "b.json")])
    with pytest.raises(FileNotFoundError, match=clone):
        official.load_official_diffkd(tmp_path / "absent")
    # hunto/DiffKD's head cloned without --recurse-submodules: an empty classification/ folder
    (tmp_path / "head" / "classification").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=rf"submodule update --init classification|checkout {pin}"):
        official.load_official_diffkd(tmp_path / "head")
    with pytest.raises(ValueError, match=r"neither channels_last nor torch\.compile"):
        bench_step("cifar", "official_kd", "fp32", True, False, "cpu", 1, 0, official_dir=str(tmp_path))


def test_the_official_loop_is_development_code_outside_the_package():
    assert importlib.util.find_spec("diffkd.bench_official") is None
    official = load_official_bench()
    repo = Path(__file__).resolve().parents[1]
    assert Path(official.__file__) == repo / "benchmarks" / "official.py"
    assert official.OFFICIAL_METHODS == OFFICIAL_METHODS


def test_official_rows_without_a_source_checkout_say_they_need_one(tmp_path, monkeypatch):
    import diffkd.bench.classification as bench

    # an installed wheel: diffkd/bench.py in site-packages, no benchmarks/ above it
    monkeypatch.delenv(bench.BENCHMARKS_DIR_ENV, raising=False)
    monkeypatch.setattr(bench, "_THIS_FILE", tmp_path / "site-packages" / "diffkd" / "bench" / "classification.py")
    with pytest.raises(SystemExit, match=r"official-code rows .* need a source checkout of diffkd"):
        main(["--methods", "kd,official_diffkd", "--official-dir", str(tmp_path), "--out", str(tmp_path / "b.json")])
    with pytest.raises(FileNotFoundError, match=r"DIFFKD_BENCHMARKS_DIR=<clone>/benchmarks"):
        bench_step("cifar", "official_kd", "fp32", False, False, "cpu", 1, 0, official_dir=str(tmp_path))
    # the environment variable names the folder explicitly, and a wrong one is reported as such
    monkeypatch.setenv(bench.BENCHMARKS_DIR_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"DIFFKD_BENCHMARKS_DIR=.* has no official\.py"):
        load_official_bench()
    monkeypatch.setenv(bench.BENCHMARKS_DIR_ENV, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    assert load_official_bench().PINNED_COMMIT.startswith("5367f44")


def test_repeat_keeps_the_median_round_and_every_rounds_time(tmp_path):
    out = tmp_path / "b.json"
    main(["--pairs", "cifar", "--methods", "none", "--precision", "fp32", "--channels-last", "off", "--no-heads",
          "--steps", "1", "--warmup", "0", "--batch", "4", "--repeat", "3", "--out", str(out)])  # fmt: skip
    (step,) = json.loads(out.read_text())["steps"]
    assert len(step["ms_runs"]) == 3
    assert step["ms_per_step"] == pytest.approx(sorted(step["ms_runs"])[1], abs=0.05)


def test_eager_steps_count_their_flops_and_the_count_is_linear_in_the_batch():
    def flops(method: str, batch: int, warmup: int = 1) -> float | None:
        r = bench_step("cifar", method, "fp32", False, False, "cpu", steps=1, warmup=warmup, batch=batch)
        assert r.error is None
        return r.gflop_per_step

    kd4, kd8, diffkd4 = flops("kd", 4), flops("kd", 8), flops("diffkd", 4)
    assert kd8 == pytest.approx(2 * kd4, rel=1e-3)  # every conv and matmul scales with the batch
    # the DiffKD heads' convolutions (six denoiser passes at the 8×8 feature point) on top of KD's
    assert 1.05 < diffkd4 / kd4 < 1.2
    assert flops("kd", 4, warmup=0) is None  # counted only in an untimed warm-up step


def test_compiled_rows_take_the_flops_of_the_eager_row_of_their_pair_method_and_batch():
    from diffkd.bench.classification import BenchResult, _share_flops

    def row(compile, batch, gflop):
        return BenchResult("cifar", "kd", "bf16", True, compile, batch, 10.0, 1.0, None, "cpu", gflop_per_step=gflop)

    eager, compiled, other_batch = row(False, 4, 1.5), row("teacher", 4, None), row("teacher", 8, None)
    _share_flops([eager, compiled, other_batch])
    assert compiled.gflop_per_step == 1.5 and compiled.gflop_per_s == pytest.approx(150.0)
    assert other_batch.gflop_per_step is None  # no eager row at batch 8: not guessed


@pytest.mark.parametrize("layout", ["root", "package"])
def test_the_official_loop_does_the_same_flops_as_ours(tmp_path, layout):
    # the stand-in wraps our head, so equal counts mean the two loops around it do the same work: no extra
    # teacher or student passes on our side (and in either layout the outputs are read in their own order)
    official = _stand_in_official(tmp_path / "DiffKD", layout)
    for ours, theirs in (("kd", "official_kd"), ("diffkd", "official_diffkd")):
        a = bench_step("cifar", ours, "fp32", False, False, "cpu", steps=1, warmup=1, batch=4)
        b = bench_step("cifar", theirs, "fp32", False, False, "cpu", steps=1, warmup=1, batch=4,
                       official_dir=str(official))  # fmt: skip
        assert a.gflop_per_step == pytest.approx(b.gflop_per_step, rel=1e-6)


@pytest.mark.slow
def test_the_gpu_script_rehearses_every_part_on_the_cpu(tmp_path):
    """`REHEARSE=cpu bash scripts/bench_gpu.sh`: CI has no GPU, so this keeps the lent-GPU script's commands alive."""
    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "gpu"
    env = {**os.environ, "REHEARSE": "cpu", "PY": sys.executable, "OUT": str(out),
           "OFFICIAL_DIR": str(_stand_in_official(tmp_path / "DiffKD"))}  # fmt: skip
    subprocess.run(["bash", str(repo / "scripts" / "bench_gpu.sh")], env=env, cwd=repo, timeout=900, check=True)
    summary = (out / "summary.txt").read_text().splitlines()
    assert len(summary) == 8, summary
    assert all(" ok" in line for line in summary), summary
    assert "CIFAR-shaped random data" in summary[-1] and "rehearsal: no projection" in summary[-1]
    steps = json.loads((out / "bench_eager.json").read_text())["steps"]
    assert {s["method"] for s in steps} == {"none", "kd", "diffkd", "official_kd", "official_diffkd"}
    assert all(s["error"] is None for s in steps)
    # 3c, the demo's pair: eager and with the heads compiled (CUDA graphs on a GPU), nothing repeated
    small = json.loads((out / "bench_small.json").read_text())["steps"]
    assert sorted((s["method"], str(s["compile"])) for s in small) == [
        ("diffkd", "False"),
        ("diffkd", "heads"),
        ("kd", "False"),
        ("kd", "heads"),
        ("none", "False"),
    ]
    assert all(s["error"] is None for s in small)


def test_small_pair_is_the_demos_pair_and_its_heads_are_a_modest_fraction(tmp_path):
    from diffkd.bench import PAIRS, pair_config
    from tests.conftest import compose_config

    demo = compose_config(["experiment=demo"])
    small = pair_config("small", "kd")
    assert PAIRS["small"] == "demo" and small.distill.points.logits.distance.tau == 4.0  # conf/distill/kd.yaml
    assert (small.model.teacher.name, small.model.student.name, small.data.batch_size) == (
        demo.demo.teacher,
        demo.demo.student,
        demo.data.batch_size,
    )
    assert small.model.teacher.weights is None  # a benchmark needs no weight file
    out = tmp_path / "b.json"
    main(["--pairs", "small", "--methods", "kd,diffkd", "--precision", "fp32", "--channels-last", "on",
          "--no-heads", "--steps", "1", "--warmup", "1", "--batch", "16", "--out", str(out)])  # fmt: skip
    steps = {s["method"]: s for s in json.loads(out.read_text())["steps"]}
    assert all(s["error"] is None and s["finite"] for s in steps.values())
    # the demo's design (conf/experiment/demo.yaml): the two DiffKD heads add well under a fifth of the KD step's FLOPs
    assert 1.0 < steps["diffkd"]["gflop_per_step"] / steps["kd"]["gflop_per_step"] < 1.2


def test_a_pair_is_any_packaged_experiment_and_a_method_any_distill_config():
    # not one of the short names: experiment=cifar_res56_res20 with distill=dkd, composed as training composes it
    r = bench_step("cifar_res56_res20", "dkd", "fp32", False, False, "cpu", steps=1, warmup=1, batch=4)
    assert r.error is None and r.finite is True and r.batch == 4 and r.gflop_per_step > 0


def test_unknown_pairs_and_methods_name_the_configs_to_choose_from(tmp_path):
    out = ["--no-heads", "--out", str(tmp_path / "b.json")]
    with pytest.raises(SystemExit, match=r"no experiment config \['cifar_nope'\].*cifar_wrn40_wrn16"):
        main(["--pairs", "cifar_nope", *out])
    with pytest.raises(SystemExit, match=r"no distill config \['kdd'\].*diffkd, .*kd"):
        main(["--pairs", "cifar", "--methods", "kdd", *out])
    with pytest.raises(SystemExit, match=r"unknown precision\(s\) \['fp64'\]; choose from fp32, bf16"):
        main(["--pairs", "cifar", "--precision", "fp64", *out])
