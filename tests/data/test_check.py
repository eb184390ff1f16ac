"""Bad image files: ``python -m diffkd.data.check`` finds them up front, ``data.verify=true`` refuses to start with
them, ``data.skip_bad_images=true`` trains past them (counted across loader workers), and by default loading one
raises an error naming it."""

from __future__ import annotations

import json
import pickle
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from diffkd.check import main
from diffkd.data.base import BadImagesError, DataNotFoundError, ImageReadError, SkipBadImages, SkippedImageWarning
from diffkd.data.cityscapes import CityscapesDataModule
from diffkd.data.coco import COCODataModule
from diffkd.data.image_folder import ImageFolderDataModule
from diffkd.data.imagenet import ImageNetDataModule
from diffkd.data.usable import EmptySplitError
from diffkd.utils.instantiate import instantiate
from tests.conftest import compose_config
from tests.helpers.fake_cityscapes import FakeCityscapes, write_fake_cityscapes
from tests.helpers.fake_coco import FakeCoco, edit_annotations, write_fake_coco
from tests.helpers.fake_data import write_image_folder


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _empty(path: Path) -> Path:
    path.write_bytes(b"")
    return path


# ------------------------------------------------------------------------------------------ the data sets


@pytest.fixture(scope="module")
def clean_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("clean")
    write_image_folder(root, classes=("a", "b"), per_class=4, size=16)
    return root


@pytest.fixture
def bad_folder(clean_folder: Path, tmp_path: Path) -> tuple[Path, list[Path]]:
    """8 train images (a truncated JPEG and a 0-byte PNG among them, in different classes), 8 clean val ones."""
    root = Path(shutil.copytree(clean_folder, tmp_path / "folder"))
    bad = [_truncate(root / "train" / "a" / "img_0.jpg"), _empty(root / "train" / "b" / "img_1.png")]
    return root, bad


@pytest.fixture(scope="module")
def coco(tmp_path_factory: pytest.TempPathFactory) -> FakeCoco:
    return write_fake_coco(tmp_path_factory.mktemp("coco"))


@pytest.fixture
def bad_coco(coco: FakeCoco, tmp_path: Path) -> tuple[Path, list[Path]]:
    """A truncated train JPEG (image 9, kept for training) and a 0-byte val JPEG (image 285)."""
    root = Path(shutil.copytree(coco.root, tmp_path / "coco"))
    return root, [_truncate(root / "train2017" / f"{9:012d}.jpg"), _empty(root / "val2017" / f"{285:012d}.jpg")]


@pytest.fixture(scope="module")
def cityscapes(tmp_path_factory: pytest.TempPathFactory) -> FakeCityscapes:
    return write_fake_cityscapes(tmp_path_factory.mktemp("cityscapes"), size=(32, 64))


@pytest.fixture
def bad_cityscapes(cityscapes: FakeCityscapes, tmp_path: Path) -> tuple[FakeCityscapes, list[Path]]:
    """A truncated train image PNG and a 0-byte train label PNG (of two other samples)."""
    root = Path(shutil.copytree(cityscapes.root, tmp_path / "cityscapes"))
    fake = FakeCityscapes(root=root, size=cityscapes.size, keys=cityscapes.keys)
    keys = fake.keys["train"]
    return fake, [_truncate(fake.image_path("train", keys[0])), _empty(fake.label_path("train", keys[2]))]


def _folder_dm(root: Path, **kwargs) -> ImageFolderDataModule:
    return ImageFolderDataModule(str(root), **{"image_size": 16, "batch_size": 4, "num_workers": 0, **kwargs})


def _coco_dm(root: Path, **kwargs) -> COCODataModule:
    return COCODataModule(str(root), **{"num_workers": 0, "batch_size": 2, "hflip_prob": 0.0, **kwargs})


def _cityscapes_dm(root: Path, **kwargs) -> CityscapesDataModule:
    return CityscapesDataModule(str(root), **{"num_workers": 0, "batch_size": 2, "crop_size": (16, 32), **kwargs})


# ------------------------------------------------------------------------------------------ the command


def _run(args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture) -> tuple[int, str, dict]:
    out = tmp_path / "report.json"
    status = main([*args, "--workers", "2", "--json", str(out)])
    text = capsys.readouterr().out
    return status, text, json.loads(out.read_text())


def _errors(report: dict) -> dict[str, str]:
    return {e["path"]: e["kind"] for split in report["splits"].values() for e in split["errors"]}


def test_check_finds_exactly_the_bad_images(bad_folder, tmp_path, capsys) -> None:
    root, (truncated, empty) = bad_folder
    status, text, report = _run(["image_folder", "--root", str(root), "--set", "batch_size=4"], tmp_path, capsys)
    assert status == 1
    assert _errors(report) == {str(truncated): "truncated", str(empty): "empty"}
    assert report["ok"] is False and report["errors"] == 2 and report["splits"]["train"]["samples"] == 8
    assert str(truncated) in text and str(empty) in text and "empty file (0 bytes)" in text
    assert text.splitlines()[-1].startswith("FAILED: image_folder: 2 error(s)")
    assert "data.skip_bad_images=true" in text.splitlines()[-1]


def test_check_clean_set_exits_0_and_a_folder_means_image_folder(clean_folder, tmp_path, capsys) -> None:
    status, text, report = _run([str(clean_folder), "--splits", "val"], tmp_path, capsys)
    assert status == 0 and report["ok"] and list(report["splits"]) == ["val"]
    assert report["settings"]["root"] == str(clean_folder)
    assert text.splitlines()[-1] == "OK: image_folder: 8 samples in val, nothing bad"


def test_the_command_keeps_its_module_path(clean_folder, tmp_path) -> None:
    """``python -m diffkd.data.check`` runs the command line that now lives in ``diffkd.check``: same output, same
    exit status."""
    argv = [sys.executable, "-m", "diffkd.data.check", str(clean_folder), "--splits", "val", "--workers", "2"]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "OK: image_folder: 8 samples in val, nothing bad"


def test_check_notes_non_rgb_images_without_failing(clean_folder, tmp_path, capsys) -> None:
    root = Path(shutil.copytree(clean_folder, tmp_path / "grey"))
    grey = root / "val" / "b" / "img_0.jpg"
    Image.open(grey).convert("L").save(grey)
    status, text, report = _run(["image_folder", "--root", str(root), "--set", "batch_size=4"], tmp_path, capsys)
    assert status == 0 and report["notes"] == 1 and f"{grey}: mode L (converted to RGB on load)" in text


def test_check_imagenet_and_set_overrides(bad_folder, tmp_path, capsys) -> None:
    root, bad = bad_folder
    args = ["imagenet", "--data-dir", str(root), "--set", "layout=folders", "--set", "batch_size=4"]
    status, _, report = _run(args, tmp_path, capsys)
    assert status == 1 and set(_errors(report)) == {str(p) for p in bad}
    assert "data.layout=folders (--set)" in report["settings"]["overrides"]


def test_check_coco_images_and_boxes(bad_coco, tmp_path, capsys) -> None:
    root, (truncated, empty) = bad_coco
    status, text, report = _run(["coco", "--root", str(root)], tmp_path, capsys)
    assert status == 1 and _errors(report) == {str(truncated): "truncated", str(empty): "empty"}
    assert report["warnings"] == 0
    # a box leaving its image, and an image of another size than its json entry: warnings, still exit 1
    path = root / "annotations" / "instances_val2017.json"
    data = json.loads(path.read_text())
    data["annotations"][0]["bbox"] = [50.0, 4.0, 30.0, 20.0]  # image 139 is 64 px wide
    data["images"][1]["width"] = 41  # image 285 is 40 × 64, and unreadable: size unknown
    data["images"][3]["height"] = 50  # image 724 is 72 × 40
    path.write_text(json.dumps(data))
    status, text, report = _run(["coco", "--root", str(root), "--splits", "val"], tmp_path, capsys)
    warned = {(w["path"].rsplit("/", 1)[-1], w["kind"]) for w in report["splits"]["val"]["warnings"]}
    assert status == 1 and warned == {(f"{139:012d}.jpg", "box"), (f"{724:012d}.jpg", "size")}
    assert "1 box(es) [x, y, w, h] outside the 64×48 image (image id 139)" in text


def test_check_cityscapes_images_and_labels(bad_cityscapes, tmp_path, capsys) -> None:
    fake, (image, label) = bad_cityscapes
    status, text, report = _run(["cityscapes", "--root", str(fake.root)], tmp_path, capsys)
    assert status == 1 and _errors(report) == {str(image): "truncated", str(label): "empty"}
    assert f"{label}: label file: empty file (0 bytes)" in text
    # a label that decodes but does not fit its image (size, then mode)
    key = fake.keys["val"][0]
    Image.new("L", (32, 16)).save(fake.label_path("val", key))
    Image.new("RGB", (64, 32)).save(fake.label_path("val", fake.keys["val"][1]))
    status, text, report = _run(["cityscapes", "--root", str(fake.root), "--splits", "val"], tmp_path, capsys)
    assert status == 1 and set(_errors(report).values()) == {"label"}
    assert "label 32×16 px, its image 64×32 px: they differ in size" in text
    assert "single-channel 8-bit PNG, got PIL mode 'RGB'" in text


def test_check_in_memory_data_and_usage_errors(cifar_root, tmp_path, capsys) -> None:
    status, text, report = _run(
        ["cifar100", "--data-dir", str(cifar_root), "--set", "download=false"], tmp_path, capsys
    )
    assert status == 0 and report["ok"] and not report["splits"]["train"]["checked"]
    assert "nothing to decode" in text.splitlines()[-1]
    assert main(["no_such_data"]) == 2
    assert main(["image_folder"]) == 2 and "data.root is not set" in capsys.readouterr().err
    assert main(["image_folder", "--data-dir", str(tmp_path)]) == 2  # image_folder has root, not data_dir
    assert "has no data_dir (use --root)" in capsys.readouterr().err
    status = main(["image_folder", "--root", str(tmp_path / "nowhere"), "--json", str(tmp_path / "r.json")])
    assert status == 1 and json.loads((tmp_path / "r.json").read_text())["failure"].startswith("DataNotFoundError")


# ------------------------------------------------------------------------------------------ data.verify


def test_verify_from_the_config_raises_listing_every_bad_file(bad_folder, tmp_path) -> None:
    root, bad = bad_folder
    cfg = compose_config(["~experiment", "data=image_folder", f"data.root={root}", "data.verify=true"])
    assert cfg.data.skip_bad_images is False
    dm = instantiate(cfg.data)
    with pytest.raises(BadImagesError) as info:
        dm.setup("fit")
    message = str(info.value)
    assert all(f"train: {p}" in message for p in bad) and "2 bad file(s)" in message
    assert "data.skip_bad_images=true" in message and isinstance(info.value, ValueError)
    assert {issue.path for _, issue in pickle.loads(pickle.dumps(info.value)).issues} == {str(p) for p in bad}
    _folder_dm(root, verify=False).setup("fit")  # the default does not look


@pytest.mark.parametrize("kind", ["coco", "cityscapes"])
def test_verify_coco_and_cityscapes(kind, bad_coco, bad_cityscapes) -> None:
    if kind == "coco":
        root, bad = bad_coco
        dm = _coco_dm(root, verify=True)
    else:
        fake, bad = bad_cityscapes
        dm = _cityscapes_dm(fake.root, verify=True)
    with pytest.raises(BadImagesError) as info:
        dm.setup("fit")
    assert {issue.path for _, issue in info.value.issues} == {str(p) for p in bad}


def test_verify_with_skipping_raises_only_for_what_skipping_cannot_handle(bad_cityscapes) -> None:
    fake, _ = bad_cityscapes
    _cityscapes_dm(fake.root, verify=True, skip_bad_images=True).setup("fit")  # unreadable: will be skipped
    small = fake.label_path("val", fake.keys["val"][0])
    Image.new("L", (8, 8)).save(small)
    with pytest.raises(BadImagesError, match="does not skip") as info:
        _cityscapes_dm(fake.root, verify=True, skip_bad_images=True).setup("fit")
    assert [issue.path for _, issue in info.value.issues] == [str(small)]


# ------------------------------------------------------------------------------------------ skip_bad_images


def _epoch(loader) -> int:
    return sum(len(batch[1]) for batch in loader)


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("datamodule", [ImageFolderDataModule, ImageNetDataModule])
def test_skip_trains_through_a_full_epoch(bad_folder, datamodule, num_workers) -> None:
    root, bad = bad_folder
    dm = datamodule(str(root), image_size=16, batch_size=4, num_workers=num_workers, skip_bad_images=True)
    assert dm.skipped_images == {}  # before setup
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        shapes = [tuple(x.shape) for x, _ in dm.train_dataloader()]
    assert shapes == [(4, 3, 16, 16)] * 2  # every sample there, every batch full
    assert dm.skipped_images == {"train": 2, "val": 0}
    assert dm.bad_image_files == {"train": [str(p) for p in bad], "val": []}
    if num_workers == 0:  # worker processes warn on their own stderr
        messages = [str(w.message) for w in caught if issubclass(w.category, SkippedImageWarning)]
        assert len(messages) == 2 and all(any(str(p) in m for m in messages) for p in bad)
    _epoch(dm.train_dataloader())  # a second epoch meets the same files: counted once
    assert dm.skipped_images["train"] == 2


def test_skip_replaces_a_bad_sample_by_the_next_one(bad_folder) -> None:
    root, _ = bad_folder
    resize = [{"_target_": "torchvision.transforms.v2.Resize", "size": [16, 16]}]  # no random draws
    dm = _folder_dm(root, skip_bad_images=True, train_transform=resize)
    with pytest.warns(SkippedImageWarning, match=re.escape(str(root / "train" / "a" / "img_0.jpg"))):
        dm.setup("fit")  # which tries the configured transform on sample 0
    dataset = dm.train_set
    assert isinstance(dataset, SkipBadImages) and dataset.classes == ["a", "b"]  # attributes of the wrapped set
    x0, y0 = dataset[0]  # a/img_0.jpg is truncated: a/img_1.png instead
    assert torch.equal(x0, dataset[1][0]) and y0 == 0 and dataset.count == 1
    with pytest.warns(SkippedImageWarning, match=re.escape(f"{root / 'train' / 'b' / 'img_1.png'} (empty file")):
        x5, y5 = dataset[5]  # b/img_1.png is empty: b/img_2.jpg instead
    assert torch.equal(x5, dataset.dataset[6][0]) and y5 == 1 and dataset.count == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a file already met is not read (nor warned about) again
        assert torch.equal(dataset[0][0], x0)
    assert pickle.loads(pickle.dumps(dataset)).classes == ["a", "b"]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skip_coco(bad_coco, num_workers) -> None:
    root, (truncated, empty) = bad_coco
    dm = _coco_dm(root, num_workers=num_workers, skip_bad_images=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedImageWarning)
        ids = [t["image_id"] for _, targets in dm.train_dataloader() for t in targets]
        val_ids = [t["image_id"] for _, targets in dm.val_dataloader() for t in targets]
    assert 9 not in ids and 285 not in val_ids and len(val_ids) == 5  # the replacement's own id, not the bad one
    assert dm.bad_image_files == {"train": [str(truncated)], "val": [str(empty)]}
    assert dm.skipped_images == {"train": 1, "val": 1}


def test_skip_cityscapes_image_or_label(bad_cityscapes) -> None:
    fake, bad = bad_cityscapes
    dm = _cityscapes_dm(fake.root, skip_bad_images=True)
    with pytest.warns(SkippedImageWarning) as caught:
        images = [x for x, _ in dm.train_dataloader()]
    assert [tuple(x.shape) for x in images] == [(2, 3, 16, 32)] * 2
    assert dm.skipped_images == {"train": 2, "val": 0} and dm.bad_image_files["train"] == [str(p) for p in bad]
    assert {str(p) for p in bad} <= {m for w in caught for m in re.findall(r"skipping (\S+)", str(w.message))}


# ------------------------------------------------------------------------------------------ the default


@pytest.mark.parametrize("num_workers", [0, 2])
def test_default_raises_naming_the_file(clean_folder, bad_folder, cityscapes, bad_cityscapes, num_workers) -> None:
    root, (truncated, empty) = bad_folder
    shutil.copy(clean_folder / "train" / "a" / "img_0.jpg", truncated)  # one bad file left: that one is named
    with pytest.raises(ImageReadError, match=re.escape(f"{empty}: empty file") + ".*skip_bad_images=true"):
        _epoch(_folder_dm(root, num_workers=num_workers).train_dataloader())
    fake, (image, label) = bad_cityscapes
    shutil.copy(cityscapes.image_path("train", cityscapes.keys["train"][0]), image)
    with pytest.raises(ImageReadError, match=re.escape(f"cannot read label file {label}: empty file")):
        _epoch(_cityscapes_dm(fake.root, num_workers=num_workers).train_dataloader())


def test_default_names_a_label_that_does_not_fit(cityscapes, tmp_path) -> None:
    root = Path(shutil.copytree(cityscapes.root, tmp_path / "cityscapes"))
    label = root / "gtFine" / "val" / f"{cityscapes.keys['val'][0]}_gtFine_labelIds.png"
    Image.new("L", (8, 8)).save(label)
    with pytest.raises(ValueError, match=re.escape(str(label)) + ".*differ in size"):
        _cityscapes_dm(root).example_batch(1, "val")


# ------------------------------------------------------------------------------------------ usable splits


def _run_failing(args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture) -> tuple[int, str, str, dict]:
    out = tmp_path / "report.json"
    status = main([*args, "--workers", "2", "--json", str(out)])
    captured = capsys.readouterr()
    return status, captured.out, captured.err, json.loads(out.read_text())


def test_check_refuses_a_coco_split_without_annotations_as_training_does(coco, tmp_path, capsys) -> None:
    root = Path(shutil.copytree(coco.root, tmp_path / "coco"))
    path = edit_annotations(root, "train2017", lambda data: data.update(annotations=[]))
    with pytest.raises(EmptySplitError) as training:
        _coco_dm(root).setup("fit")
    status, out, err, report = _run_failing(["coco", "--root", str(root)], tmp_path, capsys)
    assert status == 1 and report["ok"] is False
    assert err.strip() == str(training.value)  # the same message, word for word
    assert f"the train split (train2017, {path}) has no usable sample" in err and "Fix: point data." in err
    assert out.splitlines()[-1] == "FAILED: coco: no usable sample in train (see above)"
    assert report["failure"].startswith("EmptySplitError: COCO: the train split")
    status, out, _, _ = _run_failing(["coco", "--root", str(root), "--splits", "val"], tmp_path, capsys)
    assert status == 0 and out.splitlines()[-1].startswith("OK: coco: 5 samples in val")  # val alone is usable


def test_check_counts_the_boxes_training_drops_per_reason(coco, tmp_path, capsys) -> None:
    root = Path(shutil.copytree(coco.root, tmp_path / "coco"))

    def degenerate(data: dict) -> None:
        data["annotations"][6]["bbox"][2] = 0.0  # image 36: zero width
        data["annotations"][7]["bbox"][3] = -3.0  # image 36: negative height; no box left, so 36 is left out
        data["annotations"][9]["bbox"][2] = 0.0  # image 49: its only box

    path = edit_annotations(root, "train2017", degenerate)
    status, text, report = _run(["coco", "--root", str(root), "--splits", "train"], tmp_path, capsys)
    assert status == 0 and report["warnings"] == 0  # dropped boxes are counted, not failed
    notes = [n["message"] for n in report["splits"]["train"]["notes"] if n["path"] == str(path)]
    assert notes == [
        "training (train2017): 2 boxes dropped: crowd region (iscrowd=1: never trained on, evaluation keeps it) "
        "(e.g. image id 25, annotation 4)",
        "training (train2017): 3 boxes dropped: zero or negative width or height (e.g. image id 36, annotation 7)",
        "training (train2017): 2 boxes dropped: at most data.min_box_size px wide or tall (after clamping to the "
        "image) (e.g. image id 34, annotation 5)",
        "training (train2017): 4 of 14 images left out of training: no annotation box > 1 px wide and tall (e.g. "
        "image id 30; data.remove_images_without_annotations)",
        "training (train2017): 1 training image with no box to train on (e.g. image id 80)",
    ]
    assert all(f"  note     {path}: {note}" in text for note in notes)
    dm = _coco_dm(root)
    dm.setup("fit")  # training counts the same
    assert [i.message for i in dm.box_usage.issues()] == notes


def test_check_names_a_duplicate_coco_image_id(coco, tmp_path, capsys) -> None:
    root = Path(shutil.copytree(coco.root, tmp_path / "coco"))
    path = edit_annotations(root, "val2017", lambda data: data["images"][2].update(id=139))
    status, out, err, _ = _run_failing(["coco", "--root", str(root), "--splits", "val"], tmp_path, capsys)
    assert status == 1 and out.splitlines()[-1] == "FAILED: coco could not be set up (see above)"
    assert err.startswith(f"{path}: image id 139 is duplicated: 2 entries of 'images' have it")
    assert "'file_name': '000000000632.jpg'" in err and "Fix: give every image entry its own id" in err
    assert "not in 'images'" not in err and "--data-dir" not in err


def _empty_split(kind: str, tmp_path: Path, coco: FakeCoco, cityscapes: FakeCityscapes) -> tuple[list[str], str]:
    """A copy of a data set whose val split has no sample: the checker's arguments and the folder it must name."""
    if kind == "image_folder":
        write_image_folder(tmp_path / "folder", classes=("a", "b"), per_class=2, size=16)
        for image in (tmp_path / "folder" / "val" / "b").iterdir():
            image.unlink()
        return ["image_folder", "--root", str(tmp_path / "folder")], str(tmp_path / "folder" / "val" / "b")
    if kind == "cityscapes":
        root = Path(shutil.copytree(cityscapes.root, tmp_path / "cityscapes"))
        for folder in (root / "leftImg8bit" / "val", root / "gtFine" / "val"):
            shutil.rmtree(folder)
            folder.mkdir()
        return ["cityscapes", "--root", str(root)], str(root / "leftImg8bit" / "val")
    root = tmp_path / "segmentation"
    for split in ("train", "val"):
        (root / split / "images").mkdir(parents=True)
        (root / split / "labels").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "train" / "images" / "a.png")
    Image.new("L", (8, 8)).save(root / "train" / "labels" / "a.png")
    return ["segmentation_folder", "--root", str(root), "--set", "num_classes=3"], str(root / "val" / "images")


@pytest.mark.parametrize("kind", ["image_folder", "cityscapes", "segmentation_folder"])
def test_check_and_setup_refuse_an_empty_split_alike(kind, coco, cityscapes, tmp_path, capsys) -> None:
    args, folder = _empty_split(kind, tmp_path, coco, cityscapes)
    status, out, err, report = _run_failing(args, tmp_path, capsys)
    assert status == 1 and out.splitlines()[-1] == f"FAILED: {kind} could not be set up (see above)"
    assert "val" in err and folder in err and "To get it:" in err  # the split, its folder, the fix
    assert report["failure"].startswith("DataNotFoundError")
    cfg = compose_config(["~experiment", f"data={kind}", f"data.root={args[2]}", *[f"data.{s}" for s in args[4:]]])
    with pytest.raises(DataNotFoundError) as training:
        instantiate(cfg.data).setup("fit")
    assert str(training.value) in err  # training stops with the same message


def test_check_refuses_segmentation_images_of_several_sizes_in_one_batch(tmp_path, capsys) -> None:
    root = tmp_path / "segmentation"
    for split in ("train", "val"):
        (root / split / "images").mkdir(parents=True)
        (root / split / "labels").mkdir(parents=True)
        for name, size in (("a", (24, 20)), ("b", (24, 20)), ("c", (32, 20))):
            Image.new("RGB", size).save(root / split / "images" / f"{name}.png")
            Image.new("L", size).save(root / split / "labels" / f"{name}.png")
    args = ["segmentation_folder", "--root", str(root), "--set", "num_classes=3", "--set", "crop_size=16"]
    args += ["--set", "batch_size=2"]
    status, out, err, _ = _run_failing(args, tmp_path, capsys)
    assert status == 1 and out.splitlines()[-1] == (
        "FAILED: segmentation_folder: samples of several sizes in one batch (see above)"
    )
    assert "the val split's images are of 2 sizes: 24×20 px (2 images, e.g." in err
    assert f"32×20 px (1 image, e.g. {root / 'val' / 'images' / 'c.png'})" in err
    assert "batches of data.val_batch_size=2" in err and "Fix: set data.val_batch_size=1" in err
    status, text, _ = _run([*args, "--set", "val_batch_size=1"], tmp_path, capsys)
    assert status == 0 and text.splitlines()[-1].startswith("OK: segmentation_folder: 6 samples")


def test_check_and_training_refuse_a_training_split_smaller_than_one_batch(clean_folder, tmp_path, capsys) -> None:
    status, text, report = _run(["image_folder", "--root", str(clean_folder)], tmp_path, capsys)
    train = str(clean_folder / "train")
    expected = (
        "8 sample(s) are fewer than data.batch_size=64, and data.drop_last=true drops that incomplete batch: not one "
        "training step would run. Fix: set data.batch_size=8 (or less), or data.drop_last=false"
    )
    assert status == 1 and report["splits"]["train"]["errors"] == [
        {"path": train, "kind": "batch", "message": expected, "severity": "error", "skippable": False, "index": None}
    ]
    assert f"  error    {train}: {expected}" in text
    cfg = compose_config(["~experiment", "data=image_folder", f"data.root={clean_folder}"])
    with pytest.raises(EmptySplitError) as training:
        instantiate(cfg.data).train_dataloader()
    assert str(training.value) == f"ImageFolderDataModule: the train split ({train}) has no usable sample: {expected}."
    assert _run(["image_folder", "--root", str(clean_folder), "--set", "drop_last=false"], tmp_path, capsys)[0] == 0
