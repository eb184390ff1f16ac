"""The CIFAR zoo and the demo CNNs match the reference definitions; checkpoints load in every supported format."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from diffkd.models import create_model, list_models
from diffkd.models.checkpoint import load_weights

# name: (parameters at the default num_classes, last-feature module, its (C, H, W), sample state-dict keys).
# Counts for the models in peers.md §1.2 are that table's measured values (RepDistiller/mdistiller); the
# others (resnet8/14/44, wrn_16_1, ResNet18) follow from the same definitions.
SPEC: dict[str, tuple[int, str, tuple[int, int, int], tuple[str, ...]]] = {
    "wrn_40_2": (
        2_255_156,
        "relu",
        (128, 8, 8),
        ("conv1.weight", "block1.layer.0.bn1.weight", "bn1.weight", "fc.weight"),
    ),
    "wrn_40_1": (569_780, "relu", (64, 8, 8), ("block3.layer.5.conv2.weight", "bn1.running_var", "fc.bias")),
    "wrn_16_2": (703_284, "relu", (128, 8, 8), ("block1.layer.0.convShortcut.weight", "block3.layer.1.bn2.weight")),
    "wrn_16_1": (180_916, "relu", (64, 8, 8), ("block2.layer.0.convShortcut.weight", "fc.weight")),
    "resnet8": (83_892, "layer3", (64, 8, 8), ("conv1.weight", "bn1.weight", "layer3.0.downsample.0.weight")),
    "resnet14": (181_108, "layer3", (64, 8, 8), ("layer1.1.conv2.weight", "fc.weight")),
    "resnet20": (278_324, "layer3", (64, 8, 8), ("layer2.0.downsample.1.running_mean", "layer3.2.bn2.weight")),
    "resnet32": (472_756, "layer3", (64, 8, 8), ("layer3.4.conv1.weight", "fc.weight")),
    "resnet44": (667_188, "layer3", (64, 8, 8), ("layer3.6.conv1.weight", "fc.weight")),
    "resnet56": (861_620, "layer3", (64, 8, 8), ("layer1.8.bn2.num_batches_tracked", "fc.weight")),
    "resnet110": (1_736_564, "layer3", (64, 8, 8), ("layer3.17.conv2.weight", "fc.weight")),
    "resnet8x4": (1_233_540, "layer3", (256, 8, 8), ("layer1.0.downsample.0.weight", "fc.weight")),
    "resnet32x4": (7_433_860, "layer3", (256, 8, 8), ("layer3.4.bn2.weight", "fc.weight")),
    "vgg8": (
        3_965_028,
        "relu4",
        (512, 4, 4),
        ("block0.0.weight", "block0.1.weight", "block4.0.bias", "classifier.weight"),
    ),
    "vgg13": (9_462_180, "relu4", (512, 4, 4), ("block0.3.weight", "block4.4.running_var", "classifier.weight")),
    "MobileNetV2": (
        812_836,
        "conv2",
        (1280, 2, 2),
        ("conv1.0.weight", "blocks.6.0.conv.7.weight", "conv2.1.weight", "classifier.0.weight"),
    ),
    "ShuffleV1": (
        949_258,
        "layer3",
        (960, 4, 4),
        ("conv1.weight", "layer1.0.conv1.weight", "layer3.3.bn3.weight", "linear.weight"),
    ),
    "ShuffleV2": (
        1_355_528,
        "relu",
        (1024, 4, 4),
        ("layer1.0.conv5.weight", "layer2.7.conv3.weight", "bn2.weight", "linear.weight"),
    ),
    "ResNet18": (
        11_220_132,
        "layer4",
        (512, 4, 4),
        ("layer2.0.shortcut.0.weight", "layer4.1.bn2.weight", "linear.weight"),
    ),
    "ResNet50": (
        23_705_252,
        "layer4",
        (2048, 4, 4),
        ("layer1.0.shortcut.0.weight", "layer4.2.conv3.weight", "linear.weight"),
    ),
    "smallcnn_teacher": (
        167_402,
        "features",
        (64, 7, 7),
        ("features.conv1.conv.weight", "features.conv4.bn.weight", "fc.weight"),
    ),
    "smallcnn_student": (
        19_258,
        "features",
        (48, 7, 7),
        ("features.conv1.conv.weight", "features.conv3.bn.weight", "fc.weight"),
    ),
    "demo_cnn_teacher": (
        130_154,
        "features",
        (32, 4, 4),
        ("features.conv1.conv.weight", "features.conv4.bn.weight", "fc.weight"),
    ),
    "demo_cnn_student": (
        29_434,
        "features",
        (24, 4, 4),
        ("features.conv1.conv.weight", "features.conv4.bn.weight", "fc.weight"),
    ),
}

SMALL = ("smallcnn_teacher", "smallcnn_student", "demo_cnn_teacher", "demo_cnn_student")
CIFAR_TEACHERS = {"resnet56", "resnet110", "resnet32x4", "ResNet50", "wrn_40_2", "vgg13"}


def test_registry_lists_the_whole_zoo() -> None:
    assert set(list_models(tag="cifar")) == set(SPEC) - set(SMALL)
    assert set(list_models(tag="small")) == set(SMALL)
    assert set(list_models(tag="cifar_teacher")) == CIFAR_TEACHERS


@pytest.mark.parametrize("name", [*list_models(tag="cifar"), *SMALL])
def test_model(name: str) -> None:
    n_params, feat_path, feat_shape, keys = SPEC[name]
    torch.manual_seed(0)
    model = create_model(name)
    n_classes = 10 if name in SMALL else 100
    x = torch.randn(2, 1, 28, 28) if name in SMALL else torch.randn(2, 3, 32, 32)

    assert sum(p.numel() for p in model.parameters()) == n_params
    sd = model.state_dict()
    assert all(k in sd for k in keys), [k for k in keys if k not in sd]
    assert model.last_feature_module == feat_path

    feats: list[torch.Tensor] = []
    handle = model.get_submodule(feat_path).register_forward_hook(lambda m, i, o: feats.append(o))
    logits = model(x)
    handle.remove()
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, n_classes)
    assert len(feats) == 1 and feats[0].shape == (2, *feat_shape)
    assert feats[0].min() >= 0  # post-activation

    logits.logsumexp(1).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("name", ["resnet20", "wrn_16_1", "smallcnn_student"])
def test_in_chans_and_num_classes(name: str) -> None:
    model = create_model(name, num_classes=7, in_chans=1 if name not in SMALL else 3)
    size = 28 if name in SMALL else 32
    with torch.no_grad():
        out = model(torch.randn(1, 1 if name not in SMALL else 3, size, size))
    assert out.shape == (1, 7)


def test_pretrained_true_points_to_checkpoint_files() -> None:
    with pytest.raises(ValueError, match=r"cifar_teachers\.tar") as err:
        create_model("resnet56", pretrained=True)
    assert "resnet56_vanilla/ckpt_epoch_240.pth" in str(err.value)


def _fresh(name: str, seed: int, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return create_model(name, **kwargs).eval()


def _same_outputs(a: nn.Module, b: nn.Module, x: torch.Tensor) -> bool:
    with torch.no_grad():
        return torch.equal(a(x), b(x))


def test_repdistiller_checkpoint_loads_strict(tmp_path: Path) -> None:
    src = _fresh("wrn_40_2", 0)
    with torch.no_grad():  # non-trivial BN statistics, so that buffers are checked too
        for m in src.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "wrn_40_2_vanilla" / "ckpt_epoch_240.pth"
    path.parent.mkdir()
    torch.save({"model": src.state_dict(), "epoch": 240, "accuracy": torch.tensor(75.61)}, path)

    dst = _fresh("wrn_40_2", 1)
    x = torch.randn(2, 3, 32, 32)
    assert not _same_outputs(src, dst, x)
    load_weights(dst, path)
    assert _same_outputs(src, dst, x)
    load_weights(dst, str(path), strict=True)  # str paths too


def test_architecture_mismatch_lists_keys(tmp_path: Path) -> None:
    path = tmp_path / "resnet56.pth"
    torch.save({"model": _fresh("resnet56", 0).state_dict(), "epoch": 240}, path)
    target = _fresh("resnet20", 0)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(RuntimeError) as err:
        load_weights(target, path)
    msg = str(err.value)
    assert str(path) in msg and "unexpected keys (" in msg and "layer1.3.conv1.weight" in msg
    assert "more)" in msg  # long lists are cut
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())  # untouched

    with pytest.raises(RuntimeError, match=r"missing keys \(\d+\): layer1\.3\.conv1\.weight"):
        load_weights(_fresh("resnet56", 0), _fresh("resnet20", 0).state_dict())

    with pytest.raises(RuntimeError, match=r"shape mismatches \(2\): fc\.weight: checkpoint \(100, 64\)"):
        load_weights(_fresh("resnet20", 0, num_classes=10), _fresh("resnet20", 0).state_dict(), strict=False)


def test_missing_file_explains_where_teachers_come_from(tmp_path: Path) -> None:
    path = tmp_path / "cifar_teachers" / "resnet56_vanilla" / "ckpt_epoch_240.pth"
    with pytest.raises(FileNotFoundError) as err:
        load_weights(_fresh("resnet8", 0), path)
    msg = str(err.value)
    for part in (
        str(path),
        "megvii-research/mdistiller",
        "checkpoints",
        "cifar_teachers.tar",
        "_vanilla/ckpt_epoch_240.pth",
    ):
        assert part in msg


def test_lightning_checkpoint_prefixes(tmp_path: Path) -> None:
    student, teacher = _fresh("smallcnn_student", 0), _fresh("smallcnn_teacher", 0)
    sd = {f"student.{k}": v for k, v in student.state_dict().items()}
    sd |= {f"teacher.{k}": v for k, v in teacher.state_dict().items()}
    sd["distiller.proj.weight"] = torch.zeros(3)
    path = tmp_path / "epoch=3-step=100.ckpt"
    torch.save({"state_dict": sd, "epoch": 3, "global_step": 100, "optimizer_states": [{}]}, path)
    x = torch.randn(2, 1, 28, 28)

    s2, t2 = _fresh("smallcnn_student", 1), _fresh("smallcnn_teacher", 1)
    load_weights(s2, path, key="student")
    load_weights(t2, path, key="teacher")
    assert _same_outputs(student, s2, x) and _same_outputs(teacher, t2, x)

    with pytest.raises(RuntimeError, match="key='student' or key='teacher'"):
        load_weights(_fresh("smallcnn_student", 1), path)
    with pytest.raises(RuntimeError, match="no weights under key/prefix 'pupil'"):
        load_weights(_fresh("smallcnn_student", 1), path, key="pupil")

    # a checkpoint whose every key is under `student.` unwraps without `key`
    only_student = {"state_dict": {f"student.{k}": v for k, v in student.state_dict().items()}}
    s3 = _fresh("smallcnn_student", 2)
    load_weights(s3, only_student)
    assert _same_outputs(student, s3, x)


def test_dataparallel_prefix_and_old_checkpoints() -> None:
    src = _fresh("resnet8", 0)
    dp = {f"module.{k}": v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    dst = _fresh("resnet8", 1)
    load_weights(dst, {"model": dp, "best_acc": 70.0})  # no num_batches_tracked: PyTorch < 0.4.1 files
    assert _same_outputs(src, dst, torch.randn(2, 3, 32, 32))


def test_safetensors_round_trip(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    src = _fresh("smallcnn_teacher", 0)
    path = tmp_path / "teacher.safetensors"
    save_file(src.state_dict(), str(path))
    dst = _fresh("smallcnn_teacher", 1)
    load_weights(dst, path)
    assert _same_outputs(src, dst, torch.randn(2, 1, 28, 28))


class _NotAllowed:
    pass


def test_untrusted_pickles_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"model": _fresh("smallcnn_student", 0).state_dict(), "extra": _NotAllowed()}, path)
    with pytest.raises(
        RuntimeError, match=r"was refused: it holds Python objects outside what a weights-only load allows"
    ):
        load_weights(_fresh("smallcnn_student", 0), path)
