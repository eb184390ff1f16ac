"""CityscapesDataModule on a tiny Cityscapes written in the real format (RGB PNG images, 8-bit labelIds PNGs)."""

from __future__ import annotations

import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from lightning.pytorch.utilities.data import _update_dataloader
from omegaconf import OmegaConf
from PIL import Image
from torch import Tensor
from torch.utils.data import SequentialSampler, default_collate
from torchvision.datasets import Cityscapes

from diffkd.data import DistillDataModule, require_protocol
from diffkd.data.base import DataNotFoundError
from diffkd.data.cityscapes import (
    CIRKD_MEAN_BGR,
    CLASS_NAMES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    CityscapesDataModule,
    discrete_scales,
    map_label_ids,
)
from diffkd.data.resumable import EpochShuffleSampler
from diffkd.data.usable import EmptySplitError, MixedSizeError
from tests.helpers.fake_cityscapes import FakeCityscapes, write_fake_cityscapes

CONF = Path(__file__).resolve().parents[2] / "conf" / "data" / "cityscapes.yaml"

# The standard table, written out independently of the module under test.
TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13}
TRAIN_IDS |= {27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
ALLOWED = set(range(19)) | {255}


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> FakeCityscapes:
    return write_fake_cityscapes(tmp_path_factory.mktemp("cityscapes"))


@pytest.fixture
def fake_copy(fake: FakeCityscapes, tmp_path: Path) -> FakeCityscapes:
    """A private copy to break."""
    root = Path(shutil.copytree(fake.root, tmp_path / "cityscapes"))
    return FakeCityscapes(root=root, size=fake.size, keys=fake.keys)


def _dm(root: Path, **kwargs) -> CityscapesDataModule:
    return CityscapesDataModule(str(root), **{"num_workers": 0, "crop_size": (32, 64), **kwargs})


def _train_ids(fake: FakeCityscapes, split: str, index: int) -> Tensor:
    """int64 (H, W) trainIds of a written label, mapped with the table above (no lookup table)."""
    ids = fake.label_ids(split, index)
    return torch.from_numpy(np.vectorize(lambda v: TRAIN_IDS.get(int(v), 255))(ids)).long()


def _rgb(fake: FakeCityscapes, split: str, index: int) -> Tensor:
    """float32 (3, H, W) RGB 0-255 of a written image."""
    return torch.from_numpy(fake.image(split, index).copy()).permute(2, 0, 1).float()


def _cirkd(rgb: Tensor) -> Tensor:
    return rgb.flip(0) - torch.tensor(CIRKD_MEAN_BGR).view(3, 1, 1)


# ------------------------------------------------------------------------------------------ labels


def test_every_label_id_maps_to_its_train_id() -> None:
    mapped = map_label_ids(torch.arange(256, dtype=torch.uint8)).tolist()
    assert mapped == [TRAIN_IDS.get(v, 255) for v in range(256)]
    # the same table as torchvision's (license plate, id -1, never occurs in an 8-bit labelIds PNG)
    assert {c.id: c.train_id for c in Cityscapes.classes if c.id >= 0} == {v: mapped[v] for v in range(34)}
    evaluated = sorted((c.train_id, c.name) for c in Cityscapes.classes if 0 <= c.train_id < 255)
    assert [name for _, name in evaluated] == list(CLASS_NAMES)
    assert (CityscapesDataModule.num_classes, CityscapesDataModule.ignore_index) == (19, 255)
    assert CityscapesDataModule.class_names == CLASS_NAMES
    with pytest.raises(TypeError, match="uint8"):
        map_label_ids(torch.zeros(2, dtype=torch.int32))


def test_val_samples_are_full_size_mapped_and_in_order(fake: FakeCityscapes) -> None:
    dm = _dm(fake.root)
    dm.setup("validate")
    assert dm.train_set is None and len(dm.val_set) == 3
    assert [Path(p) for p in dm.val_set.images] == [fake.image_path("val", k) for k in fake.keys["val"]]
    for i in range(3):
        image, label = dm.val_set[i]
        assert image.shape == (3, *fake.size) and image.dtype == torch.float32
        assert label.shape == fake.size and label.dtype == torch.int64
        assert torch.equal(label, _train_ids(fake, "val", i))
        assert set(label.unique().tolist()) == ALLOWED  # every class, and ignored pixels (void ids 0..6, 9, ...)


def test_cirkd_normalization_is_bgr_minus_mean(fake: FakeCityscapes) -> None:
    image, _ = _dm(fake.root, normalization="cirkd").example_batch(1, split="val")
    r, g, b = fake.image("val", 0)[5, 7].astype(np.float64)
    expected = [b - 104.00698793, g - 116.66876762, r - 122.67891434]
    assert image[0, :, 5, 7].tolist() == pytest.approx(expected, abs=1e-4)
    assert torch.allclose(image[0], _cirkd(_rgb(fake, "val", 0)), atol=1e-4)


def test_imagenet_normalization_is_rgb_mean_std(fake: FakeCityscapes) -> None:
    image, _ = _dm(fake.root, normalization="imagenet").example_batch(1, split="val")
    rgb = fake.image("val", 0)[5, 7] / 255.0
    expected = [(rgb[c] - IMAGENET_MEAN[c]) / IMAGENET_STD[c] for c in range(3)]
    assert image[0, :, 5, 7].tolist() == pytest.approx(expected, abs=1e-5)


# ------------------------------------------------------------------------------------------ augmentation


def test_scales_are_cirkds_discrete_set(fake: FakeCityscapes) -> None:
    dm = _dm(fake.root)
    assert dm.scales == pytest.approx([0.5 + k / 10 for k in range(16)])
    dm.setup("fit")
    transform = dm.train_set.transforms
    torch.manual_seed(0)
    draws = {transform.sample_scale() for _ in range(800)}
    assert draws == set(dm.scales)
    assert discrete_scales(None, 0.1) == (1.0,)
    assert discrete_scales([0.75, 1.25], 0.25) == (0.75, 1.0, 1.25)
    for bad in ([2.0, 1.0], [0.0, 1.0], [0.5, 0.75]):
        with pytest.raises(ValueError, match="scale_range"):
            discrete_scales(bad, 0.1)


@pytest.mark.parametrize("scale", [0.5, 0.7, 1.3, 2.0])
def test_scale_then_pad_label_nearest_image_bilinear(fake: FakeCityscapes, scale: float) -> None:
    """A crop larger than the scaled image: the whole scaled image at the top left, padding elsewhere."""
    dm = _dm(fake.root, crop_size=(136, 264), scale_range=[scale, scale], hflip_prob=0.0)
    dm.setup("fit")
    image, label = dm.train_set[0]
    assert image.shape == (3, 136, 264) and label.shape == (136, 264) and label.dtype == torch.int64
    h, w = round(fake.size[0] * scale), round(fake.size[1] * scale)
    reference = F.interpolate(_train_ids(fake, "train", 0)[None, None].float(), size=(h, w), mode="nearest")
    assert torch.equal(label[:h, :w], reference[0, 0].long())  # never blended: nearest, as cv2.INTER_NEAREST
    assert set(label.unique().tolist()) <= ALLOWED
    assert (label[h:] == 255).all() and (label[:, w:] == 255).all()
    assert (image[:, h:] == 0).all() and (image[:, :, w:] == 0).all()
    rgb = F.interpolate(_rgb(fake, "train", 0)[None], size=(h, w), mode="bilinear", antialias=False)[0]
    assert (image[:, :h, :w] - _cirkd(rgb)).abs().max() <= 1 + 1e-3  # resized in uint8 (as cv2): rounding
    assert (image[:, :h, :w] != 0).all()  # a pixel minus CIRKD's fractional mean is never 0: no padding inside


def _window(crop: Tensor, full: Tensor) -> list[tuple[int, int]]:
    """Every (top, left) at which ``crop`` (..., ch, cw) equals a window of ``full`` (..., H, W)."""
    ch, cw = crop.shape[-2:]
    height, width = full.shape[-2:]
    return [
        (top, left)
        for top in range(height - ch + 1)
        for left in range(width - cw + 1)
        if torch.equal(full[..., top : top + ch, left : left + cw], crop)
    ]


def test_random_crop_is_a_window_of_the_image_and_label(fake: FakeCityscapes) -> None:
    dm = _dm(fake.root, crop_size=(32, 64), scale_range=None, hflip_prob=0.0)
    dm.setup("fit")
    full_image, full_label = _cirkd(_rgb(fake, "train", 1)), _train_ids(fake, "train", 1)
    offsets = set()
    for seed in range(6):
        torch.manual_seed(seed)
        image, label = dm.train_set[1]
        assert image.shape == (3, 32, 64) and label.shape == (32, 64)
        where = [
            (t, c) for t, c in _window(image, full_image) if torch.equal(full_label[t : t + 32, c : c + 64], label)
        ]
        assert len(where) == 1
        offsets.add(where[0])
    assert len(offsets) > 1  # the offsets are drawn


def test_crop_along_one_axis_pad_along_the_other(fake: FakeCityscapes) -> None:
    dm = _dm(fake.root, crop_size=(32, 200), scale_range=None, hflip_prob=0.0)
    dm.setup("fit")
    image, label = dm.train_set[2]
    assert (image[:, :, 128:] == 0).all() and (label[:, 128:] == 255).all()
    [(top, left)] = _window(image[:, :, :128], _cirkd(_rgb(fake, "train", 2)))
    assert left == 0 and torch.equal(label[:, :128], _train_ids(fake, "train", 2)[top : top + 32])


def test_flip_flips_image_and_label_together(fake: FakeCityscapes) -> None:
    full_image, full_label = _cirkd(_rgb(fake, "train", 0)), _train_ids(fake, "train", 0)
    always = _dm(fake.root, crop_size=fake.size, scale_range=None, hflip_prob=1.0)
    always.setup("fit")
    image, label = always.train_set[0]
    assert torch.equal(image, full_image.flip(-1)) and torch.equal(label, full_label.flip(-1))

    half = _dm(fake.root, crop_size=fake.size, scale_range=None, hflip_prob=0.5)
    half.setup("fit")
    flipped = []
    for seed in range(12):
        torch.manual_seed(seed)
        image, label = half.train_set[0]
        if torch.equal(image, full_image):
            assert torch.equal(label, full_label)
            flipped.append(False)
        else:
            assert torch.equal(image, full_image.flip(-1)) and torch.equal(label, full_label.flip(-1))
            flipped.append(True)
    assert any(flipped) and not all(flipped)


# ------------------------------------------------------------------------------------------ loaders and protocol


def test_loader_batches(fake: FakeCityscapes) -> None:
    dm = _dm(fake.root, batch_size=2)
    train = dm.train_dataloader()
    assert isinstance(train.sampler, EpochShuffleSampler) and train.drop_last
    batches = list(train)
    assert len(batches) == 2
    for images, labels in batches:
        assert images.shape == (2, 3, 32, 64) and images.dtype == torch.float32
        assert labels.shape == (2, 32, 64) and labels.dtype == torch.int64
        assert set(labels.unique().tolist()) <= ALLOWED
    val = dm.val_dataloader()
    assert isinstance(val.sampler, SequentialSampler) and not val.drop_last and val.batch_size == 1
    images, labels = next(iter(val))
    assert images.shape == (1, 3, *fake.size) and labels.shape == (1, *fake.size)
    assert len(dm.test_dataloader()) == 3
    # what Lightning does under DDP: the same loader rebuilt around its wrapper of the epoch sampler
    shard = DistributedSamplerWrapper(train.sampler, num_replicas=2, rank=1, shuffle=False)
    ddp = _update_dataloader(train, shard)
    [(images, labels)] = list(ddp)
    assert images.shape == (2, 3, 32, 64) and ddp.drop_last


def _epoch_batches(dm: CityscapesDataModule, epoch: int, done: int, seed: int) -> list[tuple[Tensor, Tensor]]:
    """The batches of ``epoch`` that a loader made now yields when ``done`` of them were already trained, with the
    global generators seeded with ``seed`` first (a resumed process starts from other random states)."""
    dm._resume_position = lambda: (epoch, done)  # what the trainer's restored progress says
    torch.manual_seed(seed), random.seed(seed), np.random.seed(seed)
    return list(dm.train_dataloader())


def _same(a: list[tuple[Tensor, Tensor]], b: list[tuple[Tensor, Tensor]]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) and torch.equal(u, v) for (x, u), (y, v) in zip(a, b))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_resumed_epoch_sees_the_rest_of_the_uninterrupted_one(fake: FakeCityscapes, num_workers: int) -> None:
    # random scale, crop and flip: what each sample draws must depend on (seed, epoch, index) only
    dm = _dm(fake.root, batch_size=1, num_workers=num_workers)
    full = _epoch_batches(_dm(fake.root, batch_size=1), epoch=1, done=0, seed=0)
    assert len(full) == 4
    assert _same(_epoch_batches(dm, epoch=1, done=2, seed=123), full[2:])
    assert _same(_epoch_batches(dm, epoch=1, done=0, seed=7), full)
    other = _epoch_batches(dm, epoch=2, done=0, seed=0)
    assert not _same(other, full)  # another epoch, other draws


def test_example_batch_is_real_fixed_and_leaves_rng_alone(fake: FakeCityscapes) -> None:
    dm = _dm(fake.root)
    assert isinstance(dm, DistillDataModule) and require_protocol(dm, DistillDataModule, "test") is dm
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    states = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    images, labels = dm.example_batch()  # before setup: sets up itself
    again = dm.example_batch(2, split="train")
    assert torch.equal(torch.get_rng_state(), states[0]) and random.getstate() == states[1]
    assert np.array_equal(np.random.get_state()[1], states[2])
    assert images.shape == (2, 3, 32, 64) and images.dtype == torch.float32
    assert labels.shape == (2, 32, 64) and labels.dtype == torch.int64
    assert torch.equal(images, again[0]) and torch.equal(labels, again[1])
    torch.default_generator.manual_seed(CityscapesDataModule.example_seed)
    first = default_collate([dm.train_set[0], dm.train_set[1]])  # the first samples, not shuffled ones
    assert torch.equal(images, first[0]) and torch.equal(labels, first[1])

    val_images, val_labels = dm.example_batch(2, split="val")
    assert val_images.shape == (2, 3, *fake.size) and val_labels.shape == (2, *fake.size)
    assert torch.equal(val_labels[1], _train_ids(fake, "val", 1))
    for size in (0, 5):
        with pytest.raises(ValueError, match="example_batch size"):
            dm.example_batch(size)
    with pytest.raises(ValueError, match="split"):
        dm.example_batch(1, split="training")


def test_train_split_val_for_a_quick_run(fake: FakeCityscapes) -> None:
    dm = _dm(fake.root, train_split="val")
    dm.setup("fit")
    assert len(dm.train_set) == 3 and dm.train_set[0][0].shape == (3, 32, 64)
    assert dm.data_dir == str(fake.root)


def test_dataset_pickles_for_spawned_workers(fake: FakeCityscapes) -> None:
    dm = _dm(fake.root)
    dm.setup("fit")
    clone = pickle.loads(pickle.dumps(dm.train_set))
    torch.manual_seed(0)
    a = dm.train_set[0]
    torch.manual_seed(0)
    b = clone[0]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_config_instantiates(fake: FakeCityscapes) -> None:
    cfg = OmegaConf.load(CONF)
    assert cfg._target_ == "diffkd.data.cityscapes.CityscapesDataModule"
    assert OmegaConf.to_container(cfg)["root"] == "${paths.data_dir}/cityscapes"
    cfg.root = str(fake.root)
    cfg.num_workers = 0
    dm = instantiate(cfg)
    assert isinstance(dm, CityscapesDataModule)
    assert (dm.batch_size, dm.val_batch_size, dm.crop_size) == (2, 1, (512, 1024))
    assert (dm.normalization, dm.hflip_prob, len(dm.scales), dm.drop_last) == ("cirkd", 0.5, 16, True)
    assert (dm.train_split, dm.val_split) == ("train", "val")
    images, labels = dm.example_batch(1)  # a 64×128 image padded to the 512×1024 crop
    assert images.shape == (1, 3, 512, 1024) and labels.shape == (1, 512, 1024)


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("remove", ["gtFine/val", "leftImg8bit/train", ""])
def test_missing_folder_is_reported(fake_copy: FakeCityscapes, remove: str) -> None:
    shutil.rmtree(fake_copy.root / remove)
    with pytest.raises(DataNotFoundError) as info:
        _dm(fake_copy.root).setup("fit")
    message = str(info.value)
    assert f"{fake_copy.root / (remove or 'leftImg8bit/train')}/ (missing folder)" in message
    for needed in ("cityscapes-dataset.com", "leftImg8bit_trainvaltest.zip", "gtFine_trainvaltest.zip", "account"):
        assert needed in message
    assert f"{fake_copy.root}/gtFine/{{train,val}}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png" in message
    assert isinstance(info.value, FileNotFoundError)


def test_validate_checks_only_the_val_split(fake_copy: FakeCityscapes) -> None:
    shutil.rmtree(fake_copy.root / "leftImg8bit" / "train")
    dm = _dm(fake_copy.root)
    dm.setup("validate")
    assert len(dm.val_set) == 3


def test_label_without_image_is_reported(fake_copy: FakeCityscapes) -> None:
    key = fake_copy.keys["train"][1]
    image, label = fake_copy.image_path("train", key), fake_copy.label_path("train", key)
    image.unlink()
    with pytest.raises(DataNotFoundError, match="label file") as info:
        _dm(fake_copy.root).setup("fit")  # at setup, before any sample is read
    assert str(label) in str(info.value) and str(image) in str(info.value)


def test_image_without_label_is_reported(fake_copy: FakeCityscapes) -> None:
    key = fake_copy.keys["val"][2]
    image, label = fake_copy.image_path("val", key), fake_copy.label_path("val", key)
    label.unlink()
    with pytest.raises(DataNotFoundError, match="image") as info:
        _dm(fake_copy.root).setup("validate")
    assert str(label) in str(info.value) and str(image) in str(info.value)
    assert pickle.loads(pickle.dumps(info.value)).args == info.value.args  # survives a worker / spawn boundary


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"normalization": "caffe"}, "normalization"),
        ({"train_split": "training"}, "train_split"),
        ({"crop_size": [0, 64]}, "crop_size"),
        ({"crop_size": [32, 64, 3]}, "crop_size"),
        ({"hflip_prob": 1.5}, "hflip_prob"),
        ({"scale_range": [2.0, 0.5]}, "scale_range"),
    ],
)
def test_bad_arguments(fake: FakeCityscapes, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _dm(fake.root, **kwargs)


def test_full_resolution_evaluation_of_several_sizes_needs_batch_1(fake_copy: FakeCityscapes) -> None:
    key = fake_copy.keys["val"][1]
    height, width = fake_copy.size
    Image.new("RGB", (width // 2, height)).save(fake_copy.image_path("val", key))
    Image.new("L", (width // 2, height)).save(fake_copy.label_path("val", key))
    with pytest.raises(MixedSizeError) as info:
        _dm(fake_copy.root, val_batch_size=2).setup("validate")
    assert str(info.value) == (
        f"the val split's images are of 2 sizes: {width}×{height} px (2 images, e.g. "
        f"{fake_copy.image_path('val', fake_copy.keys['val'][0])}), {width // 2}×{height} px (1 image, e.g. "
        f"{fake_copy.image_path('val', key)}); batches of data.val_batch_size=2 stack them into one tensor, which "
        "needs one size. Fix: set data.val_batch_size=1 (evaluation uses every image at its own size)"
    )
    widths = [x.shape[-1] for x, _ in _dm(fake_copy.root).val_dataloader()]  # the default: one per batch
    assert sorted(widths) == [width // 2, width, width]


def test_a_training_split_smaller_than_one_batch_is_refused(fake: FakeCityscapes) -> None:
    with pytest.raises(EmptySplitError, match=r"Cityscapes: the train split .* 4 sample\(s\) are fewer than"):
        _dm(fake.root, batch_size=8).train_dataloader()
