"""Every experiment composes, and its data module, LightningModule and trainer instantiate."""

from __future__ import annotations

from pathlib import Path

import hydra
import pytest

from diffkd.train import build_module
from tests.conftest import CONF_DIR, compose_config, tiny_overrides

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
# the ImageNet, Cityscapes and COCO experiments compose, instantiate and run 2 steps each in their own test files
# (tests/test_{imagenet,cityscapes,coco}_experiments.py), on data written in their formats; the structured demos
# build their data sets first (tests/test_demo_{detection,segmentation}.py)
FAST_EXPERIMENTS = [
    e for e in EXPERIMENTS if not e.startswith(("imagenet_", "cityscapes_", "coco_", "demo_detection", "demo_segm"))
]


def test_experiments_exist():
    assert {"demo", "cifar_wrn40_wrn16", "cifar_res32x4_shuv1", "teacher_cifar_wrn_40_2"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", FAST_EXPERIMENTS)
def test_experiment_composes_and_instantiates(experiment, tmp_path, cifar_root):
    overrides = [f"experiment={experiment}", *tiny_overrides(tmp_path, cifar_root)]
    cfg = compose_config(overrides)
    if cfg.model.get("teacher") is not None:
        cfg.model.teacher.weights = None  # the real teacher files are not on CI machines
        cfg.model.teacher.pretrained = False  # nor can they download weights
    assert cfg.trainer.max_epochs == 1
    datamodule = hydra.utils.instantiate(cfg.data)
    module = build_module(cfg, getattr(datamodule, "num_classes", None))
    assert module.student is not None
    assert (module.teacher is not None) == module.distiller.needs_teacher
    hydra.utils.instantiate(cfg.optim.optimizer)(list(module.student.parameters()))
    hydra.utils.instantiate(cfg.trainer, logger=False, enable_progress_bar=False)


@pytest.mark.parametrize("experiment", [e for e in EXPERIMENTS if e.startswith("cifar_")])
def test_cifar_experiments_follow_recipe_a1(experiment, tmp_path):
    cfg = compose_config([f"experiment={experiment}", f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}"])
    assert cfg.trainer.max_epochs == 240 and cfg.data.batch_size == 64
    assert cfg.optim.optimizer.momentum == 0.9 and cfg.optim.optimizer.weight_decay == 5e-4
    assert list(cfg.optim.scheduler.milestones) == [150, 180, 210] and cfg.optim.scheduler.gamma == 0.1
    small_lr = cfg.model.student.name in ("MobileNetV2", "ShuffleV1", "ShuffleV2")
    assert cfg.optim.optimizer.lr == (0.01 if small_lr else 0.05)
    assert cfg.distill.points.feature.head_kwargs.use_ae is False  # no AE on CIFAR (paper App. B.2)
    assert Path(cfg.model.teacher.weights).name == "ckpt_epoch_240.pth"


def test_config_dir_is_packaged_with_the_module():
    import diffkd

    packaged = Path(diffkd.__file__).parent / "conf" / "train.yaml"
    assert packaged.is_file()


# --------------------------------------------------------------------------------------------------------------------
# the trainer: what the hardware has


def test_design_card_command_uses_what_the_hardware_has(tmp_path):
    """``python -m diffkd.train experiment=cifar_wrn40_wrn16 trainer.devices=8``: Lightning's ``auto`` accelerator and
    strategy (DDP over 8 GPUs on a GPU node), the precision diffkd's resolver gives (32-true on this CPU)."""
    import lightning as L
    import torch
    from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator
    from lightning.pytorch.strategies import DDPStrategy
    from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
    from omegaconf import OmegaConf

    from diffkd.utils.precision import auto_precision

    cfg = compose_config(
        [
            "experiment=cifar_wrn40_wrn16",
            "trainer.devices=8",
            f"paths.root_dir={tmp_path}",
            f"paths.output_dir={tmp_path}",
        ]
    )
    assert (cfg.trainer.accelerator, cfg.trainer.devices, cfg.trainer.strategy) == ("auto", 8, "auto")
    raw = OmegaConf.to_container(cfg.trainer, resolve=False)
    assert raw["precision"] == "${diffkd.auto_precision:${trainer.accelerator}}"
    assert cfg.trainer.precision == auto_precision("auto")
    if not torch.cuda.is_available():
        assert cfg.trainer.precision == "32-true"
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, logger=False, enable_progress_bar=False)
    gpus = torch.cuda.device_count()
    expected = CUDAAccelerator if gpus else CPUAccelerator
    assert isinstance(trainer.accelerator, expected)
    if not gpus or gpus >= 8:
        assert trainer.num_devices == 8
        # one process per device; ranks > 0 are started by re-running the command (pinned to this job's folder)
        assert isinstance(trainer.strategy, DDPStrategy)
        assert isinstance(trainer.strategy.launcher, _SubprocessScriptLauncher)
    assert trainer.precision == cfg.trainer.precision


def test_every_trainer_key_is_a_lightning_flag():
    """The trainer config's keys are Lightning Trainer arguments (a misspelt one fails here, not at instantiation),
    and the common ones are plain keys: ``trainer.strategy=ddp`` needs no ``+``."""
    import inspect

    import lightning as L

    flags = set(inspect.signature(L.Trainer.__init__).parameters)
    for name in ("default", "cpu", "gpu", "ddp", "ddp_spawn"):
        cfg = compose_config([f"trainer={name}"])
        keys = set(cfg.trainer) - {"_target_"}
        assert keys <= flags, f"trainer={name}: {sorted(keys - flags)} are not Trainer arguments"
        assert {
            "strategy",
            "max_time",
            "min_steps",
            "use_distributed_sampler",
            "plugins",
            "enable_checkpointing",
        } <= keys
    cfg = compose_config(
        ["trainer.strategy=ddp", "trainer.max_time=00:12:00:00", "trainer.use_distributed_sampler=false"]
    )
    assert (cfg.trainer.strategy, cfg.trainer.max_time, cfg.trainer.use_distributed_sampler) == (
        "ddp",
        "00:12:00:00",
        False,
    )


@pytest.mark.parametrize(
    ("accelerator", "cuda", "bf16_units", "expected"),
    [
        ("cpu", True, True, "32-true"),  # the CPU even where there are GPUs
        ("auto", False, False, "32-true"),  # no GPU: the CPU
        ("auto", True, True, "bf16-mixed"),  # Ampere on
        ("gpu", True, True, "bf16-mixed"),
        ("cuda", True, False, "32-true"),  # Turing (T4): no bf16 units, and fp16 is an opt-in
        ("auto", True, False, "32-true"),
        ("gpu", False, False, "bf16-mixed"),  # composed on a machine without GPUs: reads as it will run on them
        ("mps", False, False, "32-true"),
    ],
)
def test_auto_precision_follows_the_hardware(monkeypatch, accelerator, cuda, bf16_units, expected):
    import lightning.fabric.accelerators.cuda as lightning_cuda

    from diffkd.utils import precision

    monkeypatch.setattr(lightning_cuda, "is_cuda_available", lambda: cuda)
    monkeypatch.setattr(precision, "_cuda_computes_in_bf16", lambda: bf16_units)
    assert precision.auto_precision(accelerator) == expected
    cfg = compose_config([f"trainer.accelerator={accelerator}"])
    assert cfg.trainer.precision == expected  # through the config's resolver


def test_gpu_trainers_resolve_their_precision_where_they_run():
    """trainer=gpu and trainer=ddp keep the default's resolver: bf16-mixed on GPUs with bf16 units, 32-true on
    older ones; trainer=cpu and trainer=ddp_spawn on this CPU, 32-true."""
    import torch
    from omegaconf import OmegaConf

    for name in ("gpu", "ddp", "cpu", "ddp_spawn"):
        raw = OmegaConf.to_container(compose_config([f"trainer={name}"]).trainer, resolve=False)
        assert raw["precision"] == "${diffkd.auto_precision:${trainer.accelerator}}", name
    if not torch.cuda.is_available():
        assert compose_config(["trainer=ddp_spawn"]).trainer.precision == "32-true"
        assert compose_config(["trainer=cpu"]).trainer.precision == "32-true"


# --------------------------------------------------------------------------------------------------------------------
# the DiffKD head's defaults: one file, merged into every config with a DiffKD point

DIFFKD_HEAD_DEFAULTS = CONF_DIR / "distill" / "diffkd_head" / "default.yaml"
DIFFKD_DISTILLS = sorted(p.stem for p in (CONF_DIR / "distill").glob("*.yaml") if "head: diffkd" in p.read_text())


def _first_experiment_with(distill: str) -> str | None:
    for path in sorted((CONF_DIR / "experiment").glob("*.yaml")):
        if f"override /distill: {distill}\n" in path.read_text():
            return path.stem
    return None


def test_the_diffkd_head_defaults_are_written_once():
    """The eight keys live in conf/distill/diffkd_head/default.yaml only; no other config restates them."""
    from omegaconf import OmegaConf

    keys = set(OmegaConf.load(DIFFKD_HEAD_DEFAULTS))
    assert keys == {
        "beta_schedule",
        "inference_steps",
        "num_train_timesteps",
        "start_timestep",
        "anm",
        "anm_mix",
        "kd_grad_through_diffusion",
        "proj_bn",
    }
    assert len(DIFFKD_DISTILLS) >= 7
    for path in CONF_DIR.rglob("*.yaml"):
        if path != DIFFKD_HEAD_DEFAULTS:
            restated = [k for k in keys if f"\n  {k}:" in path.read_text() or f"\n{k}:" in path.read_text()]
            assert not restated, f"{path.relative_to(CONF_DIR)} restates the DiffKD head's defaults {restated}"


@pytest.mark.parametrize("distill", DIFFKD_DISTILLS)
def test_every_diffkd_config_composes_the_shared_head_defaults(distill):
    """``distill=<name>`` alone and with an experiment that selects it: ``distill.diffkd`` is the shared node (no
    experiment changes it today), points and weights as the file says, and overrides of the node still work."""
    from omegaconf import OmegaConf

    shared = OmegaConf.to_container(OmegaConf.load(DIFFKD_HEAD_DEFAULTS))
    runs = [[f"distill={distill}"]]
    if distill == "diffkd":
        runs.append([f"distill={distill}", "distill.diffkd.inference_steps=2"])
    experiment = _first_experiment_with(distill)
    if experiment is not None:
        runs.append([f"experiment={experiment}"])
    for overrides in runs:
        cfg = compose_config(overrides)
        expected = {**shared, "inference_steps": 2} if "distill.diffkd.inference_steps=2" in overrides else shared
        assert OmegaConf.to_container(cfg.distill.diffkd) == expected, overrides
        assert cfg.distill._target_ == "diffkd.distill.Distiller" and cfg.distill.task_weight == 1.0
        assert any(p.head == "diffkd" for p in cfg.distill.points.values()), overrides
