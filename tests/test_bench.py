"""The benchmark harness runs real training steps and reports what it measured (no targets asserted)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffkd.bench import bench_head, bench_step, main


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


def _stand_in_official(root):
    """A directory with the official file names whose ``DiffKD`` has the official API (built on our head)."""
    root.mkdir()
    (root / "diffkd_modules.py").write_text("")
    (root / "scheduling_ddim.py").write_text("")
    (root / "diffkd.py").write_text(
        "import diffkd_modules, scheduling_ddim  # resolved from this directory\n"
        "from torch import nn\n"
        "from diffkd.method import DiffKD as Ours\n\n"
        "class DiffKD(nn.Module):\n"
        "    def __init__(self, student_channels, teacher_channels, kernel_size=3, inference_steps=5,\n"
        "                 num_train_timesteps=1000, use_ae=False, ae_channels=None):\n"
        "        super().__init__()\n"
        "        self.head = Ours(student_channels, teacher_channels, kernel_size=kernel_size,\n"
        "                         use_ae=use_ae, ae_channels=ae_channels)\n\n"
        "    def forward(self, s, t):\n"
        "        out = self.head(s, t)\n"
        "        return out.student, out.diffusion_loss, out.teacher, out.ae_loss\n"
    )
    return root


def test_official_step_runs_a_clone_of_the_official_api(tmp_path):
    official = _stand_in_official(tmp_path / "DiffKD")
    for method in ("official_kd", "official_diffkd"):
        r = bench_step("cifar", method, "fp32", False, False, "cpu", steps=1, warmup=1, batch=4,
                       official_dir=str(official))  # fmt: skip
        assert r.error is None and r.finite is True and r.ms_per_step > 0
    import diffkd

    assert diffkd.__file__.endswith("diffkd/__init__.py")  # the official diffkd.py did not shadow this package


def test_official_methods_explain_where_the_code_comes_from(tmp_path):
    from diffkd.bench_official import load_official_diffkd

    with pytest.raises(SystemExit, match=r"git clone https://github\.com/hunto/DiffKD"):
        main(["--methods", "official_diffkd", "--no-heads", "--out", str(tmp_path / "b.json")])
    with pytest.raises(FileNotFoundError, match=r"lacks diffkd\.py, diffkd_modules\.py, scheduling_ddim\.py"):
        load_official_diffkd(tmp_path)
    with pytest.raises(ValueError, match=r"neither channels_last nor torch\.compile"):
        bench_step("cifar", "official_kd", "fp32", True, False, "cpu", 1, 0, official_dir=str(tmp_path))


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
    from diffkd.bench import BenchResult, _share_flops

    def row(compile, batch, gflop):
        return BenchResult("cifar", "kd", "bf16", True, compile, batch, 10.0, 1.0, None, "cpu", gflop_per_step=gflop)

    eager, compiled, other_batch = row(False, 4, 1.5), row("teacher", 4, None), row("teacher", 8, None)
    _share_flops([eager, compiled, other_batch])
    assert compiled.gflop_per_step == 1.5 and compiled.gflop_per_s == pytest.approx(150.0)
    assert other_batch.gflop_per_step is None  # no eager row at batch 8: not guessed


def test_the_official_loop_does_the_same_flops_as_ours(tmp_path):
    # the stand-in wraps our head, so equal counts mean the two loops around it do the same work: no extra
    # teacher or student passes on our side
    official = _stand_in_official(tmp_path / "DiffKD")
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
    assert len(summary) == 7, summary
    assert all(" ok" in line for line in summary), summary
    assert "CIFAR-shaped random data" in summary[-1] and "rehearsal: no projection" in summary[-1]
    steps = json.loads((out / "bench_eager.json").read_text())["steps"]
    assert {s["method"] for s in steps} == {"none", "kd", "diffkd", "official_kd", "official_diffkd"}
    assert all(s["error"] is None for s in steps)
