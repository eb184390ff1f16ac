"""A ``segmentation_folder`` of grey scenes written in the real on-disk layout (PNG images and label maps)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_grey_scenes(root: Path, n_train: int = 8, n_val: int = 4, size: int = 32) -> Path:
    """``<root>/{train,val}/{images,labels}/s<i>.png``: grey images whose 4 classes show as brightness levels
    (label · 60 + noise), labels 0..3. Seeded: the same files every call. Returns ``root``."""
    rng = np.random.default_rng(0)
    for split, count in (("train", n_train), ("val", n_val)):
        for kind in ("images", "labels"):
            (root / split / kind).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            label = rng.integers(0, 4, size=(size, size), dtype=np.uint8)
            image = (label * 60 + rng.integers(0, 30, size=(size, size))).astype(np.uint8)
            Image.fromarray(image, mode="L").save(root / split / "images" / f"s{i}.png")
            Image.fromarray(label, mode="L").save(root / split / "labels" / f"s{i}.png")
    return root
