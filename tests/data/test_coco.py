"""COCODataModule on a tiny COCO written in the real format (JPEG files, genuine instances_*.json)."""

from __future__ import annotations

import json
import logging
import pickle
import random
import re
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from lightning.fabric.utilities.data import _set_sampler_epoch
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.connectors.data_connector import (
    _DataLoaderSource,
    _process_dataloader,
    _request_dataloader,
)
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler

from diffkd.data.base import DataNotFoundError
from diffkd.data.coco import (
    BOX_DROP_REASONS,
    COCO_URLS,
    MULTISCALE_MIN_SIZES,
    AnnotationFormatError,
    COCODataModule,
    DetectionTransform,
    GroupedBatchSampler,
    ImageReadError,
    aspect_ratio_group_ids,
    box_drop_codes,
    has_valid_annotation,
)
from diffkd.data.resumable import EpochCodedBatchSampler
from diffkd.data.usable import EmptySplitError
from tests.helpers.fake_coco import CATEGORIES, TRAIN_IMAGES, VAL_IMAGES, FakeCoco, edit_annotations, write_fake_coco

CONF = Path(__file__).resolve().parents[2] / "conf" / "data" / "coco.yaml"


@pytest.fixture(scope="module")
def coco(tmp_path_factory: pytest.TempPathFactory) -> FakeCoco:
    return write_fake_coco(tmp_path_factory.mktemp("coco"))


@pytest.fixture
def coco_copy(coco: FakeCoco, tmp_path: Path) -> Path:
    """A private copy to break."""
    return Path(shutil.copytree(coco.root, tmp_path / "coco"))


def _dm(root: Path, **kwargs) -> COCODataModule:
    return COCODataModule(str(root), **{"num_workers": 0, "hflip_prob": 0.0, **kwargs})


def _xyxy(bbox: list[float]) -> list[float]:
    x, y, w, h = bbox
    return [x, y, x + w, y + h]


def _samples(dataset) -> dict[int, tuple[torch.Tensor, dict]]:
    return {t["image_id"]: (img, t) for img, t in (dataset[i] for i in range(len(dataset)))}


@pytest.fixture(autouse=True)
def _rank_zero_restored():
    """A trainer posing as rank 1 sets Lightning's process-wide rank: later tests would log nothing."""
    from lightning.fabric.utilities import rank_zero as fabric_rank_zero
    from lightning.pytorch.utilities import rank_zero as pl_rank_zero

    saved = [(m.rank_zero_only, getattr(m.rank_zero_only, "rank", 0)) for m in (pl_rank_zero, fabric_rank_zero)]
    yield
    for fn, rank in saved:
        fn.rank = rank


def _ddp_trainer(rank: int, world_size: int = 2, **kwargs) -> L.Trainer:
    """A DDP trainer that is never launched, posing as ``rank`` of ``world_size`` CPU processes."""
    trainer = L.Trainer(
        accelerator="cpu",
        strategy=DDPStrategy(),
        devices=world_size,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )
    trainer.strategy.cluster_environment.set_global_rank(rank)
    return trainer


def _lightning_train_loader(dm: COCODataModule, trainer: L.Trainer) -> tuple[DataLoader, DataLoader]:
    """The loader as the hook returns it and as Lightning's fit prepares it (sampler injection and all)."""
    trainer.datamodule = dm
    dm.trainer = trainer
    loader = _request_dataloader(_DataLoaderSource(dm, "train_dataloader"))
    return loader, _process_dataloader(trainer, TrainerFn.FITTING, RunningStage.TRAINING, loader)


# ------------------------------------------------------------------------------------------ the helper


def test_fake_coco_is_genuine_coco(coco: FakeCoco) -> None:
    for split, data in (("train2017", coco.train), ("val2017", coco.val)):
        assert set(data) == {"info", "licenses", "images", "annotations", "categories"}
        for entry in data["images"]:
            with Image.open(coco.root / split / entry["file_name"]) as image:
                assert image.format == "JPEG"
                assert image.size == (entry["width"], entry["height"])
        assert [c["id"] for c in data["categories"]] == [1, 2, 3, 5, 90]
        assert all(
            {"id", "image_id", "category_id", "bbox", "area", "iscrowd", "segmentation"} <= set(a)
            for a in data["annotations"]
        )
        assert any(a["iscrowd"] == 1 and isinstance(a["segmentation"], dict) for a in data["annotations"])
    assert {e["width"] > e["height"] for e in coco.train["images"]} == {True, False}


# ------------------------------------------------------------------------------------------ targets


def test_train_targets_match_json(coco: FakeCoco) -> None:
    dm = _dm(coco.root)
    dm.setup("fit")
    samples = _samples(dm.train_set)
    for image_id, (image, target) in samples.items():
        entry = coco.image("train", image_id)
        assert image.dtype == torch.float32 and type(image) is torch.Tensor
        assert image.shape == (3, entry["height"], entry["width"])
        assert image.min() >= 0.0 and image.max() <= 1.0
        anns = [
            a for a in coco.annotations("train", image_id) if not a["iscrowd"] and a["bbox"][2] > 1 and a["bbox"][3] > 1
        ]
        assert type(target["boxes"]) is torch.Tensor and target["boxes"].dtype == torch.float32
        assert target["boxes"].shape == (len(anns), 4)
        assert target["boxes"].tolist() == [_xyxy(a["bbox"]) for a in anns]
        assert target["labels"].dtype == torch.int64
        assert target["labels"].tolist() == [a["category_id"] for a in anns]
        assert target["area"].tolist() == [a["area"] for a in anns]
        assert target["iscrowd"].tolist() == [0] * len(anns)
        assert isinstance(target["image_id"], int) and target["image_id"] == image_id


def test_crowd_removed_in_train_kept_in_val(coco: FakeCoco) -> None:
    dm = _dm(coco.root)
    dm.setup("fit")
    train, val = _samples(dm.train_set), _samples(dm.val_set)
    assert train[25][1]["labels"].tolist() == [2]  # the crowd person is gone
    assert train[80][1]["boxes"].shape == (0, 4)  # a crowd-only image: kept, with nothing to learn
    _, target = val[139]
    assert target["iscrowd"].tolist() == [0, 1]
    assert target["boxes"].tolist() == [_xyxy(a["bbox"]) for a in coco.annotations("val", 139)]
    assert target["labels"].tolist() == [1, 3]
    assert target["area"].tolist() == [a["area"] for a in coco.annotations("val", 139)]


def test_degenerate_boxes_dropped_from_training(coco: FakeCoco) -> None:
    dm = _dm(coco.root, remove_images_without_annotations=False)
    dm.setup("fit")
    train = _samples(dm.train_set)
    assert train[34][1]["labels"].tolist() == [5]  # the 0.8 px wide car is gone
    assert train[42][1]["boxes"].shape == (0, 4)  # its only box is 1 px tall


@pytest.mark.parametrize("remove", [True, False])
def test_images_without_annotations(coco: FakeCoco, remove: bool) -> None:
    dm = _dm(coco.root, remove_images_without_annotations=remove)
    dm.setup("fit")
    ids = {t["image_id"] for _, t in (dm.train_set[i] for i in range(len(dm.train_set)))}
    every = {i for i, *_ in TRAIN_IMAGES}
    assert ids == (every - {30, 42} if remove else every)
    assert sorted(dm.val_set.ids) == sorted(i for i, *_ in VAL_IMAGES)
    empty = _samples(dm.val_set)[632][1]
    assert empty["boxes"].shape == (0, 4) and empty["boxes"].dtype == torch.float32
    assert empty["labels"].dtype == torch.int64 and empty["iscrowd"].dtype == torch.int64 and empty["area"].numel() == 0


def test_has_valid_annotation_is_the_references_rule() -> None:
    def ann(w: float, h: float, crowd: int = 0) -> dict:
        return {"bbox": [0, 0, w, h], "iscrowd": crowd}

    assert not has_valid_annotation([])
    assert not has_valid_annotation([ann(1, 5), ann(5, 0.5)])
    assert has_valid_annotation([ann(1, 5), ann(1.5, 1.5)])
    assert has_valid_annotation([ann(10, 10, crowd=1)])


def test_flip_flips_boxes(coco: FakeCoco) -> None:
    plain, flipped = _dm(coco.root, hflip_prob=0.0), _dm(coco.root, hflip_prob=1.0)
    plain.setup("fit")
    flipped.setup("fit")
    for i in range(len(plain.train_set)):
        (image, target), (f_image, f_target) = plain.train_set[i], flipped.train_set[i]
        width = image.shape[-1]
        boxes = target["boxes"]
        expected = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
        torch.testing.assert_close(f_target["boxes"], expected)
        torch.testing.assert_close(f_image, image.flip(-1))
        assert f_target["labels"].tolist() == target["labels"].tolist()


def test_multiscale_resizes_images_and_boxes(coco: FakeCoco) -> None:
    assert MULTISCALE_MIN_SIZES == (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)
    plain = _dm(coco.root)
    scaled = _dm(coco.root, multiscale=True, multiscale_min_sizes=(96, 128), multiscale_max_size=150)
    plain.setup("fit")
    scaled.setup("fit")
    torch.manual_seed(0)
    for i in range(len(plain.train_set)):
        (image, target), (s_image, s_target) = plain.train_set[i], scaled.train_set[i]
        h, w = image.shape[-2:]
        sh, sw = s_image.shape[-2:]
        assert min(sh, sw) in (96, 128) or max(sh, sw) == 150
        torch.testing.assert_close(s_target["boxes"][:, 0::2], target["boxes"][:, 0::2] * sw / w)
        torch.testing.assert_close(s_target["boxes"][:, 1::2], target["boxes"][:, 1::2] * sh / h)


def test_labels_and_num_classes(coco: FakeCoco) -> None:
    dm = _dm(coco.root)
    assert dm.num_classes == 91  # read on demand, torchvision's detectors' count for COCO
    assert dm.category_ids == [1, 2, 3, 5, 90]
    assert dm.label_to_category == {c: c for c in (1, 2, 3, 5, 90)}
    names = dm.class_names
    assert len(names) == 91 and names[0] == "__background__" and names[90] == "toothbrush" and names[4] == "N/A"

    dm = _dm(coco.root, contiguous_labels=True)
    assert dm.num_classes == 6
    assert dm.category_to_label == {1: 1, 2: 2, 3: 3, 5: 4, 90: 5}
    assert dm.label_to_category == {1: 1, 2: 2, 3: 3, 4: 5, 5: 90}
    assert dm.class_names == ["__background__", *(name for _, name, _ in CATEGORIES)]
    dm.setup("fit")
    train, val = _samples(dm.train_set), _samples(dm.val_set)
    assert train[9][1]["labels"].tolist() == [1, 5]  # person, toothbrush (90)
    assert train[36][1]["labels"].tolist() == [3, 4]  # car, airplane (5)
    assert val[139][1]["labels"].tolist() == [1, 3]
    assert all(0 < label < 6 for _, t in train.values() for label in t["labels"].tolist())


# ------------------------------------------------------------------------------------------ grouping and sampling


def test_aspect_ratio_group_ids() -> None:
    # k = 3: edges 2 ** linspace(-1, 1, 7) = 0.5, 0.63, 0.79, 1, 1.26, 1.59, 2 on height / width
    sizes = [(40, 100), (50, 100), (60, 100), (75, 100), (100, 100), (150, 100), (170, 100), (300, 100)]
    assert aspect_ratio_group_ids(sizes, 3) == [0, 1, 1, 2, 4, 5, 6, 7]
    assert aspect_ratio_group_ids(sizes, 0) == [0, 0, 0, 0, 1, 1, 1, 1]


def test_groups_come_from_the_json_without_decoding(coco: FakeCoco, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_decoding(*args, **kwargs):
        raise AssertionError("an image was opened")

    monkeypatch.setattr(Image, "open", no_decoding)
    dm = _dm(coco.root)
    dm.setup("fit")
    batches = list(dm.train_dataloader().batch_sampler)
    ids = dm.train_set.ids
    sizes = [(coco.image("train", i)["height"], coco.image("train", i)["width"]) for i in ids]
    assert dm.train_group_ids == aspect_ratio_group_ids(sizes, 3)
    assert len(set(dm.train_group_ids)) == 4
    assert batches


@pytest.mark.parametrize("drop_last", [False, True])
def test_grouped_batches_are_one_group_and_cover_the_data(coco: FakeCoco, drop_last: bool) -> None:
    dm = _dm(coco.root, drop_last=drop_last)
    loader = dm.train_dataloader()
    assert isinstance(loader.batch_sampler, GroupedBatchSampler)
    n, groups = len(dm.train_set), dm.train_group_ids
    batches = list(loader.batch_sampler)
    assert len(batches) == len(loader) == (n // 2 if drop_last else min(n, (n + 4) // 2))
    assert all(len(b) == 2 and len({groups[i] for i in b}) == 1 for b in batches)
    if not drop_last:
        assert {i for b in batches for i in b} == set(range(n))
    images, targets = next(iter(loader))
    assert len(images) == len(targets) == 2
    assert {groups[dm.train_set.ids.index(t["image_id"])] for t in targets} == {groups[batches[0][0]]}


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("drop_last", [False, True])
def test_grouped_batch_sampler_on_shards(world_size: int, drop_last: bool) -> None:
    rng = np.random.default_rng(0)
    n, batch_size = 101, 4
    group_ids = rng.integers(0, 5, size=n).tolist()
    for epoch in range(4):
        lengths, covered = [], set()
        for rank in range(world_size):
            sampler = DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=True, seed=3)
            batches_sampler = GroupedBatchSampler(sampler, group_ids, batch_size, drop_last=drop_last)
            batches_sampler.set_epoch(epoch)
            shard = set(sampler)
            batches = list(batches_sampler)
            assert len(batches) == len(batches_sampler)
            assert all(len(b) == batch_size and len({group_ids[i] for i in b}) == 1 for b in batches)
            assert {i for b in batches for i in b} <= shard
            if not drop_last:
                assert {i for b in batches for i in b} == shard
            lengths.append(len(batches))
            covered |= shard
        assert len(set(lengths)) == 1  # every rank takes as many steps: DDP's all-reduce needs it
        assert covered == set(range(n))


def test_ddp_sharding_under_lightning(coco: FakeCoco) -> None:
    n = len(TRAIN_IMAGES) - 2  # images 30 and 42 have no usable box
    shards, orders = [], []
    for rank in range(2):
        dm = _dm(coco.root)
        trainer = _ddp_trainer(rank)
        assert trainer.distributed_sampler_kwargs == {"num_replicas": 2, "rank": rank}
        hooked, loader = _lightning_train_loader(dm, trainer)
        # the module built its own shard of this rank ...
        own = hooked.batch_sampler.sampler
        assert isinstance(own, DistributedSampler) and (own.num_replicas, own.rank) == (2, rank)
        # ... and Lightning (use_distributed_sampler=True) re-created the batch sampler around its own
        # DistributedSampler: the same shard and order (seed None = PL_GLOBAL_SEED), the grouping kept
        assert isinstance(loader.batch_sampler, GroupedBatchSampler)
        injected = loader.batch_sampler.sampler
        assert isinstance(injected, DistributedSampler) and (injected.num_replicas, injected.rank) == (2, rank)
        assert list(injected) == list(own)
        assert loader.batch_sampler.group_ids == dm.train_group_ids and loader.collate_fn is hooked.collate_fn
        batches = list(loader.batch_sampler)
        assert all(len({dm.train_group_ids[i] for i in b}) == 1 for b in batches)
        assert {i for b in batches for i in b} == set(injected)
        shards.append(set(injected))
        _set_sampler_epoch(loader, 1)  # what the fit loop does each epoch
        orders.append((list(injected), len(loader)))
        assert orders[-1][0] != list(own) or len(own) < 3
    assert shards[0].isdisjoint(shards[1]) and shards[0] | shards[1] == set(range(n))
    assert orders[0][1] == orders[1][1]  # equal step counts on both ranks
    images, targets = next(iter(loader))
    assert len(images) == len(targets) == 2 and all(isinstance(t["image_id"], int) for t in targets)


class _IdRecorder(L.LightningModule):
    """Records the image ids of every training batch, per epoch, into ``<out>/rank<r>.json``."""

    def __init__(self, out: str) -> None:
        super().__init__()
        self.out = out
        self.weight = torch.nn.Parameter(torch.ones(1))
        self.seen: list[list[list[int]]] = []

    def on_train_epoch_start(self) -> None:
        self.seen.append([])

    def training_step(self, batch: tuple[list[torch.Tensor], list[dict]], batch_idx: int) -> torch.Tensor:
        images, targets = batch
        self.seen[-1].append([t["image_id"] for t in targets])
        return (self.weight * sum(i.mean() for i in images)).sum()

    def on_train_end(self) -> None:
        Path(self.out, f"rank{self.global_rank}.json").write_text(json.dumps(self.seen))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.slow
def test_ddp_spawn_two_ranks_see_disjoint_grouped_shards(coco: FakeCoco, tmp_path: Path) -> None:
    trainer = L.Trainer(
        accelerator="cpu",
        strategy="ddp_spawn",
        devices=2,
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(_IdRecorder(str(tmp_path)), datamodule=_dm(coco.root))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    dm = _dm(coco.root)
    dm.setup("fit")
    group = dict(zip(dm.train_set.ids, dm.train_group_ids))
    for epoch in range(2):
        batches = [ranks[r][epoch] for r in range(2)]
        assert len(batches[0]) == len(batches[1])  # same step count: no all-reduce left waiting
        assert all(len({group[i] for i in b}) == 1 for r in range(2) for b in batches[r])
        shards = [{i for b in batches[r] for i in b} for r in range(2)]
        assert shards[0].isdisjoint(shards[1]) and shards[0] | shards[1] == set(dm.train_set.ids)
    assert ranks[0][0] != ranks[0][1]  # set_epoch reshuffled


def test_ddp_sharding_without_distributed_sampler_injection(coco: FakeCoco) -> None:
    shards = []
    for rank in range(2):
        dm = _dm(coco.root, seed=7)
        hooked, loader = _lightning_train_loader(dm, _ddp_trainer(rank, use_distributed_sampler=False))
        assert loader is hooked  # left alone: the module's own shard, its own seed
        sampler = loader.batch_sampler.sampler
        assert (sampler.num_replicas, sampler.rank, sampler.seed) == (2, rank, 7)
        shards.append({i for b in loader.batch_sampler for i in b})
    assert shards[0].isdisjoint(shards[1]) and shards[0] | shards[1] == set(range(len(dm.train_set)))


def test_ungrouped_loader_is_resharded_like_the_grouped_one(coco: FakeCoco) -> None:
    shards = []
    n = len(TRAIN_IMAGES) - 2
    for rank in range(2):
        dm = _dm(coco.root, aspect_ratio_group_factor=-1)
        hooked, loader = _lightning_train_loader(dm, _ddp_trainer(rank))
        assert dm.train_group_ids is None
        assert type(loader.batch_sampler) is EpochCodedBatchSampler and loader.batch_sampler.size == n
        injected = loader.batch_sampler.sampler
        assert isinstance(injected, DistributedSampler) and (injected.num_replicas, injected.rank) == (2, rank)
        assert list(injected) == list(hooked.batch_sampler.sampler)  # the module's shard and order
        batches = list(loader.batch_sampler)
        assert [len(b) for b in batches] == [2, 2, 2]
        shards.append({i for b in batches for i in b})
        dm._resume_position = lambda: (2, 0)  # the trainer in epoch 2: coded 2·N + index by the re-created sampler
        assert {c // n for b in loader.batch_sampler for c in b} == {2}
        assert {c % n for b in loader.batch_sampler for c in b} == set(injected)
    assert shards[0].isdisjoint(shards[1]) and len(shards[0] | shards[1]) == len(dm.train_set)


def _epoch_batches(dm: COCODataModule, epoch: int, done: int, seed: int) -> list[tuple[list[int], list[tuple]]]:
    """The batches of ``epoch`` that a loader made now yields when ``done`` of them were already trained, with the
    global generators seeded with ``seed`` first (a resumed process starts from other random states)."""
    dm._resume_position = lambda: (epoch, done)  # what the trainer's restored progress says
    loader = dm.train_dataloader()
    _set_sampler_epoch(loader, epoch)  # what the fit loop does at the start of the epoch
    torch.manual_seed(seed), random.seed(seed), np.random.seed(seed)
    out = []
    for images, targets in loader:
        ids = [t["image_id"] for t in targets]
        out.append((ids, [(img.shape, img.sum().item(), t["boxes"].tolist()) for img, t in zip(images, targets)]))
    return out


@pytest.mark.parametrize("group_factor", [3, -1], ids=["grouped", "ungrouped"])
def test_a_resumed_epoch_sees_the_rest_of_the_uninterrupted_one(coco: FakeCoco, group_factor: int) -> None:
    # random flips and multiscale resizing: what each sample draws must depend on (seed, epoch, index) only
    dm = _dm(coco.root, hflip_prob=0.5, multiscale=True, aspect_ratio_group_factor=group_factor, seed=0)
    full = _epoch_batches(dm, epoch=1, done=0, seed=0)
    assert len(full) == len(dm.train_dataloader()) >= 3
    resumed = _epoch_batches(dm, epoch=1, done=2, seed=123)
    assert resumed == full[2:]
    again = _epoch_batches(dm, epoch=1, done=0, seed=7)
    assert again == full
    other = _epoch_batches(dm, epoch=2, done=0, seed=0)
    assert [b[0] for b in other] != [b[0] for b in full]  # another epoch: another order ...
    drawn = {i: d for ids, ds in full for i, d in zip(ids, ds)}
    redrawn = {i: d for ids, ds in other for i, d in zip(ids, ds)}
    assert any(drawn[i] != redrawn[i] for i in drawn)  # ... and other flips and sizes


def test_workers_draw_what_the_main_process_draws(coco: FakeCoco) -> None:
    main = _epoch_batches(_dm(coco.root, hflip_prob=0.5, multiscale=True), epoch=1, done=1, seed=0)
    workers = _epoch_batches(_dm(coco.root, hflip_prob=0.5, multiscale=True, num_workers=2), epoch=1, done=1, seed=5)
    assert workers == main


def test_val_loader_is_sequential(coco: FakeCoco) -> None:
    dm = _dm(coco.root, val_batch_size=2)
    batches = list(dm.val_dataloader())
    assert [[t["image_id"] for t in targets] for _, targets in batches] == [[139, 285], [632, 724], [776]]
    assert dm.test_dataloader().batch_size == 2


# ------------------------------------------------------------------------------------------ protocol


def test_example_batch_is_real_and_keeps_random_states(coco: FakeCoco) -> None:
    dm = _dm(coco.root, hflip_prob=0.5)
    dm.setup("fit")
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    images, targets = dm.example_batch(2)
    assert random.getstate() == states[0]
    after = np.random.get_state()
    assert all(np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b for a, b in zip(after, states[1]))
    assert torch.equal(torch.get_rng_state(), states[2])
    assert dm.batch_size == 2
    assert [t["image_id"] for t in targets] == [dm.train_set.ids[0], dm.train_set.ids[1]]
    assert [tuple(i.shape) for i in images] == [(3, 48, 64), (3, 72, 40)]
    assert all(i.device.type == "cpu" and i.dtype == torch.float32 for i in images)
    again = dm.example_batch(2)
    assert all(torch.equal(a, b) for a, b in zip(images, again[0]))
    assert len(dm.example_batch(3)[0]) == 3
    with pytest.raises(ValueError, match="example_batch size"):
        dm.example_batch(0)


def test_config_instantiates(coco: FakeCoco) -> None:
    cfg = OmegaConf.load(CONF)
    assert cfg._target_ == "diffkd.data.coco.COCODataModule" and cfg.batch_size == 2
    cfg.root = str(coco.root)
    cfg.num_workers = 0
    dm = instantiate(cfg)
    assert isinstance(dm, COCODataModule)
    assert (dm.aspect_ratio_group_factor, dm.multiscale, dm.contiguous_labels, dm.hflip_prob) == (3, False, False, 0.5)
    assert dm.num_classes == 91


def test_dataset_pickles_for_spawned_workers(coco: FakeCoco) -> None:
    dm = _dm(coco.root)
    dm.setup("fit")
    clone = pickle.loads(pickle.dumps(dm.train_set))
    (a, ta), (b, tb) = dm.train_set[0], clone[0]
    assert torch.equal(a, b) and torch.equal(ta["boxes"], tb["boxes"])


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("remove", "named"),
    [
        ("val2017", "val2017/ (missing image folder)"),
        ("annotations/instances_train2017.json", "instances_train2017.json (missing annotation file)"),
    ],
)
def test_missing_data_is_reported(coco_copy: Path, remove: str, named: str) -> None:
    target = coco_copy / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(DataNotFoundError) as info:
        _dm(coco_copy).setup("fit")
    message = str(info.value)
    assert named in message and str(coco_copy) in message
    assert "instances_val2017.json" in message  # the expected layout
    assert all(url in message for url in COCO_URLS.values())


def test_missing_root_is_reported(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"train2017\.zip"):
        _dm(tmp_path / "nowhere").train_dataloader()


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ('{"images": [', "not a valid JSON"),
        ('{"images": [], "annotations": []}', "no list 'categories'"),
        ("[1, 2]", "top level is a list"),
    ],
)
def test_broken_annotation_file_is_reported(coco_copy: Path, content: str, match: str) -> None:
    path = coco_copy / "annotations" / "instances_val2017.json"
    path.write_text(content)
    with pytest.raises(AnnotationFormatError, match=match) as info:
        _dm(coco_copy).setup("validate")
    assert str(path) in str(info.value) and isinstance(info.value, ValueError)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
@pytest.mark.parametrize("num_workers", [0, 1])
def test_corrupted_image_names_the_file(coco_copy: Path, damage: str, num_workers: int) -> None:
    path = coco_copy / "val2017" / f"{139:012d}.jpg"
    data = path.read_bytes()
    path.write_bytes(b"this is not a JPEG" if damage == "garbage" else data[: len(data) // 2])
    dm = _dm(coco_copy, num_workers=num_workers)
    with pytest.raises(ImageReadError, match=re.escape(str(path))):
        next(iter(dm.val_dataloader()))


# ------------------------------------------------------------------------------------------ a detector


def test_fasterrcnn_takes_a_training_batch(coco: FakeCoco) -> None:
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    torch.manual_seed(0)
    model = fasterrcnn_resnet50_fpn(
        weights=None,
        weights_backbone=None,
        num_classes=91,
        min_size=128,
        max_size=192,
        rpn_post_nms_top_n_train=100,  # fewer proposals and sampled RoIs: a few seconds less on a CPU
        box_batch_size_per_image=64,
    )
    model.train()
    images, targets = next(iter(_dm(coco.root, hflip_prob=0.5).train_dataloader()))
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())


# ------------------------------------------------------------------------------------------ what training drops


def test_box_rule_gives_each_reason() -> None:
    boxes = torch.tensor(
        [
            [4.0, 4.0, 20.0, 20.0],  # kept
            [4.0, 4.0, 20.0, 20.0],  # a crowd
            [4.0, 4.0, float("nan"), 20.0],
            [4.0, 4.0, 4.0, 20.0],  # zero width
            [9.0, 4.0, 4.0, 20.0],  # negative width
            [70.0, 4.0, 90.0, 20.0],  # right of a 64 px wide image
            [4.0, 4.0, 5.0, 20.0],  # 1 px wide: not more than min_box_size
            [60.0, 4.0, 90.0, 20.0],  # 4 px wide once clamped to the image: kept
        ]
    )
    iscrowd = torch.tensor([0, 1, 0, 0, 0, 0, 0, 0])
    assert box_drop_codes(boxes, iscrowd, 64, 48, 1.0).tolist() == [0, 1, 2, 3, 3, 4, 5, 0]
    assert box_drop_codes(boxes[7:], iscrowd[7:], 64, 48, 4.0).tolist() == [5]  # not more than 4 px
    with pytest.raises(ValueError, match="min_box_size must be >= 0"):
        DetectionTransform(train=True, min_box_size=-1)


def _bad_boxes(data: dict) -> None:
    """Zero, negative and NaN widths, a box right of its image (image ids 36, 49, 71)."""
    by_image: dict[int, list[dict]] = {}
    for ann in data["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    by_image[36][0]["bbox"] = [2.0, 2.0, 0.0, 20.0]  # zero width
    by_image[36][1]["bbox"] = [90.0, 5.0, 25.0, 30.0]  # the image is 80 px wide: 36 keeps no box
    by_image[49][0]["bbox"] = [8.0, 8.0, float("nan"), 30.0]  # its only box: 49 is left out
    by_image[71][0]["bbox"] = [10.0, 20.0, -5.0, 30.0]  # its only box: 71 is left out


def test_the_report_counts_exactly_what_the_transform_drops(coco_copy: Path) -> None:
    edit_annotations(coco_copy, "train2017", _bad_boxes)
    dm = _dm(coco_copy)
    dm.setup("fit")
    usage = dm.box_usage
    assert usage.dropped == {
        BOX_DROP_REASONS[1]: 2,  # the crowds of images 25 and 80
        BOX_DROP_REASONS[2]: 1,
        BOX_DROP_REASONS[3]: 2,
        BOX_DROP_REASONS[4]: 1,
        BOX_DROP_REASONS[5]: 2,  # image 34's 0.8 px and image 42's 1 px boxes
    }
    assert usage.examples[BOX_DROP_REASONS[3]] == (36, 7) and usage.examples[BOX_DROP_REASONS[4]] == (36, 8)
    assert (usage.annotations, usage.boxes, usage.train_images, usage.usable) == (19, 11, 10, 8)
    assert usage.left_out == [30, 42, 49, 71] and usage.no_box == [36, 80]
    samples = _samples(dm.train_set)  # what training gets: the same counts
    assert sum(len(t["boxes"]) for _, t in samples.values()) == usage.boxes
    assert sorted(i for i, (_, t) in samples.items() if len(t["boxes"]) == 0) == usage.no_box
    assert sorted(samples) == sorted(set(i for i, *_ in TRAIN_IMAGES) - set(usage.left_out))


def test_dropped_boxes_are_logged_once_at_setup(coco_copy: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = edit_annotations(coco_copy, "train2017", _bad_boxes)
    caplog.set_level(logging.INFO, logger="diffkd.data.coco")
    dm = _dm(coco_copy)
    dm.setup("fit")
    dm.setup("fit")
    dm.train_dataloader()
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1
    message = warned[0]
    assert message.startswith(f"COCO train2017 ({path}): 11 of 19 annotations trained on, in 8 of 10 training images")
    assert "2 boxes dropped: zero or negative width or height (e.g. image id 36, annotation 7)" in message
    assert "1 box dropped: outside the image (e.g. image id 36, annotation 8)" in message
    assert "1 box dropped: coordinates not finite (e.g. image id 49" in message
    assert "4 of 14 images left out of training" in message and "(e.g. image id 30;" in message
    assert "2 training images with no box to train on (e.g. image id 36)" in message


def test_a_clean_split_logs_its_crowds_without_a_warning(coco_copy: Path, caplog: pytest.LogCaptureFixture) -> None:
    def clean(data: dict) -> None:  # no image left out, none without a box, no degenerate box: only the crowds
        data["images"] = [i for i in data["images"] if i["id"] not in (30, 34, 42, 80)]
        data["annotations"] = [a for a in data["annotations"] if a["image_id"] not in (30, 34, 42, 80)]

    edit_annotations(coco_copy, "train2017", clean)
    caplog.set_level(logging.INFO, logger="diffkd.data.coco")
    _dm(coco_copy).setup("fit")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "1 box dropped: crowd region" in caplog.text


@pytest.mark.parametrize("split", ["train2017", "val2017"])
def test_a_json_without_annotations_is_refused_at_setup(coco_copy: Path, split: str) -> None:
    path = edit_annotations(coco_copy, split, lambda data: data.update(annotations=[]))
    with pytest.raises(EmptySplitError) as info:
        _dm(coco_copy).setup("fit")
    message = str(info.value)
    name = "train" if split == "train2017" else "val"
    assert info.value.splits == [name] and isinstance(info.value, ValueError)
    assert f"COCO: the {name} split ({split}, {path}) has no usable sample: the file lists" in message
    assert "but no annotations" in message
    assert f"Fix: point data.annotation_file / data.{name}_split at the json with this split's" in message
    assert pickle.loads(pickle.dumps(info.value)).splits == [name]


def test_both_unusable_splits_are_named_at_once(coco_copy: Path) -> None:
    edit_annotations(coco_copy, "train2017", lambda data: data.update(images=[], annotations=[]))
    edit_annotations(coco_copy, "val2017", lambda data: [a.update(iscrowd=1) for a in data["annotations"]])
    with pytest.raises(EmptySplitError) as info:
        _dm(coco_copy, verify=True).setup("fit")  # before data.verify decodes anything
    assert info.value.splits == ["val", "train"]
    assert "train2017.json) has no usable sample: the file lists no images" in str(info.value)
    assert "the file lists 5 images but only 6 crowd regions: COCO mAP has nothing to score" in str(info.value)


def test_a_split_whose_every_box_is_dropped_is_refused(coco_copy: Path) -> None:
    def zero_width(data: dict) -> None:
        for ann in data["annotations"]:
            ann["bbox"][2] = 0.0

    path = edit_annotations(coco_copy, "train2017", zero_width)
    with pytest.raises(EmptySplitError) as info:
        _dm(coco_copy, remove_images_without_annotations=False).setup("fit")
    message = str(info.value)
    assert f"the train split (train2017, {path}) has no usable sample: none of its 14 images has a box" in message
    assert "2 boxes dropped: crowd region" in message
    assert "17 boxes dropped: zero or negative width or height (e.g. image id 9, annotation 1)" in message
    assert "Fix: boxes must be [x, y, width, height] in pixels" in message and "data.min_box_size (now 1)" in message
    with pytest.raises(EmptySplitError, match="none of its 14 images has a box"):
        _dm(coco_copy).setup("fit")  # the references' rule leaves only the crowd-only images 25 and 80


def test_a_training_split_smaller_than_one_batch_is_refused(coco: FakeCoco) -> None:
    with pytest.raises(EmptySplitError, match=r"12 sample\(s\) are fewer than data.batch_size=16.*drop_last=false"):
        _dm(coco.root, batch_size=16, drop_last=True).train_dataloader()
    assert len(_dm(coco.root, batch_size=16, drop_last=False).train_dataloader()) > 0


def test_a_duplicate_image_id_is_named(coco_copy: Path) -> None:
    def duplicate(data: dict) -> None:
        data["images"][1]["id"] = data["images"][0]["id"]  # image 25's entry now says 9

    path = edit_annotations(coco_copy, "train2017", duplicate)
    with pytest.raises(AnnotationFormatError) as info:
        _dm(coco_copy).setup("fit")
    assert str(info.value) == (
        f"{path}: image id 9 is duplicated: 2 entries of 'images' have it (entries 0 and 1: "
        f"{{'id': 9, 'file_name': '000000000009.jpg'}} and {{'id': 9, 'file_name': '000000000025.jpg'}}); ids must "
        "be unique. Fix: give every image entry its own id and point each annotation's image_id at its image."
    )


def test_a_duplicate_category_id_is_named(coco_copy: Path) -> None:
    path = edit_annotations(coco_copy, "val2017", lambda data: data["categories"][1].update(id=1))
    with pytest.raises(AnnotationFormatError) as info:
        _dm(coco_copy).setup("validate")
    assert str(info.value).startswith(
        f"{path}: category id 1 is duplicated: 2 entries of 'categories' have it (entries 0 and 1: "
        "{'id': 1, 'name': 'person'} and {'id': 1, 'name': 'bicycle'}); ids must be unique."
    )


def test_annotation_ids_must_be_unique_and_missing_ones_are_numbered(coco_copy: Path) -> None:
    def renumber(data: dict) -> None:
        data["annotations"][1]["id"] = data["annotations"][0]["id"]

    path = edit_annotations(coco_copy, "val2017", renumber)
    with pytest.raises(AnnotationFormatError, match=re.escape(f"{path}: annotation id 1001 is duplicated")):
        _dm(coco_copy).setup("validate")
    edit_annotations(coco_copy, "val2017", lambda data: [a.pop("id") for a in data["annotations"]])
    dm = _dm(coco_copy)
    dm.setup("validate")
    assert sorted(dm.val_set.coco.anns) == [1, 2, 3, 4, 5, 6]  # every box kept, none collapsed onto another
    assert sum(len(t["boxes"]) for _, t in _samples(dm.val_set).values()) == 6
