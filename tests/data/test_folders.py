"""The class-folder scan shared by ImageFolderDataModule and ImageNet's ``folders`` layout: torchvision
``ImageFolder`` semantics, one wording of the errors, the same samples from both datamodules."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
from torchvision.datasets import ImageFolder

from diffkd.data import folders
from diffkd.data.base import DataNotFoundError
from diffkd.data.folders import ClassFolders, find_images, list_classes
from diffkd.data.image_folder import ImageFolderDataModule
from diffkd.data.image_folder import list_classes as list_classes_reexported
from diffkd.data.imagenet import ImageNetDataModule, ImageNetLayoutError
from tests.helpers.fake_data import write_image_folder
from tests.helpers.fake_imagenet import write_tiny_imagenet


def _nested_tree(root: Path) -> Path:
    """Class folders with images in sub-folders whose names sort differently as paths and as a tree walk."""
    info = write_image_folder(root, classes=("a", "b"), per_class=2, size=8)
    for split in ("train", "val"):
        for sub in ("sub", "sub-x", "sub/deeper"):
            folder = root / split / "a" / sub
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copy(info[f"{split}_files"][0], folder / "img.jpg")
        (root / split / "a" / "notes.txt").write_text("not an image")
        (root / split / "b" / "UPPER.PNG").write_bytes(info[f"{split}_files"][1].read_bytes())
    return root


def test_find_images_follows_torchvision_order(tmp_path) -> None:
    root = _nested_tree(tmp_path)
    ours = [(str(root / "train" / path), label) for path, label in ImageFolderDataModule(str(root)).folders.scan()[0]]
    assert ours == ImageFolder(str(root / "train")).samples
    assert find_images(root / "train" / "a") == [
        "img_0.jpg", "img_1.png", "sub/img.jpg", "sub-x/img.jpg", "sub/deeper/img.jpg",
    ]  # fmt: skip


def test_image_folder_and_imagenet_scan_alike(tmp_path) -> None:
    root = write_tiny_imagenet(tmp_path, n_classes=3, per_class=3, size=(16, 16))
    image_folder = ImageFolderDataModule(str(root), num_workers=0)
    imagenet = ImageNetDataModule(str(root), layout="folders", num_workers=0)
    assert image_folder.folders.scan() == (imagenet.scan().train, imagenet.scan().val)
    assert image_folder.classes == imagenet.classes
    assert list_classes is list_classes_reexported and folders.IMG_EXTENSIONS[:3] == (".jpeg", ".jpg", ".png")


def test_imagenet_val_may_lack_a_train_class_image_folder_may_not(tmp_path) -> None:
    root = write_tiny_imagenet(tmp_path, n_classes=3, per_class=2, size=(8, 8))
    shutil.rmtree(root / "val" / sorted(p.name for p in (root / "val").iterdir())[-1])
    dm = ImageNetDataModule(str(root), num_workers=0)
    dm.setup()
    assert dm.num_classes == 3 and sorted(set(dm.val_set.targets)) == [0, 1]
    with pytest.raises(ValueError, match=r"train and val class folders differ .*both must hold the same classes"):
        ImageFolderDataModule(str(root), num_workers=0).setup()


def test_class_mismatch_lists_are_shortened(tmp_path) -> None:
    scan = ClassFolders(tmp_path / "t", tmp_path / "v", dataset="X", layout=["x"], remedies=[])
    train = [f"c{i:02d}" for i in range(30)]
    msg = scan.class_mismatch(train, [*train[:5], "zzz"])
    assert "... (30 in all)]" in msg and "only in val: ['zzz']" in msg and "only in train: ['c05'" in msg
    assert scan.class_mismatch(train, train) is None


def test_flat_folder_hint_in_both_datamodules(tmp_path) -> None:
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    shutil.copy(write_image_folder(tmp_path / "src", per_class=1, size=8)["train_files"][0], tmp_path / "train")
    with pytest.raises(DataNotFoundError, match=r"no class sub-folders in .*holds images directly: sort them into one"):
        ImageFolderDataModule(str(tmp_path), num_workers=0).setup()
    with pytest.raises(
        DataNotFoundError, match=r"holds images directly: sort them into wnid folders, or use layout='list'"
    ):
        ImageNetDataModule(str(tmp_path), layout="folders", num_workers=0).setup()


def test_empty_class_folder_names_it_in_both(tmp_path) -> None:
    write_image_folder(tmp_path, classes=("a", "b"), per_class=1, size=8)
    (tmp_path / "val" / "b" / "img_0.jpg").unlink()
    for dm in (ImageFolderDataModule(str(tmp_path), num_workers=0), ImageNetDataModule(str(tmp_path), num_workers=0)):
        with pytest.raises(DataNotFoundError, match=r"no images \(jpeg, jpg, png, ...\) in .*val/b"):
            dm.setup()


def test_datamodules_and_errors_pickle(tmp_path) -> None:
    """Spawned processes (DDP spawn, workers) get the datamodules and their errors by pickling."""
    root = write_tiny_imagenet(tmp_path, n_classes=2, per_class=1, size=(8, 8))
    for dm in (ImageFolderDataModule(str(root), num_workers=0), ImageNetDataModule(str(root), num_workers=0)):
        assert type(pickle.loads(pickle.dumps(dm))) is type(dm)
    shutil.copytree(root / "val" / sorted(p.name for p in (root / "val").iterdir())[0], root / "val" / "n09999999")
    with pytest.raises(ImageNetLayoutError) as err:
        ImageNetDataModule(str(root), num_workers=0).setup()
    assert str(pickle.loads(pickle.dumps(err.value))) == str(err.value)
