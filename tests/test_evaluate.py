"""``python -m diffkd.evaluate``: the task module's own validation on a trained run's checkpoint (config read from the
checkpoint), flag and ``--set`` overrides, EMA weights, exported weights with ``--model``, and the error messages.

One tiny KD run (ResNet-8 → ResNet-8 on a generated 3-class ImageNet at 32 px, EMA kept but not used for
validation) is trained once for the module; every evaluation must reproduce its logged ``val/*`` exactly.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from diffkd.callbacks import EMA
from diffkd.evaluate import main
from diffkd.export import export_student, read_export_meta, student_state_dict
from diffkd.train import train
from tests.conftest import compose_config, tiny_overrides
from tests.helpers.fake_imagenet import write_tiny_imagenet

VAL = ("val/acc", "val/acc_top5", "val/loss")
CPU = ["--device", "cpu"]


@dataclass
class Run:
    ckpt: Path
    metrics: dict[str, float]
    data_dir: Path
    tmp: Path


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Run:
    tmp = tmp_path_factory.mktemp("eval_run")
    data_dir = write_tiny_imagenet(tmp / "data" / "imagenet", n_classes=3, per_class=4, val_per_class=3)
    cfg = compose_config(
        [
            "~experiment",
            *tiny_overrides(tmp, tmp / "data"),
            "data=imagenet",
            "data.image_size=32",
            "data.batch_size=4",
            "distill=kd",
            "model.student.name=resnet8",
            "model.teacher.name=resnet8",
            "trainer.limit_val_batches=null",  # all 9 val images (3 batches), as the evaluation
            "test=false",
            "callbacks=ema",
            "callbacks.ema.decay=0.5",
            "callbacks.ema.evaluate=false",  # val/* of the trained weights; the EMA is only saved
        ]
    )
    metrics, objects = train(cfg)
    return Run(Path(objects["last_ckpt"]), metrics, data_dir, tmp)


def _exported_flags(run: Run) -> list[str]:
    """What a run's checkpoint would tell, as flags for exported weights."""
    data = ["--data", "imagenet", "--data-dir", str(run.data_dir), "--image-size", "32"]
    return [*data, "--batch-size", "4", "--num-workers", "0", *CPU]


def test_checkpoint_reproduces_the_validation_that_training_logged(run, tmp_path, capsys):
    out = tmp_path / "res" / "r8.json"
    result = main([str(run.ckpt), *CPU, "--json", str(out)])  # no data flags: all from the stored config
    assert {k: result.metrics[k] for k in VAL} == {k: run.metrics[k] for k in VAL}
    assert (result.samples, result.batches, result.split) == (9, 3, "val")
    assert (result.model, result.data, result.weights) == ("resnet8", "imagenet", "student.* of last.ckpt")
    assert result.task == "diffkd.tasks.classification.ClassificationModule"
    settings = result.settings
    assert (settings["image_size"], settings["batch_size"], settings["data_dir"]) == (32, 4, str(run.data_dir))
    assert settings["crop_pct"] == 0.875 and settings["mean"] == [0.485, 0.456, 0.406]
    printed = capsys.readouterr().out
    assert str(run.ckpt) in printed and "imagenet, val split" in printed and "image_size=32" in printed
    assert "normalisation mean=[0.485, 0.456, 0.406]" in printed and "overrides   none" in printed
    assert f"val/acc       {run.metrics['val/acc']:>10.4f}" in printed
    saved = json.loads(out.read_text())
    assert saved["metrics"] == result.metrics and saved["source"] == str(run.ckpt) and saved["samples"] == 9


def test_flags_and_set_override_the_stored_config(run, capsys):
    argv = [str(run.ckpt), "--set", "data.crop_pct=0.95", "--set", "interpolation=bicubic", "--image-size", "40"]
    result = main([*argv, "--batch-size", "2", "--limit-batches", "2", "--split", "test", *CPU])
    assert (result.samples, result.batches) == (4, 2)
    assert sorted(result.metrics) == ["test/acc", "test/acc_top5", "test/loss"]
    settings = result.settings  # read back from the datamodule
    assert (settings["crop_pct"], settings["interpolation"], settings["image_size"]) == (0.95, "bicubic", 40)
    assert settings["batch_size"] == 2
    assert result.overrides == [  # each flag wins over the stored config, and says what it replaced
        "data.image_size=40 (--image-size; the checkpoint's was 32)",
        "data.val_batch_size=2 (--batch-size)",
        "data.crop_pct=0.95 (--set; the checkpoint's was 0.875)",
        "data.interpolation=bicubic (--set; the checkpoint's was bilinear)",  # relative to data, as before
    ]
    printed = capsys.readouterr().out
    assert "image_size=40" in printed and "data.crop_pct=0.95 (--set; the checkpoint's was 0.875)" in printed


def test_ema_weights_of_the_checkpoint(run, tmp_path):
    checkpoint = torch.load(run.ckpt, map_location="cpu", weights_only=True)
    ema_state = checkpoint["callbacks"][EMA().state_key]["state"]
    weights = tmp_path / "ema.pth"  # the EMA as exported weights: the same numbers through the --model path
    torch.save({"model": {**student_state_dict(checkpoint), **ema_state}}, weights)
    ema = main([str(run.ckpt), "--ema", *CPU])
    assert ema.weights == "EMA of the student of last.ckpt"
    assert ema.metrics == main([str(weights), "--model", "resnet8", *_exported_flags(run)]).metrics
    assert ema.metrics["val/loss"] != run.metrics["val/loss"]  # decay 0.5 over 2 steps: not the trained weights


def test_an_export_evaluates_as_its_checkpoint_from_its_meta(run, tmp_path, capsys):
    from_ckpt = main([str(run.ckpt), *CPU])
    for path in export_student(run.ckpt, tmp_path / "r8"):  # .pth and .safetensors; no --model, no data flags
        result = main([str(path), *CPU])
        assert result.metrics == from_ckpt.metrics
        assert (result.model, result.data, result.settings["image_size"]) == ("resnet8", "imagenet", 32)
        assert result.settings["data_dir"] == str(run.data_dir) and result.model_args == {"num_classes": 3}
        assert result.task == "diffkd.tasks.classification.ClassificationModule" and result.overrides == []
        assert result.config == "the export's meta (diffkd_export 2)"
        assert f"exported from {run.ckpt}, epoch 0, step 2" in capsys.readouterr().out
    meta = read_export_meta(tmp_path / "r8.safetensors")
    assert meta == torch.load(tmp_path / "r8.pth", weights_only=True)["meta"]
    assert (meta["task"], meta["task_name"], meta["data_config"]) == ("diffkd.tasks.ClassificationModule",
                                                                       "classification", "imagenet")  # fmt: skip
    assert meta["student"] == {"_target_": "diffkd.models.create_model", "name": "resnet8", "num_classes": 3}
    assert meta["input"] == {"in_chans": 3, "image_size": 32, "crop_pct": 0.875, "interpolation": "bilinear",
                             "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}  # fmt: skip
    assert meta["labels"] == {"num_classes": 3, "labels": "class index 0..K-1"}
    assert meta["model"]["label_smoothing"] == 0.0 and "teacher" not in meta["model"]

    # flags that agree with the meta change nothing; one that does not wins, and the summary says what it replaced
    same = main([str(tmp_path / "r8.pth"), "--model", "resnet8", *_exported_flags(run)])
    assert same.metrics == from_ckpt.metrics and "data.image_size=32 (--image-size)" in same.overrides
    capsys.readouterr()
    larger = main([str(tmp_path / "r8.pth"), "--image-size", "40", *CPU])
    assert larger.overrides == ["data.image_size=40 (--image-size; the export's was 32)"]
    assert "data.image_size=40 (--image-size; the export's was 32)" in capsys.readouterr().out
    assert larger.metrics["val/loss"] != from_ckpt.metrics["val/loss"]

    # another data config: the run's image size and normalisation go with it where its data module takes them
    folder = main([str(tmp_path / "r8.pth"), "--data", str(run.data_dir), "--num-workers", "0", *CPU])
    assert folder.data == "image_folder" and folder.settings["image_size"] == 32
    assert folder.overrides[:2] == ["data=image_folder (--data; the export's was imagenet)",
                                    "data.image_size=32 (the export's, kept with --data image_folder)"]  # fmt: skip

    # an export without the meta (written before it existed) evaluates as before: conf/ with --model and --data
    legacy = tmp_path / "legacy.pth"
    torch.save({"model": student_state_dict(torch.load(run.ckpt, weights_only=True))}, legacy)
    old = main([str(legacy), "--model", "resnet8", *_exported_flags(run)])
    assert old.metrics == from_ckpt.metrics and old.config.startswith("composed from")


def test_a_checkpoint_without_config(run, tmp_path, capsys):
    old = torch.load(run.ckpt, map_location="cpu", weights_only=True)
    del old["diffkd"]
    torch.save(old, tmp_path / "old.ckpt")
    with pytest.raises(SystemExit, match=r"\(an older or foreign checkpoint\): give --model"):
        main([str(tmp_path / "old.ckpt"), *CPU])
    capsys.readouterr()
    result = main([str(tmp_path / "old.ckpt"), "--model", "resnet8", *_exported_flags(run)])
    assert result.metrics == main([str(run.ckpt), *CPU]).metrics
    assert "old.ckpt carries no diffkd run config (an older or foreign checkpoint)" in capsys.readouterr().out


def test_registry_model_pretrained_and_a_folder_as_data(run, monkeypatch):
    import diffkd.models

    calls = []
    real = diffkd.models.create_model

    def fake_create(name, num_classes=None, pretrained=False, **kwargs):  # no network in tests
        calls.append((name, num_classes, pretrained))
        return real(name, num_classes=3, **kwargs)

    monkeypatch.setattr(diffkd.models, "create_model", fake_create)
    argv = ["--model", "resnet8", "--pretrained", "--data", str(run.data_dir), "--image-size", "32"]
    result = main([*argv, "--num-workers", "0", "--limit-batches", "1", "--batch-size", "2", *CPU])
    assert calls == [("resnet8", None, True)]  # the weights' own classifier width, not the data's
    assert (result.samples, result.weights, result.data) == (2, "pretrained", "image_folder")
    assert result.settings["root"] == str(run.data_dir)


def test_clear_errors(run, tmp_path):
    def fails(argv: list[str], message: str) -> None:
        with pytest.raises(SystemExit, match=message) as info:
            main(argv)
        assert info.value.code not in (0, None)

    fails([str(tmp_path / "nope.ckpt")], "^no such file: .*nope.ckpt$")
    noise = tmp_path / "noise.ckpt"
    noise.write_bytes(torch.randint(0, 256, (512,), dtype=torch.uint8).numpy().tobytes())
    fails([str(noise)], "noise.ckpt is not a PyTorch checkpoint$")
    (tmp_path / "noise.pth").write_bytes(noise.read_bytes())
    fails([str(tmp_path / "noise.pth"), "--model", "resnet8"], "noise.pth is not a PyTorch checkpoint$")
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "callback": argparse.Namespace(x=1)}, evil)  # a class: weights-only refuses it
    fails([str(evil)], r"evil.ckpt' was refused: .*\(GLOBAL argparse.Namespace\).*If you trust the file")
    (tmp_path / "noise.safetensors").write_bytes(noise.read_bytes())
    fails([str(tmp_path / "noise.safetensors"), "--model", "resnet8"], "is not a safetensors file")
    checkpoint = torch.load(run.ckpt, map_location="cpu", weights_only=True)
    del checkpoint["callbacks"][EMA().state_key]
    torch.save(checkpoint, tmp_path / "no_ema.ckpt")
    fails([str(tmp_path / "no_ema.ckpt"), "--ema"], "holds no EMA weights")
    fails([str(run.ckpt), "--set", "data.no_such_key=1"], "the config has no data.no_such_key; add it with")
    fails([str(run.ckpt), "--set", "data=cifar100"], "data is a config node, not a value: use --data <name>")
    torch.save({"model": student_state_dict(checkpoint)}, tmp_path / "r8.pth")
    fails([str(tmp_path / "r8.pth")], "r8.pth: exported weights without diffkd's meta .* need --model")
    fails([str(run.ckpt), "--data", "no_such_data"], "neither a data config")
    fails(["--model", "resnet8", "--data", "cifar100", "--image-size", "64"], "cifar100 .* has no image_size")
    fails([str(run.ckpt), "--device", "tpu"], "--device 'tpu'")
    fails([str(run.ckpt), "--data-dir", str(tmp_path / "nowhere")], "(?s)ImageNet .* not found.*--data-dir / --root")


def test_exported_segmentation_weights_evaluate_with_the_segmentation_task(tmp_path):
    """A bare state dict (CIRKD's checkpoint format) for a registry segmenter: validated by SegmentationModule."""
    import torch

    from diffkd.models import create_model
    from tests.helpers.fake_cityscapes import write_fake_cityscapes

    root = tmp_path / "cityscapes"
    write_fake_cityscapes(root)
    torch.save(create_model("cirkd_deeplabv3_mobilenetv2").state_dict(), tmp_path / "w.pth")
    result = main([str(tmp_path / "w.pth"), "--model", "cirkd_deeplabv3_mobilenetv2", "--data", "cityscapes",
                   "--root", str(root), "--device", "cpu", "--limit-batches", "1", "--num-workers", "0"])  # fmt: skip
    assert 0.0 <= result.metrics["val/miou"] <= 1.0 and "val/iou/18" in result.metrics
