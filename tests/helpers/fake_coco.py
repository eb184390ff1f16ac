"""A tiny COCO written in the real on-disk format (real JPEG files, genuine ``instances_*.json``), for offline tests.

Layout (the official one)::

    <root>/train2017/<12-digit id>.jpg
    <root>/val2017/<12-digit id>.jpg
    <root>/annotations/instances_train2017.json
    <root>/annotations/instances_val2017.json

The jsons hold ``info``, ``licenses``, ``images`` (id, file_name, width, height, ...), ``annotations`` (id, image_id,
category_id, bbox ``[x, y, w, h]``, area, iscrowd, segmentation: polygons, or an uncompressed RLE for crowds) and
``categories`` with non-contiguous ids (1, 2, 3, 5, 90), as COCO's own are (1..90 with gaps).

The images are small and of several shapes (landscape, portrait, square) so that aspect-ratio grouping has several
groups. The train split has one crowd annotation, one image without annotations, one degenerate box next to a good
one, one image whose only box is degenerate (torchvision's references drop that image from training) and one whose
only annotation is a crowd (torchvision's references keep that one: their rule counts crowd boxes); the val
split has a crowd annotation and an image without annotations.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["CATEGORIES", "TRAIN_IMAGES", "VAL_IMAGES", "FakeCoco", "edit_annotations", "write_fake_coco"]

CATEGORIES: tuple[tuple[int, str, str], ...] = (
    (1, "person", "person"),
    (2, "bicycle", "vehicle"),
    (3, "car", "vehicle"),
    (5, "airplane", "vehicle"),
    (90, "toothbrush", "indoor"),
)

# (image id, width, height, [(category id, [x, y, w, h], iscrowd), ...]); ids are sparse, as in COCO.
Box = tuple[int, list[float], int]
TRAIN_IMAGES: tuple[tuple[int, int, int, list[Box]], ...] = (
    (9, 64, 48, [(1, [4.0, 6.0, 20.0, 10.0], 0), (90, [30.0, 10.0, 25.5, 30.0], 0)]),
    (25, 40, 72, [(2, [5.0, 8.0, 20.0, 40.0], 0), (1, [0.0, 40.0, 30.0, 30.0], 1)]),  # a crowd
    (30, 56, 56, []),  # no annotations
    (34, 48, 80, [(3, [10.0, 10.0, 0.8, 20.0], 0), (5, [12.0, 30.0, 24.0, 40.0], 0)]),  # a degenerate box (w 0.8)
    (36, 80, 40, [(3, [2.0, 2.0, 40.0, 20.0], 0), (5, [50.0, 5.0, 25.0, 30.0], 0)]),
    (42, 36, 60, [(2, [5.0, 5.0, 20.0, 1.0], 0)]),  # only a degenerate box (h 1): dropped from training
    (49, 72, 48, [(90, [8.0, 8.0, 30.0, 30.0], 0)]),
    (61, 50, 50, [(2, [5.0, 5.0, 20.0, 20.0], 0), (3, [25.0, 25.0, 20.0, 20.0], 0)]),
    (64, 64, 48, [(5, [0.0, 0.0, 64.0, 48.0], 0)]),
    (71, 40, 72, [(1, [10.0, 20.0, 15.0, 30.0], 0)]),
    (72, 60, 45, [(3, [5.0, 5.0, 30.0, 20.0], 0), (90, [40.0, 20.0, 15.0, 20.0], 0)]),
    (73, 45, 80, [(5, [5.0, 5.0, 30.0, 60.0], 0)]),
    (74, 50, 50, [(1, [10.0, 10.0, 25.0, 25.0], 0)]),
    (80, 64, 48, [(1, [10.0, 10.0, 30.0, 20.0], 1)]),  # only a crowd: kept for training, with no boxes
)
VAL_IMAGES: tuple[tuple[int, int, int, list[Box]], ...] = (
    (139, 64, 48, [(1, [4.0, 4.0, 30.0, 20.0], 0), (3, [10.0, 10.0, 40.0, 30.0], 1)]),  # a crowd
    (285, 40, 64, [(90, [5.0, 5.0, 20.0, 40.0], 0)]),
    (632, 48, 48, []),  # no annotations
    (724, 72, 40, [(2, [10.0, 5.0, 30.0, 25.0], 0), (5, [45.0, 10.0, 20.0, 20.0], 0)]),
    (776, 56, 40, [(3, [0.0, 0.0, 20.0, 20.0], 0)]),
)


@dataclass(frozen=True)
class FakeCoco:
    """What :func:`write_fake_coco` wrote: the root folder and both annotation dicts as written."""

    root: Path
    train: dict[str, Any]
    val: dict[str, Any]

    def annotations(self, split: str, image_id: int) -> list[dict[str, Any]]:
        """The json annotations of ``image_id`` in ``split`` (``"train"`` or ``"val"``), in file order."""
        data = self.train if split == "train" else self.val
        return [a for a in data["annotations"] if a["image_id"] == image_id]

    def image(self, split: str, image_id: int) -> dict[str, Any]:
        """The json image entry of ``image_id`` in ``split``."""
        data = self.train if split == "train" else self.val
        return next(i for i in data["images"] if i["id"] == image_id)


def _diamond(x: float, y: float, w: float, h: float) -> list[list[float]]:
    """A polygon inside the box whose area (w·h/2) differs from the box's: ``area`` must come from the json."""
    return [[x + w / 2, y, x + w, y + h / 2, x + w / 2, y + h, x, y + h / 2]]


def _crowd_rle(x: float, y: float, w: float, h: float, width: int, height: int) -> dict[str, Any]:
    """The box as an uncompressed column-major RLE (COCO's format for crowd regions) and its pixel area."""
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[int(y) : int(y + h), int(x) : int(x + w)] = 1
    flat = mask.flatten(order="F")
    counts, value, run = [], 0, 0
    for pixel in flat:
        if pixel == value:
            run += 1
        else:
            counts.append(run)
            value, run = int(pixel), 1
    counts.append(run)
    return {"counts": counts, "size": [height, width]}


def _split_json(images: tuple[tuple[int, int, int, list[Box]], ...], first_ann_id: int) -> dict[str, Any]:
    out: dict[str, Any] = {
        "info": {"description": "fake COCO for tests", "version": "1.0", "year": 2017, "date_created": "2017/09/01"},
        "licenses": [{"id": 1, "name": "Attribution License", "url": "http://creativecommons.org/licenses/by/2.0/"}],
        "images": [],
        "annotations": [],
        "categories": [{"id": i, "name": n, "supercategory": s} for i, n, s in CATEGORIES],
    }
    ann_id = first_ann_id
    for image_id, width, height, boxes in images:
        out["images"].append(
            {
                "id": image_id,
                "file_name": f"{image_id:012d}.jpg",
                "width": width,
                "height": height,
                "license": 1,
                "coco_url": "",
                "date_captured": "2013-11-14 11:18:45",
                "flickr_url": "",
            }
        )
        for category_id, (x, y, w, h), iscrowd in boxes:
            if iscrowd:
                segmentation: Any = _crowd_rle(x, y, w, h, width, height)
                area = float(int(w) * int(h))
            else:
                segmentation, area = _diamond(x, y, w, h), w * h / 2
            out["annotations"].append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": category_id,
                    "bbox": [x, y, w, h],
                    "area": area,
                    "iscrowd": iscrowd,
                    "segmentation": segmentation,
                }
            )
            ann_id += 1
    return out


def write_fake_coco(root: str | Path, seed: int = 0) -> FakeCoco:
    """Write the tiny COCO described in the module docstring under ``root`` (created) and describe it.

    Args:
        root: destination folder.
        seed: seed of the random pixels.

    Returns:
        A :class:`FakeCoco` with ``root`` and the two annotation dicts as written.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    splits = {"train2017": (TRAIN_IMAGES, 1), "val2017": (VAL_IMAGES, 1001)}
    written = {}
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, (images, first_ann_id) in splits.items():
        data = _split_json(images, first_ann_id)
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        for entry in data["images"]:
            pixels = rng.integers(0, 256, size=(entry["height"], entry["width"], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / entry["file_name"], format="JPEG", quality=90)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
        written[split] = data
    return FakeCoco(root=root, train=written["train2017"], val=written["val2017"])


def edit_annotations(root: str | Path, split: str, edit: Callable[[dict[str, Any]], None]) -> Path:
    """Rewrite ``<root>/annotations/instances_<split>.json`` after ``edit`` changed its dict in place.

    Returns:
        The json's path.
    """
    path = Path(root) / "annotations" / f"instances_{split}.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return path
