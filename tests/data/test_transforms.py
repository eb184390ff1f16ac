"""Transforms as configuration (``data.train_transform`` / ``data.val_transform``): the defaults are bit-identical
to the pipelines the datamodules always had (tensors and random draws), both config forms build, Hydra hands them
over either way, and every mistake names the key and the fix."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from timm.data.transforms import RandomResizedCropAndInterpolation
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

from diffkd.data.cifar import CIFAR100_MEAN, CIFAR100_STD, CIFAR100DataModule
from diffkd.data.fashion_mnist import FASHION_MNIST_MEAN, FASHION_MNIST_STD, FashionMNISTDataModule
from diffkd.data.image_folder import IMAGENET_MEAN, IMAGENET_STD, ImageFolderDataModule
from diffkd.data.imagenet import ImageNetDataModule
from diffkd.data.transforms import build_transform, check_transform_output, describe_spec
from tests.conftest import compose_config
from tests.helpers.fake_data import write_cifar100, write_fashion_mnist, write_image_folder
from tests.helpers.fake_imagenet import write_tiny_imagenet

CROP = {"_target_": "torchvision.transforms.v2.RandomCrop", "size": 32, "padding": 4}
FLIP = {"_target_": "torchvision.transforms.v2.RandomHorizontalFlip"}


@pytest.fixture(scope="module")
def cifar(tmp_path_factory) -> dict:
    return write_cifar100(tmp_path_factory.mktemp("cifar"), n_train=70, n_test=20)


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory) -> dict:
    return write_fashion_mnist(tmp_path_factory.mktemp("fmnist"), n_train=100, n_test=30)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> dict:
    return write_image_folder(tmp_path_factory.mktemp("folder"), classes=("cat", "dog"), per_class=5, size=40)


def _rng_states() -> tuple:
    return torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()


def _assert_same_states(a: tuple, b: tuple) -> None:
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and np.array_equal(a[2], b[2])


def _assert_same_sequence(new: DataLoader, old: DataLoader, epochs: int = 2, seed: int = 1234) -> None:
    """Seeded, both loaders give the same tensors, epoch after epoch, and leave the same random states."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    states = _rng_states()
    new_batches = []
    for _ in range(epochs):
        new_batches += list(new)
    new_states = _rng_states()
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    _assert_same_states(states, _rng_states())
    old_batches = []
    for _ in range(epochs):
        old_batches += list(old)
    assert len(new_batches) == len(old_batches) > 0
    for (x_new, y_new), (x_old, y_old) in zip(new_batches, old_batches, strict=True):
        assert torch.equal(x_new, x_old) and torch.equal(y_new, y_old)
    _assert_same_states(new_states, _rng_states())  # the same random numbers were drawn


# ---------------------------------------------------------------------------- defaults == the old pipelines
class _OldCIFAR(Dataset):
    """What CIFAR100DataModule built before transforms were configurable: torchvision's CIFAR item (a PIL image
    of the HWC pixels) through RandomCrop(32, 4) + flip + ToTensor + Normalize (train) or ToTensor + Normalize."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, train: bool) -> None:
        self.images, self.labels = images, labels
        normalize = [T.ToTensor(), T.Normalize(CIFAR100_MEAN, CIFAR100_STD)]
        augment = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if train else []
        self.transform = T.Compose([*augment, *normalize])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


class _OldFashionMNIST(Dataset):
    """What FashionMNISTDataModule built before: whole batches of uint8 tensors, crop offsets (B, 2) then flips (B,)
    drawn from the global torch RNG, zero-padded crop, mirror, then (x - 255·mean) · (1 / (255·std))."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, padding: int, flip: bool) -> None:
        self.images = torch.from_numpy(images).unsqueeze(1)
        self.labels = torch.from_numpy(labels)
        self.padding, self.flip = padding, flip
        self.mean = torch.tensor(FASHION_MNIST_MEAN, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
        self.scale = 1.0 / (torch.tensor(FASHION_MNIST_STD, dtype=torch.float32).view(1, -1, 1, 1) * 255.0)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitems__(self, indices: list[int]):
        idx = torch.as_tensor(indices, dtype=torch.long)
        x, p = self.images[idx], self.padding
        if p:
            offsets = torch.randint(0, 2 * p + 1, (len(idx), 2))
            padded = F.pad(x, [p, p, p, p])
            x = torch.stack([padded[b, :, i : i + 28, j : j + 28] for b, (i, j) in enumerate(offsets.tolist())])
        if self.flip:
            flips = torch.randint(0, 2, (len(idx),)).bool()
            x = torch.where(flips.view(-1, 1, 1, 1), x.flip(-1), x)
        x = x.float().sub_(self.mean).mul_(self.scale)
        return list(zip(x.unbind(0), self.labels[idx].unbind(0)))


def _old_loader(dataset: Dataset, batch_size: int, train: bool) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=train, drop_last=train, num_workers=0)


def test_cifar_default_transforms_are_bit_identical_to_the_old_pipeline(cifar) -> None:
    dm = CIFAR100DataModule(str(cifar["root"]), batch_size=16, num_workers=0, download=False)
    dm.setup()
    old_train = _OldCIFAR(cifar["train_images"], cifar["train_labels"], train=True)
    # the transforms (the loader's order and seeds are diffkd.data.resumable's, tested there)
    _assert_same_sequence(_old_loader(dm.train_set, 16, train=True), _old_loader(old_train, 16, train=True), epochs=3)
    old_val = _OldCIFAR(cifar["test_images"], cifar["test_labels"], train=False)
    _assert_same_sequence(dm.val_dataloader(), _old_loader(old_val, 16, train=False), epochs=1)


def test_fashion_mnist_default_transforms_are_bit_identical_to_the_old_pipeline(fmnist) -> None:
    dm = FashionMNISTDataModule(str(fmnist["root"]), batch_size=32, download=False, debian_dir=None)
    dm.setup()
    old_train = _OldFashionMNIST(fmnist["train_images"], fmnist["train_labels"], padding=2, flip=True)
    _assert_same_sequence(_old_loader(dm.train_set, 32, train=True), _old_loader(old_train, 32, train=True), epochs=3)
    old_val = _OldFashionMNIST(fmnist["test_images"], fmnist["test_labels"], padding=0, flip=False)
    _assert_same_sequence(dm.val_dataloader(), _old_loader(old_val, 32, train=False), epochs=1)


def test_image_folder_default_is_torchvision_image_folder(folder) -> None:
    """The shared folder scan + default transforms give what torchvision's ImageFolder gave: files, order, labels,
    tensors and random draws."""
    dm = ImageFolderDataModule(str(folder["root"]), image_size=32, batch_size=4, num_workers=0)
    dm.setup()
    normalize = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    old_train = ImageFolder(
        str(folder["train"]), T.Compose([T.RandomResizedCrop(32), T.RandomHorizontalFlip(), *normalize])
    )
    old_val = ImageFolder(str(folder["val"]), T.Compose([T.Resize(int(32 / 0.875)), T.CenterCrop(32), *normalize]))
    assert [(str(folder["train"] / p), y) for p, y in dm.train_set.samples] == old_train.samples
    assert dm.train_set.classes == old_train.classes and dm.train_set.class_to_idx == old_train.class_to_idx
    _assert_same_sequence(_old_loader(dm.train_set, 4, train=True), _old_loader(old_train, 4, train=True))
    _assert_same_sequence(dm.val_dataloader(), _old_loader(old_val, 4, train=False), epochs=1)


# ---------------------------------------------------------------------------------------------- the list form
def _cifar(cifar: dict, **kw) -> CIFAR100DataModule:
    return CIFAR100DataModule(str(cifar["root"]), batch_size=8, num_workers=0, download=False, **kw)


def test_list_form_appends_to_image_to_dtype_normalize(cifar) -> None:
    dm = _cifar(cifar, train_transform=[CROP, FLIP])
    dm.setup()
    steps = dm.train_set.transform.transforms
    assert [type(t) for t in steps] == [v2.RandomCrop, v2.RandomHorizontalFlip, v2.ToImage, v2.ToDtype, v2.Normalize]
    assert steps[0].padding == [4, 4, 4, 4] and steps[-1].mean == list(CIFAR100_MEAN)
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32
    # the same draws as the default pipeline, on the same PIL images: the same crops and flips
    torch.manual_seed(0)
    new = dm.train_set[0][0]
    torch.manual_seed(0)
    default = _cifar(cifar)
    default.setup()
    torch.testing.assert_close(new, default.train_set[0][0], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("given", "appended"),
    [
        ([T.ToTensor()], [v2.Normalize]),  # v1 ToTensor: already float
        ([v2.PILToTensor()], [v2.ToDtype, v2.Normalize]),
        ([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)], [v2.Normalize]),
        ([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * 3, [0.5] * 3)], []),
        ([T.Compose([T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])], []),  # looks inside a Compose
    ],
)
def test_list_form_appends_only_what_is_missing(given, appended) -> None:
    tf = build_transform(given, key="k", is_training=True, image_size=32, mean=(0.1,) * 3, std=(0.2,) * 3)
    assert [type(t) for t in tf.transforms[len(given) :]] == appended
    out = tf(Image.fromarray(np.full((32, 32, 3), 128, np.uint8)))
    assert out.dtype == torch.float32 and out.shape == (3, 32, 32)


def test_hydra_hands_the_list_over_built_or_not(cifar) -> None:
    """Recursive instantiation (the default) gives built objects, `_recursive_: false` gives `_target_` mappings,
    a Python caller may give either: the same transform every way."""
    cfg = OmegaConf.create(
        {
            "_target_": "diffkd.data.cifar.CIFAR100DataModule",
            "data_dir": str(cifar["root"]),
            "num_workers": 0,
            "download": False,
            "train_transform": [CROP, FLIP],
        }
    )
    outputs = []
    for dm in (instantiate(cfg), instantiate(cfg, _recursive_=False), _cifar(cifar, train_transform=[CROP, FLIP])):
        dm.setup()
        torch.manual_seed(7)
        outputs.append(torch.stack([dm.train_set[i][0] for i in range(5)]))
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])


def test_command_line_override_of_the_real_config(cifar, tmp_path) -> None:
    cfg = compose_config(
        [
            "data=cifar100",
            f"paths.data_dir={cifar['root']}",
            "data.num_workers=0",
            "data.download=false",
            "data.train_transform=[{_target_:torchvision.transforms.v2.RandomCrop,size:32,padding:4}]",
            "data.val_transform={crop_pct:1.0}",
        ]
    )
    dm = instantiate(cfg.data)
    dm.setup()
    assert type(dm.train_set.transform.transforms[0]) is v2.RandomCrop
    assert dm.example_batch()[0].shape == (2, 3, 32, 32)
    assert dm.val_set[0][0].shape == (3, 32, 32)
    for name in ("cifar100", "fashion_mnist", "image_folder", "imagenet"):  # every data config has the two keys
        data = compose_config([f"data={name}", "data.root=/x"] if name == "image_folder" else [f"data={name}"]).data
        assert data.train_transform is None and data.val_transform is None


def test_image_folder_augmentation_is_configurable(folder) -> None:
    """The ImageNet-style RandomResizedCrop default can be replaced (digits, text, small images)."""
    small = [{"_target_": "torchvision.transforms.v2.Resize", "size": [32, 32]}]
    dm = ImageFolderDataModule(
        str(folder["root"]),
        image_size=32,
        num_workers=0,
        batch_size=4,
        train_transform=[*small, {"_target_": "torchvision.transforms.v2.RandomCrop", "size": 32, "padding": 2}],
        val_transform=small,
    )
    dm.setup()
    names = [type(t).__name__ for t in dm.train_set.transform.transforms]
    assert "RandomResizedCrop" not in names and names[:2] == ["Resize", "RandomCrop"]
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32)
    image = Image.open(folder["val_files"][0]).convert("RGB").resize((32, 32), Image.BILINEAR)
    expected = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)(T.ToTensor()(image))
    torch.testing.assert_close(dm.val_set[0][0], expected, atol=0.05, rtol=0)  # resampling differs a little


def test_fashion_mnist_configured_transforms_get_grey_pil_images(fmnist) -> None:
    identity = [{"_target_": "torchvision.transforms.v2.Identity"}]
    dm = FashionMNISTDataModule(
        str(fmnist["root"]),
        batch_size=16,
        download=False,
        debian_dir=None,
        train_transform=identity,
        val_transform=identity,
    )
    default = FashionMNISTDataModule(str(fmnist["root"]), batch_size=16, download=False, debian_dir=None)
    dm.setup()
    default.setup()
    x, _ = dm.val_set[3]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    torch.testing.assert_close(x, default.val_set[3][0], atol=1e-5, rtol=0)  # same normalisation, other order
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (16, 1, 28, 28) and yb.dtype == torch.int64


# ---------------------------------------------------------------------------------------------- the timm form
def test_timm_form_defaults_to_the_data_set(folder) -> None:
    dm = ImageFolderDataModule(
        str(folder["root"]), image_size=32, num_workers=0, train_transform={"scale": [0.5, 1.0], "hflip": 0.0}
    )
    train, val = dm.transforms()
    rrc = train.transforms[0]
    assert isinstance(rrc, RandomResizedCropAndInterpolation) and rrc.size == (32, 32) and rrc.scale == (0.5, 1.0)
    assert not any(isinstance(t, T.RandomHorizontalFlip) for t in train.transforms)
    norm = train.transforms[-1]
    assert torch.allclose(norm.mean, torch.tensor(IMAGENET_MEAN)) and torch.allclose(
        norm.std, torch.tensor(IMAGENET_STD)
    )
    assert isinstance(val.transforms[0], T.Resize)  # the default val transform: Resize + CenterCrop
    dm.setup()
    assert dm.example_batch()[0].shape == (2, 3, 32, 32)


def test_timm_form_for_the_val_split_and_grey_images(fmnist) -> None:
    dm = FashionMNISTDataModule(
        str(fmnist["root"]),
        download=False,
        debian_dir=None,
        val_transform={"crop_pct": 1.0, "interpolation": "bicubic"},
    )
    dm.setup()
    x, _ = dm.val_set[0]
    assert x.shape == (1, 28, 28)  # is_training=false, input_size=28, the grey mean/std
    resize = dm.val_set.transform.transforms[0]
    assert resize.interpolation == T.InterpolationMode.BICUBIC


def test_imagenet_configured_transform_replaces_the_recipe(tmp_path) -> None:
    root = write_tiny_imagenet(tmp_path, n_classes=2, per_class=2, size=(40, 48))
    dm = ImageNetDataModule(
        str(root), image_size=32, batch_size=2, num_workers=0, auto_augment="rand-m9-mstd0.5", mixup=0.8,
        train_transform=[{"_target_": "torchvision.transforms.v2.RandomResizedCrop", "size": 32, "scale": [0.5, 1]}],
    )  # fmt: skip
    names = [type(t).__name__ for t in dm.train_transform().transforms]
    assert names == ["RandomResizedCrop", "ToImage", "ToDtype", "Normalize"]
    assert dm.batch_transform() is not None  # Mixup stays
    assert "RandAugment" in [
        type(t).__name__
        for t in ImageNetDataModule(str(root), auto_augment="rand-m9-mstd0.5").train_transform().transforms
    ]
    dm.setup()
    assert dm.example_batch()[0].shape == (2, 3, 32, 32)


# ---------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("which", ["train_transform", "val_transform"])
@pytest.mark.parametrize("module", ["cifar", "fmnist"])
def test_gpu_preload_with_a_configured_transform_is_an_error(cifar, fmnist, which, module) -> None:
    kw = {"gpu_preload": True, which: [FLIP]}
    with pytest.raises(ValueError) as err:
        if module == "cifar":
            _cifar(cifar, **kw)
        else:
            FashionMNISTDataModule(str(fmnist["root"]), download=False, debian_dir=None, **kw)
    msg = str(err.value)
    assert "data.gpu_preload=true" in msg and f"data.{which} is set" in msg
    assert "data.gpu_preload=false" in msg and f"data.{which}=null" in msg


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("RandomCrop", r"data.train_transform is the string 'RandomCrop'; it must be null .* a mapping .* or a list"),
        (3, r"data.train_transform is a int"),
        ([], "empty list"),
        (
            [{"size": 32}],
            r"data.train_transform\[0\] is a mapping without _target_ .*directly under data.train_transform",
        ),
        ([FLIP, 7], r"data.train_transform\[1\] is a int \(7\), not a transform"),
        ({"flip": 0.5}, r"unknown timm create_transform argument\(s\) \['flip'\]; accepted: input_size, is_training"),
        ({"separate": True}, "separate=true is not supported"),
        (
            [{"_target_": "torchvision.transforms.v2.RandomCropp"}],
            r"data.train_transform\[0\]: cannot build .*RandomCropp",
        ),
        ([{"_target_": "torchvision.transforms.v2.RandomCrop", "sise": 3}], r"\[0\]: cannot build .*sise"),
    ],
)
def test_malformed_values_name_the_key_and_the_fix(cifar, spec, match) -> None:
    with pytest.raises((TypeError, ValueError), match=match):
        _cifar(cifar, train_transform=spec).setup()


def test_outputs_that_are_not_float_images_of_the_right_shape(cifar, folder) -> None:
    normalize = [{"_target_": "torchvision.transforms.v2.Normalize", "mean": [0.5] * 3, "std": [0.5] * 3}]
    back_to_pil = [
        {"_target_": "torchvision.transforms.ToTensor"},
        *normalize,
        {"_target_": "torchvision.transforms.v2.ToPILImage"},
    ]
    with pytest.raises(
        TypeError, match=r"data.train_transform returns a Image, not a tensor: end the list with ToImage"
    ):
        _cifar(cifar, train_transform=back_to_pil).setup()
    with pytest.raises(
        ValueError, match=r"data.train_transform fails on the first train image: TypeError: Normalize\(\) does"
    ):
        _cifar(cifar, train_transform=normalize).setup()  # Normalize on the PIL image
    uint8_normalize = [{"_target_": "torchvision.transforms.v2.ToImage"}, *normalize]
    with pytest.raises(ValueError, match=r"data.val_transform fails on the first val image: .*ToDtype\(float32"):
        _cifar(cifar, val_transform=uint8_normalize).setup()
    grey = [
        {"_target_": "torchvision.transforms.v2.Grayscale"},
        {"_target_": "torchvision.transforms.ToTensor"},
        {"_target_": "torchvision.transforms.v2.Normalize", "mean": [0.5], "std": [0.5]},
    ]
    with pytest.raises(ValueError, match=r"shape \(1, 32, 32\), but this data set gives .* \(3, 32, 32\)"):
        _cifar(cifar, train_transform=grey).setup()
    with pytest.raises(ValueError, match=r"returns 28×28 images, but image_size is 32: crop or resize to 32") as err:
        _cifar(cifar, train_transform=[{"_target_": "torchvision.transforms.v2.CenterCrop", "size": 28}]).setup()
    assert "data.image_size" not in str(err.value)  # CIFAR's size is fixed
    dm = ImageFolderDataModule(str(folder["root"]), image_size=32, num_workers=0, val_transform={"input_size": 28})
    with pytest.raises(ValueError, match=r"or set data\.image_size=28"):
        dm.setup()


def test_check_transform_output_directly() -> None:
    check_transform_output(torch.zeros(3, 8, 8), key="k", in_chans=3, image_size=8)
    with pytest.raises(TypeError, match=r"k returns torch\.uint8 images, not float"):
        check_transform_output(torch.zeros(3, 8, 8, dtype=torch.uint8), key="k", in_chans=3, image_size=8)


def test_describe_spec() -> None:
    assert describe_spec(None) == "default"
    assert describe_spec([CROP, v2.RandomHorizontalFlip()]) == "[RandomCrop, RandomHorizontalFlip]"
    assert describe_spec({"scale": [0.5, 1.0]}) == "timm create_transform(scale=[0.5, 1.0])"


def test_configured_transforms_are_checked_without_touching_the_random_state(cifar) -> None:
    dm = _cifar(cifar, train_transform=[CROP, FLIP])
    torch.manual_seed(2)
    expected = torch.rand(4)
    torch.manual_seed(2)
    dm.setup()  # tries the transform on the first image
    assert torch.equal(torch.rand(4), expected)


def test_repository_configs_still_build(tmp_path: Path, cifar) -> None:
    cfg = compose_config(["data=cifar100", f"paths.data_dir={cifar['root']}", "data.download=false"])
    dm = instantiate(cfg.data)
    assert dm.transform_specs == {"train": None, "val": None}
