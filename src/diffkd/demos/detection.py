"""The embedded detection demo (``python -m diffkd.train experiment=demo_detection``).

It builds a real-pixel detection set from the Fashion-MNIST images the classification demo uses — items pasted at
random positions and scales on small black canvases (:func:`diffkd.demos.scenes.compose_scenes`; train scenes from
the Fashion-MNIST train images, val scenes from its test images), boxes from the items' pixels — written once as an
ordinary COCO folder (``train2017/``, ``val2017/``, ``annotations/instances_{train,val}2017.json``, categories = the
10 Fashion-MNIST classes with ids 1..10) and read by the same :class:`~diffkd.data.coco.COCODataModule` as COCO.
Then the demo protocol (:mod:`diffkd.demos.protocol`, as for the classification demo) trains the small teacher
detector once (reused afterwards from ``demo.teacher_weights``, with a json of its AP), the student alone, with FitNet
and with DiffKD on the FPN (``backbone.fpn:*``) once per seed, and prints the AP tables side by side. This module is
the demo's declaration (:data:`DEMO`): its scenes, columns and names.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from PIL import Image

from diffkd.data.fashion_mnist import FASHION_MNIST_CLASSES, read_idx
from diffkd.demos.protocol import Column, Demo, Prepared
from diffkd.demos.scenes import Scene, compose_scenes, fashion_mnist_files, scene_folder, scene_summary
from diffkd.models import demo_detection  # noqa: F401  (registers demo_fcos_teacher / demo_fcos_student)

__all__ = ["AP_COLUMNS", "DEMO", "build_scene_set", "run_demo", "write_coco_split"]

#: (column title, metric suffix) of the printed table; AP values are COCO's, in percent.
AP_COLUMNS: tuple[tuple[str, str], ...] = (
    ("AP", "map"), ("AP50", "map_50"), ("AP75", "map_75"),
    ("APs", "map_small"), ("APm", "map_medium"), ("APl", "map_large"),
)  # fmt: skip
_SPLITS = {"train": ("train2017", "train"), "val": ("val2017", "test")}  # scene split → (COCO split, Fashion-MNIST)


def write_coco_split(scenes: Sequence[Scene], root: str | Path, split: str) -> Path:
    """Write ``scenes`` as COCO split ``split``: ``<root>/<split>/<id>.png`` and
    ``<root>/annotations/instances_<split>.json`` (boxes ``[x, y, w, h]``, ``area`` = the item's pixel count,
    ``iscrowd`` 0, categories 1..10 = the Fashion-MNIST classes). Image ids count from 1.

    Returns:
        The annotation file.
    """
    root = Path(root)
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id, scene in enumerate(scenes, start=1):
        name = f"{image_id:06d}.png"  # PNG: lossless, so the pixels are exactly those the boxes were taken from
        Image.fromarray(scene.image.numpy(), mode="L").save(root / split / name)
        height, width = scene.image.shape
        images.append({"id": image_id, "file_name": name, "height": int(height), "width": int(width)})
        for box, label, mask in zip(scene.boxes.tolist(), scene.labels.tolist(), scene.masks):
            x0, y0, x1, y1 = box
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(label) + 1,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    # the item's pixels, not its box: COCO's small/medium/large split reads this area
                    "area": float(mask.sum()),
                    "iscrowd": 0,
                }
            )
    categories = [
        {"id": i + 1, "name": name, "supercategory": "fashion"} for i, name in enumerate(FASHION_MNIST_CLASSES)
    ]
    data = {
        "info": {"description": "diffkd detection demo: Fashion-MNIST items on black canvases"},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    path = root / "annotations" / f"instances_{split}.json"
    path.write_text(json.dumps(data))
    return path


def _scene_params(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The settings that determine the scene set (what its cache is keyed on)."""
    keys = ("train", "val", "canvas", "items", "scale", "threshold", "max_iou", "seed")
    return {k: OmegaConf.to_container(spec[k]) if OmegaConf.is_config(spec[k]) else spec[k] for k in keys}


def build_scene_set(spec: Mapping[str, Any], data_dir: str | Path) -> Path:
    """The COCO folder of the demo's scenes (``spec.root``), written unless it holds the same settings already
    (:func:`~diffkd.demos.scenes.scene_folder`).

    Args:
        spec: ``demo.scenes``: ``root``, ``train``/``val`` (scene counts), ``canvas``, ``items``, ``scale``,
            ``threshold``, ``max_iou``, ``seed``, ``debian_dir``, ``download``.
        data_dir: where the Fashion-MNIST files are looked for in torchvision's layout (``paths.data_dir``).

    Returns:
        ``spec.root``, holding ``train2017/``, ``val2017/`` and ``annotations/instances_{train,val}2017.json``.
    """
    params = _scene_params(spec)

    def build(folder: Path) -> dict[str, Any]:
        files, _ = fashion_mnist_files(data_dir, spec.get("debian_dir"), bool(spec.get("download", True)))
        summary: dict[str, Any] = {}
        for offset, (split, (coco_split, source)) in enumerate(_SPLITS.items()):
            images, labels = read_idx(files[(source, "images")]), read_idx(files[(source, "labels")])
            scenes = compose_scenes(
                images, labels, int(params[split]), canvas=params["canvas"], items=tuple(params["items"]),
                scale=tuple(params["scale"]), threshold=int(params["threshold"]), max_iou=float(params["max_iou"]),
                seed=int(params["seed"]) + offset,
            )  # fmt: skip
            write_coco_split(scenes, folder, coco_split)
            summary[split] = scene_summary(scenes)
        return {"summary": summary}

    return scene_folder(spec["root"], params, build)


def _prepare(cfg: DictConfig) -> Prepared:
    """The scenes, written or reused: every run reads them; their settings key the teacher's cache."""
    root = build_scene_set(cfg.demo.scenes, cfg.paths.data_dir)
    params = _scene_params(cfg.demo.scenes)
    return Prepared(overrides=(f"data.root={root}",), recipe={"scenes": params}, fields=params)


#: The detection demo, declared: the protocol (:func:`diffkd.demos.protocol.run_protocol`) runs it.
DEMO = Demo(
    title="Detection demo — {student} distilled from {teacher} on Fashion-MNIST scenes ({train} train / {val} val "
    "scenes of {canvas} px; {seed_text}, {student_epochs} student epochs, precision {precision}); COCO box AP (%) "
    "on val",
    columns=tuple(Column(title, f"test/{suffix}", suffix, width=7, digits=1) for title, suffix in AP_COLUMNS),
    name_width=40,
    method_names={"fitnet_fpn": "student + FitNet (FPN)", "diffkd_det": "student + DiffKD (FPN)"},
    teacher_metrics_in="test",
    prepare=_prepare,
    prepare_row="scenes (written or reused)",
)


def run_demo(cfg: DictConfig, overrides: Sequence[str] | None = None) -> float:
    """Scenes (written or reused), teacher (trained or reused), then the student once per seed and method; prints
    the AP table and returns the last method's AP (COCO box mAP in [0, 1]; its mean over ``demo.seeds``).

    Args:
        cfg: the composed demo config (``experiment=demo_detection``).
        overrides: the overrides it was composed with (default: the running Hydra app's command line).
    """
    return DEMO.run(cfg, overrides)
