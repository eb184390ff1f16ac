"""ImageNetDataModule on tiny ImageNets written in both real layouts (JPEG files, wnid folders, list files)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from timm.data import Mixup
from timm.data.auto_augment import RandAugment
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation, ResizeKeepRatio
from torchvision import transforms as T

from diffkd.data.base import DataNotFoundError
from diffkd.data.imagenet import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageNetDataModule,
    ImageNetLayoutError,
    read_image_list,
)
from tests.helpers.fake_imagenet import IMAGENET_FIRST_WNIDS, write_tiny_imagenet


@pytest.fixture(scope="module")
def folders_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_imagenet(tmp_path_factory.mktemp("imagenet_folders"), layout="folders")


@pytest.fixture(scope="module")
def list_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_imagenet(tmp_path_factory.mktemp("imagenet_list"), layout="list")


def _dm(root: Path, **kwargs) -> ImageNetDataModule:
    kwargs = {"batch_size": 4, "num_workers": 0, **kwargs}
    return ImageNetDataModule(str(root), **kwargs)


def _steps(transform) -> list:
    return list(transform.transforms)


def _types(transform) -> list[type]:
    return [type(t) for t in _steps(transform)]


# ------------------------------------------------------------------------------------------ the helper


def test_fake_imagenet_layouts(folders_root: Path, list_root: Path) -> None:
    wnids = sorted(IMAGENET_FIRST_WNIDS[:3])
    assert sorted(p.name for p in (folders_root / "train").iterdir()) == wnids
    assert sorted(p.name for p in (folders_root / "val").iterdir()) == wnids
    assert len(list((folders_root / "train" / wnids[0]).glob("*.JPEG"))) == 4
    assert not (folders_root / "meta").exists()
    train = read_image_list(list_root / "meta" / "train.txt")
    val = read_image_list(list_root / "meta" / "val.txt")
    assert len(train) == 12 and len(val) == 6
    assert train[0] == (f"{wnids[0]}/{wnids[0]}_0.JPEG", 0)
    assert val[0] == ("ILSVRC2012_val_00000001.JPEG", 0)  # flat val/ as in the official list
    assert all((list_root / "train" / p).is_file() for p, _ in train)
    assert all((list_root / "val" / p).is_file() for p, _ in val)


# --------------------------------------------------------------------------------------------- batches


@pytest.mark.parametrize("layout", ["folders", "list"])
def test_batches_on_both_layouts(folders_root: Path, list_root: Path, layout: str) -> None:
    root = folders_root if layout == "folders" else list_root
    dm = _dm(root, val_batch_size=3)
    assert dm.num_classes == 3  # inferred before setup
    assert dm.resolved_layout() == layout
    assert (dm.in_chans, dm.image_size, dm.mean, dm.std) == (3, 224, IMAGENET_MEAN, IMAGENET_STD)
    dm.setup("fit")
    assert len(dm.train_set) == 12 and len(dm.val_set) == 6
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 224, 224) and x.dtype == torch.float32
    assert y.shape == (4,) and y.dtype == torch.int64 and y.min() >= 0 and y.max() < 3
    assert x.min() < -1 and x.max() > 1  # normalised
    vx, vy = next(iter(dm.val_dataloader()))
    assert vx.shape == (3, 3, 224, 224) and vx.dtype == torch.float32 and vy.dtype == torch.int64
    assert sorted(dm.val_set.targets) == [0, 0, 1, 1, 2, 2]
    if layout == "folders":
        assert dm.classes == sorted(IMAGENET_FIRST_WNIDS[:3])
    else:
        assert dm.classes is None


def test_labels_follow_sorted_wnids(folders_root: Path) -> None:
    dm = _dm(folders_root)
    dm.setup()
    for rel, label in dm.train_set.samples + dm.val_set.samples:
        assert dm.classes[label] == rel.split("/")[0]


def test_auto_prefers_list_files(tmp_path: Path) -> None:
    root = write_tiny_imagenet(tmp_path, n_classes=2, per_class=2, layout="folders")
    (root / "meta").mkdir()
    (root / "meta" / "train.txt").write_text(f"{IMAGENET_FIRST_WNIDS[0]}/{IMAGENET_FIRST_WNIDS[0]}_0.JPEG 0\n")
    (root / "meta" / "val.txt").write_text(f"{IMAGENET_FIRST_WNIDS[0]}/ILSVRC2012_val_00000001.JPEG 0\n")
    dm = _dm(root)
    assert dm.resolved_layout() == "list" and dm.num_classes == 1
    assert _dm(root, layout="folders").num_classes == 2


def test_num_classes_explicit_and_default(folders_root: Path, tmp_path: Path) -> None:
    assert _dm(folders_root, num_classes=1000).num_classes == 1000
    assert _dm(tmp_path / "nothing_here").num_classes == 1000  # data not there yet: ImageNet's 1000
    many = write_tiny_imagenet(tmp_path / "many", n_classes=12, per_class=1, size=(8, 8))
    dm = _dm(many)
    assert dm.num_classes == 12 and dm.classes[-2:] == ["n90000000", "n90000001"]


# ------------------------------------------------------------------------------------------ transforms


def test_default_transforms_are_b1() -> None:
    dm = _dm("unused")
    train = dm.train_transform()
    rrc = _steps(train)[0]
    assert isinstance(rrc, RandomResizedCropAndInterpolation)
    assert rrc.size == (224, 224) and rrc.scale == (0.08, 1.0) and rrc.ratio == pytest.approx((3 / 4, 4 / 3))
    assert _types(train)[1] is T.RandomHorizontalFlip and _steps(train)[1].p == 0.5
    assert not {RandAugment, RandomErasing, T.ColorJitter} & set(_types(train))
    assert [t.__name__ for t in _types(train)[-2:]] == ["MaybeToTensor", "Normalize"]
    val = dm.val_transform()
    resize, crop = _steps(val)[:2]
    assert isinstance(resize, T.Resize | ResizeKeepRatio) and resize.size in (256, [256], (256,))
    assert isinstance(crop, T.CenterCrop) and tuple(crop.size) == (224, 224)
    assert resize.interpolation == T.InterpolationMode.BILINEAR


def test_randaugment_random_erasing_and_color_jitter() -> None:
    train = _dm("unused", auto_augment="rand-m9-mstd0.5", re_prob=0.25, re_mode="pixel").train_transform()
    types = _types(train)
    assert RandAugment in types and RandomErasing in types
    ra = _steps(train)[types.index(RandAugment)]
    assert len(ra.ops) == 15 and ra.num_layers == 2 and ra.ops[0].magnitude == 9
    assert ra.ops[0].hparams["translate_const"] == 100  # int(224 * 0.45), as the official code
    erase = _steps(train)[types.index(RandomErasing)]
    assert erase.probability == 0.25 and erase.mode == "pixel"
    # ColorJitter only without RandAugment (timm and the official code drop it under RA)
    assert T.ColorJitter in _types(_dm("unused", color_jitter=0.4).train_transform())
    with_ra = _dm("unused", color_jitter=0.4, auto_augment="rand-m9-mstd0.5").train_transform()
    assert T.ColorJitter not in _types(with_ra)


def test_bicubic_interpolation() -> None:
    dm = _dm("unused", interpolation="bicubic")
    assert dm.val_transform().transforms[0].interpolation == T.InterpolationMode.BICUBIC
    assert _steps(dm.train_transform())[0].interpolation == T.InterpolationMode.BICUBIC


def test_augmented_batch(list_root: Path) -> None:
    dm = _dm(list_root, auto_augment="rand-m9-mstd0.5", re_prob=1.0)
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 224, 224) and torch.isfinite(x).all()


# ------------------------------------------------------------------------------------- mixup / smoothing


def test_mixup_batch_transform_soft_targets(folders_root: Path) -> None:
    dm = _dm(folders_root, mixup=0.8, cutmix=1.0, label_smoothing=0.1)
    mix = dm.batch_transform()
    assert isinstance(mix, Mixup) and dm.mixup_active
    assert (mix.mixup_alpha, mix.cutmix_alpha, mix.mix_prob, mix.switch_prob, mix.mode) == (0.8, 1.0, 1.0, 0.5, "batch")
    assert mix.num_classes == 3 and mix.label_smoothing == 0.1
    assert dm.loss_label_smoothing == 0.0 and dm.label_smoothing == 0.1
    torch.manual_seed(0)
    x, y = next(iter(dm.train_dataloader()))
    x_mixed, soft = mix(x.clone(), y)
    assert x_mixed.shape == x.shape
    assert soft.shape == (4, 3) and soft.dtype == torch.float32
    torch.testing.assert_close(soft.sum(1), torch.ones(4))
    assert soft.min() >= 0.1 / 3 - 1e-6


def test_label_smoothing_without_mixup() -> None:
    dm = _dm("unused", label_smoothing=0.1)
    assert dm.batch_transform() is None and not dm.mixup_active
    assert dm.loss_label_smoothing == 0.1
    assert _dm("unused").batch_transform() is None


def test_mixup_needs_even_full_batches() -> None:
    with pytest.raises(ValueError, match="even batch_size"):
        _dm("unused", mixup=0.8, batch_size=3)
    with pytest.raises(ValueError, match="drop_last=True"):
        _dm("unused", cutmix=1.0, drop_last=False)
    _dm("unused", mixup=0.8, batch_size=3, mixup_prob=0.0)  # never mixes: fine


# ---------------------------------------------------------------------------------------------- errors


def _both_layouts_shown(msg: str) -> None:
    assert 'layout="folders"' in msg and 'layout="list"' in msg
    assert "train/<wnid>/*.JPEG" in msg and "meta/train.txt" in msg and "meta/val.txt" in msg
    assert "relative to <root>/train/" in msg and "<root> = " in msg


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError) as err:
        _dm(tmp_path / "nope").setup()
    _both_layouts_shown(str(err.value))
    assert "layout='auto' found neither" in str(err.value)
    assert str(tmp_path / "nope" / "meta" / "train.txt") in str(err.value)
    with pytest.raises(DataNotFoundError, match="layout='folders': missing") as err:
        _dm(tmp_path / "nope", layout="folders").setup()
    _both_layouts_shown(str(err.value))


def test_folders_missing_val(tmp_path: Path) -> None:
    root = write_tiny_imagenet(tmp_path, n_classes=2, per_class=1, size=(8, 8))
    shutil.rmtree(root / "val")
    with pytest.raises(DataNotFoundError, match=r"missing .*val") as err:
        _dm(root).setup()
    _both_layouts_shown(str(err.value))


def test_list_missing_val_list(tmp_path: Path) -> None:
    root = write_tiny_imagenet(tmp_path, n_classes=2, per_class=1, size=(8, 8), layout="list")
    (root / "meta" / "val.txt").unlink()
    with pytest.raises(DataNotFoundError, match=r"meta/val\.txt") as err:
        _dm(root, layout="list").setup()
    _both_layouts_shown(str(err.value))


@pytest.mark.parametrize(
    ("line", "what"),
    [("n01440764/x.JPEG", "no label"), ("n01440764/x.JPEG zero", "word"), ("n01440764/x.JPEG -1", "negative")],
)
def test_malformed_list_line(tmp_path: Path, line: str, what: str) -> None:
    root = write_tiny_imagenet(tmp_path, n_classes=2, per_class=2, size=(8, 8), layout="list")
    lines = (root / "meta" / "train.txt").read_text().splitlines()
    lines.insert(2, line)
    (root / "meta" / "train.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(ImageNetLayoutError, match=r"train\.txt, line 3: expected '<relative path> <label>'") as err:
        _dm(root).setup()
    assert repr(line) in str(err.value), what
    _both_layouts_shown(str(err.value))
    assert isinstance(err.value, ValueError)


def test_empty_list_file(tmp_path: Path) -> None:
    root = write_tiny_imagenet(tmp_path, n_classes=2, per_class=1, size=(8, 8), layout="list")
    (root / "meta" / "val.txt").write_text("\n\n")
    with pytest.raises(ImageNetLayoutError, match="holds no") as err:
        _dm(root).setup()
    _both_layouts_shown(str(err.value))


def test_list_paths_relative_to_root_instead_of_train(tmp_path: Path) -> None:
    root = write_tiny_imagenet(tmp_path, n_classes=2, per_class=1, size=(8, 8), layout="list")
    path = root / "meta" / "train.txt"
    path.write_text("".join(f"train/{line}\n" for line in path.read_text().splitlines()))
    with pytest.raises(DataNotFoundError, match="relative to") as err:
        _dm(root).setup()
    assert "first entry of meta/train.txt" in str(err.value)
    _both_layouts_shown(str(err.value))


def test_flat_val_folder_with_folders_layout(tmp_path: Path) -> None:
    root = write_tiny_imagenet(tmp_path, n_classes=2, per_class=2, size=(8, 8), layout="list")
    with pytest.raises(DataNotFoundError, match="holds images directly") as err:
        _dm(root, layout="folders").setup()
    _both_layouts_shown(str(err.value))


def test_empty_class_folder(tmp_path: Path) -> None:
    root = write_tiny_imagenet(tmp_path, n_classes=2, per_class=1, size=(8, 8))
    (root / "train" / "n01530575").mkdir()
    with pytest.raises(DataNotFoundError, match=r"no images .*n01530575"):
        _dm(root).setup()


def test_val_class_missing_from_train(tmp_path: Path) -> None:
    root = write_tiny_imagenet(tmp_path, n_classes=2, per_class=1, size=(8, 8))
    shutil.copytree(root / "val" / IMAGENET_FIRST_WNIDS[0], root / "val" / "n09999999")
    with pytest.raises(ImageNetLayoutError, match="n09999999") as err:
        _dm(root).setup()
    _both_layouts_shown(str(err.value))


def test_label_beyond_num_classes(list_root: Path) -> None:
    with pytest.raises(ImageNetLayoutError, match="label 2 >= num_classes=2"):
        _dm(list_root, num_classes=2).setup()


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="layout"):
        _dm("unused", layout="lists")
    with pytest.raises(ValueError, match="interpolation"):
        _dm("unused", interpolation="lanczos")
    with pytest.raises(ValueError, match="label_smoothing"):
        _dm("unused", label_smoothing=1.0)


def test_layout_error_pickles() -> None:
    import pickle

    err = pickle.loads(pickle.dumps(ImageNetLayoutError("bad line", "/data/imagenet")))
    assert str(err).startswith("bad line\nExpected layout:") and "<root> = /data/imagenet" in str(err)
