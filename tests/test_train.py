"""Short training runs through the real entry point on generated CIFAR-100 files."""

from __future__ import annotations

import math

import pytest
import torch

from diffkd.tasks import NonFiniteLossError
from diffkd.train import train

DISTILLERS = ["none", "kd", "dist", "fitnet", "dkd", "diffkd", "diffkd_dist"]


@pytest.mark.parametrize("distill", DISTILLERS)
def test_each_distiller_trains_and_logs_its_terms(cifar_cfg, distill):
    cfg = cifar_cfg("cifar_wrn40_wrn16", f"distill={distill}", "test=true")
    metrics, objs = train(cfg)
    module = objs["module"]
    assert 0.0 <= metrics["val/acc"] <= 1.0 and 0.0 <= metrics["test/acc"] <= 1.0
    assert "val/acc_best" in metrics and "val/acc_top5" in metrics
    assert math.isfinite(metrics["train/loss"])
    terms = {k for k in metrics if k.startswith("train/loss/")}
    expected = {"train/loss/ce"} | {f"train/loss/{t}" for t in _terms(module)}
    assert terms == expected
    # the logged terms are the summands of the loss (KD's CE logged at its weight 0.1, as the distillation terms are)
    assert metrics["train/loss"] == pytest.approx(sum(metrics[k] for k in terms), rel=1e-5, abs=1e-6)
    if distill == "none":
        assert module.teacher is None  # no teacher built, no teacher work
    else:
        assert not any(p.requires_grad for p in module.teacher.parameters())
        assert not module.teacher.training  # stayed in eval through Lightning's train() calls
    if distill.startswith("diffkd"):
        assert {"train/gamma/feature", "train/gamma/logits"} <= set(metrics)
        assert 0 < metrics["train/gamma/feature"] < 1
        assert module.distiller.student_paths == {"feature": "relu", "logits": ""}


def _terms(module) -> list[str]:
    names = []
    for name, spec in module.distiller.specs.items():
        names.append(f"{name}/kd")
        if spec.head == "diffkd":
            names.append(f"{name}/diff")
            if spec.head_kwargs.get("use_ae"):
                names.append(f"{name}/ae")
    return names


def test_heads_are_children_in_optimizer_and_checkpoint(cifar_cfg, tmp_path):
    _, objs = train(cifar_cfg("cifar_wrn40_wrn16", "distill=diffkd"))
    module, trainer = objs["module"], objs["trainer"]
    optimized = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    head_params = list(module.distiller.heads.parameters())
    assert head_params and all(id(p) in optimized for p in head_params)
    assert not any(id(p) in optimized for p in module.teacher.parameters())
    ckpt = torch.load(objs["last_ckpt"], map_location="cpu", weights_only=True)
    keys = ckpt["state_dict"].keys()
    assert any(k.startswith("distiller.heads.feature.model.pred") for k in keys)
    assert ckpt["diffkd"]["config"]["model"]["student"]["name"] == "wrn_16_2"


def test_resume_from_last_checkpoint(cifar_cfg, tmp_path):
    _, objs = train(cifar_cfg("cifar_wrn40_wrn16", "distill=diffkd"))
    last = objs["last_ckpt"]
    assert last.endswith("last.ckpt")
    cfg = cifar_cfg("cifar_wrn40_wrn16", "distill=diffkd", "trainer.max_epochs=2", f"ckpt_path={last}")
    _, objs2 = train(cfg)
    assert objs2["trainer"].current_epoch == 2
    assert objs2["trainer"].global_step == 4  # 2 steps restored + 2 new


def test_teacher_checkpoint_loads_strict_and_mismatch_lists_keys(cifar_cfg, tmp_path):
    from diffkd.models import create_model

    good = tmp_path / "wrn_40_2_vanilla" / "ckpt_epoch_240.pth"
    good.parent.mkdir()
    teacher = create_model("wrn_40_2", num_classes=100)
    torch.save({"model": teacher.state_dict(), "epoch": 240, "accuracy": torch.tensor(75.61)}, good)
    _, objs = train(cifar_cfg("cifar_wrn40_wrn16", f"model.teacher.weights={good}"))
    torch.testing.assert_close(objs["module"].teacher.fc.weight, teacher.fc.weight)
    bad = tmp_path / "resnet56.pth"
    torch.save({"model": create_model("resnet56").state_dict()}, bad)
    with pytest.raises(RuntimeError, match="missing keys"):
        train(cifar_cfg("cifar_wrn40_wrn16", f"model.teacher.weights={bad}"))


def test_wrong_layer_name_lists_nearest_names(cifar_cfg):
    cfg = cifar_cfg("cifar_wrn40_wrn16", "distill=fitnet", "distill.points.feature.teacher=block3.layer.5.relu")
    with pytest.raises(KeyError, match=r"Nearest module names: .*block3\.layer\.5\.relu2"):
        train(cfg)


def test_sync_batchnorm_on_the_cpu_names_the_fix(cifar_cfg):
    cfg = cifar_cfg("cifar_wrn40_wrn16", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=1")
    with pytest.raises(ValueError, match=r"SyncBatchNorm has no CPU kernel.*trainer\.sync_batchnorm=false"):
        train(cfg)


def test_spatial_mismatch_fails_unless_aligned(cifar_cfg):
    # ShuffleV2's last map is 4×4, resnet32x4's 8×8: the experiment opts into interpolation...
    metrics, _ = train(cifar_cfg("cifar_res32x4_shuv2"))
    assert math.isfinite(metrics["train/loss"])
    # ...and without it the error names the sizes and the option
    with pytest.raises(
        ValueError,
        match=r"\(4, 4\) \(H, W.* but teacher 'layer3' is \(8, 8\).*\+\+distill.points.feature.align=interpolate",
    ):
        train(cifar_cfg("cifar_res32x4_shuv2", "distill.points.feature.align=null"))


def test_missing_dataset_says_layout_and_where_to_download(tmp_path):
    from tests.conftest import compose_config, tiny_overrides

    cfg = compose_config(
        ["experiment=cifar_wrn40_wrn16", *tiny_overrides(tmp_path, tmp_path / "empty"), "data.download=false",
         "model.teacher.weights=null"]
    )  # fmt: skip
    with pytest.raises(FileNotFoundError, match=r"cifar-100-python.*cifar-100-python\.tar\.gz"):
        train(cfg)


def test_nonfinite_loss_stops_and_names_the_term(cifar_cfg, tmp_path):
    cfg = cifar_cfg(
        "cifar_wrn40_wrn16", "distill=kd", "model.nonfinite_check_every=1", "distill.points.logits.weight=inf"
    )
    with pytest.raises(NonFiniteLossError, match=r"logits/kd") as err:
        train(cfg)
    assert "no checkpoint of these weights was written" in str(err.value)
    assert not list((tmp_path / "out" / "checkpoints").glob("*.ckpt"))


@pytest.mark.slow
def test_compile_and_channels_last_fast_path(cifar_cfg):
    cfg = cifar_cfg(
        "cifar_wrn40_wrn16", "model.compile=true", "model.channels_last=true", "model.teacher_dtype=bfloat16"
    )
    metrics, objs = train(cfg)
    assert math.isfinite(metrics["train/loss"])
    assert objs["module"].teacher.fc.weight.dtype == torch.bfloat16


def test_distill_on_my_own_image_folder(tmp_path):
    from tests.conftest import compose_config, tiny_overrides
    from tests.helpers.fake_data import write_image_folder

    root = tmp_path / "images"
    write_image_folder(root, classes=("cat", "dog", "owl"), per_class=6, size=40)
    overrides = [o for o in tiny_overrides(tmp_path, tmp_path) if not o.startswith("paths.data_dir")]
    cfg = compose_config(
        ["~experiment", "data=image_folder", f"data.root={root}", "data.image_size=32",
         "model.student.name=resnet8", "model.teacher.name=resnet14", "distill=diffkd", *overrides]
    )  # fmt: skip
    metrics, objs = train(cfg)
    assert objs["module"].student.fc.out_features == 3  # read from the class folders
    assert math.isfinite(metrics["train/loss"])


def test_sweep_config_lists_schedules_and_steps():
    from hydra import compose, initialize_config_dir

    from tests.conftest import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=cifar_wrn40_wrn16", "sweep=schedules"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert params["distill.diffkd.beta_schedule"] == "linear,scaled_linear,squaredcos_cap_v2"
    assert params["distill.diffkd.inference_steps"] == "1,3,5,10"


def test_per_iteration_schedule_on_a_run_counted_in_steps(cifar_cfg):
    # max_epochs=-1 + max_steps: Lightning gives the step count without a loader; the schedule still gets its epoch
    cfg = cifar_cfg("cifar_wrn40_wrn16", "distill=none", "optim=sgd_warmup_cosine", "trainer.max_epochs=-1",
                    "trainer.max_steps=3", "trainer.limit_train_batches=2")  # fmt: skip
    _, objs = train(cfg)
    scheduler = objs["trainer"].lr_scheduler_configs[0].scheduler
    assert scheduler.steps_per_epoch == 2 and scheduler.max_epochs == 1.5
    assert objs["trainer"].global_step == 3
