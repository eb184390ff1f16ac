"""Small data sets written in the real on-disk formats, for tests that must run offline.

* CIFAR-100: ``<root>/cifar-100-python/{train,test,meta}``, Python-2 pickles exactly like the real archive
  (keys and strings are Python-2 ``str``: ``pickle.load(f, encoding="latin1")`` gives ``str`` keys as torchvision
  reads them, ``encoding="bytes"`` gives ``b"data"`` etc. as the CIFAR web page documents).
* Fashion-MNIST: IDX ``*-ubyte`` files, either Debian's flat gzipped layout or torchvision's
  ``<root>/FashionMNIST/raw/`` layout (both the ``.gz`` and the extracted file, as after a real download).
* Image folders: ``<root>/{train,val}/<class>/*.{jpg,png}`` written with PIL.
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from PIL import Image

__all__ = [
    "FASHION_MNIST_FILES",
    "write_cifar100",
    "write_fashion_mnist",
    "write_idx",
    "write_image_folder",
]

FASHION_MNIST_FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}


# --------------------------------------------------------------------------------------------- CIFAR-100
class _Py2Pickler(pickle._Pickler):
    """Protocol-2 pickler that writes ``bytes`` as Python-2 ``str`` (``SHORT_BINSTRING``/``BINSTRING``).

    This is how the real CIFAR files were written (cPickle under Python 2): loading with ``encoding="latin1"``
    turns them into ``str``, with ``encoding="bytes"`` into ``bytes``. NumPy arrays go through the same path
    (their raw buffer becomes a Python-2 ``str``, which NumPy's unpickler accepts under either encoding).
    """

    dispatch: ClassVar[dict] = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def _dump_py2(obj: Any, path: Path) -> None:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    path.write_bytes(buf.getvalue())


def write_cifar100(root: str | Path, n_train: int = 64, n_test: int = 32, seed: int = 0) -> dict[str, Any]:
    """Write a small CIFAR-100 in the real ``cifar-100-python`` format.

    Each split is a dict ``{b"filenames", b"batch_label", b"fine_labels", b"coarse_labels", b"data"}`` with
    ``data`` uint8 (N, 3072): 1024 red, then 1024 green, then 1024 blue values, each a row-major 32 × 32 plane.
    ``meta`` holds ``b"fine_label_names"`` (100) and ``b"coarse_label_names"`` (20).

    Returns:
        ``{"root", "dir", "train", "test", "meta"}`` paths, plus ``"train_images"``/``"test_images"`` uint8
        (N, 32, 32, 3) and ``"train_labels"``/``"test_labels"`` int64 (N,) arrays of what was written.
    """
    root = Path(root)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {"root": root, "dir": folder}
    for split, n, batch_label in (
        ("train", n_train, b"training batch 1 of 1"),
        ("test", n_test, b"testing batch 1 of 1"),
    ):
        images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        fine = rng.integers(0, 100, size=n).astype(np.int64)
        coarse = fine // 5
        entry = {
            b"filenames": [f"fake_{split}_{i:05d}.png".encode() for i in range(n)],
            b"batch_label": batch_label,
            b"fine_labels": [int(v) for v in fine],
            b"coarse_labels": [int(v) for v in coarse],
            b"data": np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(n, 3072)),
        }
        _dump_py2(entry, folder / split)
        out[split] = folder / split
        out[f"{split}_images"] = images
        out[f"{split}_labels"] = fine
    meta = {
        b"fine_label_names": [f"fine_{i:03d}".encode() for i in range(100)],
        b"coarse_label_names": [f"coarse_{i:02d}".encode() for i in range(20)],
    }
    _dump_py2(meta, folder / "meta")
    out["meta"] = folder / "meta"
    return out


# ----------------------------------------------------------------------------------------- Fashion-MNIST
def write_idx(path: str | Path, array: np.ndarray, compress: bool | None = None) -> Path:
    """Write a uint8 array in IDX format (big-endian header ``0x0000 08 <ndim>``, then the dims, then the data).

    Compresses with gzip when ``compress`` is true, or (``None``) when the name ends with ``.gz``.
    """
    path = Path(path)
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.tobytes()
    if compress is None:
        compress = path.suffix == ".gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        payload = gzip.compress(payload, mtime=0)
    path.write_bytes(payload)
    return path


def write_fashion_mnist(
    root: str | Path,
    n_train: int = 64,
    n_test: int = 32,
    layout: Literal["torchvision", "debian"] = "torchvision",
    seed: int = 0,
) -> dict[str, Any]:
    """Write a small Fashion-MNIST as IDX ``ubyte`` files.

    ``layout="debian"``: ``<root>/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`` (what Debian's
    ``dataset-fashion-mnist`` installs in ``/usr/share/datasets/fashion-mnist``).
    ``layout="torchvision"``: ``<root>/FashionMNIST/raw/`` with each ``.gz`` and its extracted file, as
    ``torchvision.datasets.FashionMNIST(root, download=True)`` leaves them.

    Returns:
        ``{"root", "dir"}`` paths, ``"files"`` (every file written), ``"train_images"``/``"test_images"`` uint8
        (N, 28, 28) and ``"train_labels"``/``"test_labels"`` int64 (N,).
    """
    if layout not in ("debian", "torchvision"):
        raise ValueError(f"layout must be 'debian' or 'torchvision', got {layout!r}")
    root = Path(root)
    folder = root if layout == "debian" else root / "FashionMNIST" / "raw"
    rng = np.random.default_rng(seed)
    data = {}
    for split, n in (("train", n_train), ("test", n_test)):
        data[(split, "images")] = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        data[(split, "labels")] = (np.arange(n) % 10).astype(np.uint8)
    files: list[Path] = []
    for key, name in FASHION_MNIST_FILES.items():
        files.append(write_idx(folder / f"{name}.gz", data[key]))
        if layout == "torchvision":
            files.append(write_idx(folder / name, data[key]))
    return {
        "root": root,
        "dir": folder,
        "files": files,
        "train_images": data[("train", "images")],
        "train_labels": data[("train", "labels")].astype(np.int64),
        "test_images": data[("test", "images")],
        "test_labels": data[("test", "labels")].astype(np.int64),
    }


# ------------------------------------------------------------------------------------------ image folders
def write_image_folder(
    root: str | Path,
    classes: Sequence[str] = ("a", "b", "c"),
    per_class: int = 4,
    size: int = 40,
    splits: Sequence[str] = ("train", "val"),
    val_classes: Sequence[str] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Write ``<root>/<split>/<class>/img_<i>.{jpg,png}`` RGB images (alternating JPEG and PNG).

    ``val_classes`` (default: ``classes``) lets a test write mismatched class lists into ``val``.

    Returns:
        ``{"root", "classes", "<split>": Path, "<split>_files": list[Path]}`` for each split.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {"root": root, "classes": list(classes)}
    for split in splits:
        split_classes = val_classes if (split != "train" and val_classes is not None) else classes
        written: list[Path] = []
        for cls in split_classes:
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, size=(size, size + 8 * (i % 2), 3), dtype=np.uint8)
                ext = "jpg" if i % 2 == 0 else "png"
                path = folder / f"img_{i}.{ext}"
                Image.fromarray(pixels).save(path)
                written.append(path)
        out[split] = root / split
        out[f"{split}_files"] = written
    return out
