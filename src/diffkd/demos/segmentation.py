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

Every run is a normal :func:`diffkd.training.train` run in its own folder, composed by Hydra from ``train.yaml``
with the command line's overrides (:func:`diffkd.demo.demo_run_config`: ``distill.*`` overrides reach the runs
whose distiller has that key).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import Tensor

from diffkd.data.fashion_mnist import FashionMNISTDataModule, read_idx
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
from diffkd.demos.scenes import compose_scenes

log = logging.getLogger("diffkd.demos.segmentation")

__all__ = ["CLASS_NAMES", "IGNORE_INDEX", "ensure_scenes", "run_demo", "scene_label", "write_scene_split"]

IGNORE_INDEX = 255
CLASS_NAMES: tuple[str, ...] = (
    "background", "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
    "Ankle boot",
)  # fmt: skip
#: The file that marks a complete scene folder (written last) and records what it was built from.
SCENES_FILE = "scenes.json"


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


def _fashion_mnist(source: Mapping[str, Any]) -> tuple[dict[tuple[str, str], Path], str]:
    """The four Fashion-MNIST files (and where they came from), found as the classification demo finds them."""
    finder = FashionMNISTDataModule(
        data_dir=str(source["data_dir"]),
        download=bool(source.get("download", True)),
        debian_dir=source.get("debian_dir"),
    )
    finder.prepare_data()
    found = finder.locate()
    if found is None:
        raise finder._not_found()
    where, files = found
    return files, where


def ensure_scenes(spec: Mapping[str, Any], source: Mapping[str, Any]) -> Path:
    """The scene folder of ``spec`` (``demo.scenes``), built from Fashion-MNIST (``demo.fashion_mnist``) unless a
    complete one with the same parameters is already there.

    The folder is written under a temporary name and renamed when complete, so an interrupted build is never
    taken for a finished one; a folder of other parameters is replaced only when it is one of ours (it holds
    ``scenes.json``).

    Returns:
        ``spec.root``, in the ``segmentation_folder`` layout, with ``scenes.json`` (the parameters and counts).
    """
    root = Path(spec["root"])
    params = {k: spec[k] for k in ("train", "val", "canvas", "items", "scale", "ignore_border", "seed")}
    params = json.loads(json.dumps(OmegaConf.to_container(OmegaConf.create(params), resolve=True)))
    marker = root / SCENES_FILE
    if marker.is_file():
        built = json.loads(marker.read_text())
        if built.get("params") == params:
            log.info("reusing the demo scenes in %s", root)
            return root
        log.info("demo scenes in %s were built with %s, not %s: rebuilding", root, built.get("params"), params)
    elif root.exists() and any(root.iterdir()):
        raise FileExistsError(
            f"{root} exists without {SCENES_FILE}: not the demo's scenes; move it or set demo.scenes.root"
        )
    start = time.perf_counter()
    files, where = _fashion_mnist(source)
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    stats = {}
    for split, fm_split, offset in (("train", "train", 0), ("val", "test", 1)):
        images, labels = read_idx(files[(fm_split, "images")]), read_idx(files[(fm_split, "labels")])
        count = int(params[split])
        stats[split] = write_scene_split(tmp / split, images, labels, count, params, int(params["seed"]) * 2 + offset)
    (tmp / SCENES_FILE).write_text(json.dumps({"params": params, "stats": stats, "fashion_mnist": where}, indent=1))
    if marker.is_file():
        shutil.rmtree(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(root)
    log.info("demo scenes: %s in %s from %s (%.1f s)", stats, root, where, time.perf_counter() - start)
    return root


def run_demo(cfg: DictConfig, overrides: Sequence[str] | None = None) -> float:
    """Scenes (built or reused), teacher (trained or reused), then the student once per method; prints the table.

    Args:
        cfg: the composed demo config (``experiment=demo_segmentation``).
        overrides: the overrides it was composed with (default: the running Hydra app's command line).

    Returns:
        the last method's test mIoU in [0, 1] (its mean over ``demo.seeds``).
    """
    demo = cfg.demo
    user = demo_user_overrides(demo, overrides)
    precision = demo_precision(demo)
    wall = time.perf_counter()
    scenes_root = ensure_scenes(demo.scenes, demo.fashion_mnist)
    scenes_params = json.loads((scenes_root / SCENES_FILE).read_text())["params"]
    out_root = Path(cfg.paths.output_dir)
    teacher_file = Path(demo.teacher_weights)
    meta_file = teacher_file.with_suffix(".json")
    rows: list[tuple[str, float, float, float]] = []

    def settings(label: str, epochs: int, student: str, extra: Sequence[str] = ()) -> list[str]:
        return [
            f"trainer.max_epochs={epochs}",
            f"trainer.precision={precision}",
            f"model.student.name={student}",
            f"paths.output_dir={out_root / label}",
            *extra,
        ]

    def run(label: str, method: str, epochs: int, student: str, extra: Sequence[str] = ()) -> dict[str, Any]:
        metrics, best, seconds = train_demo_run(user, method, settings(label, epochs, student, extra))
        return {
            "miou": metrics.get("test/miou", float("nan")),
            "pixel_acc": metrics.get("test/pixel_acc", float("nan")),
            "seconds": seconds,
            "best_ckpt": best,
        }

    teacher_settings = settings("teacher", demo.teacher_epochs, demo.teacher)
    recipe = teacher_recipe(demo_run_config(user, "none", ["pipeline=train", *teacher_settings]), scenes=scenes_params)
    meta, message = cached_teacher(teacher_file, recipe)
    log.info(message)
    if meta is not None:
        log.info("demo teacher %s: test mIoU %.2f%%", teacher_file, 100 * meta["miou"])
        rows.append((f"teacher {demo.teacher} (reused)", meta["miou"], meta["pixel_acc"], 0.0))
    else:
        result = run("teacher", "none", demo.teacher_epochs, demo.teacher)
        save_student_as_teacher(result["best_ckpt"], teacher_file, miou=result["miou"])
        meta = {k: result[k] for k in ("miou", "pixel_acc")}
        meta |= {"source": result["best_ckpt"], "epochs": demo.teacher_epochs, "scenes": scenes_params}
        meta_file.write_text(json.dumps({**meta, "recipe": recipe}, indent=1))
        rows.append((f"teacher {demo.teacher}", result["miou"], result["pixel_acc"], result["seconds"]))
    teacher = [f"model.teacher.name={demo.teacher}", f"model.teacher.weights={teacher_file}"]
    seeds = demo_seeds(demo, int(cfg.seed))
    per_seed: dict[str, list[float]] = {}
    for seed in seeds:  # seed-major: an interrupted demo has every method for the seeds it finished
        for method in demo.methods:
            name = "student alone" if method == "none" else f"student + {method.removesuffix('_seg')}"
            label = method if len(seeds) == 1 else f"{method}/seed{seed}"
            result = run(label, method, demo.student_epochs, demo.student, [*teacher, f"seed={seed}"])
            row_name = name if len(seeds) == 1 else f"{name}, seed {seed}"
            rows.append((row_name, result["miou"], result["pixel_acc"], result["seconds"]))
            per_seed.setdefault(name, []).append(result["miou"])
    total = time.perf_counter() - wall
    seed_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {' '.join(map(str, seeds))}"
    lines = [
        "",
        f"Segmentation demo — {demo.student} distilled from {demo.teacher} on Fashion-MNIST scenes "
        f"({scenes_params['train']} train / {scenes_params['val']} val, {scenes_params['canvas']}px, 11 classes; "
        f"{seed_text}, {demo.student_epochs} student epochs, precision {precision})",
    ]
    if user:
        lines.append(f"overrides: {' '.join(user)}")
    lines.append(f"{'run':<34}{'mIoU':>9}{'pixel acc':>11}{'time (s)':>10}")
    lines += [f"{n:<34}{100 * m:>8.2f}%{100 * a:>10.2f}%{s:>10.1f}" for n, m, a, s in rows]
    lines += seed_summary(per_seed, "mIoU", digits=2)
    lines.append(f"{'total wall time':<34}{'':>20}{total:>10.1f}")
    lines.append(f"outputs: {out_root}" + ("" if len(seeds) == 1 else " (<method>/seed<k>/)"))
    print("\n".join(lines), flush=True)
    return mean_std(next(reversed(per_seed.values())))[0]
