"""The segmentation demo (``python -m diffkd.train experiment=demo_segmentation``): DiffKD on real-pixel scenes.

1. Scenes, built once from Fashion-MNIST (offline, found as the classification demo finds it) and reused: items
   pasted at random positions and scales on small black canvases by :func:`diffkd.demos.scenes.compose_scenes`
   (training scenes from the TRAIN images, validation scenes from the TEST images), written as an ordinary
   ``segmentation_folder`` (grey image PNGs + label PNGs) under ``demo.scenes.root``. 11 classes: background 0,
   the 10 Fashion-MNIST classes as 1..10. An item's pixels are those the compositor pasted (value >= its
   ``threshold``); the fainter halo it drops becomes background. With ``demo.scenes.ignore_border`` the background
   pixels touching an item (8-neighbourhood) are 255 (ignored), a one-pixel void band like Cityscapes' around
   objects: there the antialiased edge makes the class a matter of taste.
2. The teacher ``demo.teacher`` trained once and cached in ``demo.teacher_weights`` (a json beside it holds its
   mIoU and the scenes it was trained on; other scenes retrain it).
3. The student ``demo.student`` once per method of ``demo.methods`` (alone, pixel KD, DiffKD on the logit maps),
   same recipe for every method; then one table: run, mIoU, pixel accuracy, time.

Steps 2 and 3 are the demo protocol (:mod:`diffkd.demos.protocol`, as for the classification demo); this module is
the demo's declaration (:data:`DEMO`): its scenes, columns and names.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import Tensor

from diffkd.data.fashion_mnist import read_idx
from diffkd.demos.protocol import Column, Demo, Prepared
from diffkd.demos.scenes import SCENES_FILE, compose_scenes, fashion_mnist_files, scene_folder

__all__ = [
    "CLASS_NAMES",
    "DEMO",
    "IGNORE_INDEX",
    "SCENES_FILE",
    "ensure_scenes",
    "run_demo",
    "scene_label",
    "write_scene_split",
]

IGNORE_INDEX = 255
CLASS_NAMES: tuple[str, ...] = (
    "background", "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
    "Ankle boot",
)  # fmt: skip


def scene_label(label_mask: Tensor, ignore_border: bool = True) -> Tensor:
    """The label PNG's content of one scene.

    Args:
        label_mask: uint8 (H, W) from the compositor: 0 background, 1..10 the item classes.
        ignore_border: set background pixels with an item pixel among their 8 neighbours to ``IGNORE_INDEX``.

    Returns:
        uint8 (H, W) holding 0..10 and (with ``ignore_border``) 255.
    """
    label = label_mask.clone()
    if ignore_border:
        item = (label_mask > 0).float()[None, None]
        near = F.max_pool2d(item, 3, stride=1, padding=1)[0, 0] > 0
        label[near & (label_mask == 0)] = IGNORE_INDEX
    return label


def write_scene_split(
    folder: Path,
    images: Tensor,
    labels: Tensor,
    count: int,
    params: Mapping[str, Any],
    seed: int,
) -> dict[str, float]:
    """Compose ``count`` scenes and write ``folder/images/NNNNN.png`` (grey) and ``folder/labels/NNNNN.png``.

    Args:
        folder: the split folder (``<root>/train``).
        images: uint8 (M, 28, 28) source items; labels: int (M,) their classes 0..9.
        count: number of scenes.
        params: ``canvas``, ``items``, ``scale``, ``ignore_border`` (see ``demo.scenes``).
        seed: the compositor's seed.

    Returns:
        per-split counts: scenes, items, and the fraction of pixels that are background, item and ignored.
    """
    scenes = compose_scenes(
        images,
        labels,
        count,
        canvas=int(params["canvas"]),
        items=tuple(int(v) for v in params["items"]),
        scale=tuple(float(v) for v in params["scale"]),
        seed=seed,
    )
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "labels").mkdir(parents=True, exist_ok=True)
    pixels = np.zeros(3)
    for i, scene in enumerate(scenes):
        label = scene_label(scene.label_mask, bool(params["ignore_border"]))
        Image.fromarray(scene.image.numpy(), mode="L").save(folder / "images" / f"{i:05d}.png")
        Image.fromarray(label.numpy(), mode="L").save(folder / "labels" / f"{i:05d}.png")
        pixels += [
            int((label == 0).sum()),
            int(((label > 0) & (label < IGNORE_INDEX)).sum()),
            int((label == 255).sum()),
        ]
    total = max(pixels.sum(), 1.0)
    return {
        "scenes": len(scenes),
        "items": sum(len(s.labels) for s in scenes),
        "background": round(pixels[0] / total, 4),
        "item": round(pixels[1] / total, 4),
        "ignored": round(pixels[2] / total, 4),
    }


def ensure_scenes(spec: Mapping[str, Any], source: Mapping[str, Any]) -> Path:
    """The scene folder of ``spec`` (``demo.scenes``), built from Fashion-MNIST (``demo.fashion_mnist``) unless a
    complete one with the same parameters is already there (:func:`~diffkd.demos.scenes.scene_folder`).

    Returns:
        ``spec.root``, in the ``segmentation_folder`` layout, with ``scenes.json`` (the parameters and counts).
    """
    params = {k: spec[k] for k in ("train", "val", "canvas", "items", "scale", "ignore_border", "seed")}
    params = OmegaConf.to_container(OmegaConf.create(params), resolve=True)

    def build(folder: Path) -> dict[str, Any]:
        download = bool(source.get("download", True))
        files, where = fashion_mnist_files(source["data_dir"], source.get("debian_dir"), download)
        stats = {}
        for split, fm_split, offset in (("train", "train", 0), ("val", "test", 1)):
            images, labels = read_idx(files[(fm_split, "images")]), read_idx(files[(fm_split, "labels")])
            seed = int(params["seed"]) * 2 + offset
            stats[split] = write_scene_split(folder / split, images, labels, int(params[split]), params, seed)
        return {"stats": stats, "fashion_mnist": where}

    return scene_folder(spec["root"], params, build)


def _prepare(cfg: DictConfig) -> Prepared:
    """The scenes, built or reused; their parameters key the teacher's cache and fill the title."""
    root = ensure_scenes(cfg.demo.scenes, cfg.demo.fashion_mnist)
    params = json.loads((root / SCENES_FILE).read_text())["params"]
    return Prepared(recipe={"scenes": params}, fields=params)


#: The segmentation demo, declared: the protocol (:func:`diffkd.demos.protocol.run_protocol`) runs it.
DEMO = Demo(
    title="Segmentation demo — {student} distilled from {teacher} on Fashion-MNIST scenes ({train} train / {val} val, "
    "{canvas}px, 11 classes; {seed_text}, {student_epochs} student epochs, precision {precision})",
    columns=(
        Column("mIoU", "test/miou", "miou", width=9, digits=2, suffix="%"),
        Column("pixel acc", "test/pixel_acc", "pixel_acc", width=11, digits=2, suffix="%"),
    ),
    method_suffix="_seg",
    prepare=_prepare,
)


def run_demo(cfg: DictConfig, overrides: Sequence[str] | None = None) -> float:
    """Scenes (built or reused), teacher (trained or reused), then the student once per seed and method; prints
    the table.

    Args:
        cfg: the composed demo config (``experiment=demo_segmentation``).
        overrides: the overrides it was composed with (default: the running Hydra app's command line).

    Returns:
        the last method's test mIoU in [0, 1] (its mean over ``demo.seeds``).
    """
    return DEMO.run(cfg, overrides)
