"""The benchmark harness runs real training steps and reports what it measured (no targets asserted)."""

import json
import math

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
