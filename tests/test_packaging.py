"""The configs travel inside the wheel: `python -m diffkd.train` finds them outside a source checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_carries_configs_and_train_finds_them(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(ROOT),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next(tmp_path.glob("diffkd-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "diffkd/conf/train.yaml" in names
    assert "diffkd/conf/experiment/cifar_wrn40_wrn16.yaml" in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run(
        [sys.executable, "-m", "diffkd.train", "experiment=cifar_wrn40_wrn16", "--cfg", "job", "--resolve"],
        cwd=elsewhere, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "name: wrn_16_2" in out.stdout
    assert str(elsewhere) in out.stdout  # paths resolve against the working directory
