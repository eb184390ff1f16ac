"""The GPU-resident data path (``gpu_preload``), tested on the CPU device: same augmentation semantics as the CPU
path (torchvision's RandomCrop + RandomHorizontalFlip + Normalize), same validation tensors, per-epoch reshuffling,
DistributedSampler-style sharding, and a Lightning fit."""

from __future__ import annotations

import logging
import warnings

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch.utils.data import DataLoader, DistributedSampler
from torchvision import transforms as T

from diffkd.data.cifar import CIFAR100_MEAN, CIFAR100_STD, CIFAR100DataModule
from diffkd.data.device_loader import CropFlipNormalize, DeviceTensorLoader, ShardedIndexSampler
from diffkd.data.fashion_mnist import FASHION_MNIST_MEAN, FASHION_MNIST_STD, FashionMNISTDataModule
from diffkd.models import create_model
from tests.conftest import compose_config
from tests.helpers.fake_data import write_cifar100, write_fashion_mnist


@pytest.fixture(scope="module")
def cifar(tmp_path_factory) -> dict:
    return write_cifar100(tmp_path_factory.mktemp("cifar"), n_train=70, n_test=40)


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory) -> dict:
    return write_fashion_mnist(tmp_path_factory.mktemp("fmnist"), n_train=100, n_test=40)


def _cifar_dm(cifar: dict, **kw) -> CIFAR100DataModule:
    return CIFAR100DataModule(str(cifar["root"]), num_workers=0, download=False, **kw)


def _fmnist_dm(fmnist: dict, **kw) -> FashionMNISTDataModule:
    return FashionMNISTDataModule(str(fmnist["root"]), download=False, debian_dir=None, **kw)


def _loader(n: int = 50, c: int = 3, size: int = 8, batch_size: int = 8, **kw) -> DeviceTensorLoader:
    """A loader whose targets are the sample indices (so batches say which samples they hold)."""
    images = torch.randint(0, 256, (n, c, size, size), generator=torch.Generator().manual_seed(n), dtype=torch.uint8)
    mean, std = (0.5,) * c, (0.25,) * c
    return DeviceTensorLoader(images, torch.arange(n), batch_size, mean, std, seed=kw.pop("seed", 7), **kw)


def _targets(loader) -> list[int]:
    return [int(v) for _, y in loader for v in y]


# ------------------------------------------------------------------------------------- augmentation semantics
def test_cifar_crop_flip_equals_torchvision_pipeline_for_every_offset(cifar):
    """Forcing the same (i, j) and flip on torchvision's own train transform gives bit-identical tensors."""
    dm = _cifar_dm(cifar, gpu_preload=True)
    dm.setup()
    images, targets = dm.device_data["train"]
    assert images.dtype == torch.uint8 and images.shape == (70, 3, 32, 32) and images.device.type == "cpu"
    assert torch.equal(images, torch.from_numpy(cifar["train_images"]).permute(0, 3, 1, 2))
    assert torch.equal(targets, torch.from_numpy(cifar["train_labels"]))
    crop, flip = dm.train_set.transform.transforms[:2]
    assert isinstance(crop, T.RandomCrop) and crop.padding == 4 and isinstance(flip, T.RandomHorizontalFlip)
    # all 9 x 9 window positions, each with and without a flip
    grid = torch.cartesian_prod(torch.arange(9), torch.arange(9), torch.arange(2))
    offsets, flips = grid[:, :2], grid[:, 2].bool()
    idx = torch.arange(len(grid)) % len(images)
    out = CropFlipNormalize(CIFAR100_MEAN, CIFAR100_STD, padding=4, flip=True)(images, idx, offsets, flips)
    for b in range(len(grid)):
        i, j = int(offsets[b, 0]), int(offsets[b, 1])
        crop.get_params = lambda img, size, i=i, j=j: (i, j, *size)  # what RandomCrop.forward asks for
        flip.p = 1.0 if flips[b] else 0.0  # torch.rand(1) < p: always / never
        expected, _ = dm.train_set[int(idx[b])]
        assert torch.equal(out[b], expected), (i, j, bool(flips[b]))


def test_cifar_train_loader_batches_are_its_plan_through_torchvision(cifar):
    """The loader's batches are torchvision's transform of the samples and parameters its epoch plan lists."""
    dm = _cifar_dm(cifar, gpu_preload=True, batch_size=16)
    dm.setup()
    loader = dm.train_dataloader()
    assert isinstance(loader, DeviceTensorLoader) and len(loader) == 70 // 16
    plan = loader.plan(0)
    crop, flip = dm.train_set.transform.transforms[:2]
    xs, ys = zip(*loader)
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.shape == (64, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    for b in range(len(x)):
        i, j = plan.offsets[b].tolist()
        crop.get_params = lambda img, size, i=i, j=j: (i, j, *size)
        flip.p = float(plan.flips[b])
        expected, target = dm.train_set[int(plan.indices[b])]
        assert torch.equal(x[b], expected) and int(y[b]) == target


def test_fashion_mnist_crop_flip_equals_torchvision_on_tensors(fmnist):
    dm = _fmnist_dm(fmnist, gpu_preload=True)
    dm.setup()
    images, _ = dm.device_data["train"]
    padding, flip = dm.train_augmentation()
    assert (padding, flip) == (2, True) and images.shape == (100, 1, 28, 28)
    tf = CropFlipNormalize(FASHION_MNIST_MEAN, FASHION_MNIST_STD, padding, flip, fused_normalize=True)
    offsets, flips = tf.sample(200, generator=torch.Generator().manual_seed(0))
    idx = torch.arange(200) % 100
    pixels = tf.crop_flip(images[idx], offsets, flips)
    out = tf(images, idx, offsets, flips)
    normalize = T.Normalize(FASHION_MNIST_MEAN, FASHION_MNIST_STD)
    for b in range(200):
        rc = T.RandomCrop(28, padding=2)
        rc.get_params = lambda img, size, i=int(offsets[b, 0]), j=int(offsets[b, 1]): (i, j, *size)
        expected = T.RandomHorizontalFlip(p=float(flips[b]))(rc(images[idx[b]]))  # torchvision on uint8 tensors
        assert torch.equal(pixels[b], expected)
        torch.testing.assert_close(out[b], normalize(expected.float() / 255), atol=1e-6, rtol=0)
    # the CPU path (InMemoryImageDataset) runs the same transform: same global-RNG draws, same batch
    torch.manual_seed(3)
    cpu_x, _ = dm.train_set.batch(idx[:16])
    torch.manual_seed(3)
    o, f = dm.train_set.transform.sample(16)
    assert torch.equal(cpu_x, tf(images, idx[:16], o, f))


def test_offsets_are_uniform_and_flips_fair():
    loader = _loader(n=4000, size=8, padding=4, flip=True, shuffle=True)
    plans = [loader.plan(epoch) for epoch in range(10)]
    offsets = torch.cat([p.offsets for p in plans])
    flips = torch.cat([p.flips for p in plans])
    counts = torch.bincount(offsets[:, 0] * 9 + offsets[:, 1], minlength=81).double()
    assert offsets.min() == 0 and offsets.max() == 8 and len(counts) == 81
    expected = len(offsets) / 81
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 135, chi2  # χ²(80 dof): mean 80, 99.99 % quantile ≈ 131
    assert abs(float(flips.double().mean()) - 0.5) < 0.01  # 40 000 draws: σ = 0.0025
    # flips are independent of the offsets (fair within each column offset)
    for j in range(9):
        assert abs(float(flips[offsets[:, 1] == j].double().mean()) - 0.5) < 0.04


def test_channels_last_output():
    contiguous = _loader(c=3, padding=2, flip=True, shuffle=True)
    nhwc = _loader(c=3, padding=2, flip=True, shuffle=True, channels_last=True)
    for (a, ya), (b, yb) in zip(contiguous, nhwc):
        assert a.is_contiguous() and b.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(a, b) and torch.equal(ya, yb)
    for kw in ({}, {"flip": True}, {"padding": 1}):  # val; flip only; crop only
        a, _ = next(iter(_loader(c=3, shuffle=True, **kw)))
        b, _ = next(iter(_loader(c=3, shuffle=True, channels_last=True, **kw)))
        assert b.is_contiguous(memory_format=torch.channels_last) and torch.equal(a, b)


# ----------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("name", ["cifar", "fmnist"])
def test_val_batches_equal_the_cpu_path_exactly(name, cifar, fmnist):
    make = {"cifar": lambda **kw: _cifar_dm(cifar, **kw), "fmnist": lambda **kw: _fmnist_dm(fmnist, **kw)}[name]
    cpu, dev = make(batch_size=16), make(batch_size=16, gpu_preload=True)
    cpu.setup()
    dev.setup()
    cpu_val, dev_val = cpu.val_dataloader(), dev.val_dataloader()
    assert isinstance(cpu_val, DataLoader) and isinstance(dev_val, DeviceTensorLoader)
    assert len(dev_val) == len(cpu_val) == 3  # 16 + 16 + 8, nothing dropped
    for _ in range(2):  # the same every epoch
        pairs = list(zip(cpu_val, dev_val, strict=True))
        assert pairs[-1][1][0].shape[0] == 8
        for (xc, yc), (xd, yd) in pairs:
            assert torch.equal(xc, xd) and torch.equal(yc, yd)
    assert isinstance(dev.test_dataloader(), DeviceTensorLoader)


# ------------------------------------------------------------------------------------------ order and shards
def test_epochs_reshuffle_reproducibly():
    loader = _loader(n=50, batch_size=8, padding=2, flip=True, shuffle=True, drop_last=True)
    assert len(loader) == 6
    epochs = [[(x.clone(), y.clone()) for x, y in loader] for _ in range(3)]  # a plain loop advances the epoch
    orders = [torch.cat([y for _, y in e]) for e in epochs]
    assert all(len(o) == 48 and len(set(o.tolist())) == 48 for o in orders)
    assert not torch.equal(orders[0], orders[1]) and not torch.equal(orders[1], orders[2])
    for epoch in (0, 2):  # set_epoch (what Lightning calls) replays an epoch exactly, augmentation included
        loader.sampler.set_epoch(epoch)
        again = list(loader)
        assert all(torch.equal(a, x) and torch.equal(b, y) for (a, b), (x, y) in zip(again, epochs[epoch]))
    # the order is DistributedSampler's (seed + epoch); another seed gives another order
    sampler = DistributedSampler(range(50), num_replicas=1, rank=0, shuffle=True, seed=7)
    sampler.set_epoch(1)
    assert orders[1].tolist() == list(sampler)[:48]
    assert not torch.equal(torch.cat([y for _, y in _loader(shuffle=True, seed=8)]), orders[0])
    # validation: dataset order, every sample, the same every time
    val = _loader(n=50, batch_size=8)
    assert len(val) == 7 and _targets(val) == list(range(50)) == _targets(val)


@pytest.mark.parametrize("n", [103, 104])
@pytest.mark.parametrize("shuffle", [True, False])
def test_ddp_shards_are_disjoint_equal_and_match_distributed_sampler(n, shuffle):
    for epoch in (0, 1):
        train = [_loader(n=n, batch_size=8, shuffle=shuffle, drop_last=True, rank=r, world_size=2) for r in (0, 1)]
        for loader in train:
            loader.sampler.set_epoch(epoch)
        seen = [_targets(loader) for loader in train]
        assert len(train[0]) == len(train[1]) == (n // 2) // 8
        assert len(seen[0]) == len(seen[1]) == len(train[0]) * 8
        assert not set(seen[0]) & set(seen[1])  # disjoint
        for r, loader in enumerate(train):
            ref = DistributedSampler(range(n), num_replicas=2, rank=r, shuffle=shuffle, seed=7, drop_last=True)
            ref.set_epoch(epoch)
            assert loader.sampler.indices(epoch).tolist() == list(ref)
            assert seen[r] == list(ref)[: len(seen[r])]
        # all of the (truncated) data set is covered by the two shards together
        whole = set(train[0].sampler.indices(epoch).tolist()) | set(train[1].sampler.indices(epoch).tolist())
        assert len(whole) == n - n % 2
    # evaluation shards: no shuffle, padded by wrapping around like DistributedSampler(drop_last=False)
    val = [_loader(n=n, batch_size=8, rank=r, world_size=2) for r in (0, 1)]
    seen = [_targets(loader) for loader in val]
    assert len(seen[0]) == len(seen[1]) == -(-n // 2) and set(seen[0]) | set(seen[1]) == set(range(n))
    for r in (0, 1):
        assert seen[r] == list(DistributedSampler(range(n), num_replicas=2, rank=r, shuffle=False))
    # different ranks draw different augmentations
    aug = [_loader(n=n, padding=2, flip=True, shuffle=True, rank=r, world_size=2).plan(0) for r in (0, 1)]
    assert not torch.equal(aug[0].offsets, aug[1].offsets)


@pytest.mark.parametrize(
    ("n", "batch_size", "drop_last", "world_size"),
    [
        (50, 8, True, 1),
        (50, 8, False, 1),
        (48, 8, True, 1),
        (7, 8, False, 1),
        (7, 8, True, 1),
        (103, 8, True, 3),
        (103, 8, False, 3),
    ],
)
def test_len_matches_batches_and_dataloader(n, batch_size, drop_last, world_size):
    for rank in range(world_size):
        loader = _loader(
            n=n, batch_size=batch_size, shuffle=True, drop_last=drop_last, rank=rank, world_size=world_size
        )
        sampler = DistributedSampler(range(n), world_size, rank, shuffle=True, drop_last=drop_last)
        reference = DataLoader(range(n), batch_size=batch_size, sampler=sampler, drop_last=drop_last)
        batches = list(loader)
        assert len(loader) == len(batches) == len(reference)
        assert all(len(y) == batch_size for _, y in batches[:-1])
        if drop_last and batches:
            assert len(batches[-1][1]) == batch_size


def test_no_host_round_trip_per_batch(monkeypatch):
    """After the epoch's plan is made (once per epoch), batches never read a tensor back to the host."""
    loader = _loader(n=64, batch_size=8, padding=2, flip=True, shuffle=True, channels_last=True)
    batches = iter(loader)
    next(batches)  # draws the epoch plan

    def sync(*args, **kwargs):
        raise AssertionError("host round-trip inside the batch loop")

    for name in ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    assert sum(1 for _ in batches) == 7


# ----------------------------------------------------------------------------------------- data modules
def test_datamodules_preload_once_and_log(cifar, fmnist, caplog):
    caplog.set_level(logging.INFO, logger="diffkd.data.base")
    dm = _cifar_dm(cifar, gpu_preload=True, batch_size=16)
    dm.num_workers = 4
    dm.setup("fit")
    images = dm.device_data["train"][0]
    dm.setup("validate")
    train = dm.train_dataloader()
    assert dm.device_data["train"][0] is images and train.images is images  # moved once, shared by the loader
    assert train.sampler.shuffle and train.drop_last and train.transform.padding == 4 and train.transform.flip
    assert "gpu_preload: 70 train / 40 val images on cpu" in caplog.text
    assert "num_workers=4 and pin_memory ignored" in caplog.text
    x, y = next(iter(train))
    assert x.shape == (16, 3, 32, 32) and y.shape == (16,)
    fm = _fmnist_dm(fmnist, gpu_preload=True, batch_size=32, image_size=32, subset=60)
    fm.setup()
    loader = fm.train_dataloader()
    assert len(loader) == 1 and loader.transform.padding == 2 and loader.transform.fused_normalize
    assert next(iter(loader))[0].shape == (32, 1, 32, 32)
    # off by default: the CPU loaders
    assert isinstance(_fmnist_dm(fmnist, batch_size=32).train_dataloader(), DataLoader)


def test_hydra_option(fmnist, tmp_path):
    for data in ("fashion_mnist", "cifar100"):
        cfg = compose_config([f"data={data}", f"paths.data_dir={tmp_path}", "data.gpu_preload=true"])
        assert instantiate(cfg.data).gpu_preload is True
        assert compose_config([f"data={data}", f"paths.data_dir={tmp_path}"]).data.gpu_preload is False


class _Recorder(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = create_model("smallcnn_student", num_classes=10)
        self.channels_last = True  # the loader follows the module's memory format
        self.train_batches: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.val_batches = 0

    def training_step(self, batch, batch_idx):
        x, y = batch
        assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
        self.train_batches.setdefault(self.current_epoch, []).append((x.clone(), y.clone()))
        return F.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        self.val_batches += 1

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_lightning_fit_with_gpu_preload(fmnist, tmp_path):
    L.seed_everything(5)
    dm = _fmnist_dm(fmnist, gpu_preload=True, batch_size=16)
    module = _Recorder()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, datamodule=dm)
    about_data = [str(w.message) for w in caught if any(k in str(w.message) for k in ("sampler", "shuffl", "worker"))]
    assert not about_data
    assert trainer.global_step == 4 and module.val_batches == 2
    loader = trainer.train_dataloader
    assert isinstance(loader, DeviceTensorLoader) and loader.sampler.seed == 5  # Lightning's seed
    # Lightning's set_epoch reached the loader: each epoch got its own plan
    for epoch in (0, 1):
        plan = loader.plan(epoch)
        for b, (x, y) in enumerate(module.train_batches[epoch]):
            part = slice(16 * b, 16 * (b + 1))
            idx = plan.indices[part]
            assert torch.equal(x, loader.transform(loader.images, idx, plan.offsets[part], plan.flips[part]))
            assert torch.equal(y, loader.targets[idx])
    assert not torch.equal(loader.plan(0).indices, loader.plan(1).indices)


def test_train_entry_point_with_gpu_preload(tmp_path, fmnist_root):
    """``python -m diffkd.train data.gpu_preload=true``: the real task module with DiffKD, channels_last, val, test."""
    from diffkd.train import train
    from tests.conftest import tiny_overrides

    overrides = [
        "experiment=demo",
        "pipeline=train",
        "distill=diffkd",
        "test=true",
        "data.debian_dir=null",
        "data.download=false",
    ]
    overrides += ["data.gpu_preload=true", "model.channels_last=true", *tiny_overrides(tmp_path, fmnist_root)]
    metrics, objects = train(compose_config(overrides))
    dm, trainer = objects["datamodule"], objects["trainer"]
    assert dm.gpu_preload and isinstance(dm.train_dataloader(), DeviceTensorLoader)
    assert dm.train_dataloader().transform.channels_last  # follows model.channels_last
    assert trainer.global_step == 2
    assert all(np.isfinite(metrics[k]) for k in ("train/loss", "val/loss", "test/loss", "val/acc"))


def test_loader_rejects_bad_input():
    with pytest.raises(TypeError, match="uint8"):
        DeviceTensorLoader(torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.long), 2, (0.5,), (0.5,))
    with pytest.raises(ValueError, match="targets"):
        DeviceTensorLoader(
            torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.zeros(3, dtype=torch.long), 2, (0.5,), (0.5,)
        )
    with pytest.raises(ValueError, match="rank"):
        ShardedIndexSampler(10, rank=2, world_size=2)
    assert np.isclose(
        CropFlipNormalize((0.5,), (0.25,)).normalize(torch.full((1, 1, 1, 1), 255, dtype=torch.uint8)).item(), 2.0
    )
