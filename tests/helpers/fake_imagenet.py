"""A tiny ImageNet written in the real on-disk layouts (real JPEG files, wnid folder names), for offline tests.

``layout="folders"``::

    <root>/train/<wnid>/<wnid>_<i>.JPEG
    <root>/val/<wnid>/ILSVRC2012_val_<n>.JPEG

``layout="list"`` (the official code's layout; list paths are relative to ``train/`` and ``val/``)::

    <root>/train/<wnid>/<wnid>_<i>.JPEG     <root>/meta/train.txt: "<wnid>/<wnid>_<i>.JPEG <label>"
    <root>/val/ILSVRC2012_val_<n>.JPEG      <root>/meta/val.txt:   "ILSVRC2012_val_<n>.JPEG <label>"
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

__all__ = ["IMAGENET_FIRST_WNIDS", "wnids", "write_tiny_imagenet"]

# The first ten ILSVRC-2012 class wnids in label order (tench, goldfish, great white shark, ...).
IMAGENET_FIRST_WNIDS = (
    "n01440764",
    "n01443537",
    "n01484850",
    "n01491361",
    "n01494475",
    "n01496331",
    "n01498041",
    "n01514668",
    "n01514859",
    "n01518878",
)


def wnids(n: int) -> list[str]:
    """``n`` sorted wnid-style names: the real first ten, then made-up ``n9xxxxxxx`` ones."""
    names = list(IMAGENET_FIRST_WNIDS[:n])
    names += [f"n9{i:07d}" for i in range(n - len(names))]
    return sorted(names)


def write_tiny_imagenet(
    root: str | Path,
    n_classes: int = 3,
    per_class: int = 4,
    size: tuple[int, int] = (48, 64),
    layout: Literal["folders", "list"] = "folders",
    val_per_class: int | None = None,
    seed: int = 0,
) -> Path:
    """Write a tiny ImageNet under ``root`` and return ``root``.

    Args:
        root: destination folder (created).
        n_classes: number of wnid classes; label i is the i-th sorted wnid.
        per_class: train images per class.
        size: image (width, height) in PIL order; ImageNet images are not square, nor are these by default.
        layout: ``"folders"`` or ``"list"`` (see the module docstring).
        val_per_class: val images per class (default: ``max(1, per_class // 2)``).
        seed: seed of the random pixels (each class has its own mean colour, plus noise).

    Returns:
        ``Path(root)``.
    """
    if layout not in ("folders", "list"):
        raise ValueError(f"layout must be 'folders' or 'list', got {layout!r}")
    root = Path(root)
    rng = np.random.default_rng(seed)
    classes = wnids(n_classes)
    n_val = max(1, per_class // 2) if val_per_class is None else val_per_class
    width, height = size

    def image(label: int) -> Image.Image:
        base = rng.integers(0, 256, size=3)
        noise = rng.integers(-40, 41, size=(height, width, 3))
        pixels = np.clip(base + noise + 20 * label, 0, 255).astype(np.uint8)
        return Image.fromarray(pixels, "RGB")

    train_lines: list[str] = []
    val_lines: list[str] = []
    val_counter = 0
    for label, wnid in enumerate(classes):
        (root / "train" / wnid).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            rel = f"{wnid}/{wnid}_{i}.JPEG"
            image(label).save(root / "train" / rel, "JPEG", quality=85)
            train_lines.append(f"{rel} {label}")
        for _ in range(n_val):
            val_counter += 1
            name = f"ILSVRC2012_val_{val_counter:08d}.JPEG"
            rel = f"{wnid}/{name}" if layout == "folders" else name
            (root / "val" / rel).parent.mkdir(parents=True, exist_ok=True)
            image(label).save(root / "val" / rel, "JPEG", quality=85)
            val_lines.append(f"{rel} {label}")
    if layout == "list":
        (root / "meta").mkdir(parents=True, exist_ok=True)
        (root / "meta" / "train.txt").write_text("\n".join(train_lines) + "\n")
        (root / "meta" / "val.txt").write_text("\n".join(val_lines) + "\n")
    return root
