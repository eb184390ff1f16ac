"""Fashion-MNIST, held in memory: the embedded demo's data (60 000 train / 10 000 test, 28 × 28 grey, 10 classes).

Where the files come from, in this order (the first complete set wins; a log line says which files were used):

1. Debian's ``dataset-fashion-mnist`` package: ``/usr/share/datasets/fashion-mnist/*-ubyte.gz``
   (``apt-get install dataset-fashion-mnist``; works offline once installed);
2. torchvision's layout under ``data_dir``: ``<data_dir>/FashionMNIST/raw/*-ubyte[.gz]``;
3. a download by ``torchvision.datasets.FashionMNIST`` into (2), when ``download=True``.

The whole data set is decoded once into uint8 tensors; augmentation (random crop with zero padding, horizontal
flip) and normalisation run on tensors, a whole batch at a time (``InMemoryImageDataset.__getitems__``), so
loading costs well under a millisecond per batch and no worker processes are needed. With ``gpu_preload=True``
the uint8 tensors live on the training device and the same augmentation runs there.
Batches: images (B, 1, S, S) float32 with S = ``image_size``, targets (B,) int64 in [0, 10).

Transforms: ``train_transform``/``val_transform`` from the configuration (a mapping of timm ``create_transform``
arguments or a list of torchvision transforms, see :mod:`diffkd.data.transforms`) replace the built-in tensor
augmentation: each image then goes to the transform as a grey (``L``) S × S PIL image, one at a time
(:class:`TransformedImageDataset`, as ``torchvision.datasets.FashionMNIST`` does), and must come out float32
(1, S, S). ``null`` keeps the built-in one, whose tensors and random draws are those this module has always
produced.
"""

from __future__ import annotations

import gzip
import logging
import math
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from diffkd.data.classification import PreloadableDataModule
from diffkd.data.device_loader import CropFlipNormalize
from diffkd.data.images import DataNotFoundError
from diffkd.data.loader_keywords import loader_keywords
from diffkd.data.transforms import TransformSpec

__all__ = [
    "DEBIAN_FASHION_MNIST_DIR",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "FashionMNISTDataModule",
    "InMemoryImageDataset",
    "TransformedImageDataset",
    "find_fashion_mnist",
    "read_idx",
]

log = logging.getLogger(__name__)

#: Where Debian's ``dataset-fashion-mnist`` package installs the four ``*-ubyte.gz`` files.
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
DEBIAN_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
#: (split, kind) -> file name without ``.gz``.
FASHION_MNIST_FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}


def read_idx(path: str | Path) -> Tensor:
    """Read an IDX file of unsigned bytes (gzipped or not; detected from the content, not the name).

    Returns:
        uint8 tensor with the file's shape: (N, H, W) for ``*-images-idx3-ubyte``, (N,) for ``*-labels-idx1-ubyte``.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes (header {raw[:4].hex()})")
    ndim = raw[3]
    offset = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", raw[4:offset])
    count = math.prod(dims)
    if len(raw) - offset != count:
        raise ValueError(f"{path}: header says {dims} = {count} bytes, file holds {len(raw) - offset}")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8, offset=offset, count=count).view(*dims)


def _files_in(folder: Path) -> dict[tuple[str, str], Path] | None:
    """The four files in ``folder`` (extracted file preferred over ``.gz``), or None when one is missing."""
    found = {}
    for key, name in FASHION_MNIST_FILES.items():
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            return None
    return found


def find_fashion_mnist(
    folders: list[tuple[str, Path]],
) -> tuple[str, dict[tuple[str, str], Path]] | None:
    """First ``(source, files)`` among ``[(source, folder), ...]`` holding all four files, else None."""
    for source, folder in folders:
        files = _files_in(folder)
        if files is not None:
            return source, files
    return None


class InMemoryImageDataset(Dataset):
    """Images held as one uint8 tensor; crop/flip augmentation and normalisation done on tensors.

    ``__getitems__`` (used by ``DataLoader`` for a whole batch of indices) augments a batch in a few vectorised
    tensor ops (:class:`~diffkd.data.device_loader.CropFlipNormalize`, the same code as the ``gpu_preload`` path,
    drawing its crop offsets and flips from the global torch RNG); ``__getitem__`` goes through the same code for
    one index. Normalisation: ``(x - 255·mean) · (1 / (255·std))`` (``fused_normalize``).

    Args:
        images: uint8 (N, C, H, W) or (N, H, W) (a channel axis is added).
        targets: int64 (N,).
        mean, std: per-channel statistics on the [0, 1] scale.
        padding: random-crop zero padding in pixels (0: no crop), as ``RandomCrop(H, padding)``.
        flip: random horizontal flip with probability 1/2.

    Returns per item ``(image, target)``: float32 (C, H, W) and int64 ().
    """

    def __init__(
        self,
        images: Tensor,
        targets: Tensor,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        padding: int = 0,
        flip: bool = False,
    ) -> None:
        if images.dtype != torch.uint8:
            raise TypeError(f"images must be uint8, got {images.dtype}")
        if images.ndim == 3:
            images = images.unsqueeze(1)
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        self.height, self.width = images.shape[-2:]
        self.padding = int(padding)
        self.flip = bool(flip)
        self.images = images.contiguous()  # uint8 (N, C, H, W), unpadded
        self.targets = targets.long()
        self.channels = images.shape[1]
        self.transform = CropFlipNormalize(mean, std, padding=self.padding, flip=self.flip, fused_normalize=True)

    def __len__(self) -> int:
        return len(self.targets)

    def batch(self, indices: Tensor | Sequence[int]) -> tuple[Tensor, Tensor]:
        """Augmented, normalised ``(images (B, C, H, W) float32, targets (B,) int64)`` for ``indices``."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        offsets, flips = self.transform.sample(len(idx))
        return self.transform(self.images, idx, offsets, flips), self.targets[idx]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        x, y = self.batch([int(index)])
        return x[0], y[0]

    def __getitems__(self, indices: list[int]) -> list[tuple[Tensor, Tensor]]:
        x, y = self.batch(indices)
        return list(zip(x.unbind(0), y.unbind(0)))


class TransformedImageDataset(Dataset):
    """Images held as one uint8 tensor, each handed to ``transform`` as a PIL image (``L`` for one channel, RGB
    for three), one item at a time: for the configured transforms (see :mod:`diffkd.data.transforms`).

    Args:
        images: uint8 (N, C, H, W) or (N, H, W) (a channel axis is added), C = 1 or 3.
        targets: int64 (N,).
        transform: PIL image → float32 (C, S, S).

    Returns per item ``(transform(image), target)``: the transform's output and int64 ().
    """

    def __init__(self, images: Tensor, targets: Tensor, transform: Callable[[Image.Image], Any]) -> None:
        if images.dtype != torch.uint8:
            raise TypeError(f"images must be uint8, got {images.dtype}")
        if images.ndim == 3:
            images = images.unsqueeze(1)
        if images.shape[1] not in (1, 3):
            raise ValueError(f"images must have 1 or 3 channels for PIL, got {images.shape[1]}")
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        self.images = images.contiguous()
        self.targets = targets.long()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, Tensor]:
        pixels = self.images[index]
        pixels = pixels[0] if pixels.shape[0] == 1 else pixels.permute(1, 2, 0)
        return self.transform(Image.fromarray(pixels.numpy())), self.targets[index]


@loader_keywords(after="data_dir", batch_size=128, num_workers=0)
class FashionMNISTDataModule(PreloadableDataModule):
    """Fashion-MNIST in memory (see the module docstring for where the files are looked for).

    The official test split is used for validation. Default train transform: random crop with zero padding (2 px
    at 28 × 28, scaled with ``image_size``) + horizontal flip + normalise, on whole batches of tensors; val:
    normalise. ``train_transform``/``val_transform`` replace them (grey PIL images in, see the module docstring).
    Batches are images (B, 1, S, S) float32 and targets (B,) int64, S = ``image_size``.

    Args:
        data_dir: folder for torchvision's layout, ``<data_dir>/FashionMNIST/raw/``.
        batch_size, val_batch_size, pin_memory, drop_last: see ``ClassificationDataModule``.
        num_workers: default 0: the data are in memory and a batch costs well under 1 ms, so worker
            processes would only take CPU from training.
        download: let torchvision download the files when no complete set is found.
        image_size: side S of the images; other than 28, the data set is resized once (bilinear) at load time.
        subset: keep only the first ``subset`` training images (quick runs); None keeps all 60 000.
        debian_dir: where Debian's ``dataset-fashion-mnist`` puts its files (searched first; None skips it).
        gpu_preload: keep the uint8 data set on the training device and augment there (the same crop, flip and
            normalisation; see ``PreloadableDataModule``); only with the default transforms.
        train_transform, val_transform: None (the built-in ones), a mapping of timm ``create_transform``
            arguments, or a list of torchvision transforms (see :mod:`diffkd.data.transforms`); the images are
            resized to ``image_size`` first, and the output must be (1, ``image_size``, ``image_size``).
    """

    num_classes = 10
    in_chans = 1
    fused_normalize = True  # InMemoryImageDataset's normalisation: the gpu_preload path gives the same numbers
    mean = FASHION_MNIST_MEAN
    std = FASHION_MNIST_STD
    classes = FASHION_MNIST_CLASSES

    def __init__(
        self,
        data_dir: str = "data",
        download: bool = True,
        image_size: int = 28,
        subset: int | None = None,
        debian_dir: str | Path | None = DEBIAN_FASHION_MNIST_DIR,
        gpu_preload: bool = False,
        train_transform: TransformSpec = None,
        val_transform: TransformSpec = None,
        **loader_options: Any,
    ) -> None:
        transforms = {"train_transform": train_transform, "val_transform": val_transform}
        super().__init__(data_dir, gpu_preload=gpu_preload, **transforms, **loader_options)
        self.download = download
        self.image_size = int(image_size)
        if subset is not None and subset <= 0:
            raise ValueError(f"subset must be a positive number of images or None, got {subset}")
        self.subset = subset
        self.debian_dir = Path(debian_dir) if debian_dir is not None else None
        self.files: dict[tuple[str, str], Path] | None = None
        self.source: str | None = None

    @property
    def torchvision_dir(self) -> Path:
        """``<data_dir>/FashionMNIST/raw``: where ``torchvision.datasets.FashionMNIST`` keeps (and downloads) them."""
        return Path(self.data_dir) / "FashionMNIST" / "raw"

    def search_folders(self) -> list[tuple[str, Path]]:
        """``[(source, folder), ...]`` in search order."""
        folders = []
        if self.debian_dir is not None:
            folders.append((f"Debian package {DEBIAN_PACKAGE}", self.debian_dir))
        folders.append(("torchvision layout", self.torchvision_dir))
        return folders

    def locate(self) -> tuple[str, dict[tuple[str, str], Path]] | None:
        """The first complete set of files in search order, as ``(source, files)``, or None."""
        return find_fashion_mnist(self.search_folders())

    def prepare_data(self) -> None:
        """Download with torchvision (rank 0 only) when no complete set is found and ``download=True``."""
        if not self.download or self.locate() is not None:
            return
        from torchvision.datasets import FashionMNIST

        log.info(
            "Fashion-MNIST: not in %s; downloading with torchvision into %s",
            ", ".join(str(f) for _, f in self.search_folders()),
            self.torchvision_dir,
        )
        try:
            FashionMNIST(self.data_dir, train=True, download=True)  # fetches (md5-checked), extracts all 4 files
        except (OSError, RuntimeError) as err:  # no network, all mirrors down, bad checksum
            raise self._not_found(download_error=err) from err

    def _not_found(self, download_error: BaseException | None = None) -> DataNotFoundError:
        searched = [f"{folder}  ({source})" for source, folder in self.search_folders()]
        if not self.download:
            searched.append("torchvision download: off (download=False)")
        elif download_error is not None:
            searched.append(f"torchvision download (download=True): failed: {download_error}")
        else:
            searched.append("torchvision download (download=True)")
        names = ", ".join(FASHION_MNIST_FILES.values())
        return DataNotFoundError(
            "Fashion-MNIST",
            searched=searched,
            layout=[f"<folder>/{{{names}}}  (each file may also be gzipped, with a .gz suffix)"],
            remedies=[
                f"apt-get install {DEBIAN_PACKAGE}  (Debian/Ubuntu; installs into {DEBIAN_FASHION_MNIST_DIR})",
                f"set data.download=true: torchvision downloads Fashion-MNIST into {self.torchvision_dir}",
            ],
        )

    def _load(self, files: dict[tuple[str, str], Path], split: str) -> tuple[Tensor, Tensor]:
        images, labels = read_idx(files[(split, "images")]), read_idx(files[(split, "labels")]).long()
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"Fashion-MNIST {split}: images {tuple(images.shape)} and labels {tuple(labels.shape)} do not match"
            )
        return images, labels

    def _resize(self, images: Tensor) -> Tensor:
        """uint8 (N, H, W) -> uint8 (N, 1, S, S), bilinear, in chunks to bound memory."""
        images = images.unsqueeze(1)
        if images.shape[-1] == self.image_size and images.shape[-2] == self.image_size:
            return images
        chunks = [
            F.interpolate(c.float(), size=(self.image_size, self.image_size), mode="bilinear", antialias=True)
            .round_()
            .clamp_(0, 255)
            .to(torch.uint8)
            for c in images.split(8192)
        ]
        return torch.cat(chunks)

    def build_datasets(self) -> tuple[Dataset, Dataset]:
        found = self.locate()
        if found is None and self.download:
            self.prepare_data()  # a standalone `setup()` without the Trainer's `prepare_data` call
            found = self.locate()
        if found is None:
            raise self._not_found()
        self.source, self.files = found
        steps = [f"{source} {folder}" for source, folder in self.search_folders()]
        steps.append(f"torchvision download ({'on' if self.download else 'off'})")
        log.info(
            "Fashion-MNIST: search order: %s; using %s: %s",
            " -> ".join(f"{i}) {step}" for i, step in enumerate(steps, 1)),
            self.source,
            ", ".join(str(p) for p in self.files.values()),
        )
        train_x, train_y = self._load(self.files, "train")
        val_x, val_y = self._load(self.files, "test")
        if self.subset is not None:
            train_x, train_y = train_x[: self.subset], train_y[: self.subset]
        return self._dataset("train", self._resize(train_x), train_y), self._dataset("val", self._resize(val_x), val_y)

    def _dataset(self, split: str, images: Tensor, targets: Tensor) -> Dataset:
        """The built-in tensor pipeline, or the configured transform over PIL images."""
        configured = self.configured_transform(split)
        if configured is not None:
            return TransformedImageDataset(images, targets, configured)
        if split == "train":
            padding = max(1, round(2 * self.image_size / 28))
            return InMemoryImageDataset(images, targets, self.mean, self.std, padding=padding, flip=True)
        return InMemoryImageDataset(images, targets, self.mean, self.std)

    def preload_tensors(self, split: str) -> tuple[Tensor, Tensor]:
        """uint8 (N, 1, S, S) images and int64 (N,) labels of ``"train"`` or ``"val"`` (the test split)."""
        ds = {"train": self.train_set, "val": self.val_set}[split]
        return ds.images, ds.targets

    def train_augmentation(self) -> tuple[int, bool]:
        return self.train_set.padding, self.train_set.flip
