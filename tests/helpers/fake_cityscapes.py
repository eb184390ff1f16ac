"""A tiny Cityscapes written in the real on-disk format (8-bit RGB PNG images, 8-bit labelIds PNGs), for offline
tests.

Layout (the official one, as ``leftImg8bit_trainvaltest.zip`` and ``gtFine_trainvaltest.zip`` unpack)::

    <root>/leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    <root>/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png
    <root>/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_{color.png,instanceIds.png,polygons.json}

The images are random noise; each labelIds image is a grid of 8×8 blocks cycling through every labelId 0..33 (so
void ids such as 0 "unlabeled", 1 "ego vehicle", 4 "static" and unevaluated ones such as 9 "parking" appear in every
image), shifted per image. The color, instanceIds and polygons files are there because the real gtFine has them
next to each labelIds file; they are not read.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["DEFAULT_CITIES", "FakeCityscapes", "write_fake_cityscapes"]

# split -> city -> number of images: two cities per split, 4 training and 3 validation images.
DEFAULT_CITIES: dict[str, dict[str, int]] = {
    "train": {"aachen": 2, "bochum": 2},
    "val": {"frankfurt": 2, "lindau": 1},
}
BLOCK = 8


@dataclass(frozen=True)
class FakeCityscapes:
    """What :func:`write_fake_cityscapes` wrote.

    Attributes:
        root: the Cityscapes folder.
        size: ``(height, width)`` of every image.
        keys: split → sorted ``"<city>/<city>_<seq>_<frame>"`` keys, the order the datamodule serves them in.
    """

    root: Path
    size: tuple[int, int]
    keys: dict[str, list[str]]

    def image_path(self, split: str, key: str) -> Path:
        return self.root / "leftImg8bit" / split / f"{key}_leftImg8bit.png"

    def label_path(self, split: str, key: str) -> Path:
        return self.root / "gtFine" / split / f"{key}_gtFine_labelIds.png"

    def image(self, split: str, index: int) -> np.ndarray:
        """uint8 (H, W, 3) RGB of the ``index``-th image of ``split``, read back from its PNG."""
        return np.asarray(Image.open(self.image_path(split, self.keys[split][index])).convert("RGB"))

    def label_ids(self, split: str, index: int) -> np.ndarray:
        """uint8 (H, W) labelIds of the ``index``-th image of ``split``, read back from its PNG."""
        return np.asarray(Image.open(self.label_path(split, self.keys[split][index])))


def _label_ids(size: tuple[int, int], shift: int) -> np.ndarray:
    height, width = size
    rows = np.arange(height)[:, None] // BLOCK
    cols = np.arange(width)[None, :] // BLOCK
    blocks_per_row = -(-width // BLOCK)
    return ((rows * blocks_per_row + cols + shift) % 34).astype(np.uint8)


def write_fake_cityscapes(
    root: str | Path,
    cities: Mapping[str, Mapping[str, int]] = DEFAULT_CITIES,
    size: tuple[int, int] = (64, 128),
    seed: int = 0,
) -> FakeCityscapes:
    """Write a tiny Cityscapes under ``root``.

    Args:
        root: the folder to create (``leftImg8bit/`` and ``gtFine/`` go inside).
        cities: split → city → number of images.
        size: ``(height, width)`` of every image (the real ones are 1024×2048).
        seed: seed of the image noise.

    Returns:
        The root, the size and the keys of each split.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    keys: dict[str, list[str]] = {}
    shift = 0
    for split, per_city in cities.items():
        keys[split] = []
        for city, count in per_city.items():
            image_dir = root / "leftImg8bit" / split / city
            label_dir = root / "gtFine" / split / city
            image_dir.mkdir(parents=True, exist_ok=True)
            label_dir.mkdir(parents=True, exist_ok=True)
            for seq in range(count):
                stem = f"{city}_{seq:06d}_000019"
                pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(image_dir / f"{stem}_leftImg8bit.png")
                label_ids = _label_ids(size, shift)
                shift += 5
                Image.fromarray(label_ids).save(label_dir / f"{stem}_gtFine_labelIds.png")
                Image.fromarray(np.repeat(label_ids[..., None] * 7, 3, axis=2)).save(
                    label_dir / f"{stem}_gtFine_color.png"
                )
                Image.fromarray(label_ids.astype(np.uint16) * 1000).save(label_dir / f"{stem}_gtFine_instanceIds.png")
                polygons = {"imgHeight": size[0], "imgWidth": size[1], "objects": []}
                (label_dir / f"{stem}_gtFine_polygons.json").write_text(json.dumps(polygons))
                keys[split].append(f"{city}/{stem}")
        keys[split].sort()
    return FakeCityscapes(root=root, size=(int(size[0]), int(size[1])), keys=keys)
