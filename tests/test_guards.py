"""Issue 21's guards in every task: a blow-up stops before any checkpoint of its weights (detection and
segmentation too), every checkpoint is written atomically, a run folder holding another run's checkpoints is
refused, and a resume with a changed config stops or applies the change for real."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffkd.tasks import NonFiniteLossError
from diffkd.train import train
from tests.conftest import compose_config, tiny_overrides
from tests.helpers.fake_coco import write_fake_coco


def _grey_scenes(root: Path, n: int = 8, size: int = 32) -> Path:
    """A ``segmentation_folder`` of 4-class grey scenes."""
    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("val", 4)):
        for kind in ("images", "labels"):
            (root / split / kind).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            label = rng.integers(0, 4, size=(size, size), dtype=np.uint8)
            image = (label * 60 + rng.integers(0, 30, size=(size, size))).astype(np.uint8)
            Image.fromarray(image, mode="L").save(root / split / "images" / f"s{i}.png")
            Image.fromarray(label, mode="L").save(root / split / "labels" / f"s{i}.png")
    return root


def segmentation_cfg(tmp_path: Path, *extra: str):
    scenes = _grey_scenes(tmp_path / "scenes")
    return compose_config([
        "experiment=demo_segmentation", "pipeline=train", *tiny_overrides(tmp_path, tmp_path),
        f"data.root={scenes}", "data.batch_size=4", "data.val_batch_size=4", *extra,
    ])  # fmt: skip


def detection_cfg(tmp_path: Path, *extra: str):
    coco = write_fake_coco(tmp_path / "coco")
    return compose_config([
        "experiment=demo_detection", "pipeline=train", *tiny_overrides(tmp_path, tmp_path),
        f"data.root={coco.root}", "data.batch_size=2", "data.val_batch_size=2", "data.contiguous_labels=true",
        "data.multiscale=false", "model.teacher.weights=null",
        *(f"model.{s}.{k}=64" for s in ("student", "teacher") for k in ("min_size", "max_size")), *extra,
    ])  # fmt: skip


def _max_abs_weight(path: Path) -> float:
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return max(float(v.abs().max()) for k, v in state.items() if k.startswith("student.") and v.is_floating_point())


BLOW_UP = ["optim.optimizer.lr=1e38", "trainer.limit_train_batches=1"]


@pytest.mark.parametrize("epochs", [1, 2])
def test_segmentation_blow_up_stops_at_validation_with_no_checkpoint(tmp_path, epochs):
    cfg = segmentation_cfg(tmp_path, *BLOW_UP, f"trainer.max_epochs={epochs}")
    with pytest.raises(NonFiniteLossError) as err:
        train(cfg)
    message = str(err.value)
    assert message.startswith("val/loss is nan after global step 1 (epoch 0)"), message
    assert "no checkpoint of these weights was written; the last good checkpoint is none yet" in message
    assert not list((tmp_path / "out" / "checkpoints").glob("*.ckpt*"))


def test_detection_blow_up_stops_at_validation_with_no_checkpoint(tmp_path):
    # SGD with no warm-up: the demo's AdamW warms up from 1e-5 (no blow-up in one step)
    cfg = detection_cfg(tmp_path, *BLOW_UP, "optim=sgd_det_2x", "optim.scheduler=null")
    with pytest.raises(NonFiniteLossError) as err:
        train(cfg)
    message = str(err.value)
    assert message.startswith("the student's outputs (backbone, head) held NaN/inf in validation after global step 1")
    assert "the last good checkpoint is none yet" in message
    assert not list((tmp_path / "out" / "checkpoints").glob("*.ckpt*"))
