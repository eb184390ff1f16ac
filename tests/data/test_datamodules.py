"""DataModules on small files written in the real on-disk formats (no network, no real data sets)."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from diffkd.data.base import DataNotFoundError
from diffkd.data.cifar import CIFAR100_MEAN, CIFAR100_STD, CIFAR100DataModule
from diffkd.data.fashion_mnist import (
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    FashionMNISTDataModule,
    InMemoryImageDataset,
    read_idx,
)
from diffkd.data.image_folder import IMAGENET_MEAN, IMAGENET_STD, ImageFolderDataModule
from diffkd.data.usable import MixedSizeError
from tests.helpers.fake_data import write_cifar100, write_fashion_mnist, write_idx, write_image_folder


def _range(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[float, float]:
    """Smallest and largest value a [0, 1] pixel can take after Normalize(mean, std)."""
    lo = min(-m / s for m, s in zip(mean, std))
    hi = max((1 - m) / s for m, s in zip(mean, std))
    return lo - 1e-4, hi + 1e-4


def _check_batch(x: torch.Tensor, y: torch.Tensor, shape: tuple[int, ...], num_classes: int, mean, std) -> None:
    assert x.shape == shape and x.dtype == torch.float32
    assert y.shape == shape[:1] and y.dtype == torch.int64
    assert int(y.min()) >= 0 and int(y.max()) < num_classes
    lo, hi = _range(mean, std)
    assert lo <= float(x.min()) and float(x.max()) <= hi
    assert float(x.std()) > 0.3  # normalised, not [0, 1] or [0, 255]


def _train_changes_val_does_not(dm, n: int = 6) -> None:
    torch.manual_seed(0)
    train_diff = [not torch.equal(dm.train_set[i][0], dm.train_set[i][0]) for i in range(n)]
    assert any(train_diff), "train augmentation gave identical images on two draws"
    for i in range(n):
        assert torch.equal(dm.val_set[i][0], dm.val_set[i][0])


# ------------------------------------------------------------------------------------------------ CIFAR-100
@pytest.fixture(scope="module")
def cifar(tmp_path_factory) -> dict:
    return write_cifar100(tmp_path_factory.mktemp("cifar"), n_train=70, n_test=40)


def test_fake_cifar_pickles_have_the_real_keys(cifar):
    with open(cifar["train"], "rb") as f:
        as_bytes = pickle.load(f, encoding="bytes")
    assert set(as_bytes) == {b"data", b"fine_labels", b"coarse_labels", b"filenames", b"batch_label"}
    assert as_bytes[b"data"].dtype == np.uint8 and as_bytes[b"data"].shape == (70, 3072)
    with open(cifar["meta"], "rb") as f:
        meta = pickle.load(f, encoding="latin1")  # how torchvision reads it: Python-2 str -> str
    assert set(meta) == {"fine_label_names", "coarse_label_names"} and len(meta["fine_label_names"]) == 100


def test_cifar100_batches(cifar):
    dm = CIFAR100DataModule(str(cifar["root"]), batch_size=16, num_workers=0, download=False)
    assert (dm.num_classes, dm.in_chans, dm.image_size) == (100, 3, 32)
    dm.setup("fit")
    train, val = dm.train_dataloader(), dm.val_dataloader()
    assert len(train) == 70 // 16  # drop_last
    assert len(val) == 3  # 16 + 16 + 8, nothing dropped
    x, y = next(iter(train))
    _check_batch(x, y, (16, 3, 32, 32), 100, CIFAR100_MEAN, CIFAR100_STD)
    xs, ys = zip(*val)
    assert xs[-1].shape[0] == 8
    assert torch.equal(torch.cat(ys), torch.from_numpy(cifar["test_labels"]))
    # val is exactly ToTensor + Normalize of the stored pixels (also checks the R, G, B plane order)
    mean, std = torch.tensor(CIFAR100_MEAN).view(3, 1, 1), torch.tensor(CIFAR100_STD).view(3, 1, 1)
    raw = torch.from_numpy(cifar["test_images"]).permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(torch.cat(xs) * std + mean, raw, atol=1e-5, rtol=0)
    _train_changes_val_does_not(dm)


def test_cifar100_skips_md5_but_real_download_is_md5_checked(cifar, tmp_path, monkeypatch):
    # torchvision's own class rejects the re-written files (md5 mismatch) ...
    with pytest.raises(RuntimeError, match="not found or corrupted"):
        torchvision.datasets.CIFAR100(str(cifar["root"]), train=False, download=False)
    # ... ours only asks that they exist and reads them with torchvision's loader
    dm = CIFAR100DataModule(str(cifar["root"]), num_workers=0, download=False)
    assert dm.files_present()
    dm.setup()
    assert len(dm.val_set) == 40 and len(dm.val_set.classes) == 100

    # a download goes through torchvision's md5-checked download_and_extract_archive, on prepare_data only
    calls = []

    def fake_download(url, download_root, filename=None, md5=None, **kw):
        calls.append((url, filename, md5))
        write_cifar100(download_root, n_train=8, n_test=8)

    monkeypatch.setattr("diffkd.data.cifar.download_and_extract_archive", fake_download)
    dm = CIFAR100DataModule(str(tmp_path / "new"), num_workers=0, download=True)
    dm.prepare_data()
    dm.prepare_data()  # files now present: no second download
    tv = torchvision.datasets.CIFAR100
    assert calls == [(tv.url, tv.filename, tv.tgz_md5)]
    assert tv.url == "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
    dm.setup()
    assert len(dm.train_set) == 8


@pytest.mark.parametrize("present", [(), ("train", "meta")])
def test_cifar100_missing_files_error(tmp_path, present):
    if present:
        folder = tmp_path / "cifar-100-python"
        folder.mkdir()
        for name in present:
            (folder / name).write_bytes(b"")
    dm = CIFAR100DataModule(str(tmp_path), download=False)
    with pytest.raises(FileNotFoundError) as err:
        dm.setup()
    msg = str(err.value)
    assert isinstance(err.value, DataNotFoundError)
    assert "cifar-100-python/{train,test,meta}" in msg
    assert str(tmp_path / "cifar-100-python") in msg
    assert "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz" in msg
    assert "data.download=true" in msg


# -------------------------------------------------------------------------------------------- Fashion-MNIST
def test_fake_fashion_mnist_is_readable_by_torchvision(tmp_path):
    info = write_fashion_mnist(tmp_path, n_train=20, n_test=10, layout="torchvision")
    ds = torchvision.datasets.FashionMNIST(str(tmp_path), train=True, download=False)
    assert torch.equal(ds.data, torch.from_numpy(info["train_images"]))
    assert torch.equal(ds.targets, torch.from_numpy(info["train_labels"]))
    for path in info["files"]:  # our reader: gzipped and plain alike
        assert read_idx(path).dtype == torch.uint8


@pytest.mark.parametrize("layout", ["torchvision", "debian"])
def test_fashion_mnist_found_in_each_layout(tmp_path, layout, caplog):
    data_dir, debian_dir = tmp_path / "data", tmp_path / "debian"
    info = write_fashion_mnist(data_dir if layout == "torchvision" else debian_dir, 50, 20, layout=layout)
    dm = FashionMNISTDataModule(str(data_dir), batch_size=16, download=False, debian_dir=debian_dir)
    with caplog.at_level(logging.INFO, logger="diffkd.data.fashion_mnist"):
        dm.setup()
    expected = "Debian package dataset-fashion-mnist" if layout == "debian" else "torchvision layout"
    assert dm.source == expected
    assert all(p.parent == info["dir"] for p in dm.files.values())
    log = caplog.text
    assert "search order" in log and str(debian_dir) in log and str(data_dir / "FashionMNIST" / "raw") in log
    assert f"using {expected}" in log and str(dm.files[("train", "images")]) in log
    x, _ = dm.val_set.batch(range(20))
    mean, std = FASHION_MNIST_MEAN[0], FASHION_MNIST_STD[0]
    raw = torch.from_numpy(info["test_images"]).float().unsqueeze(1) / 255
    torch.testing.assert_close(x * std + mean, raw, atol=1e-5, rtol=0)


def test_fashion_mnist_debian_comes_first(tmp_path):
    debian = write_fashion_mnist(tmp_path / "debian", 20, 10, layout="debian", seed=1)
    write_fashion_mnist(tmp_path / "data", 30, 10, layout="torchvision", seed=2)
    dm = FashionMNISTDataModule(str(tmp_path / "data"), download=False, debian_dir=tmp_path / "debian")
    dm.setup()
    assert dm.source.startswith("Debian") and len(dm.train_set) == 20
    dm = FashionMNISTDataModule(str(tmp_path / "data"), download=False, debian_dir=None)  # Debian search off
    dm.setup()
    assert dm.source == "torchvision layout" and len(dm.train_set) == 30
    assert not torch.equal(dm.val_set.images[:, 0], torch.from_numpy(debian["test_images"]))


def test_fashion_mnist_batches(tmp_path):
    write_fashion_mnist(tmp_path, n_train=100, n_test=40)
    dm = FashionMNISTDataModule(str(tmp_path), batch_size=32, download=False, debian_dir=None)
    assert (dm.num_classes, dm.in_chans, dm.image_size) == (10, 1, 28)
    dm.setup()
    train, val = dm.train_dataloader(), dm.val_dataloader()
    assert dm.num_workers == 0 and len(train) == 3 and len(val) == 2
    x, y = next(iter(train))
    _check_batch(x, y, (32, 1, 28, 28), 10, FASHION_MNIST_MEAN, FASHION_MNIST_STD)
    assert sum(b[0].shape[0] for b in val) == 40
    _train_changes_val_does_not(dm)
    # whole-batch path (__getitems__) == per-item path
    xb, yb = dm.val_set.batch([3, 1, 4])
    assert torch.equal(xb, torch.stack([dm.val_set[i][0] for i in (3, 1, 4)]))
    assert torch.equal(yb, torch.stack([dm.val_set[i][1] for i in (3, 1, 4)]))


def test_fashion_mnist_subset_and_image_size(tmp_path):
    write_fashion_mnist(tmp_path, n_train=100, n_test=20)
    dm = FashionMNISTDataModule(str(tmp_path), batch_size=8, download=False, debian_dir=None, subset=40, image_size=32)
    dm.setup()
    assert len(dm.train_set) == 40 and len(dm.train_dataloader()) == 5
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 1, 32, 32)
    assert dm.val_set[0][0].shape == (1, 32, 32)


def test_in_memory_dataset_crop_matches_torchvision_semantics():
    images = torch.arange(2 * 4 * 4, dtype=torch.uint8).view(2, 4, 4)
    ds = InMemoryImageDataset(images, torch.tensor([0, 1]), (0.0,), (1 / 255,), padding=1, flip=True)
    torch.manual_seed(0)
    seen = {tuple(ds[0][0].flatten().tolist()) for _ in range(200)}
    # every output is a 4x4 window of the zero-padded 6x6 image, possibly mirrored: 9 offsets x 2 flips
    padded = torch.nn.functional.pad(images[0], [1, 1, 1, 1]).float()
    windows = set()
    for dy in range(3):
        for dx in range(3):
            w = padded[dy : dy + 4, dx : dx + 4]
            windows |= {tuple(w.flatten().tolist()), tuple(w.flip(-1).flatten().tolist())}
    assert seen <= windows and len(seen) > 9


def test_fashion_mnist_download_when_missing(tmp_path, monkeypatch):
    calls = []

    def fake_download(self):
        calls.append(self.root)
        write_fashion_mnist(self.root, 16, 8, layout="torchvision")

    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "download", fake_download)
    dm = FashionMNISTDataModule(str(tmp_path), batch_size=8, download=True, debian_dir=tmp_path / "no-debian")
    dm.prepare_data()
    dm.prepare_data()  # found now: no second download
    assert calls == [str(tmp_path)]
    dm.setup()
    assert dm.source == "torchvision layout" and len(dm.train_set) == 16


@pytest.mark.parametrize("download", [False, True])
def test_fashion_mnist_missing_error(tmp_path, monkeypatch, download):
    def no_network(self):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "download", no_network)
    dm = FashionMNISTDataModule(str(tmp_path / "data"), download=download, debian_dir=tmp_path / "debian")
    with pytest.raises(FileNotFoundError) as err:
        dm.setup()
    msg = str(err.value)
    assert str(tmp_path / "debian") in msg and str(tmp_path / "data" / "FashionMNIST" / "raw") in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "/usr/share/datasets/fashion-mnist" in msg
    assert "torchvision download" in msg and "data.download=true" in msg
    assert "train-images-idx3-ubyte" in msg and "t10k-labels-idx1-ubyte" in msg
    assert ("download: off" in msg) is (not download)
    assert ("failed: Error downloading train-images-idx3-ubyte.gz" in msg) is download


def test_read_idx_rejects_other_files(tmp_path):
    bad = tmp_path / "x-idx1-ubyte"
    bad.write_bytes(b"\x00\x00\x0d\x01" + b"\x00" * 8)  # float IDX
    with pytest.raises(ValueError, match="not an IDX file of unsigned bytes"):
        read_idx(bad)
    good = write_idx(tmp_path / "y-idx2-ubyte.gz", np.zeros((3, 2), np.uint8))
    assert read_idx(good).shape == (3, 2)
    truncated = write_idx(tmp_path / "z-idx2-ubyte", np.zeros((3, 2), np.uint8))
    truncated.write_bytes(truncated.read_bytes()[:-1])
    with pytest.raises(ValueError, match="header says"):
        read_idx(truncated)


# ------------------------------------------------------------------------------------------------ ImageFolder
def test_image_folder_batches(tmp_path):
    info = write_image_folder(tmp_path, classes=("cat", "dog", "owl"), per_class=4, size=40)
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()  # hidden folders are not classes
    dm = ImageFolderDataModule(str(tmp_path), image_size=32, batch_size=5, num_workers=0)
    assert dm.num_classes == 3 and dm.classes == ["cat", "dog", "owl"]  # before setup
    dm.setup()
    train, val = dm.train_dataloader(), dm.val_dataloader()
    assert len(train) == 12 // 5 and len(val) == 3
    x, y = next(iter(train))
    _check_batch(x, y, (5, 3, 32, 32), 3, IMAGENET_MEAN, IMAGENET_STD)
    assert dm.train_set.classes == info["classes"] and dm.val_set.classes == info["classes"]
    assert torch.equal(torch.cat([b[1] for b in val]), torch.tensor([0] * 4 + [1] * 4 + [2] * 4))
    _train_changes_val_does_not(dm)


def test_image_folder_class_mismatch(tmp_path):
    write_image_folder(tmp_path, classes=("a", "b", "c"), val_classes=("a", "b", "d"), per_class=1, size=8)
    dm = ImageFolderDataModule(str(tmp_path), image_size=8, num_workers=0)
    with pytest.raises(ValueError) as err:
        dm.setup()
    msg = str(err.value)
    assert "['a', 'b', 'c']" in msg and "['a', 'b', 'd']" in msg
    assert "only in train: ['c']" in msg and "only in val: ['d']" in msg


@pytest.mark.parametrize("missing", ["root", "val", "classes", "empty_class"])
def test_image_folder_missing_data(tmp_path, missing):
    root = tmp_path / "mydata"
    if missing == "val":
        write_image_folder(root, per_class=1, size=8, splits=("train",))
    elif missing == "classes":
        (root / "train").mkdir(parents=True)
        (root / "val").mkdir()
    elif missing == "empty_class":
        write_image_folder(root, per_class=1, size=8)
        (root / "train" / "zzz").mkdir()
        (root / "val" / "zzz").mkdir()
    dm = ImageFolderDataModule(str(root), num_workers=0)
    with pytest.raises(FileNotFoundError) as err:
        dm.setup()
    msg = str(err.value)
    assert f"{root / 'train'}/<class>/<image>.jpg" in msg and f"{root / 'val'}/<class>/<image>.jpg" in msg
    expected = {
        "root": f"missing {root / 'train'} and {root / 'val'}",
        "val": f"missing {root / 'val'}",
        "classes": f"no class sub-folders in {root / 'train'}",
        "empty_class": "zzz",
    }[missing]
    assert expected in msg
    if missing == "root":
        with pytest.raises(FileNotFoundError, match="Expected layout"):
            _ = dm.num_classes


def test_data_not_found_error_pickles():
    err = DataNotFoundError("X", ["/a", Path("/b")], "layout", ["fix it"])
    again = pickle.loads(pickle.dumps(err))
    assert isinstance(again, FileNotFoundError) and str(again) == str(err)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_transform_giving_several_sizes_names_them_instead_of_stack(tmp_path, num_workers):
    write_image_folder(tmp_path, classes=("a", "b"), per_class=2, size=16)  # 16 × 16 and 16 × 24 (W) images
    resize = [{"_target_": "torchvision.transforms.v2.Resize", "size": 16}]  # shorter side only: sizes stay apart
    dm = ImageFolderDataModule(
        str(tmp_path), image_size=16, batch_size=2, val_batch_size=4, num_workers=num_workers, val_transform=resize
    )
    with pytest.raises(MixedSizeError) as info:
        next(iter(dm.val_dataloader()))
    message = str(info.value)
    assert "the val split's images are of 2 sizes: shape (3, 16, 16) (2 images" in message
    assert "shape (3, 16, 24) (2 images" in message and "batches of data.val_batch_size=4" in message
    fix = (
        "Fix: make data.val_transform give one size, e.g. end it with Resize([16, 16]) or CenterCrop(16) "
        "(data.image_size), or set it to null for the default transform"
    )
    assert f"{fix}, or set data.val_batch_size=1" in message  # (a worker's copy adds the traceback)
    assert "stack expects" not in message.split("Original Traceback")[0]
    with pytest.raises(MixedSizeError) as info:
        dm.example_batch(2, "val")
    assert "batches of the models' dry-run example batch of 2 stack them" in str(info.value)
    assert str(info.value).endswith(fix)
