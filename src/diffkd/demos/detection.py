"""The embedded detection demo (``python -m diffkd.train experiment=demo_detection``).

It builds a real-pixel detection set from the Fashion-MNIST images the classification demo uses — items pasted at
random positions and scales on small black canvases (:func:`diffkd.demos.scenes.compose_scenes`; train scenes from
the Fashion-MNIST train images, val scenes from its test images), boxes from the items' pixels — written once as an
ordinary COCO folder (``train2017/``, ``val2017/``, ``annotations/instances_{train,val}2017.json``, categories = the
10 Fashion-MNIST classes with ids 1..10) and read by the same :class:`~diffkd.data.coco.COCODataModule` as COCO.
Then it trains the small teacher detector once (reused afterwards from ``demo.teacher_weights``, with a json of
its AP), the student alone, with FitNet and with DiffKD on the FPN (``backbone.fpn:*``), and prints the AP tables
side by side. Every run is a normal :func:`diffkd.training.train` run with its own folder, composed by Hydra with
the command line's overrides (:func:`diffkd.demo.demo_run_config`, as the classification demo).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from PIL import Image

from diffkd.data.fashion_mnist import FASHION_MNIST_CLASSES, FashionMNISTDataModule, read_idx
from diffkd.demo import (
    cached_teacher,
    demo_precision,
    demo_run_config,
    demo_seeds,
    demo_user_overrides,
    mean_std,
    save_student_as_teacher,
    seed_summary,
    teacher_recipe,
    train_demo_run,
)
from diffkd.demos.scenes import Scene, compose_scenes, scene_summary
from diffkd.models import demo_detection  # noqa: F401  (registers demo_fcos_teacher / demo_fcos_student)

log = logging.getLogger("diffkd.demos.detection")

__all__ = ["AP_COLUMNS", "build_scene_set", "run_demo", "write_coco_split"]

#: (column title, metric suffix) of the printed table; AP values are COCO's, in percent.
AP_COLUMNS: tuple[tuple[str, str], ...] = (
    ("AP", "map"), ("AP50", "map_50"), ("AP75", "map_75"),
    ("APs", "map_small"), ("APm", "map_medium"), ("APl", "map_large"),
)  # fmt: skip
_SPLITS = {"train": ("train2017", "train"), "val": ("val2017", "test")}  # scene split → (COCO split, Fashion-MNIST)
_META = "scenes.json"
_METHOD_NAMES = {
    "none": "student alone",
    "fitnet_fpn": "student + FitNet (FPN)",
    "diffkd_det": "student + DiffKD (FPN)",
}


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


def _fashion_mnist_files(data_dir: str | Path, debian_dir: str | Path | None, download: bool) -> dict[Any, Path]:
    """The four Fashion-MNIST files, found (or downloaded) as the classification demo's data module does."""
    dm = FashionMNISTDataModule(data_dir=str(data_dir), debian_dir=debian_dir, download=download)
    dm.prepare_data()
    found = dm.locate()
    if found is None:
        raise dm._not_found()
    source, files = found
    log.info("detection demo: Fashion-MNIST from %s", source)
    return files


def _scene_params(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The settings that determine the scene set (what its cache is keyed on)."""
    keys = ("train", "val", "canvas", "items", "scale", "threshold", "max_iou", "seed")
    return {k: OmegaConf.to_container(spec[k]) if OmegaConf.is_config(spec[k]) else spec[k] for k in keys}


def build_scene_set(spec: Mapping[str, Any], data_dir: str | Path) -> Path:
    """The COCO folder of the demo's scenes (``spec.root``), written unless it holds the same settings already.

    Args:
        spec: ``demo.scenes``: ``root``, ``train``/``val`` (scene counts), ``canvas``, ``items``, ``scale``,
            ``threshold``, ``max_iou``, ``seed``, ``debian_dir``, ``download``.
        data_dir: where the Fashion-MNIST files are looked for in torchvision's layout (``paths.data_dir``).

    Returns:
        ``spec.root``, holding ``train2017/``, ``val2017/`` and ``annotations/instances_{train,val}2017.json``.
    """
    root = Path(spec["root"])
    params = _scene_params(spec)
    meta = root / _META
    if meta.is_file() and json.loads(meta.read_text()).get("params") == params:
        log.info("detection demo: reusing the scenes in %s", root)
        return root
    files = _fashion_mnist_files(data_dir, spec.get("debian_dir"), bool(spec.get("download", True)))
    # written next to the final folder and renamed at the end, so an interrupted run never leaves a half set
    tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    summary: dict[str, Any] = {}
    for offset, (split, (coco_split, source)) in enumerate(_SPLITS.items()):
        images, labels = read_idx(files[(source, "images")]), read_idx(files[(source, "labels")])
        scenes = compose_scenes(
            images, labels, int(params[split]), canvas=params["canvas"], items=tuple(params["items"]),
            scale=tuple(params["scale"]), threshold=int(params["threshold"]), max_iou=float(params["max_iou"]),
            seed=int(params["seed"]) + offset,
        )  # fmt: skip
        write_coco_split(scenes, tmp, coco_split)
        summary[split] = scene_summary(scenes)
        log.info("detection demo: %s scenes %s", split, summary[split])
    (tmp / _META).write_text(json.dumps({"params": params, "summary": summary}, indent=1))
    shutil.rmtree(root, ignore_errors=True)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(root)
    return root


def _fmt(value: float) -> str:
    """A COCO AP in percent; torchmetrics reports -1 where a size class has no ground truth."""
    return "n/a" if value is None or math.isnan(value) or value < 0 else f"{100 * value:.1f}"


def run_demo(cfg: DictConfig, overrides: Sequence[str] | None = None) -> float:
    """Scenes (written or reused), teacher (trained or reused), then the student once per method; prints the AP
    table and returns the last method's AP (COCO box mAP in [0, 1]; its mean over ``demo.seeds``).

    Args:
        cfg: the composed demo config (``experiment=demo_detection``).
        overrides: the overrides it was composed with (default: the running Hydra app's command line).
    """
    demo = cfg.demo
    user = demo_user_overrides(demo, overrides)
    precision = demo_precision(demo)
    out_root = Path(cfg.paths.output_dir)
    wall = time.perf_counter()
    scene_root = build_scene_set(demo.scenes, cfg.paths.data_dir)
    scene_secs = time.perf_counter() - wall
    teacher_file = Path(demo.teacher_weights)
    meta_file = teacher_file.with_suffix(".json")
    rows: list[tuple[str, dict[str, float], float]] = []
    names = {**_METHOD_NAMES, "teacher": f"teacher {demo.teacher}"}

    def settings(label: str, epochs: int, student: str, extra: Sequence[str] = ()) -> list[str]:
        return [
            f"trainer.max_epochs={epochs}",
            f"trainer.precision={precision}",
            f"model.student.name={student}",
            f"paths.output_dir={out_root / label}",
            f"data.root={scene_root}",
            *extra,
        ]

    def run(label: str, method: str, epochs: int, student: str, extra: Sequence[str] = ()) -> tuple[dict, str]:
        metrics, best, seconds = train_demo_run(user, method, settings(label, epochs, student, extra))
        ap = {suffix: metrics.get(f"test/{suffix}", float("nan")) for _, suffix in AP_COLUMNS}
        rows.append((names.get(label, f"student + {label}"), ap, seconds))
        return ap, best

    params = _scene_params(demo.scenes)
    teacher_settings = settings("teacher", demo.teacher_epochs, demo.teacher)
    recipe = teacher_recipe(demo_run_config(user, "none", ["pipeline=train", *teacher_settings]), scenes=params)
    meta, message = cached_teacher(teacher_file, recipe)
    log.info(message)
    if meta is not None:
        log.info("demo teacher %s: AP %s", teacher_file, _fmt(meta["test"]["map"]))
        rows.append((f"teacher {demo.teacher} (reused)", meta["test"], 0.0))
    else:
        ap, best = run("teacher", "none", demo.teacher_epochs, demo.teacher)
        save_student_as_teacher(best, teacher_file)
        info = {"teacher": demo.teacher, "test": ap, "scenes": params, "epochs": demo.teacher_epochs, "source": best}
        meta_file.write_text(json.dumps({**info, "recipe": recipe}, indent=1))
    teacher = [f"model.teacher.name={demo.teacher}", f"model.teacher.weights={teacher_file}"]
    seeds = demo_seeds(demo, int(cfg.seed))
    per_seed: dict[str, list[float]] = {}
    for seed in seeds:  # seed-major: an interrupted demo has every method for the seeds it finished
        for method in demo.methods:
            base = names.get(method, f"student + {method}")
            label = method if len(seeds) == 1 else f"{method}/seed{seed}"
            names.setdefault(label, base if len(seeds) == 1 else f"{base}, seed {seed}")
            ap, _ = run(label, method, demo.student_epochs, demo.student, [*teacher, f"seed={seed}"])
            per_seed.setdefault(base, []).append(ap["map"])
    total = time.perf_counter() - wall
    counts = f"{params['train']} train / {params['val']} val scenes of {params['canvas']} px"
    seed_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {' '.join(map(str, seeds))}"
    lines = [
        "",
        f"Detection demo — {demo.student} distilled from {demo.teacher} on Fashion-MNIST scenes ({counts}; "
        f"{seed_text}, {demo.student_epochs} student epochs, precision {precision}); COCO box AP (%) on val",
    ]
    if user:
        lines.append(f"overrides: {' '.join(user)}")
    lines.append(f"{'run':<40}" + "".join(f"{title:>7}" for title, _ in AP_COLUMNS) + f"{'time (s)':>10}")
    for name, ap, secs in rows:
        lines.append(f"{name:<40}" + "".join(f"{_fmt(ap.get(s)):>7}" for _, s in AP_COLUMNS) + f"{secs:>10.1f}")
    lines += seed_summary(per_seed, "AP", digits=1)
    lines.append(f"{'scenes (written or reused)':<40}{'':>42}{scene_secs:>10.1f}")
    lines.append(f"{'total wall time':<40}{'':>42}{total:>10.1f}")
    lines.append(f"outputs: {out_root}" + ("" if len(seeds) == 1 else " (<method>/seed<k>/)"))
    print("\n".join(lines), flush=True)
    return mean_std(next(reversed(per_seed.values())))[0]
