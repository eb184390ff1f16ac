"""ImageNet recipes B1/B2/B3: experiment configs, per-iteration schedulers, the student EMA, printed head sizes.

Training runs use the generated tiny ImageNet (3 classes, JPEG files in the folders layout), teachers without
weights, 64² images (Swin: 224², batch 2, marked slow), 2 training steps and one validation batch.
"""

from __future__ import annotations

import itertools
import logging
import math
from pathlib import Path

import hydra
import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from diffkd.callbacks import EMA, ema_state_from_checkpoint
from diffkd.optim import WarmupCosineLR, WarmupStepLR
from diffkd.train import build_module, train
from tests.conftest import compose_config, tiny_overrides
from tests.helpers.fake_imagenet import write_tiny_imagenet

EXPERIMENTS = [
    "imagenet_r34_r18",
    "imagenet_r50_mbv1",
    "imagenet_b2_r50_r34",
    "imagenet_b2_r50_mbv2",
    "imagenet_b2_r50_effb0",
    "imagenet_b2_swinl_r50",
    "imagenet_b3_swinl_swint",
]

# experiment → (student, teacher, per-GPU batch, lr_base_batch_size, lr, epochs, AE latent, EMA)
RECIPES = {
    "imagenet_r34_r18": ("tv_resnet18", "tv_resnet34", 32, 256, 0.1, 100, 1024, False),
    "imagenet_r50_mbv1": ("mobilenetv1_100", "tv_resnet50", 32, 256, 0.1, 100, 1024, False),
    "imagenet_b2_r50_r34": ("tv_resnet34", "resnet50", 96, 768, 0.048, 450, 1024, True),
    "imagenet_b2_r50_mbv2": ("mobilenetv2_100", "resnet50", 96, 768, 0.048, 450, 1024, True),
    "imagenet_b2_r50_effb0": ("efficientnet_b0", "resnet50", 96, 768, 0.048, 450, 1024, True),
    "imagenet_b2_swinl_r50": ("tv_resnet50", "swin_large_patch4_window7_224", 96, 768, 0.048, 450, 768, True),
    "imagenet_b3_swinl_swint": (
        "swin_tiny_patch4_window7_224",
        "swin_large_patch4_window7_224",
        64,
        1024,
        5e-4,
        300,
        768,
        False,
    ),
}


@pytest.fixture(scope="session")
def imagenet_root(tmp_path_factory) -> Path:
    """``<root>/imagenet/{train,val}/<wnid>/*.JPEG``: 3 classes, 4 train and 2 val images each."""
    root = tmp_path_factory.mktemp("tiny_imagenet")
    write_tiny_imagenet(root / "imagenet", n_classes=3, per_class=4, val_per_class=2)
    return root


def _overrides(tmp_path: Path, root: Path, experiment: str, *extra: str) -> list[str]:
    return [
        f"experiment={experiment}",
        *tiny_overrides(tmp_path, root),
        "model.teacher.pretrained=false",
        "data.batch_size=4",
        "data.image_size=64",
        "test=false",
        "~callbacks.model_checkpoint",
        "trainer.enable_checkpointing=false",
        "++trainer.enable_model_summary=false",
        *extra,
    ]


# ------------------------------------------------------------------------------------------------ configs


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_with_its_recipe(experiment, tmp_path):
    cfg = compose_config([f"experiment={experiment}", f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}"])
    student, teacher, _, base, lr, epochs, ae, ema = RECIPES[experiment]
    assert cfg.model.student.name == student and cfg.model.teacher.name == teacher
    assert cfg.model.teacher.pretrained is True
    assert cfg.data._target_ == "diffkd.data.imagenet.ImageNetDataModule"
    # the paper's global batch on 8 GPUs (B3: 16) with lr scaled from it
    assert cfg.data.batch_size * (16 if "b3" in experiment else 8) == base == cfg.optim.lr_base_batch_size
    assert cfg.optim.optimizer.lr == lr and cfg.optim.no_decay_bias_norm is True
    assert cfg.trainer.max_epochs == epochs
    points = cfg.distill.points
    assert (points.feature.student, points.feature.teacher, points.logits.student, points.logits.teacher) == (
        "@feature",
        "@feature",
        "",
        "",
    )
    assert points.feature.head_kwargs.use_ae is True and points.feature.head_kwargs.ae_channels == ae
    assert ("ema" in cfg.callbacks) == ema
    if ema:
        assert cfg.callbacks.ema.decay == 0.9999
    recipe = experiment.split("_")[1] if "_b" in experiment else "b1"
    optim = {"b1": "torch.optim.SGD", "b2": "timm.optim.RMSpropTF", "b3": "torch.optim.AdamW"}[recipe]
    assert cfg.optim.optimizer._target_ == optim
    if recipe == "b1":
        assert cfg.optim.optimizer.nesterov is True and cfg.optim.optimizer.weight_decay == 1e-4
        assert (cfg.optim.scheduler.step_size, cfg.optim.scheduler.gamma) == (30, 0.1)
        assert cfg.data.auto_augment is None and cfg.data.label_smoothing == 0.0
    elif recipe == "b2":
        o, s = cfg.optim.optimizer, cfg.optim.scheduler
        assert (o.alpha, o.eps, o.momentum, o.weight_decay) == (0.9, 1e-3, 0.9, 1e-5)
        assert (s.decay_epochs, s.decay_rate, s.warmup_epochs, s.warmup_lr) == (2.4, 0.97, 3, 1e-6)
        assert cfg.optim.scheduler_interval == "step"
        assert (cfg.data.auto_augment, cfg.data.re_prob, cfg.data.label_smoothing) == ("rand-m9-mstd0.5", 0.2, 0.1)
    else:
        o, s = cfg.optim.optimizer, cfg.optim.scheduler
        assert o.weight_decay == 0.05 and cfg.optim.scheduler_interval == "step"
        assert (s.warmup_epochs, s.warmup_lr, s.min_lr) == (20, 5e-7, 5e-6)
        d = cfg.data
        assert (d.auto_augment, d.re_prob, d.mixup, d.cutmix, d.label_smoothing, d.interpolation) == (
            "rand-m9-mstd0.5",
            0.25,
            0.8,
            1.0,
            0.1,
            "bicubic",
        )
        assert cfg.trainer.gradient_clip_val == 5.0 and cfg.model.student.drop_path_rate == 0.2


def test_swin_experiment_instantiates(tmp_path, imagenet_root):
    """Compose + instantiate B3 (models on the meta device: no memory, no init cost)."""
    cfg = compose_config(_overrides(tmp_path, imagenet_root, "imagenet_b3_swinl_swint"))
    dm = hydra.utils.instantiate(cfg.data)
    assert dm.num_classes == 3 and dm.mixup_active and dm.loss_label_smoothing == 0.0
    assert dm.batch_transform() is not None
    with torch.device("meta"):
        student = hydra.utils.instantiate(cfg.model.student, num_classes=1000)
        teacher = hydra.utils.instantiate(cfg.model.teacher, num_classes=1000)
    assert sum(p.numel() for p in student.parameters()) == 28_288_354  # Swin-T
    assert sum(p.numel() for p in teacher.parameters()) == 196_532_476  # Swin-L
    assert student.layers[-1].blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)
    assert not any(p.requires_grad for p in teacher.parameters())
    distiller = hydra.utils.instantiate(cfg.distill, _convert_="all")
    assert distiller.specs["feature"].head_kwargs == {"use_ae": True, "ae_channels": 768}
    params = [nn.Parameter(torch.zeros(2))]
    opt = hydra.utils.instantiate(cfg.optim.optimizer)(params)
    assert isinstance(opt, torch.optim.AdamW)
    sched = hydra.utils.instantiate(cfg.optim.scheduler)(opt, steps_per_epoch=10, total_steps=3000)
    assert isinstance(sched, WarmupCosineLR) and opt.param_groups[0]["lr"] == pytest.approx(5e-7)


# ------------------------------------------------------------------------------------------------ training


def _check_run(experiment: str, metrics: dict, objs: dict, batch: int) -> None:
    module, trainer = objs["module"], objs["trainer"]
    assert trainer.global_step == 2
    assert math.isfinite(metrics["train/loss"]) and 0.0 <= metrics["val/acc"] <= 1.0
    assert {"train/loss/feature/ae", "train/loss/feature/diff", "train/loss/logits/kd"} <= set(metrics)
    _, _, _, base, lr, _, _, ema = RECIPES[experiment]
    group_lr = trainer.optimizers[0].param_groups[0]["lr"]
    scaled = lr * batch / base  # lr_base_batch_size: global batch = batch × 1 device
    if "_b2_" in experiment:  # after 2 of the 3 × 2 warm-up steps (2 steps per epoch here)
        assert group_lr == pytest.approx(1e-6 + (scaled - 1e-6) * 2 / 6)
        assert module.label_smoothing == 0.1  # from data.label_smoothing (hard targets)
        assert trainer.lr_scheduler_configs[0].scheduler.steps_per_epoch == 2
    elif "_b3_" in experiment:
        assert group_lr == pytest.approx(5e-7 + (scaled - 5e-7) * 2 / 40)  # 20 warm-up epochs × 2 steps
        assert module.label_smoothing == 0.0  # Mixup targets carry it
        assert trainer.gradient_clip_val == 5.0
    else:
        assert group_lr == pytest.approx(scaled)  # StepLR per epoch: no decay yet
        assert module.label_smoothing == 0.0
        assert trainer.optimizers[0].param_groups[0]["nesterov"] is True
    callbacks = [c for c in trainer.callbacks if isinstance(c, EMA)]
    assert len(callbacks) == int(ema)
    if ema:
        assert callbacks[0].decay == 0.9999 and callbacks[0].num_updates == 2
    no_decay = trainer.optimizers[0].param_groups[1]
    assert no_decay["weight_decay"] == 0.0 and all(p.ndim <= 1 for p in no_decay["params"])


CNN_EXPERIMENTS = [e for e in EXPERIMENTS if "swin" not in e]


@pytest.mark.parametrize("experiment", CNN_EXPERIMENTS)
def test_cnn_experiment_trains_two_steps_and_validates(experiment, tmp_path, imagenet_root):
    cfg = compose_config(_overrides(tmp_path, imagenet_root, experiment))
    metrics, objs = train(cfg)
    _check_run(experiment, metrics, objs, batch=4)
    paths = objs["module"].distiller.teacher_paths
    assert paths == {"feature": "layer4", "logits": ""}  # the inferred points: the last map and the output


@pytest.mark.slow
@pytest.mark.parametrize("experiment", ["imagenet_b2_swinl_r50", "imagenet_b3_swinl_swint"])
def test_swin_experiment_trains_two_steps_and_validates(experiment, tmp_path, imagenet_root):
    cfg = compose_config(_overrides(tmp_path, imagenet_root, experiment, "data.image_size=224", "data.batch_size=2"))
    metrics, objs = train(cfg)
    _check_run(experiment, metrics, objs, batch=2)
    module = objs["module"]
    assert module.distiller.teacher_paths == {"feature": "norm", "logits": ""}  # Swin-L: channels-last (B, 7, 7, C)
    assert module.distiller.layouts["feature"][1] == "bhwc"
    if experiment == "imagenet_b3_swinl_swint":
        assert module.distiller.student_paths["feature"] == "norm"


# ------------------------------------------------------------------------------------------------ head sizes


@pytest.mark.parametrize(
    ("experiment", "expected"),
    [
        ("imagenet_r34_r18", {"feature": ("7,644,418", "1.11G"), "logits": ("23,323,002", "102M")}),
        ("imagenet_r50_mbv1", {"feature": ("11,315,970", "1.29G"), "logits": ("23,323,002", "102M")}),
    ],
)
def test_printed_head_sizes_match_spec_b7(experiment, expected, tmp_path, caplog):
    """At 224² and 1000 classes the per-point log line shows spec §B.7's parameters and MACs/iter."""
    cfg = compose_config([f"experiment={experiment}", f"paths.root_dir={tmp_path}", "model.teacher.pretrained=false"])
    module = build_module(cfg, num_classes=1000)
    with caplog.at_level(logging.INFO, logger="diffkd.tasks.base"):
        module.build(torch.randn(2, 3, 224, 224))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("distill point")]
    assert len(lines) == 2
    for line, (point, (params, macs)) in zip(lines, expected.items()):
        assert line.split()[2] == point
        assert f"head params {params}  MACs/sample {macs}" in line, line


# ------------------------------------------------------------------------------------------------ schedulers


def _optimizer(lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)


def _lrs(scheduler, steps: int) -> list[float]:
    out = [scheduler.get_last_lr()[0]]
    for _ in range(steps):
        scheduler.optimizer.step()
        scheduler.step()
        out.append(scheduler.get_last_lr()[0])
    return out


def test_warmup_step_lr_b2_values():
    """B2 at 10 steps per epoch: warm-up over 30 steps from 1e-6, then ×0.97 every 24 steps."""
    sched = WarmupStepLR(
        _optimizer(0.1), decay_epochs=2.4, decay_rate=0.97, steps_per_epoch=10, warmup_epochs=3, warmup_lr=1e-6
    )
    lrs = _lrs(sched, 300)
    expected = {
        0: 1e-6,
        15: 1e-6 + (0.1 - 1e-6) * 0.5,  # half-way through the warm-up: 0.0500005
        29: 1e-6 + (0.1 - 1e-6) * 29 / 30,
        30: 0.1,  # warm-up done; the decay clock starts here
        53: 0.1,
        54: 0.097,  # 2.4 epochs after the warm-up
        77: 0.097,
        78: 0.1 * 0.97**2,
        270: 0.1 * 0.97**10,  # 0.07374241...
        299: 0.1 * 0.97**11,
    }
    for step, value in expected.items():
        assert lrs[step] == pytest.approx(value, rel=1e-12), step
    assert lrs[270] == pytest.approx(0.0737424127, rel=1e-9)


def test_warmup_cosine_lr_b3_values():
    """B3 at 10 steps per epoch, 300 epochs: warm-up over 200 steps from 5e-7, cosine over 2800 steps to 5e-6."""
    sched = WarmupCosineLR(
        _optimizer(5e-4), steps_per_epoch=10, total_steps=3000, warmup_epochs=20, warmup_lr=5e-7, min_lr=5e-6
    )
    lrs = _lrs(sched, 3100)
    assert lrs[0] == pytest.approx(5e-7)
    assert lrs[100] == pytest.approx(2.5025e-4)  # 5e-7 + (5e-4 − 5e-7) / 2
    assert lrs[200] == pytest.approx(5e-4)
    assert lrs[1600] == pytest.approx(2.525e-4)  # half-way: 5e-6 + (5e-4 − 5e-6) / 2
    assert lrs[3000] == pytest.approx(5e-6) and lrs[3100] == pytest.approx(5e-6)
    # the official CosineAnnealingLR(T_max = total − warm-up, eta_min) after the warm-up
    for k in (1, 700, 2100, 2799):
        official = 5e-6 + (5e-4 - 5e-6) * (1 + math.cos(math.pi * k / 2800)) / 2
        assert lrs[200 + k] == pytest.approx(official, rel=1e-12)
    assert all(a >= b for a, b in itertools.pairwise(lrs[200:]))


def test_schedulers_resume_from_state_dict_and_scale_every_group():
    opt = torch.optim.SGD(
        [{"params": [nn.Parameter(torch.zeros(1))]}, {"params": [nn.Parameter(torch.zeros(1))]}], lr=0.2
    )
    opt.param_groups[1]["lr"] = 0.02
    sched = WarmupStepLR(opt, decay_epochs=0.5, decay_rate=0.5, steps_per_epoch=4, warmup_epochs=1, warmup_lr=0.0)
    assert _lrs(sched, 5)[1:] == pytest.approx([0.05, 0.1, 0.15, 0.2, 0.2])  # warm-up over 4 steps from 0
    assert sched.get_last_lr() == pytest.approx([0.2, 0.02])  # step 5: 0.25 epochs after the warm-up
    _lrs(sched, 1)
    assert sched.get_last_lr() == pytest.approx([0.1, 0.01])  # step 6: 0.5 epochs after → one decay of 0.5
    state = sched.state_dict()
    fresh = _optimizer(0.2)
    fresh.add_param_group({"params": [nn.Parameter(torch.zeros(1))], "lr": 0.02})
    for g, old in zip(fresh.param_groups, opt.param_groups):
        g["initial_lr"] = old["initial_lr"]
    resumed = WarmupStepLR(fresh, decay_epochs=0.5, decay_rate=0.5, steps_per_epoch=4, last_epoch=5)
    resumed.load_state_dict(state)
    assert _lrs(resumed, 2)[1:] == pytest.approx(_lrs(sched, 2)[1:])
    with pytest.raises(ValueError, match="steps_per_epoch"):
        WarmupStepLR(_optimizer(0.1), decay_epochs=1, decay_rate=0.5)


# ------------------------------------------------------------------------------------------------ EMA


class _Tiny(L.LightningModule):
    """A student with BatchNorm; records its state after every optimizer step and what validation sees."""

    def __init__(self) -> None:
        super().__init__()
        self.student = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        self.after_step: list[dict[str, torch.Tensor]] = []
        self.seen_in_val: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.student(x), y)

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        self.after_step.append({k: v.detach().clone() for k, v in self.student.state_dict().items()})

    def validation_step(self, batch, batch_idx):
        self.seen_in_val.append(self.student[0].weight.detach().clone())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g))
    return DataLoader(data, batch_size=4)


def _trainer(tmp_path: Path, callbacks: list, **kwargs) -> L.Trainer:
    options = {
        "max_epochs": 1,
        "limit_val_batches": 1,
        "num_sanity_val_steps": 0,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": str(tmp_path),
        **kwargs,
    }
    return L.Trainer(accelerator="cpu", callbacks=callbacks, **options)


def _hand_ema(start: dict[str, torch.Tensor], states: list[dict[str, torch.Tensor]], decay: float) -> dict:
    ema = {k: v.clone() for k, v in start.items() if v.is_floating_point()}
    for state in states:
        for k in ema:
            ema[k] = decay * ema[k] + (1 - decay) * state[k]
    return ema


@pytest.mark.parametrize("accumulate", [1, 2])
def test_ema_equals_hand_computation_and_validation_uses_it(tmp_path, accumulate):
    torch.manual_seed(0)
    module = _Tiny()
    start = {k: v.clone() for k, v in module.student.state_dict().items()}
    ema = EMA(decay=0.5)
    _trainer(tmp_path, [ema], accumulate_grad_batches=accumulate).fit(module, _loader(), _loader())
    assert len(module.after_step) == ema.num_updates == 4 // accumulate
    expected = _hand_ema(start, module.after_step, 0.5)
    got = ema.ema_state_dict()
    assert set(got) == set(expected)  # running stats averaged too; num_batches_tracked is not
    assert "1.running_mean" in got and "1.num_batches_tracked" not in got
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(module.seen_in_val[-1], expected["0.weight"])  # validation saw the EMA weights
    torch.testing.assert_close(module.student[0].weight.detach(), module.after_step[-1]["0.weight"])  # swapped back


def test_ema_is_checkpointed_and_restored_on_resume(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    torch.manual_seed(0)
    module = _Tiny()
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    ema = EMA(decay=0.5)
    _trainer(tmp_path, [ema, ckpt_cb], enable_checkpointing=True).fit(module, _loader(), _loader())
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    state = ema_state_from_checkpoint(saved)
    assert state is not None and state.keys() == ema.ema_state_dict().keys()
    for k, v in ema.ema_state_dict().items():
        torch.testing.assert_close(state[k], v)
    # the checkpoint's model weights are the trained ones, not the EMA swapped in for validation
    torch.testing.assert_close(saved["state_dict"]["student.0.weight"], module.after_step[-1]["0.weight"])

    resumed, ema2 = _Tiny(), EMA(decay=0.5)
    trainer = _trainer(tmp_path, [ema2], max_epochs=2)
    trainer.fit(resumed, _loader(), _loader(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert trainer.global_step == 8 and ema2.num_updates == 8 and len(resumed.after_step) == 4
    expected = _hand_ema(state, resumed.after_step, 0.5)  # continues from the restored EMA
    for k, v in ema2.ema_state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=1e-6, atol=1e-7)


def test_ema_of_bf16_weights_is_kept_in_fp32(tmp_path):
    torch.manual_seed(0)
    module = _Tiny()
    start = {k: v.to(torch.bfloat16).float() for k, v in module.student.state_dict().items() if v.is_floating_point()}
    ema = EMA(decay=0.5)
    _trainer(tmp_path, [ema], precision="bf16-true").fit(module, _loader(), _loader())
    got = ema.ema_state_dict()
    assert module.student[0].weight.dtype == torch.bfloat16 and got["0.weight"].dtype == torch.float32
    expected = _hand_ema(start, [{k: v.float() for k, v in s.items()} for s in module.after_step], 0.5)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-6, atol=1e-7)
