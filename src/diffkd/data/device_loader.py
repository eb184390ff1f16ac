"""Data sets that live on the device: uint8 images in device memory, batches augmented there.

For small data sets (CIFAR-100: 150 MB, Fashion-MNIST: 47 MB as uint8) the whole data set fits in GPU memory many
times over. :class:`DeviceTensorLoader` then replaces ``DataLoader`` + worker processes + PIL: each batch is a
gather of uint8 pixels, a random crop with zero padding and a random horizontal flip done with per-sample index
arithmetic, and a normalisation, all on the device, with no worker process and no host synchronisation per batch.

Pieces (all dataset-agnostic):

* :class:`CropFlipNormalize`: the augmentation, ``RandomCrop(H, padding) + RandomHorizontalFlip + ToTensor +
  Normalize`` for a batch of uint8 images, with its random parameters either sampled (:meth:`~CropFlipNormalize.
  sample`) or given, so that a test can force the same crop offsets and flips on both paths;
* :class:`ShardedIndexSampler`: the order of the samples in an epoch and this rank's share of it, exactly as
  ``torch.utils.data.DistributedSampler`` computes it (``randperm`` seeded with ``seed + epoch``, ``drop_last``
  truncation or wrap-around padding, ``rank::world_size`` shards);
* :class:`DeviceTensorLoader`: the iterable Lightning uses as a train or val dataloader.

Every epoch's plan (sample order, crop offsets, flips) is drawn on the CPU from generators seeded with
``(seed, epoch, rank)`` and copied to the device once per epoch, so a run is reproducible and the same on the
CPU and on a GPU.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from diffkd.utils.seeding import lightning_seed, mix_seed

__all__ = ["CropFlipNormalize", "DeviceTensorLoader", "EpochPlan", "ShardedIndexSampler", "lightning_seed"]


class CropFlipNormalize:
    """Random crop with zero padding, random horizontal flip and normalisation of a batch of uint8 images.

    Same semantics as torchvision's ``RandomCrop(H, padding=padding)`` (zero fill) + ``RandomHorizontalFlip(0.5)``
    + ``ToTensor`` + ``Normalize(mean, std)`` applied to each image, for given crop offsets and flip decisions:
    the crop window of sample ``b`` starts at row ``offsets[b, 0]`` and column ``offsets[b, 1]`` of the image
    padded by ``padding`` pixels on every side (torchvision's ``i, j`` from ``RandomCrop.get_params``), and the
    window is mirrored when ``flips[b]``.

    Normalisation is computed in float32 either as torchvision does it, ``(x / 255 - mean) / std`` (default: batches
    equal ``ToTensor`` + ``Normalize`` bit for bit), or, with ``fused_normalize``, as ``(x - 255·mean) · (1 / (255·
    std))`` (one pass fewer; what ``InMemoryImageDataset`` has always computed). The two differ by about 1e-7.

    The whole batch is done in a few vectorised ops: one ``index_select`` of the batch, one zero ``pad``, one
    window selection with the (B,) offsets, one column ``gather`` for the flips, then the cast and normalisation.
    No Python loop over samples, no host synchronisation.

    Args:
        mean, std: per-channel statistics on the [0, 1] scale (C values each).
        padding: zero padding of the random crop in pixels (0: no crop).
        flip: random horizontal flip with probability 1/2.
        channels_last: return batches in ``torch.channels_last`` memory format (written in that layout directly, no
            extra copy; on the CPU the NHWC gather is slower than the NCHW one).
        fused_normalize: normalise as ``(x - 255·mean) · (1 / (255·std))`` instead of torchvision's order.
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        padding: int = 0,
        flip: bool = False,
        channels_last: bool = False,
        fused_normalize: bool = False,
    ) -> None:
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} channels but std has {len(std)}")
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.padding = int(padding)
        self.flip = bool(flip)
        self.channels_last = bool(channels_last)
        self.fused_normalize = bool(fused_normalize)
        self._cache: dict[tuple, Tensor] = {}  # aranges and statistics per device: no per-batch host-to-device copy

    @property
    def augments(self) -> bool:
        """Whether there is anything random (a crop or a flip)."""
        return self.padding > 0 or self.flip

    def _stats(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """``(mean, std)`` as float32 (1, C, 1, 1) on ``device``; fused: ``(255·mean, 1 / (255·std))``."""
        key = ("stats", device)
        if key not in self._cache:
            mean, std = torch.tensor([self.mean, self.std], dtype=torch.float32).view(2, 1, -1, 1, 1)
            if self.fused_normalize:
                mean, std = mean * 255.0, 1.0 / (std * 255.0)
            self._cache[key] = torch.stack([mean, std]).to(device)
        stats = self._cache[key]
        return stats[0], stats[1]

    def _arange(self, n: int, device: torch.device) -> Tensor:
        key = ("arange", n, device)
        if key not in self._cache:
            self._cache[key] = torch.arange(n, device=device)
        return self._cache[key]

    def sample(
        self, n: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> tuple[Tensor | None, Tensor | None]:
        """Random parameters for ``n`` samples.

        Returns:
            ``offsets`` int64 (n, 2), ``(top, left)`` uniform over the ``(2·padding + 1)²`` window positions, or
            None without padding; ``flips`` bool (n,), each true with probability 1/2, or None without flip.
        """
        offsets = flips = None
        if self.padding:
            offsets = torch.randint(0, 2 * self.padding + 1, (n, 2), generator=generator, device=device)
        if self.flip:
            flips = torch.randint(0, 2, (n,), generator=generator, device=device).bool()
        return offsets, flips

    def crop_flip(self, images: Tensor, offsets: Tensor | None, flips: Tensor | None) -> Tensor:
        """Crop and flip uint8 images (B, C, H, W) → uint8 (B, C, H, W) (channels_last strides if asked for).

        ``offsets`` int64 (B, 2) into the zero-padded image (None: the centre, i.e. no crop); ``flips`` bool (B,)
        (None: no flip).

        The crop selects, per sample, one of the ``(2p + 1)²`` windows of the zero-padded batch (an ``unfold`` view,
        no copy) with three (B,) indices; the flip is one ``gather`` of the columns with a per-sample mirrored
        column order. For channels_last the same runs on the (B, H, W, C) view, so the result needs no extra copy.
        """
        b, _, h, w = images.shape
        cl = self.channels_last
        if offsets is None and flips is None:
            return images.contiguous(memory_format=torch.channels_last) if cl else images
        hd, wd = (1, 2) if cl else (2, 3)  # the H and W dims of the working layout, NHWC or NCHW

        def work(t: Tensor) -> Tensor:
            return t.permute(0, 2, 3, 1) if cl else t

        x = work(images)
        if offsets is not None and self.padding:
            p = self.padding
            # zero padding (RandomCrop's fill), written in the working layout so the windows' gather keeps it
            padded = F.pad(x, [0, 0, p, p, p, p] if cl else [p, p, p, p])
            windows = padded.unfold(hd, h, 1).unfold(wd, w, 1)
            # NCHW: (B, C, 2p+1, 2p+1, H, W) → (B, 2p+1, 2p+1, C, H, W); NHWC: (B, 2p+1, 2p+1, C, H, W) → (…, H, W, C)
            windows = windows.permute(0, 1, 2, 4, 5, 3) if cl else windows.permute(0, 2, 3, 1, 4, 5)
            x = windows[self._arange(b, images.device), offsets[:, 0], offsets[:, 1]]
        if flips is not None:
            cols = self._arange(w, images.device)
            cols = torch.where(flips[:, None], cols.flip(0), cols)  # (B, W): mirrored column order where flipped
            cols = cols[:, None, :, None] if cl else cols[:, None, None, :]
            x = x.gather(wd, cols.expand(x.shape))
        return x.contiguous().permute(0, 3, 1, 2) if cl else x  # contiguous(): a no-op, as a guarantee

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 (B, C, H, W) → float32 (B, C, H, W): ``(x / 255 - mean) / std`` in torchvision's order of operations,
        or the fused form (see the class docstring). Keeps the memory format."""
        mean, std = self._stats(images.device)
        if self.fused_normalize:
            return images.float().sub_(mean).mul_(std)
        return images.float().div_(255).sub_(mean).div_(std)

    def __call__(
        self,
        images: Tensor,
        indices: Tensor | None = None,
        offsets: Tensor | None = None,
        flips: Tensor | None = None,
    ) -> Tensor:
        """Augmented, normalised batch.

        Args:
            images: uint8 (N, C, H, W): the data set, or the batch itself when ``indices`` is None.
            indices: int64 (B,) rows of ``images`` to take, on ``images``'s device.
            offsets, flips: the random parameters (see :meth:`sample`); None: no crop / no flip.

        Returns:
            float32 (B, C, H, W), channels_last when ``channels_last``.
        """
        batch = images if indices is None else images.index_select(0, indices)
        return self.normalize(self.crop_flip(batch, offsets, flips))


class ShardedIndexSampler:
    """Sample order of one epoch and this rank's share, as ``DistributedSampler`` computes it, as a tensor.

    ``shuffle``: ``randperm(n)`` from a CPU generator seeded with ``seed + epoch`` (the same on every rank);
    otherwise ``0 … n-1``. ``drop_last``: the order is truncated to a multiple of ``world_size``; otherwise it is
    padded by wrapping around to one. Rank ``r`` takes positions ``r, r + world_size, …``: disjoint shards of equal
    size (``len(self)``) that together cover the (truncated) data set.

    Lightning calls :meth:`set_epoch` at the start of every epoch (it looks for ``loader.sampler.set_epoch``);
    an iteration that starts without a new ``set_epoch`` takes the next epoch (:meth:`advance`), so a plain loop
    reshuffles as well.
    """

    def __init__(
        self,
        num_samples: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.n = int(num_samples)
        self.rank, self.world_size = int(rank), int(world_size)
        self.shuffle, self.seed, self.drop_last = bool(shuffle), int(seed), bool(drop_last)
        self.epoch = 0
        self._epoch_given = True  # the first iteration uses epoch 0

    def __len__(self) -> int:
        """Samples on this rank."""
        if self.drop_last:
            return self.n // self.world_size
        return math.ceil(self.n / self.world_size)

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch`` for the next iteration (what Lightning and ``DistributedSampler`` users call)."""
        self.epoch = int(epoch)
        self._epoch_given = True

    def advance(self) -> int:
        """The epoch an iteration starting now uses: the one last set, else the one after the last used."""
        if not self._epoch_given:
            self.epoch += 1
        self._epoch_given = False
        return self.epoch

    def indices(self, epoch: int | None = None) -> Tensor:
        """int64 (len(self),) on the CPU: this rank's sample indices for ``epoch`` (default: ``self.epoch``)."""
        epoch = self.epoch if epoch is None else int(epoch)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        total = len(self) * self.world_size
        if total > self.n:  # wrap around, as DistributedSampler pads
            order = order[torch.arange(total) % self.n]
        return order[self.rank : total : self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())


@dataclass
class EpochPlan:
    """Everything random about one epoch on one rank, on the loader's device.

    Attributes:
        epoch: the epoch it was drawn for.
        indices: int64 (M,) sample indices in order (M = ``len(loader.sampler)``).
        offsets: int64 (M, 2) crop offsets, or None (no crop).
        flips: bool (M,) flips, or None (no flip).
    """

    epoch: int
    indices: Tensor
    offsets: Tensor | None
    flips: Tensor | None


class DeviceTensorLoader:
    """A dataloader over a data set held on the device: batches ``(images, targets)`` made there.

    Usable wherever Lightning takes a dataloader (``train_dataloader``/``val_dataloader``): it is an iterable with
    ``__len__``; Lightning leaves non-``DataLoader`` iterables alone (no ``DistributedSampler`` is injected with
    ``use_distributed_sampler``, no worker checks), and ``transfer_batch_to_device`` of a batch already on the
    device is a no-op. In DDP, pass the rank and world size: every rank gets a disjoint shard of the same size
    (see :class:`ShardedIndexSampler`).

    Each epoch's plan (order, crop offsets, flips) is drawn on the CPU — the order from ``seed + epoch``, the
    augmentation from ``(seed, epoch, rank)`` — and copied to the device once; batches are then slices of it and
    :class:`CropFlipNormalize` on the device: no host synchronisation per batch.

    Args:
        images: uint8 (N, C, H, W) on the device the batches should be on.
        targets: int64 (N,) on the same device.
        batch_size: samples per batch (per rank).
        mean, std: per-channel normalisation statistics on the [0, 1] scale.
        padding: random-crop zero padding in pixels (0: no crop).
        flip: random horizontal flip.
        shuffle: reshuffle every epoch (training); False keeps the data set's order (evaluation).
        drop_last: drop this rank's last incomplete batch, and truncate the data set to a multiple of
            ``world_size`` (else it is padded by wrapping around, like ``DistributedSampler``).
        rank, world_size: this process's place in data-parallel training.
        seed: base seed; None takes Lightning's (``PL_GLOBAL_SEED``, 0 when unset).
        channels_last: yield images in ``torch.channels_last`` memory format.
        fused_normalize: see :class:`CropFlipNormalize`.
        with_index: end each batch with the samples' positions in ``images`` (int64 (B,)).

    Yields:
        ``(images float32 (B, C, H, W), targets int64 (B,))`` on ``images.device``; with ``with_index``
        ``(images, targets, index int64 (B,))``.
    """

    batch_sampler = None  # Lightning's shuffle check reads `batch_sampler` when a loader has a `sampler`

    def __init__(
        self,
        images: Tensor,
        targets: Tensor,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        padding: int = 0,
        flip: bool = False,
        shuffle: bool = False,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        seed: int | None = None,
        channels_last: bool = False,
        fused_normalize: bool = False,
        with_index: bool = False,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise TypeError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if targets.ndim != 1 or len(targets) != len(images):
            raise ValueError(f"{len(images)} images but targets of shape {tuple(targets.shape)}")
        if targets.device != images.device:
            raise ValueError(f"images on {images.device} but targets on {targets.device}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(mean) != images.shape[1]:
            raise ValueError(f"{images.shape[1]} channels but {len(mean)} mean values")
        self.images = images
        self.targets = targets.long()
        self.batch_size = int(batch_size)
        self.drop_last = bool(drop_last)
        self.with_index = bool(with_index)
        self.transform = CropFlipNormalize(mean, std, padding, flip, channels_last, fused_normalize)
        seed = lightning_seed() if seed is None else int(seed)
        self.sampler = ShardedIndexSampler(len(images), rank, world_size, shuffle, seed, drop_last)
        self._plan: EpochPlan | None = None  # the fixed plan of a loader without randomness (evaluation)

    @property
    def device(self) -> torch.device:
        return self.images.device

    @property
    def random(self) -> bool:
        """Whether epochs differ (shuffling or augmentation)."""
        return self.sampler.shuffle or self.transform.augments

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        m = len(self.sampler)
        return m // self.batch_size if self.drop_last else math.ceil(m / self.batch_size)

    def _to_device(self, t: Tensor) -> Tensor:
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def plan(self, epoch: int) -> EpochPlan:
        """This rank's order, crop offsets and flips for ``epoch``, on the device (the same for the same epoch)."""
        if not self.random and self._plan is not None:
            return self._plan
        s = self.sampler
        indices = s.indices(epoch)
        offsets = flips = None
        if self.transform.augments:
            g = torch.Generator().manual_seed(mix_seed(s.seed, epoch, s.rank, 1))
            offsets, flips = self.transform.sample(len(indices), generator=g)
        plan = EpochPlan(
            epoch=epoch,
            indices=self._to_device(indices),
            offsets=None if offsets is None else self._to_device(offsets),
            flips=None if flips is None else self._to_device(flips),
        )
        if not self.random:
            self._plan = plan
        return plan

    def example(self, size: int) -> tuple[Tensor, ...]:
        """The first ``size`` samples of the data set as one of this loader's batches (same crop, flip,
        normalisation and memory format, on its device), whatever the epoch or shard.

        The crop offsets and flips come from a generator seeded with the loader's seed: the global random
        states are not touched, and the example is the same on every call.

        Returns:
            ``(images float32 (size, C, H, W), targets int64 (size,))`` on ``self.device``, followed by the index
            ``0 … size-1`` with ``with_index``.
        """
        if not 1 <= size <= len(self.images):
            raise ValueError(f"example(size={size}): the data set has {len(self.images)} samples")
        offsets = flips = None
        if self.transform.augments:
            g = torch.Generator().manual_seed(mix_seed(self.sampler.seed, 2))
            offsets, flips = self.transform.sample(size, generator=g)
            offsets = None if offsets is None else self._to_device(offsets)
            flips = None if flips is None else self._to_device(flips)
        idx = self._to_device(torch.arange(size))
        return self._batch(idx, offsets, flips)

    def _batch(self, idx: Tensor, offsets: Tensor | None, flips: Tensor | None) -> tuple[Tensor, ...]:
        batch = (self.transform(self.images, idx, offsets, flips), self.targets[idx])
        return (*batch, idx) if self.with_index else batch

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        plan = self.plan(self.sampler.advance())
        stop = len(self) * self.batch_size if self.drop_last else len(plan.indices)
        for start in range(0, stop, self.batch_size):
            part = slice(start, start + self.batch_size)
            idx = plan.indices[part]
            offsets = None if plan.offsets is None else plan.offsets[part]
            flips = None if plan.flips is None else plan.flips[part]
            yield self._batch(idx, offsets, flips)

    def __repr__(self) -> str:
        s, t = self.sampler, self.transform
        return (
            f"{type(self).__name__}(n={s.n}, shape={tuple(self.images.shape[1:])}, device={self.device}, "
            f"batch_size={self.batch_size}, batches={len(self)}, shuffle={s.shuffle}, drop_last={self.drop_last}, "
            f"padding={t.padding}, flip={t.flip}, rank={s.rank}/{s.world_size})"
        )
