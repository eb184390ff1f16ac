"""The segmentation demo: scenes written as a segmentation folder, teacher once (then reused), a four-row table."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffkd.data.fashion_mnist import read_idx
from diffkd.data.segmentation_folder import SegmentationFolderDataModule
from diffkd.demos.scenes import compose_scenes
from diffkd.demos.segmentation import ensure_scenes, run_demo, write_scene_split
from tests.conftest import compose_config, tiny_overrides

PARAMS = {"canvas": 48, "items": [1, 3], "scale": [0.8, 1.2], "ignore_border": True}
SOURCE_DIR = ("FashionMNIST", "raw")


def _fmnist(fmnist_root, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    folder = fmnist_root.joinpath(*SOURCE_DIR)
    prefix = "train" if split == "train" else "t10k"
    return read_idx(folder / f"{prefix}-images-idx3-ubyte"), read_idx(folder / f"{prefix}-labels-idx1-ubyte")


def test_scene_labels_carry_each_items_class(tmp_path, fmnist_root):
    images, labels = _fmnist(fmnist_root)
    stats = write_scene_split(tmp_path / "train", images, labels, 6, PARAMS, seed=5)
    scenes = compose_scenes(images, labels, 6, canvas=48, items=(1, 3), scale=(0.8, 1.2), seed=5)
    assert stats["scenes"] == 6 and stats["items"] == sum(len(s.labels) for s in scenes)
    for i, scene in enumerate(scenes):
        pixels = np.asarray(Image.open(tmp_path / "train" / "images" / f"{i:05d}.png"))
        label = torch.from_numpy(np.asarray(Image.open(tmp_path / "train" / "labels" / f"{i:05d}.png")).copy())
        assert pixels.shape == label.shape == (48, 48)
        assert torch.equal(torch.from_numpy(pixels.copy()), scene.image)
        assert set(label.unique().tolist()) <= set(range(11)) | {255}
        for mask, cls in zip(scene.masks, scene.labels):
            assert (label[mask] == 1 + cls).all()  # boxes never overlap (max_iou=0): no item covers another
        items = scene.masks.any(0)
        assert (label[~items] != 0).sum() > 0 and set(label[~items].unique().tolist()) <= {0, 255}
    no_border = write_scene_split(tmp_path / "plain", images, labels, 6, {**PARAMS, "ignore_border": False}, seed=5)
    assert no_border["ignored"] == 0.0 and stats["ignored"] > 0.0


def test_scene_folder_is_built_once_and_read_by_the_datamodule(tmp_path, fmnist_root):
    spec = {"root": str(tmp_path / "scenes"), "train": 10, "val": 4, "seed": 1, **PARAMS}
    source = {"data_dir": str(fmnist_root), "debian_dir": None, "download": False}
    root = ensure_scenes(spec, source)
    meta = json.loads((root / "scenes.json").read_text())
    assert meta["params"]["train"] == 10 and meta["stats"]["val"]["scenes"] == 4
    stamp = (root / "train" / "labels" / "00000.png").stat().st_mtime_ns
    assert ensure_scenes(spec, source) == root
    assert (root / "train" / "labels" / "00000.png").stat().st_mtime_ns == stamp  # reused, not rewritten
    dm = SegmentationFolderDataModule(str(root), 11, batch_size=4, in_chans=1, mean=[0.1], std=[0.3], hflip_prob=0.5)
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 1, 48, 48) and labels.shape == (4, 48, 48)
    assert set(labels.unique().tolist()) <= set(range(11)) | {255}
    assert len(dm.val_dataloader().dataset) == 4
    ensure_scenes({**spec, "val": 5}, source)  # other parameters: rebuilt in place
    assert len(list((root / "val" / "images").glob("*.png"))) == 5
    assert not (tmp_path / "scenes.partial").exists()


def _overrides(tmp_path, fmnist_root, *extra, out: str = "out"):
    """``out``: the runs' folder (each demo call needs its own, as each ``python -m diffkd.train`` gets its own)."""
    overrides = [o for o in tiny_overrides(tmp_path, fmnist_root) if o != "logger=none"]
    overrides = [
        o if not o.startswith("paths.output_dir=") else f"paths.output_dir={tmp_path / out}" for o in overrides
    ]
    return ["experiment=demo_segmentation", *overrides, "demo.fashion_mnist.debian_dir=null",
            "demo.fashion_mnist.download=false", f"demo.scenes.root={tmp_path}/scenes", "demo.scenes.train=16",
            "demo.scenes.val=8", "demo.scenes.canvas=32", "demo.scenes.scale=[0.8,1.1]", "demo.teacher_epochs=1", "demo.student_epochs=1",
            "demo.precision=32-true", f"demo.teacher_weights={tmp_path}/demo/teacher.pth", *extra]  # fmt: skip


@pytest.mark.slow
def test_demo_prints_four_rows_and_reuses_its_teacher(tmp_path, fmnist_root, capsys):
    overrides = _overrides(tmp_path, fmnist_root)
    cfg = compose_config(overrides)
    assert cfg.pipeline == "demo_segmentation" and cfg.data._target_.endswith("SegmentationFolderDataModule")
    miou = run_demo(cfg, overrides)
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("teacher ", "student "))]
    assert [r.split("  ")[0] for r in rows] == [
        "teacher demo_seg_teacher",
        "student alone",
        "student + kd",
        "student + diffkd",
    ]
    assert 0.0 <= miou <= 1.0
    assert (tmp_path / "demo" / "teacher.pth").is_file() and (tmp_path / "demo" / "teacher.json").is_file()
    overrides = _overrides(
        tmp_path, fmnist_root, "distill.diffkd.inference_steps=2", "demo.methods=[diffkd_seg]", out="again"
    )
    run_demo(compose_config(overrides), overrides)
    out = capsys.readouterr().out
    assert "teacher demo_seg_teacher (reused)" in out and "student + diffkd" in out
    ckpt = torch.load(tmp_path / "again" / "diffkd_seg" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["diffkd"]["config"]["distill"]["diffkd"]["inference_steps"] == 2
    overrides = _overrides(tmp_path, fmnist_root, "demo.methods=[none,kd_seg]", "demo.seeds=[3,4]", out="seeds")
    run_demo(compose_config(overrides), overrides)
    out = capsys.readouterr().out
    assert "mIoU over 2 seeds (mean ± std)" in out and "differences beyond the seed spread" in out
    for seed in (3, 4):
        ckpt = torch.load(
            tmp_path / "seeds" / "kd_seg" / f"seed{seed}" / "checkpoints" / "last.ckpt", weights_only=True
        )
        assert ckpt["diffkd"]["config"]["seed"] == seed
