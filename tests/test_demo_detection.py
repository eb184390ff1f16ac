"""The detection demo: Fashion-MNIST scenes as a COCO folder, read by COCODataModule; teacher once, three students."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from diffkd.data.coco import COCODataModule
from diffkd.demos.detection import build_scene_set, run_demo
from diffkd.demos.scenes import compose_scenes, tight_box
from tests.conftest import compose_config, tiny_overrides

SCENES = {"train": 12, "val": 6, "canvas": 64, "items": [1, 3], "scale": [0.7, 1.5], "threshold": 8,
          "max_iou": 0.0, "seed": 0}  # fmt: skip


def _spec(tmp_path, **changes):
    return {**SCENES, "root": str(tmp_path / "coco"), "debian_dir": None, "download": False, **changes}


def _items(n: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Items with black borders, as Fashion-MNIST's: a random bright block inside each 28×28 image."""
    rng = np.random.default_rng(1)
    images = np.zeros((n, 28, 28), np.uint8)
    for i in range(n):
        y0, x0 = rng.integers(0, 10, size=2)
        images[i, y0 : y0 + rng.integers(8, 18), x0 : x0 + rng.integers(8, 18)] = rng.integers(40, 256)
    return torch.from_numpy(images), torch.arange(n) % 10


def test_scenes_boxes_are_the_tight_boxes_of_the_pasted_pixels():
    images, labels = _items()
    scenes = compose_scenes(images, labels, 25, canvas=64, items=(1, 4), scale=(0.7, 2.0), seed=3)
    again = compose_scenes(images, labels, 25, canvas=64, items=(1, 4), scale=(0.7, 2.0), seed=3)
    assert all(torch.equal(a.image, b.image) and torch.equal(a.boxes, b.boxes) for a, b in zip(scenes, again))
    for scene in scenes:
        assert scene.image.shape == scene.label_mask.shape == (64, 64)
        assert 1 <= len(scene.boxes) <= 4 and scene.masks.shape == (len(scene.boxes), 64, 64)
        assert ((scene.image > 0) == scene.masks.any(0)).all()  # every non-zero pixel belongs to exactly one item
        for box, label, mask in zip(scene.boxes, scene.labels, scene.masks):
            assert tuple(box.int().tolist()) == tight_box(mask)
            x0, y0, x1, y1 = box.int().tolist()
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
            assert tight_box(scene.image[y0:y1, x0:x1] > 0) == (0, 0, x1 - x0, y1 - y0)  # tight in the image too
            assert (scene.label_mask[mask] == label + 1).all()
        assert (scene.label_mask[scene.image == 0] == 0).all()


def test_scene_set_is_a_coco_folder_that_coco_datamodule_reads(tmp_path, fmnist_root):
    root = build_scene_set(_spec(tmp_path), fmnist_root)
    for split, count in (("train2017", SCENES["train"]), ("val2017", SCENES["val"])):
        data = json.loads((root / "annotations" / f"instances_{split}.json").read_text())
        assert [c["id"] for c in data["categories"]] == list(range(1, 11))
        assert len(data["images"]) == count == len(list((root / split).glob("*.png")))
        for ann in data["annotations"]:
            x, y, w, h = ann["bbox"]
            assert 0 <= x < x + w <= 64 and 0 <= y < y + h <= 64
            assert 1 <= ann["category_id"] <= 10 and 0 < ann["area"] <= w * h
        # the box of each annotation is the tight box of the non-zero pixels in the written image (boxes are disjoint)
        from PIL import Image

        first = data["images"][0]
        pixels = np.asarray(Image.open(root / split / first["file_name"]))
        for ann in (a for a in data["annotations"] if a["image_id"] == first["id"]):
            x, y, w, h = (int(v) for v in ann["bbox"])
            crop = pixels[y : y + h, x : x + w] > 0
            assert crop[0].any() and crop[-1].any() and crop[:, 0].any() and crop[:, -1].any()
    mtime = (root / "annotations" / "instances_val2017.json").stat().st_mtime_ns
    assert build_scene_set(_spec(tmp_path), fmnist_root) == root  # same settings: reused, not rewritten
    assert (root / "annotations" / "instances_val2017.json").stat().st_mtime_ns == mtime

    dm = COCODataModule(root=str(root), batch_size=4, val_batch_size=4, num_workers=0, pin_memory=False)
    dm.setup("fit")
    assert dm.num_classes == 11 and dm.class_names[1] == "T-shirt/top"
    images, targets = next(iter(dm.train_dataloader()))
    assert images[0].shape == (3, 64, 64) and targets[0]["boxes"].shape[1] == 4
    assert targets[0]["labels"].min() >= 1 and targets[0]["labels"].max() <= 10


def _overrides(tmp_path, fmnist_root, *extra, out: str = "out"):
    """``out``: the runs' folder (each demo call needs its own, as each ``python -m diffkd.train`` gets its own)."""
    overrides = [o for o in tiny_overrides(tmp_path, fmnist_root) if o not in ("logger=none", "data.batch_size=8")]
    overrides = [
        o if not o.startswith("paths.output_dir=") else f"paths.output_dir={tmp_path / out}" for o in overrides
    ]
    scenes = [f"demo.scenes.{k}={json.dumps(v).replace(' ', '')}" for k, v in SCENES.items()]
    return ["experiment=demo_detection", *overrides, *scenes, "demo.scenes.debian_dir=null",
            "demo.scenes.download=false", "data.batch_size=4", "data.val_batch_size=4", "model.student.min_size=64",
            "model.student.max_size=64", "model.teacher.min_size=64", "model.teacher.max_size=64",
            "demo.teacher_epochs=1", "demo.student_epochs=1", "demo.precision=32-true",
            f"demo.teacher_weights={tmp_path}/demo/teacher.pth", *extra]  # fmt: skip


@pytest.mark.slow
def test_detection_demo_prints_four_rows_and_reuses_its_teacher(tmp_path, fmnist_root, capsys):
    overrides = _overrides(tmp_path, fmnist_root)
    cfg = compose_config(overrides)
    assert cfg.pipeline == "demo_detection" and cfg.data._target_.endswith("COCODataModule")
    assert OmegaConf.select(cfg, "demo.scenes.canvas") == 64
    ap = run_demo(cfg, overrides)
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("teacher ", "student "))]
    assert [r.split("  ")[0] for r in rows] == [
        "teacher demo_fcos_teacher",
        "student alone",
        "student + FitNet (FPN)",
        "student + DiffKD (FPN)",
    ]
    assert all(len(r.split()) >= 7 for r in rows) and 0.0 <= ap <= 1.0
    assert "AP50" in out and "APl" in out
    assert (tmp_path / "demo" / "teacher.pth").is_file()
    meta = json.loads((tmp_path / "demo" / "teacher.json").read_text())
    assert meta["teacher"] == "demo_fcos_teacher" and set(meta["test"]) >= {"map", "map_50", "map_small"}
    assert meta["recipe"]["scenes"]["canvas"] == 64 and meta["recipe"]["trainer"]["max_epochs"] == 1
    again = _overrides(tmp_path, fmnist_root, out="again")
    run_demo(compose_config(again), again)
    assert "teacher demo_fcos_teacher (reused)" in capsys.readouterr().out
    ckpt = torch.load(next((tmp_path / "out" / "diffkd_det" / "checkpoints").glob("last.ckpt")), weights_only=True)
    assert ckpt["diffkd"]["config"]["distill"]["points"]["fpn"]["student"] == "backbone.fpn:*"
    overrides = _overrides(tmp_path, fmnist_root, "demo.methods=[none,fitnet_fpn]", "demo.seeds=[3,4]", out="seeds")
    run_demo(compose_config(overrides), overrides)
    out = capsys.readouterr().out
    assert "AP over 2 seeds (mean ± std)" in out and "differences beyond the seed spread" in out
    for seed in (3, 4):
        last = tmp_path / "seeds" / "fitnet_fpn" / f"seed{seed}" / "checkpoints" / "last.ckpt"
        assert torch.load(last, weights_only=True)["diffkd"]["config"]["seed"] == seed
