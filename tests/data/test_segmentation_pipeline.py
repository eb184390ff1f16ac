"""The one segmentation pipeline (diffkd.data.segmentation) gives, bit for bit, what the two it replaced gave:
Cityscapes' CIRKD transform and the segmentation folders' transform, and both data modules' batches.

The pinned digests were computed with the former implementations (``CityscapesTransform`` and
``SegmentationTransform`` of commit cb322cb, before they became one) on the same inputs and seeds."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffkd.data.cityscapes import CityscapesDataModule, CityscapesTransform, discrete_scales, find_pairs
from diffkd.data.images import DataNotFoundError
from diffkd.data.segmentation import PairLayout, SegmentationFolder, SegmentationTransform
from diffkd.data.segmentation_folder import SegmentationFolderDataModule, find_segmentation_pairs
from tests.helpers.fake_cityscapes import write_fake_cityscapes
from tests.helpers.fake_segmentation import write_grey_scenes

TRANSFORM_DIGESTS = {
    "cs-cirkd-False": "f818d57907937088",
    "cs-cirkd-True": "4074bbb3e2a375eb",
    "cs-imagenet-False": "0d5ae69f011b92dd",
    "cs-imagenet-True": "ac21ae1a40f60a8d",
    "sf-greybig-False": "e3c8b46269b7821c",
    "sf-greybig-True": "af71288d6fcbab96",
    "sf-greynocrop-False": "e3c8b46269b7821c",
    "sf-greynocrop-True": "475861441a8a778c",
    "sf-rgbcrop-False": "8dfcebc128299817",
    "sf-rgbcrop-True": "7e339b6f7d3fe8ff",
}
BATCH_DIGESTS = {
    "cs-cirkd-example": "ac458af4da9c3995",
    "cs-cirkd-train": ["f9b81035e581e187", "d78bcfb51f7f3a36"],
    "cs-cirkd-val": ["6a49e80e5892bc36", "f68eb78c3e5e62bd", "17380fda57c19197"],
    "cs-imagenet-example": "10534f6360954b80",
    "cs-imagenet-train": ["f1aae52a62d4288f", "12c310ad58c0b365"],
    "cs-imagenet-val": ["5c9dbfa017b01776", "eb72359c3e8892a9", "acc556b50ce0a389"],
    "sf-example": "20c4ec4ed6d7b03f",
    "sf-train": ["e5b9de14ead2cdf4", "cf3ee26562e118be", "6442fff82b62adf7"],
    "sf-val": ["18452dc79af3d9ad", "817eff199d9b5aa5"],
}


def _digest(*tensors: torch.Tensor, dtype: bool = True) -> str:
    m = hashlib.sha256()
    for t in tensors:
        if dtype:
            m.update(str(t.dtype).encode())
        m.update(str(tuple(t.shape)).encode())
        m.update(t.contiguous().numpy().tobytes())
    return m.hexdigest()[:16]


def _transform_digests() -> dict[str, str]:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    ids = rng.integers(0, 34, (40, 60), dtype=np.uint8)
    grey = torch.from_numpy(rng.integers(0, 256, (1, 20, 30), dtype=np.uint8))
    lab = torch.from_numpy(rng.integers(0, 4, (20, 30), dtype=np.uint8))
    per_seed: dict[str, list[str]] = {}

    def run(key: str, call) -> None:
        for seed in range(12):
            torch.manual_seed(seed)
            per_seed.setdefault(key, []).append(_digest(*call()))

    for norm in ("cirkd", "imagenet"):
        for train in (True, False):
            t = CityscapesTransform(train, (32, 48), discrete_scales((0.5, 2.0), 0.1), 0.5, normalization=norm)
            run(f"cs-{norm}-{train}", lambda t=t: t(Image.fromarray(rgb), Image.fromarray(ids)))
    rgbt = torch.from_numpy(rgb).permute(2, 0, 1).contiguous()
    imagenet = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    cases = [
        ("rgbcrop", {**imagenet, "crop_size": (24, 24), "scales": discrete_scales((0.5, 2.0), 0.25)}, rgbt, ids),
        ("greybig", {"mean": (0.5,), "std": (0.25,), "crop_size": (32, 40), "ignore_index": 7}, grey, lab),
        ("greynocrop", {"mean": (0.5,), "std": (0.25,)}, grey, lab),
    ]
    for name, kw, pixels, label in cases:
        label = torch.as_tensor(label)
        for train in (True, False):
            t = SegmentationTransform(train, hflip_prob=0.5, **kw)
            run(f"sf-{name}-{train}", lambda t=t, p=pixels, y=label: t(p.clone(), y.clone()))
    return {k: hashlib.sha256("".join(v).encode()).hexdigest()[:16] for k, v in per_seed.items()}


def test_the_transform_gives_what_both_former_transforms_gave():
    assert _transform_digests() == TRANSFORM_DIGESTS


@pytest.mark.parametrize("norm", ["cirkd", "imagenet"])
def test_cityscapes_batches_are_those_of_the_former_pipeline(tmp_path: Path, norm: str, monkeypatch):
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)  # the digests' run seed (an earlier test may have set one)
    root = write_fake_cityscapes(tmp_path / "cs", size=(64, 128)).root
    dm = CityscapesDataModule(str(root), batch_size=2, num_workers=0, crop_size=(48, 80), normalization=norm)
    assert [_digest(*b, dtype=False) for b in dm.train_dataloader()] == BATCH_DIGESTS[f"cs-{norm}-train"]
    assert [_digest(*b, dtype=False) for b in dm.val_dataloader()] == BATCH_DIGESTS[f"cs-{norm}-val"]
    assert _digest(*dm.example_batch(2), dtype=False) == BATCH_DIGESTS[f"cs-{norm}-example"]


def test_segmentation_folder_batches_are_those_of_the_former_pipeline(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)  # the digests' run seed (an earlier test may have set one)
    root = write_grey_scenes(tmp_path / "sc", n_train=6, n_val=3, size=24)
    kw = {"batch_size": 2, "in_chans": 1, "mean": (0.5,), "std": (0.25,), "crop_size": (20, 28)}
    dm = SegmentationFolderDataModule(str(root), 4, scale_range=(0.5, 1.5), hflip_prob=0.5, **kw)
    assert [_digest(*b, dtype=False) for b in dm.train_dataloader()] == BATCH_DIGESTS["sf-train"]
    assert [_digest(*b, dtype=False) for b in dm.val_dataloader()] == BATCH_DIGESTS["sf-val"]
    assert _digest(*dm.example_batch(2), dtype=False) == BATCH_DIGESTS["sf-example"]


def test_one_pair_finder_for_both_layouts(tmp_path: Path):
    """Cityscapes (cities one level down, long suffixes) and the plain folders pair through the same code, and an
    unpaired file is named with its missing partner in either layout."""
    fake = write_fake_cityscapes(tmp_path / "cs", size=(16, 32))
    pairs = find_pairs(fake.root, ["train"])["train"]
    assert [(i.name, lbl.name) for i, lbl in pairs] == [
        (f"{k.split('/')[1]}_leftImg8bit.png", f"{k.split('/')[1]}_gtFine_labelIds.png") for k in fake.keys["train"]
    ]
    root = write_grey_scenes(tmp_path / "sc", n_train=3, n_val=1, size=8)
    folder = find_segmentation_pairs(root, ["train"])["train"]
    assert [(i.stem, lbl.stem) for i, lbl in folder] == [("s0", "s0"), ("s1", "s1"), ("s2", "s2")]
    assert isinstance(SegmentationFolder(folder, None, 4)[0][1], torch.Tensor)


class AdeLikeScenes(SegmentationFolderDataModule):
    """A new segmentation data set in a dozen lines: its folder layout and its label map (ADE20K's convention:
    label 0 is unlabelled and ignored, classes 1..K become 0..K-1); loaders, transform, checks and resume are
    the shared ones."""

    checks_name = "ADE-like scenes"
    layout = PairLayout("ADE-like scenes", "images/{split}", "annotations/{split}", (".png", ".jpg"), ".png")

    def dataset(self, split: str, pairs, train: bool) -> SegmentationFolder:
        lut = torch.full((256,), self.ignore_index, dtype=torch.uint8)
        lut[1 : self.num_classes + 1] = torch.arange(self.num_classes, dtype=torch.uint8)
        mode = "RGB" if self.in_chans == 3 else "L"
        return SegmentationFolder(
            pairs, self.transform(train), self.num_classes, self.ignore_index, mode, label_map=lut
        )


def test_a_new_layout_and_label_map_plug_into_the_generic_module(tmp_path: Path):
    scenes = write_grey_scenes(tmp_path / "scenes", n_train=4, n_val=2, size=8)
    for split in ("train", "val"):  # the same files in the ADE-like layout
        (tmp_path / "ade" / "images").mkdir(parents=True, exist_ok=True)
        (tmp_path / "ade" / "annotations").mkdir(parents=True, exist_ok=True)
        (scenes / split / "images").rename(tmp_path / "ade" / "images" / split)
        (scenes / split / "labels").rename(tmp_path / "ade" / "annotations" / split)
    dm = AdeLikeScenes(str(tmp_path / "ade"), 3, batch_size=2, in_chans=1, mean=(0.5,), std=(0.25,))
    images, labels = next(iter(dm.val_dataloader()))
    files = [np.array(Image.open(lbl)) for _, lbl in dm.val_set.pairs]
    expected = torch.stack([torch.from_numpy(f).long() - 1 for f in files])
    expected[expected < 0] = 255
    assert images.shape == (2, 1, 8, 8) and torch.equal(labels, expected)
    assert len(next(iter(dm.train_dataloader()))) == 2 and dm.task == "segmentation"
    with pytest.raises(DataNotFoundError, match=r"ADE-like scenes \(2 folder\(s\) missing\)"):
        AdeLikeScenes(str(tmp_path / "nowhere"), 3).setup("validate")
