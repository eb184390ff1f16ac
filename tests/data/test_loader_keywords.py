"""The loader keywords written once (:func:`diffkd.data.loader_keywords.loader_keywords`): the signatures that
configs, ``accepts`` and Hydra read keep every keyword, place and default, and calls behave as written-out ones."""

from __future__ import annotations

import inspect
from typing import Any

import pytest

from diffkd.data.cifar import CIFAR100DataModule
from diffkd.data.cityscapes import CityscapesDataModule
from diffkd.data.coco import COCODataModule
from diffkd.data.fashion_mnist import FashionMNISTDataModule
from diffkd.data.image_folder import ImageFolderDataModule
from diffkd.data.imagenet import ImageNetDataModule
from diffkd.data.loader_keywords import LOADER_KEYWORDS, loader_keywords
from diffkd.data.segmentation_folder import SegmentationFolderDataModule

# (class, the parameters before the loader keywords, their defaults, where drop_last stands)
CASES = [
    (CIFAR100DataModule, ["data_dir"], (64, None, 2, False, True), "download"),
    (FashionMNISTDataModule, ["data_dir"], (128, None, 0, False, True), "download"),
    (ImageFolderDataModule, ["root", "train_dir", "val_dir", "image_size"], (64, None, 2, False, True), "mean"),
    (ImageNetDataModule, ["data_dir", "layout"], (32, None, 8, False, True), "image_size"),
    (CityscapesDataModule, ["root"], (2, 1, 4, False, True), "verify"),
    (SegmentationFolderDataModule, ["root", "num_classes"], (8, None, 0, False, True), "verify"),
    (COCODataModule, ["root"], (2, 2, 4, False, False), "min_box_size"),
]


@pytest.mark.parametrize(
    ("cls", "before", "defaults", "after_drop_last"), CASES, ids=lambda c: getattr(c, "__name__", "")
)
def test_signature_shows_each_loader_keyword_in_place(cls: type, before: list[str], defaults: tuple, after_drop_last):
    params = inspect.signature(cls).parameters
    names = list(params)
    assert names[: len(before)] == before
    assert names[len(before) : len(before) + 4] == list(LOADER_KEYWORDS[:4])
    assert names[names.index("drop_last") + 1] == after_drop_last
    assert tuple(params[k].default for k in LOADER_KEYWORDS) == defaults
    assert all(p.kind is not inspect.Parameter.VAR_KEYWORD for p in params.values())


def test_defaults_keywords_and_positions_reach_the_module(tmp_path):
    dm = FashionMNISTDataModule(str(tmp_path), debian_dir=None)
    assert (dm.batch_size, dm.val_batch_size, dm.num_workers, dm.pin_memory, dm.drop_last) == (128, 128, 0, False, True)
    dm = CIFAR100DataModule(str(tmp_path), 16, 8, 0, True, False, download=False)
    assert (dm.batch_size, dm.val_batch_size, dm.num_workers, dm.pin_memory, dm.drop_last) == (16, 8, 0, True, False)
    assert dm.download is False
    dm = CityscapesDataModule(str(tmp_path), batch_size=4, drop_last=False, train_split="train")
    assert (dm.batch_size, dm.val_batch_size, dm.drop_last) == (4, 1, False)


def test_unknown_keywords_and_bad_values_are_refused(tmp_path):
    with pytest.raises(TypeError, match="batchsize"):
        CIFAR100DataModule(str(tmp_path), batchsize=8)
    with pytest.raises(ValueError, match=r"data\.batch_size must be >= 1"):
        CIFAR100DataModule(str(tmp_path), batch_size=0)


def test_decorator_refuses_what_it_cannot_write():
    with pytest.raises(TypeError, match="missing default"):
        loader_keywords(after="root", batch_size=2)
    with pytest.raises(TypeError, match="unknown keyword"):
        loader_keywords(after="root", batch_size=2, num_workers=0, workers=1)

    class Plain:
        def __init__(self, root: str = "x") -> None:
            self.root = root

    with pytest.raises(TypeError, match=r"\*\*loader_options"):
        loader_keywords(after="root", batch_size=2, num_workers=0)(Plain)

    @loader_keywords(after="root", batch_size=2, num_workers=0)
    class Module:
        def __init__(self, root: str = "x", *, flag: bool = False, **loader_options: Any) -> None:
            self.root, self.flag, self.loader = root, flag, loader_options

    m = Module("r", 5, flag=True)
    assert (m.root, m.flag) == ("r", True)
    assert m.loader == {
        "batch_size": 5,
        "val_batch_size": None,
        "num_workers": 0,
        "pin_memory": False,
        "drop_last": True,
    }
