"""``python -m diffkd.evaluate`` on generated CIFAR-100 and tiny-ImageNet files: checkpoints, exported weights,
registry models; top-1/top-5 and loss against a direct computation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from diffkd.callbacks import EMA
from diffkd.evaluate import build_datamodule, evaluate_model, load_model, main
from diffkd.models import create_model
from tests.helpers.fake_imagenet import write_tiny_imagenet


@pytest.fixture(scope="module")
def imagenet_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval_imagenet") / "imagenet"
    write_tiny_imagenet(root, n_classes=3, per_class=2, val_per_class=3)
    return root


def _diffkd_checkpoint(path: Path, model: torch.nn.Module, name: str, num_classes: int | None, ema=None) -> Path:
    """A checkpoint shaped like the ones diffkd.train writes (state_dict, stored config, callback states)."""
    state = {f"student.{k}": v for k, v in model.state_dict().items()}
    state["distiller.heads.feature.proj.0.weight"] = torch.zeros(1)  # not part of the student
    spec = {"_target_": "diffkd.models.create_model", "name": name, "num_classes": num_classes}
    checkpoint = {"state_dict": state, "diffkd": {"config": {"model": {"student": spec}}}, "epoch": 3}
    if ema is not None:
        checkpoint["callbacks"] = {EMA().state_key: {"decay": 0.9999, "num_updates": 7, "state": ema}}
    torch.save(checkpoint, path)
    return path


def _reference(model: torch.nn.Module, loader) -> dict[str, float]:
    logits, targets = [], []
    with torch.no_grad():
        for x, y in loader:
            logits.append(model.eval()(x))
            targets.append(y)
    out, y = torch.cat(logits), torch.cat(targets)
    top5 = out.topk(min(5, out.shape[1]), dim=1).indices
    return {
        "images": len(y),
        "top1": 100.0 * (out.argmax(1) == y).float().mean().item(),
        "top5": 100.0 * (top5 == y[:, None]).any(1).float().mean().item(),
        "loss": F.cross_entropy(out, y).item(),
    }


def test_checkpoint_student_on_cifar_matches_a_direct_computation(cifar_root, tmp_path, capsys):
    torch.manual_seed(0)
    student = create_model("resnet8", num_classes=100)
    ckpt = _diffkd_checkpoint(tmp_path / "last.ckpt", student, "resnet8", 100)
    out = tmp_path / "res" / "r8.json"
    argv = [str(ckpt), "--data", "cifar100", "--data-dir", str(cifar_root), "--set", "download=false"]
    result = main([*argv, "--batch-size", "8", "--num-workers", "0", "--device", "cpu", "--json", str(out)])
    dm = build_datamodule("cifar100", str(cifar_root), batch_size=8, num_workers=0, overrides=["download=false"])
    dm.setup("validate")
    expected = _reference(student, dm.val_dataloader())
    assert result.images == expected["images"] == 32  # every test image, the last batch included
    assert result.top1 == pytest.approx(expected["top1"]) and result.top5 == pytest.approx(expected["top5"])
    assert result.loss == pytest.approx(expected["loss"], rel=1e-5)
    assert (result.model, result.weights) == ("resnet8", "student of last.ckpt")
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["model", "weights", "data", "images", "top-1", "top-5", "loss"]
    assert table[1].startswith("resnet8") and "cifar100 (val)" in table[1]
    saved = json.loads(out.read_text())
    assert saved["top1"] == result.top1 and saved["images"] == 32 and saved["source"] == str(ckpt)


def test_ema_weights_of_a_checkpoint(cifar_root, tmp_path):
    torch.manual_seed(0)
    student, averaged = create_model("resnet8", num_classes=100), create_model("resnet8", num_classes=100)
    ema = {k: v for k, v in averaged.state_dict().items() if v.is_floating_point()}
    ckpt = _diffkd_checkpoint(tmp_path / "b2.ckpt", student, "resnet8", 100, ema=ema)
    net, _, weights = load_model(ckpt, ema=True)
    assert weights == "EMA of the student of b2.ckpt"
    for k, v in averaged.state_dict().items():
        torch.testing.assert_close(net.state_dict()[k], v)
    plain, _, _ = load_model(ckpt)
    torch.testing.assert_close(plain.state_dict()["fc.weight"], student.state_dict()["fc.weight"])
    with pytest.raises(KeyError, match="no EMA weights"):
        load_model(_diffkd_checkpoint(tmp_path / "none.ckpt", student, "resnet8", 100), ema=True)


def test_checkpoint_whose_classifier_width_came_from_the_data(tmp_path):
    """``model.student.num_classes: null`` (the data's width) is stored as null: read it from the classifier."""
    torch.manual_seed(0)
    student = create_model("mobilenetv2_100", num_classes=3)  # timm: `classifier`, not `fc`
    net, name, _ = load_model(_diffkd_checkpoint(tmp_path / "mbv2.ckpt", student, "mobilenetv2_100", None))
    assert name == "mobilenetv2_100" and net.classifier.out_features == 3
    torch.testing.assert_close(net.classifier.weight, student.classifier.weight)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_exported_weights_on_tiny_imagenet_folder(imagenet_dir, tmp_path, suffix):
    torch.manual_seed(0)
    model = create_model("tv_resnet18", num_classes=3)
    path = tmp_path / f"r18{suffix}"
    if suffix == ".pth":
        torch.save({"model": model.state_dict()}, path)  # what diffkd.export writes
    else:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    argv = [str(path), "--model", "tv_resnet18", "--data", "imagenet", "--data-dir", str(imagenet_dir)]
    result = main([*argv, "--image-size", "64", "--batch-size", "4", "--num-workers", "0", "--device", "cpu"])
    dm = build_datamodule("imagenet", str(imagenet_dir), batch_size=4, num_workers=0, image_size=64)
    dm.setup("validate")
    expected = _reference(model, dm.val_dataloader())
    assert result.images == 9 and result.top5 == 100.0  # 3 classes: top-5 is top-3
    assert result.top1 == pytest.approx(expected["top1"]) and result.loss == pytest.approx(expected["loss"], rel=1e-5)


def test_registry_model_pretrained_and_a_folder_as_data(imagenet_dir, monkeypatch):
    import diffkd.models

    calls = []
    real = diffkd.models.create_model

    def fake_create(name, num_classes=None, pretrained=False, **kwargs):  # no network in tests
        calls.append((name, num_classes, pretrained))
        return real(name, num_classes=3, **kwargs)

    monkeypatch.setattr(diffkd.models, "create_model", fake_create)
    argv = ["--model", "tv_resnet18", "--pretrained", "--data", str(imagenet_dir), "--image-size", "64"]
    result = main([*argv, "--num-workers", "0", "--limit-batches", "1", "--batch-size", "2", "--device", "cpu"])
    assert calls == [("tv_resnet18", None, True)]  # the weights' own 1000 classes, not the data's
    assert (result.images, result.weights, result.data) == (2, "pretrained", "imagenet (val)")


def test_helpful_errors(imagenet_dir, tmp_path):
    with pytest.raises(ValueError, match="neither a data config"):
        build_datamodule("no_such_data")
    with pytest.raises(ValueError, match="--model"):
        load_model(None)
    weights = tmp_path / "w.pth"
    torch.save({"model": create_model("resnet8", num_classes=3).state_dict()}, weights)
    with pytest.raises(ValueError, match="need --model"):
        load_model(weights)
    with pytest.raises(RuntimeError, match="shape mismatches"):
        load_model(weights, model="resnet8", num_classes=100)
    loader = [(torch.randn(2, 3, 8, 8), torch.tensor([0, 1]))]
    with pytest.raises(ValueError, match="no batches"):
        evaluate_model(torch.nn.Flatten(), loader, limit_batches=0)
