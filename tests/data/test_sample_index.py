"""Sample indices (``enable_sample_index``, ``num_train_samples``, ``train_labels``) on every data module, with the
fake on-disk data: the index names the sample the batch holds, the batches are otherwise unchanged, and the index is
the same for the same sample across epochs and a mid-epoch resume."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor
from torchvision.transforms import v2

from diffkd.data.cifar import CIFAR100DataModule
from diffkd.data.cityscapes import CityscapesDataModule
from diffkd.data.coco import COCODataModule, GroupedBatchSampler
from diffkd.data.device_loader import DeviceTensorLoader
from diffkd.data.fashion_mnist import FashionMNISTDataModule
from diffkd.data.image_folder import ImageFolderDataModule
from diffkd.data.imagenet import ImageNetDataModule
from diffkd.data.protocol import DATA_TASKS, SampleIndexData, require_protocol, task_of
from diffkd.data.sample_index import NoPerSampleClassError, with_sample_index
from diffkd.data.segmentation_folder import SegmentationFolderDataModule
from tests.helpers.fake_cityscapes import write_fake_cityscapes
from tests.helpers.fake_coco import write_fake_coco
from tests.helpers.fake_data import write_cifar100, write_fashion_mnist, write_image_folder
from tests.helpers.fake_imagenet import write_tiny_imagenet
from tests.helpers.fake_segmentation import write_grey_scenes


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    make = tmp_path_factory.mktemp
    return {
        "cifar": write_cifar100(make("cifar"), n_train=20, n_test=8)["root"],
        "fmnist": write_fashion_mnist(make("fmnist"), n_train=20, n_test=8)["root"],
        "folder": write_image_folder(make("folder"), per_class=3, size=20)["root"],
        "imagenet": write_tiny_imagenet(make("imagenet"), per_class=3, size=(24, 32)),
        "cityscapes": write_fake_cityscapes(make("cityscapes"), size=(32, 64)).root,
        "coco": write_fake_coco(make("coco")).root,
        "scenes": write_grey_scenes(make("scenes"), n_train=6, n_val=2, size=16),
    }


# Each data module with a deterministic training transform, so a batch's samples can be compared with dataset[i].
def _cifar(roots: dict[str, Path], **kw: Any) -> CIFAR100DataModule:
    kw = {"batch_size": 4, "num_workers": 0, "train_transform": [v2.CenterCrop(32)], **kw}
    return CIFAR100DataModule(str(roots["cifar"]), **kw)


def _fmnist(roots: dict[str, Path], **kw: Any) -> FashionMNISTDataModule:
    kw = {"batch_size": 4, "train_transform": [v2.CenterCrop(28)], **kw}
    return FashionMNISTDataModule(str(roots["fmnist"]), debian_dir=None, **kw)


def _folder(roots: dict[str, Path], **kw: Any) -> ImageFolderDataModule:
    resize = [v2.Resize([16, 16])]
    kw = {"image_size": 16, "batch_size": 4, "num_workers": 0, "train_transform": resize, **kw}
    return ImageFolderDataModule(str(kw.pop("root", roots["folder"])), **kw)


def _imagenet(roots: dict[str, Path], **kw: Any) -> ImageNetDataModule:
    resize = [v2.Resize([16, 16])]
    kw = {"image_size": 16, "batch_size": 4, "num_workers": 0, "train_transform": resize, **kw}
    return ImageNetDataModule(str(roots["imagenet"]), **kw)


def _cityscapes(roots: dict[str, Path], **kw: Any) -> CityscapesDataModule:
    kw = {"num_workers": 0, "crop_size": (32, 64), "scale_range": None, "hflip_prob": 0.0, **kw}
    return CityscapesDataModule(str(roots["cityscapes"]), **kw)


def _coco(roots: dict[str, Path], **kw: Any) -> COCODataModule:
    return COCODataModule(str(roots["coco"]), **{"num_workers": 0, "hflip_prob": 0.0, **kw})


def _scenes(roots: dict[str, Path], **kw: Any) -> SegmentationFolderDataModule:
    kw = {"batch_size": 2, "in_chans": 1, "mean": (0.5,), "std": (0.25,), **kw}
    return SegmentationFolderDataModule(str(roots["scenes"]), 4, **kw)


MODULES: dict[str, Callable[..., Any]] = {
    "cifar": _cifar,
    "fmnist": _fmnist,
    "folder": _folder,
    "imagenet": _imagenet,
    "cityscapes": _cityscapes,
    "coco": _coco,
    "scenes": _scenes,
}
TASKS = {"cityscapes": "segmentation", "scenes": "segmentation", "coco": "detection"}
CLASSIFICATION = ("cifar", "fmnist", "folder", "imagenet")


def _same(a: Any, b: Any) -> bool:
    """Equal batches: tensors bit for bit, containers element by element."""
    if isinstance(a, Tensor):
        return isinstance(b, Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _sample_of(batch: Any, k: int) -> tuple[Any, Any]:
    """The k-th (image, target) of a batch whose images are a stacked tensor or a list (detection)."""
    return batch[0][k], batch[1][k]


def _epoch(dm: Any) -> list[Any]:
    return list(dm.train_dataloader())


@pytest.mark.parametrize("name", list(MODULES))
def test_the_index_names_the_sample_and_leaves_the_batch_as_it_was(roots, name):
    plain = MODULES[name](roots)
    before = _epoch(plain)
    example = plain.example_batch(2)
    dm = MODULES[name](roots)
    assert isinstance(dm, SampleIndexData) and require_protocol(dm, SampleIndexData, "CRD") is dm
    dm.enable_sample_index()
    after = _epoch(dm)
    n = dm.num_train_samples()
    assert n == len(dm.train_set)
    assert len(after) == len(before) > 0
    seen: list[int] = []
    for old, new in zip(before, after, strict=True):
        assert isinstance(new, tuple) and len(new) == len(old) + 1
        assert _same(tuple(old), new[:-1])  # everything but the index is the batch it was
        index = new[-1]
        assert index.dtype == torch.int64 and index.shape == (len(new[1]),)
        for k, i in enumerate(index.tolist()):
            image, target = _sample_of(new, k)
            ref_image, ref_target = dm.train_set[i]
            assert torch.equal(image, ref_image)
            assert _same(target, ref_target if not isinstance(ref_target, int) else torch.tensor(ref_target))
        seen += index.tolist()
    assert set(seen) <= set(range(n))
    if name != "coco":  # COCO's grouped batches fill their last partial groups with repeats
        assert len(set(seen)) == len(seen)
    indexed_example = dm.example_batch(2)
    assert _same(tuple(example), indexed_example[:-1]) and indexed_example[-1].tolist() == [0, 1]
    val = next(iter(dm.val_dataloader()))
    assert len(val) == 2  # validation batches carry no index
    assert len(dm.example_batch(1, split="val")) == 2


@pytest.mark.parametrize("name", CLASSIFICATION)
def test_train_labels_are_the_classes_of_the_indexed_samples(roots, name):
    dm = MODULES[name](roots)
    dm.enable_sample_index()
    labels = dm.train_labels()
    assert labels.dtype == torch.int64 and labels.shape == (dm.num_train_samples(),)
    for _, targets, index in dm.train_dataloader():
        assert torch.equal(labels[index], targets)
    assert len(set(labels.tolist())) > 1


@pytest.mark.parametrize("name", ["cityscapes", "coco", "scenes"])
def test_data_without_a_class_per_image_says_what_to_use(roots, name):
    dm = MODULES[name](roots)
    with pytest.raises(NoPerSampleClassError, match=rf"{type(dm).__name__} has no per-image class.*use "):
        dm.train_labels()
    with pytest.raises(TypeError):  # a TypeError, as require_protocol's
        dm.train_labels()


@pytest.mark.parametrize("name", list(MODULES))
def test_every_data_module_declares_its_task(roots, name):
    dm = MODULES[name](roots)
    assert task_of(dm) == task_of(type(dm)) == type(dm).task == TASKS.get(name, "classification")
    assert type(dm).task in DATA_TASKS


def test_a_module_without_a_task_is_named():
    class Mine:
        pass

    with pytest.raises(TypeError, match=r"Mine declares no task: set the class attribute task"):
        task_of(Mine)


def test_the_index_is_the_same_in_every_epoch_and_after_a_mid_epoch_resume(roots):
    """Random augmentation on (CIFAR's default crop + flip): each index still maps to its sample's label, and the
    loader resumed after 2 batches of epoch 1 yields the rest of epoch 1 with the same indices."""
    dm = _cifar(roots, train_transform=None, batch_size=3)
    dm.enable_sample_index()
    labels = dm.train_labels()
    epochs = {}
    for epoch in (0, 1):
        dm._resume_position = lambda epoch=epoch: (epoch, 0)
        epochs[epoch] = _epoch(dm)
        for _, targets, index in epochs[epoch]:
            assert torch.equal(labels[index], targets)
    orders = [torch.cat([b[-1] for b in epochs[e]]).tolist() for e in (0, 1)]
    assert orders[0] != orders[1]  # reshuffled, and still every index names its sample
    dm._resume_position = lambda: (1, 2)
    resumed = _epoch(dm)
    assert len(resumed) == len(epochs[1]) - 2
    for a, b in zip(resumed, epochs[1][2:], strict=True):
        assert _same(a, b)


@pytest.mark.parametrize("maker", [_cifar, _fmnist], ids=["cifar", "fmnist"])
def test_the_preloaded_device_loader_gives_the_index(roots, maker):
    plain = maker(roots, gpu_preload=True, train_transform=None)
    before = _epoch(plain)
    example = plain.example_batch(3)
    dm = maker(roots, gpu_preload=True, train_transform=None)
    dm.enable_sample_index()
    loader = dm.train_dataloader()
    assert isinstance(loader, DeviceTensorLoader)
    after = list(loader)
    targets = dm.device_data["train"][1]
    labels = dm.train_labels()
    assert torch.equal(labels, targets.cpu())
    for old, new in zip(before, after, strict=True):
        assert len(new) == 3 and _same(tuple(old), new[:2])
        assert torch.equal(targets[new[2]], new[1])
    indexed_example = dm.example_batch(3)
    assert _same(tuple(example), indexed_example[:2]) and indexed_example[2].tolist() == [0, 1, 2]
    assert len(next(iter(dm.val_dataloader()))) == 2


def test_device_loader_shards_carry_their_positions():
    """Under data parallelism each rank's indices are its shard's positions: targets = arange names them."""
    images = torch.zeros(10, 1, 4, 4, dtype=torch.uint8)
    shards = []
    for rank in (0, 1):
        loader = DeviceTensorLoader(
            images, torch.arange(10), 2, (0.5,), (0.5,), shuffle=True, rank=rank, world_size=2, seed=3, with_index=True
        )
        batches = list(loader)
        assert all(torch.equal(t, i) for _, t, i in batches)
        shards.append(torch.cat([i for *_, i in batches]).tolist())
    assert sorted(shards[0] + shards[1]) == list(range(10))


@pytest.mark.parametrize("group", [3, -1], ids=["grouped", "plain"])
def test_coco_batches_carry_the_index_of_their_image(roots, group):
    dm = _coco(roots, aspect_ratio_group_factor=group, batch_size=2, drop_last=False)
    dm.enable_sample_index()
    loader = dm.train_dataloader()
    assert isinstance(loader.batch_sampler, GroupedBatchSampler) == (group >= 0)
    seen = []
    for images, targets, index in loader:
        for image, target, i in zip(images, targets, index.tolist(), strict=True):
            ref_image, ref_target = dm.train_set[i]
            assert torch.equal(image, ref_image) and target["image_id"] == ref_target["image_id"]
        seen += index.tolist()
    assert set(seen) == set(range(dm.num_train_samples()))  # grouping may repeat a few to fill groups


def test_a_skipped_bad_image_carries_the_position_of_its_replacement(roots, tmp_path):
    root = write_image_folder(tmp_path / "bad", per_class=3, size=20)
    bad = root["train_files"][1]
    bad.write_bytes(b"")
    dm = _folder(roots, root=root["root"], skip_bad_images=True, batch_size=2, drop_last=False)
    dm.enable_sample_index()
    dm.setup("fit")
    position = next(i for i in range(len(dm.train_set)) if dm.train_set.sample_files(i)[0] == str(bad))
    with pytest.warns(UserWarning, match="skipping"):
        *sample, index = with_sample_index(dm.train_set)[position]
    assert index == position + 1 and torch.equal(sample[0], dm.train_set[position + 1][0])
    labels = dm.train_labels()
    for _, targets, index in dm.train_dataloader():
        assert position not in index.tolist() and torch.equal(labels[index], targets)


def test_a_module_that_builds_its_own_train_loader_cannot_give_indices(roots):
    class OwnLoader(CIFAR100DataModule):
        def train_dataloader(self):
            return []

    dm = OwnLoader(str(roots["cifar"]), num_workers=0)
    with pytest.raises(
        TypeError,
        match=r"OwnLoader cannot give sample indices: .*OwnLoader.train_dataloader .*fix|"
        r"OwnLoader cannot give sample indices: .*builds_sample_index = True",
    ):
        dm.enable_sample_index()
    assert not dm.sample_index


@pytest.mark.parametrize("name", ["cifar", "scenes", "coco"])
def test_ddp_shards_carry_the_positions_of_their_samples(roots, name):
    """As Lightning prepares the train loader for rank r of 2 (its distributed sampler injected): each rank's
    indices name the samples it holds, and the two ranks' indices are disjoint shards of 0..N-1."""
    from tests.data.test_coco import _ddp_trainer, _lightning_train_loader

    shards = []
    for rank in (0, 1):
        dm = MODULES[name](roots, batch_size=2, drop_last=False)
        dm.enable_sample_index()
        _, loader = _lightning_train_loader(dm, _ddp_trainer(rank))
        seen = []
        for batch in loader:
            for k, i in enumerate(batch[-1].tolist()):
                image, target = _sample_of(batch, k)
                ref_image, ref_target = dm.train_set[i]
                assert torch.equal(image, ref_image)
                assert _same(target, torch.tensor(ref_target) if isinstance(ref_target, int) else ref_target)
            seen += batch[-1].tolist()
        shards.append(set(seen))
    assert shards[0].isdisjoint(shards[1]) or name == "coco"  # grouping may repeat an image to fill a batch
    assert shards[0] | shards[1] == set(range(dm.num_train_samples()))
