"""SegmentationFolderDataModule on a tiny folder of RGB/grey PNG images and 8-bit label PNGs."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from diffkd.data import DistillDataModule, require_protocol
from diffkd.data.base import DataNotFoundError
from diffkd.data.segmentation_folder import SegmentationFolderDataModule
from diffkd.data.usable import EmptySplitError, MixedSizeError

CONF = Path(__file__).resolve().parents[2] / "conf" / "data" / "segmentation_folder.yaml"
NUM_CLASSES = 4
SIZE = (20, 24)  # H, W


def write_folder(root: Path, n: int = 4, mode: str = "RGB", seed: int = 0) -> dict[str, list[np.ndarray]]:
    """``<root>/{train,val}/{images,labels}/s<i>.png``; returns the written arrays by ``<split>_{images,labels}``."""
    rng = np.random.default_rng(seed)
    written: dict[str, list[np.ndarray]] = {}
    for split in ("train", "val"):
        (root / split / "images").mkdir(parents=True)
        (root / split / "labels").mkdir(parents=True)
        shape = (*SIZE, 3) if mode == "RGB" else SIZE
        for i in range(n):
            image = rng.integers(0, 256, size=shape, dtype=np.uint8)
            label = rng.integers(0, NUM_CLASSES, size=SIZE, dtype=np.uint8)
            label[0, :] = 255
            Image.fromarray(image, mode=mode).save(root / split / "images" / f"s{i}.png")
            Image.fromarray(label, mode="L").save(root / split / "labels" / f"s{i}.png")
            written.setdefault(f"{split}_images", []).append(image)
            written.setdefault(f"{split}_labels", []).append(label)
    return written


def _dm(root: Path, **kwargs) -> SegmentationFolderDataModule:
    return SegmentationFolderDataModule(str(root), NUM_CLASSES, **{"batch_size": 2, **kwargs})


def test_batches_have_the_right_shapes_values_and_normalisation(tmp_path):
    written = write_folder(tmp_path)
    dm = _dm(tmp_path, crop_size=(16, 16), scale_range=(0.75, 1.5), hflip_prob=0.5)
    require_protocol(dm, DistillDataModule, "test")
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (2, 3, 16, 16) and images.dtype == torch.float32
    assert labels.shape == (2, 16, 16) and labels.dtype == torch.int64
    assert set(labels.unique().tolist()) <= set(range(NUM_CLASSES)) | {255}
    images, labels = next(iter(dm.val_dataloader()))
    assert images.shape == (2, 3, *SIZE) and labels.shape == (2, *SIZE)
    mean = torch.tensor(dm.mean).view(3, 1, 1)
    std = torch.tensor(dm.std).view(3, 1, 1)
    expected = (torch.from_numpy(written["val_images"][0]).permute(2, 0, 1).float() / 255 - mean) / std
    torch.testing.assert_close(images[0], expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(labels[0], torch.from_numpy(written["val_labels"][0]).long())
    assert len(dm.test_dataloader().dataset) == 4


def test_grey_images_whole_and_config(tmp_path):
    write_folder(tmp_path, mode="L")
    cfg = OmegaConf.load(CONF)
    cfg.root, cfg.num_classes, cfg.in_chans, cfg.mean, cfg.std, cfg.num_workers = str(tmp_path), 4, 1, [0.5], [0.5], 0
    cfg.cache, cfg.batch_size = True, 2
    dm = instantiate(cfg)
    assert isinstance(dm, SegmentationFolderDataModule)
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape[1:] == (1, *SIZE) and labels.shape[1:] == SIZE
    assert float(images.min()) >= -1.0 and float(images.max()) <= 1.0


def test_example_batch_leaves_every_rng_unchanged_and_repeats(tmp_path):
    write_folder(tmp_path)
    dm = _dm(tmp_path, crop_size=16, scale_range=(0.5, 1.5), hflip_prob=0.5)
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    first = dm.example_batch(2)
    after = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    assert torch.equal(before[0], after[0]) and before[1] == after[1] and np.array_equal(before[2], after[2])
    second = dm.example_batch(2)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert first[0].shape == (2, 3, 16, 16) and first[1].shape == (2, 16, 16)
    assert dm.example_batch(1, split="val")[0].shape == (1, 3, *SIZE)
    with pytest.raises(ValueError, match="split"):
        dm.example_batch(1, split="nope")


def test_missing_folders_raise_data_not_found_with_the_layout(tmp_path):
    with pytest.raises(DataNotFoundError) as err:
        _dm(tmp_path / "nothing").setup("fit")
    message = str(err.value)
    assert "missing folder" in message and "train/images" in message and "Expected layout" in message
    assert "labels/<name>.png" in message
    write_folder(tmp_path / "some")
    (tmp_path / "some" / "val" / "labels" / "s1.png").unlink()
    dm = _dm(tmp_path / "some")
    with pytest.raises(DataNotFoundError, match="unpaired") as err:
        dm.setup("validate")
    assert "s1.png" in str(err.value)


def test_bad_label_values_and_sizes_name_the_file(tmp_path):
    write_folder(tmp_path)
    bad = np.full(SIZE, 7, dtype=np.uint8)  # class 7 of 4
    Image.fromarray(bad, mode="L").save(tmp_path / "val" / "labels" / "s0.png")
    dm = _dm(tmp_path)
    dm.setup("validate")
    with pytest.raises(ValueError, match=r"s0\.png.*neither classes 0\.\.3 nor 255"):
        dm.val_set[0]
    Image.fromarray(np.zeros((5, 5), np.uint8), mode="L").save(tmp_path / "val" / "labels" / "s1.png")
    with pytest.raises(ValueError, match=r"label 5×5 px, its image 24×20 px"):
        dm.val_set[1]


def test_invalid_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="crop_size"):
        _dm(tmp_path, scale_range=(0.5, 1.0))
    with pytest.raises(ValueError, match="in_chans"):
        _dm(tmp_path, in_chans=1)  # three-value mean/std
    with pytest.raises(ValueError, match="class_names"):
        _dm(tmp_path, class_names=["a"])


def _resize_one(root: Path, split: str, name: str, size: tuple[int, int]) -> Path:
    """Rewrite ``<split>/{images,labels}/<name>.png`` at ``size`` (W, H); returns the image's path."""
    image = root / split / "images" / f"{name}.png"
    Image.new("RGB", size).save(image)
    Image.new("L", size).save(root / split / "labels" / f"{name}.png")
    return image


def test_evaluation_images_of_several_sizes_are_refused_at_setup(tmp_path):
    write_folder(tmp_path)
    odd = _resize_one(tmp_path, "val", "s1", (30, 20))
    with pytest.raises(MixedSizeError) as info:
        _dm(tmp_path, crop_size=16).setup("fit")  # val_batch_size null: batch_size 2
    assert str(info.value) == (
        f"the val split's images are of 2 sizes: 24×20 px (3 images, e.g. {tmp_path / 'val' / 'images' / 's0.png'}), "
        f"30×20 px (1 image, e.g. {odd}); batches of data.val_batch_size=2 stack them into one tensor, which needs one "
        "size. Fix: set data.val_batch_size=1 (evaluation uses every image at its own size)"
    )
    dm = _dm(tmp_path, crop_size=16, val_batch_size=1)
    assert sorted(tuple(x.shape[-2:]) for x, _ in dm.val_dataloader()) == [(20, 24)] * 3 + [(20, 30)]
    images, labels = dm.example_batch(2, "val")  # the dry run of a validate-only run: the first image's size
    assert images.shape == (1, 3, 20, 24) and labels.shape == (1, 20, 24)


def test_whole_training_images_of_several_sizes_need_a_crop(tmp_path):
    write_folder(tmp_path)
    _resize_one(tmp_path, "train", "s1", (24, 16))
    with pytest.raises(MixedSizeError, match=r"the train split's images are of 2 sizes: 24×20 px \(3 images") as info:
        _dm(tmp_path, val_batch_size=1).setup("fit")
    assert "batches of data.batch_size=2" in str(info.value)
    assert "Fix: set data.crop_size=[height, width] (training crops of one size), or data.batch_size=1" in str(
        info.value
    )
    images, _ = next(iter(_dm(tmp_path, crop_size=16, val_batch_size=1).train_dataloader()))
    assert images.shape == (2, 3, 16, 16)


def test_a_collate_of_several_sizes_names_them(tmp_path):
    """Past the setup check (a file changed after it), the collate still says what and how to fix it."""
    write_folder(tmp_path)
    dm = _dm(tmp_path, crop_size=16)
    dm.setup("fit")
    _resize_one(tmp_path, "val", "s1", (30, 20))
    with pytest.raises(MixedSizeError) as info:
        next(iter(dm.val_dataloader()))
    assert str(info.value).startswith(
        "the val split's images are of 2 sizes: shape (3, 20, 24) (1 image, e.g. sample 0 of the batch), shape "
        "(3, 20, 30) (1 image, e.g. sample 1 of the batch); batches of data.val_batch_size=2 stack them"
    )
    assert str(info.value).endswith("Fix: set data.val_batch_size=1 (evaluation uses every image at its own size)")


def test_a_training_split_smaller_than_one_batch_is_refused(tmp_path):
    write_folder(tmp_path, n=3)
    with pytest.raises(EmptySplitError) as info:
        _dm(tmp_path, batch_size=4).train_dataloader()
    assert str(info.value) == (
        f"Segmentation folder: the train split ({tmp_path} (train)) has no usable sample: 3 sample(s) are fewer than "
        "data.batch_size=4, and data.drop_last=true drops that incomplete batch: not one training step would run. "
        "Fix: set data.batch_size=3 (or less), or data.drop_last=false."
    )
    assert len(_dm(tmp_path, batch_size=4, drop_last=False).train_dataloader()) == 1
