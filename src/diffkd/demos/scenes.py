"""Synthetic scenes from real pixels: Fashion-MNIST items pasted at random positions and scales on a black canvas.

Shared by the embedded detection and segmentation demos. Every item is cut to the tight box of its non-zero pixels,
resized (bilinear, antialiased) by a random factor, its faint halo (values below ``threshold``) set to exactly 0,
and pasted where its box does not overlap an earlier item's by more than ``max_iou``. Each item's box and mask
come from the pixels that were pasted, so ``boxes[i]`` is exactly the tight box of ``masks[i]``, and with the
default ``max_iou=0`` (boxes never overlap) the tight box of that item's non-zero pixels in ``image``.

Conventions: boxes are ``xyxy`` in pixel edges (a one-pixel item at column 3, row 5 has the box ``(3, 5, 4, 6)``);
``labels`` are Fashion-MNIST classes 0..9; ``label_mask`` holds 0 for the background and ``1 + class`` where an
item is (the topmost one where items overlap), i.e. COCO-style category ids 1..10.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger("diffkd.demos.scenes")

__all__ = [
    "SCENES_FILE",
    "Scene",
    "box_iou_matrix",
    "compose_scenes",
    "fashion_mnist_files",
    "scene_folder",
    "scene_summary",
    "tight_box",
]

#: The file that marks a complete scene folder (written last) and records what it was built from.
SCENES_FILE = "scenes.json"


@dataclass(frozen=True)
class Scene:
    """One composed canvas.

    Attributes:
        image: uint8 (H, W) grey canvas.
        boxes: float32 (N, 4) ``xyxy`` tight boxes of the items, in pixel edges, inside the canvas.
        labels: int64 (N,) Fashion-MNIST classes 0..9.
        masks: bool (N, H, W): the pixels each item was pasted with (non-zero, before any later item covered them).
        label_mask: uint8 (H, W): 0 background, ``1 + label`` of the topmost item at each pixel.
        sources: int64 (N,) index of each item in the source images.
    """

    image: Tensor
    boxes: Tensor
    labels: Tensor
    masks: Tensor
    label_mask: Tensor
    sources: Tensor


def tight_box(mask: Tensor) -> tuple[int, int, int, int] | None:
    """``(x0, y0, x1, y1)`` in pixel edges of the True pixels of a bool (H, W) mask, or None when it has none."""
    rows = torch.nonzero(mask.any(dim=1)).flatten()
    cols = torch.nonzero(mask.any(dim=0)).flatten()
    if len(rows) == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def box_iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every ``xyxy`` box of ``a`` (N, 4) with every box of ``b`` (M, 4): (N, M)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    area_a = (a[:, 2:] - a[:, :2]).prod(axis=1)
    area_b = (b[:, 2:] - b[:, :2]).prod(axis=1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def _prepare_item(item: Tensor, scale: float, threshold: int) -> Tensor | None:
    """uint8 (h, w) item → uint8 (h', w') cut to its non-zero pixels after resizing by ``scale`` (None if empty)."""
    box = tight_box(item >= threshold)
    if box is None:
        return None
    x0, y0, x1, y1 = box
    crop = item[y0:y1, x0:x1].float()[None, None]
    size = (max(1, round(crop.shape[-2] * scale)), max(1, round(crop.shape[-1] * scale)))
    resized = F.interpolate(crop, size=size, mode="bilinear", antialias=True, align_corners=False)
    resized = resized[0, 0].round_().clamp_(0, 255).to(torch.uint8)
    resized[resized < threshold] = 0  # no faint halo: the box is that of the pixels one can see
    box = tight_box(resized > 0)
    if box is None:
        return None
    x0, y0, x1, y1 = box
    return resized[y0:y1, x0:x1]


def compose_scenes(
    images: Tensor,
    labels: Tensor,
    count: int,
    canvas: int | tuple[int, int] = 128,
    items: tuple[int, int] = (1, 4),
    scale: tuple[float, float] = (0.7, 2.0),
    threshold: int = 8,
    max_iou: float = 0.0,
    attempts: int = 30,
    seed: int = 0,
) -> list[Scene]:
    """Compose ``count`` scenes, deterministically from ``seed``.

    Args:
        images: uint8 (M, h, w) source items (Fashion-MNIST: (M, 28, 28), black background).
        labels: int (M,) class of each source item.
        count: number of scenes.
        canvas: side of the square canvas, or ``(H, W)``.
        items: least and most items per scene (inclusive); an item with no free place after ``attempts`` random
            positions is left out, so a crowded scene may hold fewer (never fewer than one).
        scale: range of the uniform resize factor of an item.
        threshold: pixels below it (0..255) count as background, before and after the resize.
        max_iou: the largest IoU an item's box may have with an earlier item's (0: boxes never overlap).
        attempts: random positions tried per item.
        seed: the only source of randomness.

    Returns:
        ``count`` :class:`Scene` objects (image (H, W), boxes (N, 4), labels (N,), masks (N, H, W), label_mask (H, W)).
    """
    if images.dtype != torch.uint8 or images.ndim != 3:
        raise ValueError(f"images must be uint8 (M, h, w), got {images.dtype} {tuple(images.shape)}")
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"{len(images)} images and {len(labels)} labels: need as many, at least one")
    lo, hi = items
    if not 1 <= lo <= hi:
        raise ValueError(f"items must be (least, most) with 1 <= least <= most, got {items}")
    height, width = (canvas, canvas) if isinstance(canvas, int) else canvas
    rng = np.random.default_rng(seed)
    labels = torch.as_tensor(labels, dtype=torch.long)
    scenes: list[Scene] = []
    while len(scenes) < count:
        image = torch.zeros(height, width, dtype=torch.uint8)
        label_mask = torch.zeros(height, width, dtype=torch.uint8)
        boxes: list[tuple[int, int, int, int]] = []
        masks: list[Tensor] = []
        kept_labels: list[int] = []
        sources: list[int] = []
        for _ in range(int(rng.integers(lo, hi + 1))):
            source = int(rng.integers(len(images)))
            item = _prepare_item(images[source], float(rng.uniform(*scale)), threshold)
            if item is None or item.shape[0] > height or item.shape[1] > width:
                continue
            h, w = item.shape
            for _ in range(attempts):
                x0, y0 = int(rng.integers(width - w + 1)), int(rng.integers(height - h + 1))
                box = (x0, y0, x0 + w, y0 + h)
                if not boxes or box_iou_matrix(np.array([box], float), np.array(boxes, float)).max() <= max_iou:
                    break
            else:
                continue
            mask = torch.zeros(height, width, dtype=torch.bool)
            mask[y0 : y0 + h, x0 : x0 + w] = item > 0
            image[mask] = item[item > 0]
            label_mask[mask] = 1 + int(labels[source])
            boxes.append(box)
            masks.append(mask)
            kept_labels.append(int(labels[source]))
            sources.append(source)
        if not boxes:  # every draw failed (only with degenerate items): draw the scene again
            continue
        scenes.append(
            Scene(
                image=image,
                boxes=torch.tensor(boxes, dtype=torch.float32),
                labels=torch.tensor(kept_labels, dtype=torch.long),
                masks=torch.stack(masks),
                label_mask=label_mask,
                sources=torch.tensor(sources, dtype=torch.long),
            )
        )
    return scenes


def scene_summary(scenes: Sequence[Scene]) -> dict[str, float]:
    """Counts for a log line: scenes, items, mean items per scene, mean box side (sqrt of the area, px)."""
    boxes = torch.cat([s.boxes for s in scenes]) if scenes else torch.zeros(0, 4)
    sides = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).sqrt()
    return {
        "scenes": float(len(scenes)),
        "items": float(len(boxes)),
        "items_per_scene": float(len(boxes)) / max(1, len(scenes)),
        "mean_box_side": float(sides.mean()) if len(sides) else 0.0,
    }


def fashion_mnist_files(
    data_dir: str | Path, debian_dir: str | Path | None = None, download: bool = True
) -> tuple[dict[tuple[str, str], Path], str]:
    """The four Fashion-MNIST files (keys ``("train" | "test", "images" | "labels")``) and where they came from,
    found (or downloaded) as the classification demo's data module finds them."""
    from diffkd.data.fashion_mnist import FashionMNISTDataModule

    finder = FashionMNISTDataModule(data_dir=str(data_dir), debian_dir=debian_dir, download=download)
    finder.prepare_data()
    found = finder.locate()
    if found is None:
        raise finder._not_found()
    where, files = found
    log.info("demo scenes: Fashion-MNIST from %s", where)
    return files, where


def scene_folder(root: str | Path, params: Mapping[str, Any], build: Callable[[Path], Mapping[str, Any]]) -> Path:
    """``root`` holding the scenes of ``params``: reused when its ``scenes.json`` records the same ``params``,
    else built again by ``build(folder) -> info`` (``info`` is recorded in ``scenes.json`` beside ``params``).

    The folder is written under a temporary name and renamed when complete, so an interrupted build is never taken
    for a finished one; a folder of other parameters is replaced only when it is one of ours (it holds
    ``scenes.json``).
    """
    root = Path(root)
    params = json.loads(json.dumps(params))  # as scenes.json gives them back: lists, not tuples
    marker = root / SCENES_FILE
    if marker.is_file():
        built = json.loads(marker.read_text()).get("params")
        if built == params:
            log.info("reusing the demo scenes in %s", root)
            return root
        log.info("demo scenes in %s were built with %s, not %s: rebuilding", root, built, params)
    elif root.exists() and any(root.iterdir()):
        raise FileExistsError(
            f"{root} exists without {SCENES_FILE}: not the demo's scenes; move it or set demo.scenes.root"
        )
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    info = build(tmp)
    (tmp / SCENES_FILE).write_text(json.dumps({"params": params, **info}, indent=1))
    shutil.rmtree(root, ignore_errors=True)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(root)
    return root
