"""The datamodule ↔ task protocol: every classification datamodule satisfies it, ``require_protocol`` names what
is missing, and ``example_batch`` gives real training batches without touching any global random state."""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

import diffkd.data
from diffkd.data import ClassificationData, DistillDataModule, require_protocol
from diffkd.data.base import ClassificationDataModule
from diffkd.data.cifar import CIFAR100DataModule
from diffkd.data.fashion_mnist import FashionMNISTDataModule
from diffkd.data.image_folder import ImageFolderDataModule
from diffkd.data.imagenet import ImageNetDataModule
from diffkd.data.protocol import preserved_rng_state, protocol_members
from tests.helpers.fake_data import write_cifar100, write_fashion_mnist, write_image_folder
from tests.helpers.fake_imagenet import write_tiny_imagenet


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("protocol")
    write_cifar100(base / "cifar", n_train=20, n_test=10)
    write_fashion_mnist(base / "fmnist", n_train=30, n_test=10)
    write_image_folder(base / "folder", classes=("a", "b"), per_class=3, size=40)
    write_tiny_imagenet(base / "imagenet", n_classes=2, per_class=2, size=(40, 48))
    return {
        "cifar": base / "cifar",
        "fmnist": base / "fmnist",
        "folder": base / "folder",
        "imagenet": base / "imagenet",
    }


def _make(name: str, roots: dict[str, Path], **kw) -> ClassificationDataModule:
    if name == "cifar":
        return CIFAR100DataModule(str(roots["cifar"]), batch_size=4, num_workers=0, download=False, **kw)
    if name == "fmnist":
        return FashionMNISTDataModule(str(roots["fmnist"]), batch_size=4, download=False, debian_dir=None, **kw)
    if name == "folder":
        return ImageFolderDataModule(str(roots["folder"]), image_size=32, batch_size=4, num_workers=0, **kw)
    # RandAugment and RandomErasing: timm draws from Python's `random` as well as torch
    kw = {"auto_augment": "rand-m9-mstd0.5", "re_prob": 0.5, **kw}
    return ImageNetDataModule(str(roots["imagenet"]), image_size=32, batch_size=4, num_workers=0, **kw)


ALL = ["cifar", "fmnist", "folder", "imagenet"]
SHAPES = {"cifar": (3, 32, 32), "fmnist": (1, 28, 28), "folder": (3, 32, 32), "imagenet": (3, 32, 32)}


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def _draws() -> tuple:
    """One number from each global generator (CUDA only where it is initialised)."""
    cuda = torch.rand(2, device="cuda").tolist() if torch.cuda.is_initialized() else None
    return torch.rand(3).tolist(), random.random(), np.random.rand(3).tolist(), cuda


# ----------------------------------------------------------------------------------------------- the protocols
def test_protocols_are_exported_and_declare_the_members() -> None:
    assert diffkd.data.DistillDataModule is DistillDataModule and diffkd.data.require_protocol is require_protocol
    assert protocol_members(DistillDataModule) == {"batch_size": "attribute", "example_batch": "method"}
    assert protocol_members(ClassificationData) == {
        "batch_size": "attribute",
        "example_batch": "method",
        "num_classes": "attribute",
        "in_chans": "attribute",
        "image_size": "attribute",
        "loss_label_smoothing": "attribute",
        "batch_transform": "method",
    }


@pytest.mark.parametrize("name", ALL)
def test_every_classification_datamodule_satisfies_the_protocol(roots, name) -> None:
    dm = _make(name, roots)
    assert isinstance(dm, ClassificationData) and isinstance(dm, DistillDataModule)
    assert require_protocol(dm, ClassificationData, "the task's datamodule") is dm
    assert (dm.in_chans, dm.image_size) == SHAPES[name][:2]
    assert isinstance(dm.batch_size, int) and dm.num_classes == {"cifar": 100, "fmnist": 10}.get(name, 2)
    assert dm.loss_label_smoothing == 0.0 and dm.batch_transform() is None


def test_imagenet_protocol_members_keep_their_recipe(roots) -> None:
    dm = _make("imagenet", roots, label_smoothing=0.1)
    assert dm.loss_label_smoothing == 0.1 and dm.batch_transform() is None
    mixed = _make("imagenet", roots, label_smoothing=0.1, mixup=0.8)
    assert mixed.loss_label_smoothing == 0.0 and mixed.batch_transform() is not None


class _OnlyBatchSize:
    batch_size = 8

    def batch_transform(self) -> None:
        return None

    example_batch = None  # a method set to None is blocked, as typing's protocols treat it


def test_require_protocol_names_the_missing_members() -> None:
    with pytest.raises(TypeError) as err:
        require_protocol(_OnlyBatchSize(), ClassificationData, "ClassificationDistillation's datamodule")
    msg = str(err.value)
    assert msg.startswith(
        "ClassificationDistillation's datamodule must satisfy diffkd.data.protocol.ClassificationData"
    )
    assert "_OnlyBatchSize lacks attributes num_classes, in_chans, image_size, loss_label_smoothing" in msg
    assert "methods example_batch()" in msg and "batch_transform()" not in msg.split("lacks")[1]
    assert "diffkd.data.base.ClassificationDataModule" in msg  # the fix
    with pytest.raises(TypeError, match=r"DistillDataModule.*lacks methods example_batch\(\)"):
        require_protocol(_OnlyBatchSize(), DistillDataModule, "the task")
    with pytest.raises(TypeError, match=r"no datamodule \(got None\)"):
        require_protocol(None, DistillDataModule, "the task")


def test_require_protocol_does_not_run_properties(tmp_path) -> None:
    """A datamodule whose data are not there yet passes: no property (no folder scan) is evaluated."""
    dm = ImageFolderDataModule(str(tmp_path / "not_yet"), num_workers=0)
    with pytest.raises(FileNotFoundError):
        _ = dm.num_classes
    assert require_protocol(dm, ClassificationData, "the task") is dm


# ------------------------------------------------------------------------------------------------ example_batch
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("set_up", [False, True])
def test_example_batch_is_a_real_training_batch(roots, name, set_up) -> None:
    dm = _make(name, roots)
    if set_up:
        dm.setup("fit")
    x, y = dm.example_batch(3)
    assert dm.train_set is not None  # it set itself up when needed
    assert x.shape == (3, *SHAPES[name]) and x.dtype == torch.float32 and x.device.type == "cpu"
    assert torch.equal(y, torch.as_tensor([int(dm.train_set[i][1]) for i in range(3)]))  # the first three
    assert x.std() > 0.3  # normalised
    assert dm.example_batch()[0].shape == (2, *SHAPES[name])


@pytest.mark.parametrize("name", ALL)
def test_example_batch_leaves_every_random_state_unchanged(roots, name) -> None:
    dm = _make(name, roots)
    _seed_all(11)
    expected = _draws()
    _seed_all(11)
    dm.example_batch(4)  # also sets up the data sets
    dm.example_batch(2)
    assert _draws() == expected


@pytest.mark.parametrize("name", ALL)
def test_seeded_training_batches_are_the_same_with_or_without_example_batch(roots, name) -> None:
    def first_batches(call_example: bool) -> list[torch.Tensor]:
        dm = _make(name, roots)
        _seed_all(3)
        if call_example:
            dm.example_batch()
        return [x for x, _ in dm.train_dataloader()]

    for a, b in zip(first_batches(False), first_batches(True), strict=True):
        assert torch.equal(a, b)


def test_example_batch_uses_the_transforms_and_collate_of_the_train_loader(roots) -> None:
    """With a deterministic train transform the example is exactly the first items, collated by `collate_fn`."""

    class Tagged(ImageFolderDataModule):
        def collate_fn(self):
            return lambda items: ("tagged", default_collate(items))

    crop = [{"_target_": "torchvision.transforms.v2.CenterCrop", "size": 32}]
    dm = Tagged(str(roots["folder"]), image_size=32, num_workers=0, batch_size=4, train_transform=crop)
    tag, (x, y) = dm.example_batch(3)
    assert tag == "tagged" and next(iter(dm.train_dataloader()))[0] == "tagged"
    expected = default_collate([dm.train_set[i] for i in range(3)])
    assert torch.equal(x, expected[0]) and torch.equal(y, expected[1])


def test_example_batch_size_errors(roots) -> None:
    dm = _make("cifar", roots)
    with pytest.raises(ValueError, match="train split has 20 samples"):
        dm.example_batch(21)
    with pytest.raises(ValueError, match="size=0"):
        dm.example_batch(0)
    with pytest.raises(ValueError, match="choose 'train' or 'val'"):
        dm.example_batch(2, split="test")
    images, targets = dm.example_batch(3, split="val")  # the val split, through the val transform
    val_images, val_targets = next(iter(dm.val_dataloader()))
    torch.testing.assert_close(images, val_images[:3])
    assert torch.equal(targets, val_targets[:3])


# ----------------------------------------------------------------------------------------- the gpu_preload path
def _windows(image: torch.Tensor, padding: int) -> list[torch.Tensor]:
    """Every crop of the zero-padded uint8 image (C, H, W) as RandomCrop(H, padding) gives it, flipped or not."""
    h, w = image.shape[-2:]
    padded = F.pad(image, [padding] * 4)
    crops = [padded[:, i : i + h, j : j + w] for i in range(2 * padding + 1) for j in range(2 * padding + 1)]
    return crops + [c.flip(-1) for c in crops]


@pytest.mark.parametrize("name", ["cifar", "fmnist"])
@pytest.mark.parametrize("set_up", [False, True])
def test_example_batch_with_gpu_preload(roots, name, set_up) -> None:
    dm = _make(name, roots, gpu_preload=True)
    if set_up:
        dm.setup("fit")
    _seed_all(5)
    expected_draws = _draws()
    _seed_all(5)
    x, y = dm.example_batch(4)
    assert _draws() == expected_draws
    images, targets = dm.device_data["train"]  # preloaded (on the CPU without a trainer)
    assert x.device == images.device and x.shape == (4, *SHAPES[name]) and x.dtype == torch.float32
    assert torch.equal(y, targets[:4])
    padding, _ = dm.train_augmentation()
    mean, std = torch.tensor(dm.mean).view(-1, 1, 1), torch.tensor(dm.std).view(-1, 1, 1)
    for b in range(4):  # each example image is one crop/flip of training image b, normalised
        pixels = (x[b] * std + mean) * 255
        assert any(torch.allclose(pixels, c.float(), atol=1e-3) for c in _windows(images[b], padding)), b
    again, _ = dm.example_batch(4)
    assert torch.equal(x, again)  # a fixed generator: the same example every time


def test_example_batch_with_gpu_preload_follows_the_trainer(roots) -> None:
    """The device loader's memory format and device come from the trainer; the example ignores the shard."""
    dm = _make("cifar", roots, gpu_preload=True)
    dm.trainer = SimpleNamespace(
        strategy=SimpleNamespace(root_device=torch.device("cpu")),
        distributed_sampler_kwargs={"rank": 1, "num_replicas": 2},
        lightning_module=SimpleNamespace(channels_last=True),
    )
    x, y = dm.example_batch(3)
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y, dm.device_data["train"][1][:3])  # the first samples, not rank 1's shard


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["cifar", "fmnist"])
def test_example_batch_on_cuda_keeps_the_cuda_generators(roots, name) -> None:
    dm = _make(name, roots, gpu_preload=True)
    dm.trainer = SimpleNamespace(
        strategy=SimpleNamespace(root_device=torch.device("cuda", 0)),
        distributed_sampler_kwargs={},
        lightning_module=SimpleNamespace(channels_last=False),
    )
    torch.cuda.init()
    torch.cuda.manual_seed_all(9)
    _seed_all(9)
    expected = _draws()
    torch.cuda.manual_seed_all(9)
    _seed_all(9)
    x, y = dm.example_batch()
    assert x.device.type == "cuda" and y.device.type == "cuda"
    assert _draws() == expected


# ------------------------------------------------------------------------------------------ preserved_rng_state
def test_preserved_rng_state_restores_torch_python_and_numpy() -> None:
    _seed_all(1)
    expected = _draws()
    _seed_all(1)
    with preserved_rng_state():
        _draws()
        torch.manual_seed(99)
        random.seed(99)
        np.random.seed(99)
    assert _draws() == expected
    _seed_all(1)
    with pytest.raises(RuntimeError), preserved_rng_state():
        _draws()
        raise RuntimeError("restored on errors too")
    assert _draws() == expected
