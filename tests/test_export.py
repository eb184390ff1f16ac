"""Student export: RepDistiller {"model": ...} and safetensors, logits equal to the trained module's; the meta holds
what evaluation needs, so that ``python -m diffkd.evaluate <export>`` gives the metric of the training checkpoint in
every task (classification: tests/test_evaluate.py)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from diffkd.data.cifar import CIFAR100DataModule
from diffkd.evaluate import main as evaluate
from diffkd.export import export_student, load_student, main, read_export_meta, student_state_dict
from diffkd.models import create_model, load_weights
from diffkd.train import train
from tests.conftest import compose_config, tiny_overrides
from tests.helpers.fake_coco import write_fake_coco
from tests.helpers.fake_segmentation import write_grey_scenes

CPU = ["--device", "cpu"]


def test_export_round_trip(cifar_cfg, tmp_path, capsys):
    _, objs = train(cifar_cfg("cifar_wrn40_wrn16", "distill=diffkd"))
    ckpt = objs["last_ckpt"]
    main([ckpt, str(tmp_path / "export" / "wrn_16_2")])
    assert "wrote" in capsys.readouterr().out
    pth, st = tmp_path / "export" / "wrn_16_2.pth", tmp_path / "export" / "wrn_16_2.safetensors"
    blob = torch.load(pth, map_location="cpu", weights_only=True)
    assert set(blob) >= {"model"} and not any(k.startswith(("teacher", "distiller")) for k in blob["model"])
    module = objs["module"].cpu().eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = module.student(x)
        for source in (pth, st):
            model = create_model("wrn_16_2").eval()
            load_weights(model, source)
            torch.testing.assert_close(model(x), expected)
        torch.testing.assert_close(load_student(ckpt)(x), expected)
    assert export_student(ckpt, tmp_path / "only", ("safetensors",)) == [tmp_path / "only.safetensors"]
    meta = read_export_meta(st)
    assert meta["input"]["image_size"] == 32 and meta["labels"]["num_classes"] == 100  # CIFAR's fixed size


def _fake_checkpoint(path: Path, num_classes: int = 7) -> Path:
    """A diffkd checkpoint as training writes it (student weights, stored config), without training."""
    state = create_model("resnet8", num_classes=num_classes).state_dict()
    config = {
        "model": {
            "_target_": "diffkd.tasks.ClassificationModule",
            "student": {"_target_": "diffkd.models.create_model", "name": "resnet8", "num_classes": None},
            "teacher": {"_target_": "diffkd.models.create_teacher", "name": "resnet32x4", "weights": "/t.pth"},
            "label_smoothing": 0.1,
        },
        "data": {"_target_": "diffkd.data.cifar.CIFAR100DataModule", "data_dir": "/nowhere", "batch_size": 64},
    }
    checkpoint = {
        "epoch": 3,
        "global_step": 40,
        "state_dict": {f"student.{k}": v for k, v in state.items()},
        "diffkd": {"config": config},
    }
    torch.save(checkpoint, path)
    return path


def test_out_folder_modes_and_meta_without_data(tmp_path, capsys):
    ckpt = _fake_checkpoint(tmp_path / "last.ckpt")
    folder = tmp_path / "exports"
    for out in (f"{folder}/", str(folder)):  # ends with / (created), then an existing folder
        paths = main([str(ckpt), out])
        assert paths == [folder / "resnet8.pth", folder / "resnet8.safetensors"]
        printed = capsys.readouterr().out
        assert all(f"wrote {p}" in printed for p in paths)
    assert not (tmp_path / "exports.pth").exists() and sorted(os.listdir(folder)) == ["resnet8.pth",
                                                                                     "resnet8.safetensors"]  # fmt: skip
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
    assert set(modes.values()) == {0o666 & ~umask}, modes  # safetensors' own writer makes 0o600
    meta = read_export_meta(folder / "resnet8.safetensors")
    assert meta == torch.load(folder / "resnet8.pth", weights_only=True)["meta"]
    assert (meta["epoch"], meta["global_step"], meta["task_name"], meta["data_config"]) == (3, 40, "classification",
                                                                                             "cifar100")  # fmt: skip
    assert meta["student"]["num_classes"] == 7  # read from the weights: the config left it to the data
    assert meta["model"] == {"_target_": "diffkd.tasks.ClassificationModule", "student": meta["student"],
                             "label_smoothing": 0.1}  # fmt: skip
    cifar = CIFAR100DataModule  # a class of fixed size and statistics: read without the data
    assert meta["input"] == {"in_chans": 3, "image_size": 32, "mean": list(cifar.mean), "std": list(cifar.std)}


def test_export_refuses_what_is_no_diffkd_checkpoint(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("true",))

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "x": Payload()}, evil)
    with pytest.raises(SystemExit, match=r"evil.ckpt' was refused: it holds Python objects outside what a weights-only "
                       r"load allows \(GLOBAL (posix|nt).system\).*If you trust the file, re-save") as err:  # fmt: skip
        main([str(evil), str(tmp_path / "out")])
    assert "not a checkpoint" not in str(err.value)
    plain = tmp_path / "plain.ckpt"
    plain.write_bytes(pickle.dumps({"x": Payload()}, protocol=4))  # pickle.dump's format: torch.load stops earlier
    with pytest.raises(SystemExit, match=r"plain.ckpt' was refused: .*\(GLOBAL (posix|nt).system\)"):
        main([str(plain), str(tmp_path / "out")])
    torch.save({"model": {}}, tmp_path / "weights.pth")
    with pytest.raises(SystemExit, match="not a Lightning checkpoint: it has no 'state_dict' entry"):
        main([str(tmp_path / "weights.pth"), str(tmp_path / "out")])
    assert not list(tmp_path.glob("out*"))


def _same(a: dict[str, float], b: dict[str, float]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == pytest.approx(b[key], abs=1e-6), key


def test_detection_export_evaluates_as_its_checkpoint(tmp_path, capsys):
    """A demo FCOS trained at 96 px: the export's meta gives the size, frozen_bn=false and the labels."""
    coco = write_fake_coco(tmp_path / "coco")
    overrides = [
        "experiment=demo_detection", "pipeline=train", *tiny_overrides(tmp_path, tmp_path), f"data.root={coco.root}",
        "data.batch_size=2", "data.val_batch_size=2", "data.val_split=train2017", "data.contiguous_labels=true",
        "data.hflip_prob=0", "distill=none", "model.teacher.weights=null", "model.student.min_size=96",
        "model.student.max_size=96", "trainer.max_epochs=10", "trainer.limit_train_batches=null",
        "trainer.limit_val_batches=null", "optim.optimizer.lr=0.01", "test=false",
    ]  # fmt: skip
    _, objs = train(compose_config(overrides))
    from_ckpt = evaluate([objs["last_ckpt"], *CPU]).metrics
    assert from_ckpt["val/map"] > 0.05  # trained enough for a wrong size to show

    paths = main([objs["last_ckpt"], f"{tmp_path / 'exports'}/"])
    assert paths == [tmp_path / "exports" / f"demo_fcos_student.{s}" for s in ("pth", "safetensors")]
    meta = read_export_meta(paths[1])
    assert meta == torch.load(paths[0], weights_only=True)["meta"]
    assert (meta["task"], meta["task_name"], meta["data_config"]) == ("diffkd.tasks.DetectionModule", "detection",
                                                                       "coco")  # fmt: skip
    assert meta["student"] == {
        "_target_": "diffkd.models.create_model", "name": "demo_fcos_student", "num_classes": 6,
        "weights_backbone": None, "min_size": 96, "max_size": 96, "trainable_layers": 5, "frozen_bn": False,
    }  # fmt: skip
    assert meta["input"] == {"min_size": 96, "max_size": 96, "mean": [0.485, 0.456, 0.406],
                             "std": [0.229, 0.224, 0.225]}  # fmt: skip
    assert meta["labels"] == {"num_classes": 6, "background": 0, "contiguous_labels": True,
                              "labels": "1..K-1: the annotation file's categories in id order (background 0)"}  # fmt: skip
    assert (meta["data"]["val_split"], meta["data"]["root"]) == ("train2017", str(coco.root))
    for path in paths:  # the command line: the flags agree with the meta
        result = evaluate([str(path), "--model", "demo_fcos_student", "--data", "coco", "--root", str(coco.root), *CPU])
        _same(result.metrics, from_ckpt)
        assert (result.model_args["min_size"], result.model_args["frozen_bn"]) == (96, False)
        assert result.task == "diffkd.tasks.detection.DetectionModule" and result.config.startswith("the export's")
    summary = "demo_fcos_student(num_classes=6, min_size=96, max_size=96, trainable_layers=5, frozen_bn=False)"
    assert summary in capsys.readouterr().out

    # without the meta (an older export) the detection task still comes from the data; frozen BN is named as the fix
    legacy = tmp_path / "legacy.pth"
    torch.save({"model": student_state_dict(torch.load(objs["last_ckpt"], weights_only=True))}, legacy)
    base = [str(legacy), "--model", "demo_fcos_student", "--data", "coco", "--root", str(coco.root), "--set",
            "val_split=train2017", "--set", "contiguous_labels=true", "--num-workers", "0", *CPU]  # fmt: skip
    with pytest.raises(SystemExit, match=r"(?s)num_batches_tracked.*--set model\.student\.frozen_bn=false") as err:
        evaluate(base)
    assert err.value.code not in (0, None)
    sized = ["--set", "model.student.frozen_bn=false", "--set", "model.student.min_size=96"]
    result = evaluate([*base, *sized, "--set", "model.student.max_size=96"])
    assert result.task == "diffkd.tasks.detection.DetectionModule"
    _same(result.metrics, from_ckpt)


def test_segmentation_export_evaluates_as_its_checkpoint(tmp_path):
    """A demo segmenter on a grey segmentation_folder (4 classes, 1 channel, its own mean/std)."""
    root = tmp_path / "scenes"
    write_grey_scenes(root, size=24)
    overrides = [
        "experiment=demo_segmentation", "pipeline=train", *tiny_overrides(tmp_path, tmp_path), f"data.root={root}",
        "data.batch_size=4", "data.val_batch_size=2", "data.num_classes=4", "data.class_names=null",
        "model.num_classes=4", "distill=none", "trainer.limit_val_batches=null", "test=false",
    ]  # fmt: skip
    _, objs = train(compose_config(overrides))
    from_ckpt = evaluate([objs["last_ckpt"], *CPU]).metrics
    paths = export_student(objs["last_ckpt"], tmp_path / "seg")
    meta = read_export_meta(paths[0])
    assert (meta["task_name"], meta["data_config"], meta["student"]["num_classes"]) == ("segmentation",
                                                                                         "segmentation_folder", 4)  # fmt: skip
    assert meta["input"] == {"in_chans": 1, "mean": [0.12], "std": [0.26]}
    assert meta["labels"] == {"num_classes": 4, "ignore_index": 255,
                              "labels": "class index per pixel, 0..K-1; ignore_index counts nowhere"}  # fmt: skip
    for path in paths:
        result = evaluate([str(path), "--model", "demo_seg_student", "--data", "segmentation_folder", "--root",
                           str(root), *CPU])  # fmt: skip
        _same(result.metrics, from_ckpt)
        assert result.task == "diffkd.tasks.segmentation.SegmentationModule"

    # an older export: segmentation_folder's ??? entries are named, then the task comes from the data's label maps
    legacy = tmp_path / "legacy.pth"
    torch.save({"model": student_state_dict(torch.load(objs["last_ckpt"], weights_only=True))}, legacy)
    base = [str(legacy), "--model", "demo_seg_student", "--data", "segmentation_folder", "--root", str(root),
            "--num-workers", "0", "--batch-size", "2", *CPU]  # fmt: skip
    with pytest.raises(SystemExit, match=r"segmentation_folder needs data.num_classes .*--set num_classes=<value>"):
        evaluate(base)
    stats = ["--set", "num_classes=4", "--set", "in_chans=1", "--set", "mean=[0.12]", "--set", "std=[0.26]"]
    result = evaluate([*base, *stats])
    assert result.task == "diffkd.tasks.segmentation.SegmentationModule"
    _same(result.metrics, from_ckpt)
