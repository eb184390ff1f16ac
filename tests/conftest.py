"""Shared fixtures: composed Hydra configs for tiny runs on data written in the real on-disk formats."""

from __future__ import annotations

import logging
import os

# Before torch loads: spin-waiting OpenMP threads make tests 10-50x slower when anything else is busy on a
# 2-core machine, and a weights download must fail at once offline instead of retrying for ~45 s.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from tests.helpers.fake_data import write_cifar100, write_fashion_mnist

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory) -> Path:
    """A data dir holding a small CIFAR-100 in the real python-pickle format (64 train, 32 test images)."""
    root = tmp_path_factory.mktemp("cifar")
    write_cifar100(root, n_train=64, n_test=32)
    return root


@pytest.fixture(scope="session")
def fmnist_root(tmp_path_factory) -> Path:
    """A data dir holding a small Fashion-MNIST in torchvision's IDX layout."""
    root = tmp_path_factory.mktemp("fmnist")
    write_fashion_mnist(root, n_train=256, n_test=64, layout="torchvision")
    return root


@pytest.fixture(autouse=True)
def _restore_logger_levels():
    """CLI entry points (``diffkd.bench.main``, ``diffkd.bench_tasks.main``) quiet these loggers for their run; a
    test that calls one must not silence the log records later tests read."""
    names = ("diffkd", "lightning", "lightning.pytorch", "lightning.fabric")
    levels = {n: logging.getLogger(n).level for n in names}
    yield
    for n, level in levels.items():
        logging.getLogger(n).setLevel(level)


def tiny_overrides(tmp_path: Path, data_dir: Path) -> list[str]:
    """Overrides that make any experiment a few-batch CPU run writing under ``tmp_path``."""
    return [
        f"paths.root_dir={tmp_path}",
        f"paths.output_dir={tmp_path / 'out'}",
        f"paths.data_dir={data_dir}",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "trainer.num_sanity_val_steps=0",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "~callbacks.progress_bar",
        "logger=none",
        "data.batch_size=8",
        "data.num_workers=0",
        "print_config=false",
    ]


def compose_config(overrides: list[str]) -> DictConfig:
    """``train.yaml`` composed with ``overrides`` (no Hydra app running)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


@pytest.fixture
def cifar_cfg(tmp_path, cifar_root):
    """Factory: a tiny CIFAR run config for an experiment, plus extra overrides. The first config writes to
    ``tmp_path/out``, later ones to ``out2``, ``out3``, ... (one run per folder, as ``diffkd.train`` demands)."""
    calls = [0]

    def make(experiment: str = "cifar_wrn40_wrn16", *extra: str) -> DictConfig:
        calls[0] += 1
        base = [f"experiment={experiment}", *tiny_overrides(tmp_path, cifar_root), "data.download=false"]
        if calls[0] > 1:
            base.append(f"paths.output_dir={tmp_path / f'out{calls[0]}'}")
        if not experiment.startswith("teacher_"):
            base.append("model.teacher.weights=null")
        return compose_config([*base, *extra])

    return make
