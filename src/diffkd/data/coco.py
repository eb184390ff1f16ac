"""COCO-format object detection data (``data=coco``): torchvision's ``CocoDetection`` + transforms v2, list batches.

Layout (the official COCO 2017 one; split names and file names are configurable)::

    <root>/train2017/*.jpg
    <root>/val2017/*.jpg
    <root>/annotations/instances_train2017.json
    <root>/annotations/instances_val2017.json

A batch is ``(images, targets)``: ``images`` a list of float (3, H_i, W_i) tensors in [0, 1] (sizes differ), and
``targets`` a list of dicts, one per image, as torchvision's detectors take them::

    {"boxes": float32 (N, 4) xyxy in pixels, "labels": int64 (N,), "image_id": int,
     "area": float32 (N,) from the json, "iscrowd": int64 (N,)}

Images are neither normalised nor resized here: torchvision's detectors do both inside the model
(``GeneralizedRCNNTransform``: ImageNet mean/std, shorter side to ``min_size``, padding to a multiple of 32). A
distiller that runs the student's transform once and feeds the same transformed tensor to the teacher therefore
needs nothing from the data side, and the ground-truth boxes stay in the original pixel frame that COCO evaluation
uses.

The training pipeline follows torchvision's detection references (``references/detection``): horizontal flip 0.5,
optionally the ``multiscale`` preset, images without usable annotations removed, and batches grouped by aspect ratio.
"""

from __future__ import annotations

import bisect
import contextlib
import io
import json
import logging
import math
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler, Sampler
from torchvision import tv_tensors
from torchvision.datasets import CocoDetection, VisionDataset, wrap_dataset_for_transforms_v2
from torchvision.transforms import v2

from diffkd.data.image_checks import ImageFileChecks
from diffkd.data.images import DataIssue, DataNotFoundError, ImageReadError, inspect_image, read_image
from diffkd.data.loader_keywords import loader_keywords
from diffkd.data.loaders import DataModuleBase, LoaderOptions
from diffkd.data.resumable import EpochCodedBatchSampler
from diffkd.data.usable import SplitProblem, raise_problems

__all__ = [
    "BOX_DROP_REASONS",
    "COCO_URLS",
    "MULTISCALE_MIN_SIZES",
    "AnnotationFormatError",
    "BoxUsage",
    "COCODataModule",
    "CocoImages",
    "DetectionTransform",
    "GroupedBatchSampler",
    "ImageReadError",
    "aspect_ratio_group_ids",
    "box_drop_codes",
    "box_usage",
    "collate_detection",
    "has_valid_annotation",
    "load_coco_annotations",
]

log = logging.getLogger(__name__)

COCO_URLS: dict[str, str] = {
    "train2017": "http://images.cocodataset.org/zips/train2017.zip",
    "val2017": "http://images.cocodataset.org/zips/val2017.zip",
    "annotations": "http://images.cocodataset.org/annotations/annotations_trainval2017.zip",
}

# Shorter-side choices of the references' "multiscale" preset (RandomShortestSize, longer side at most 1333).
MULTISCALE_MIN_SIZES: tuple[int, ...] = tuple(range(480, 801, 32))

Target = dict[str, Any]
Batch = tuple[list[Tensor], list[Target]]


class AnnotationFormatError(ValueError):
    """A COCO annotation file that is not valid JSON or not in the COCO instances format; the message names it."""


# ------------------------------------------------------------------------------------------ annotation files


def load_coco_annotations(path: str | Path) -> dict[str, Any]:
    """Read and check a COCO instances json (``images``, ``annotations``, ``categories``).

    Missing ``iscrowd`` is filled with 0 and missing ``area`` with the box area, so that every annotation has the
    same keys (custom COCO-format sets often omit them).

    Args:
        path: the json file.

    Returns:
        The parsed dict.

    Raises:
        AnnotationFormatError: not valid JSON, or a required key or field is missing or of the wrong type.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AnnotationFormatError(f"{path}: not a valid JSON file ({err})") from err

    def fail(problem: str) -> AnnotationFormatError:
        return AnnotationFormatError(
            f"{path}: not a COCO instances annotation file: {problem}. Expected a JSON object with lists 'images' "
            "({id, file_name, width, height}), 'annotations' ({id, image_id, category_id, bbox: [x, y, w, h], "
            "area, iscrowd}) and 'categories' ({id, name})."
        )

    if not isinstance(data, dict):
        raise fail(f"the top level is a {type(data).__name__}")
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if missing:
        raise fail(f"no list {', '.join(repr(k) for k in missing)}")
    for entry in data["images"]:
        if not isinstance(entry, dict) or any(k not in entry for k in ("id", "file_name", "width", "height")):
            raise fail(f"image entry {str(entry)[:200]} lacks one of id, file_name, width, height")
    for entry in data["categories"]:
        if not isinstance(entry, dict) or "id" not in entry:
            raise fail(f"category entry {str(entry)[:200]} has no id")
    _require_unique_ids(path, "categories", data["categories"], "category")
    _require_unique_ids(path, "images", data["images"], "image")
    category_ids = {entry["id"] for entry in data["categories"]}
    image_ids = {entry["id"] for entry in data["images"]}
    for ann in data["annotations"]:
        if not isinstance(ann, dict) or any(k not in ann for k in ("image_id", "category_id", "bbox")):
            raise fail(f"annotation {str(ann)[:200]} lacks one of image_id, category_id, bbox")
        bbox = ann["bbox"]
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
            raise fail(f"annotation {str(ann)[:200]} has a bbox that is not [x, y, w, h] (four numbers)")
        if ann["category_id"] not in category_ids:
            raise fail(f"annotation {str(ann)[:200]} has category_id {ann['category_id']}, not in 'categories'")
        if ann["image_id"] not in image_ids:
            raise fail(f"annotation {str(ann)[:200]} refers to image_id {ann['image_id']}, not in 'images'")
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", float(ann["bbox"][2]) * float(ann["bbox"][3]))
    _number_annotations(path, data["annotations"])
    return data


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _require_unique_ids(path: Path, key: str, entries: Sequence[Mapping[str, Any]], what: str) -> None:
    """Raise :class:`AnnotationFormatError` naming the first id that more than one entry of ``key`` has: pycocotools
    keeps one entry per id, so a duplicate would silently lose the others."""
    seen: dict[Any, int] = {}
    for position, entry in enumerate(entries):
        first = seen.setdefault(entry["id"], position)
        if first == position:
            continue
        count = sum(e["id"] == entry["id"] for e in entries)
        shown = " and ".join(str(_brief(e)) for e in (entries[first], entry))
        fix = {
            "image": "give every image entry its own id and point each annotation's image_id at its image",
            "category": "give every category its own id",
            "annotation": "give every annotation its own id (or leave 'id' out: missing ids are numbered)",
        }[what]
        raise AnnotationFormatError(
            f"{path}: {what} id {entry['id']!r} is duplicated: {count} entries of {key!r} have it (entries "
            f"{first} and {position}: {shown}); ids must be unique. Fix: {fix}."
        )


def _brief(entry: Mapping[str, Any]) -> dict[str, Any]:
    """The identifying fields of a json entry, for a message."""
    keys = ("id", "file_name", "name", "image_id", "category_id", "bbox")
    return {k: entry[k] for k in keys if k in entry}


def _number_annotations(path: Path, annotations: list[dict[str, Any]]) -> None:
    """Check the annotation ids are unique, and number those without one after the largest (pycocotools indexes
    annotations by id; custom COCO-format sets often leave it out)."""
    _require_unique_ids(path, "annotations", [a for a in annotations if "id" in a], "annotation")
    numbers = [a["id"] for a in annotations if _is_number(a.get("id"))]
    next_id = int(max(numbers, default=0)) + 1
    for ann in annotations:
        if "id" not in ann:
            ann["id"] = next_id
            next_id += 1


def _coco_index(data: dict[str, Any]) -> Any:
    """A ``pycocotools`` ``COCO`` index over already-loaded annotations (no second parse of the file)."""
    try:
        from pycocotools.coco import COCO
    except ImportError as err:  # pragma: no cover - the detection extra is not installed
        raise ImportError("COCO data needs pycocotools: pip install 'diffkd[detection]'") from err
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress lines
        coco.createIndex()
    return coco


def has_valid_annotation(annotations: Sequence[Mapping[str, Any]]) -> bool:
    """Whether an image stays in the training set, by torchvision's references' rule.

    The image needs at least one annotation whose box is wider and taller than 1 px. Crowd annotations count: an
    image whose only usable box is a crowd is kept (its training target then has no boxes). The references' extra
    rule for keypoint annotation files (at least 10 visible keypoints) does not apply to ``instances`` files.
    """
    return any(float(a["bbox"][2]) > 1 and float(a["bbox"][3]) > 1 for a in annotations)


def aspect_ratio_group_ids(sizes: Sequence[tuple[int, int]], group_factor: int) -> list[int]:
    """Quantised aspect-ratio group of each image, as torchvision's references bin them.

    Args:
        sizes: ``(height, width)`` of each image.
        group_factor: ``k``: bin edges ``2 ** linspace(-1, 1, 2k + 1)`` on height / width (k = 3: 7 edges, groups
            0..7); ``k = 0``: one edge at 1 (landscape vs. portrait or square).

    Returns:
        One group id per image: the number of bin edges <= its height / width.
    """
    edges = (2 ** np.linspace(-1, 1, 2 * group_factor + 1)).tolist() if group_factor > 0 else [1.0]
    return [bisect.bisect_right(edges, float(h) / float(w)) for h, w in sizes]


# ------------------------------------------------------------------------------------------ samples


class CocoImages(CocoDetection):
    """torchvision's ``CocoDetection`` over an already-built ``COCO`` index and a chosen list of image ids.

    It reads images as ``CocoDetection`` does (PIL, RGB), but an unreadable file raises :class:`ImageReadError`
    naming it (:class:`~diffkd.data.images.ImageReadError`, also importable from here). Wrap it with
    ``torchvision.datasets.wrap_dataset_for_transforms_v2`` for box targets.

    Args:
        root: folder of the image files (``file_name`` in the json is relative to it).
        coco: a ``pycocotools`` ``COCO`` index.
        ids: the image ids to serve, in order (default: all, sorted, as ``CocoDetection``).
        transforms: called on ``(image, target)``.
    """

    def __init__(self, root: str | Path, coco: Any, ids: Sequence[int] | None = None, transforms: Any = None) -> None:
        VisionDataset.__init__(self, root, transforms=transforms)  # CocoDetection.__init__ would re-read the json
        self.coco = coco
        self.ids = [int(i) for i in (sorted(coco.imgs) if ids is None else ids)]
        self.usage: BoxUsage | None = None

    def split_issues(self) -> list[DataIssue]:
        """What the training box rule drops, as notes for ``python -m diffkd.data.check`` (none for evaluation)."""
        return self.usage.issues() if self.usage is not None else []

    def _load_image(self, id: int) -> Image.Image:
        path = os.path.join(self.root, self.coco.imgs[id]["file_name"])
        return read_image(path, "RGB", context=f" (COCO image id {id})")

    def sample_files(self, index: int) -> tuple[str]:
        """The image file of sample ``index``."""
        return (os.path.join(self.root, self.coco.imgs[self.ids[index]]["file_name"]),)

    def check_sample(self, index: int) -> list[DataIssue]:
        """Decode sample ``index``'s image (an error when it does not) and compare it with its annotations:
        warnings for a size other than the json's and for boxes more than 1 px outside the image."""
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        path = self.sample_files(index)[0]
        image, issues = inspect_image(path, index)
        width, height = int(info["width"]), int(info["height"])
        if image is not None and image.size != (width, height):
            message = f"{image.width}×{image.height} px, but the json (image id {image_id}) says {width}×{height}"
            issues.append(DataIssue(path, "size", message, "warning", index=index))
            width, height = image.size
        outside = [a for a in self.coco.imgToAnns.get(image_id, []) if not _box_inside(a["bbox"], width, height)]
        if outside:
            shown = ", ".join(f"annotation {a.get('id')} {[float(v) for v in a['bbox']]}" for a in outside[:3])
            more = f" and {len(outside) - 3} more" if len(outside) > 3 else ""
            message = (
                f"{len(outside)} box(es) [x, y, w, h] outside the {width}×{height} image (image id {image_id}): "
                f"{shown}{more}"
            )
            issues.append(DataIssue(path, "box", message, "warning", index=index))
        return issues

    def height_and_width(self, index: int) -> tuple[int, int]:
        """``(height, width)`` of sample ``index`` from the json, without decoding the image."""
        info = self.coco.imgs[self.ids[index]]
        return int(info["height"]), int(info["width"])


def _box_inside(bbox: Sequence[float], width: int, height: int, tolerance: float = 1.0) -> bool:
    """Whether a COCO ``[x, y, w, h]`` box is finite, of non-negative size and inside the image (give or take
    ``tolerance`` px: rounding in the json)."""
    x, y, w, h = (float(v) for v in bbox)
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w < 0 or h < 0:
        return False
    return x >= -tolerance and y >= -tolerance and x + w <= width + tolerance and y + h <= height + tolerance


# ------------------------------------------------------------------------------------------ the training box rule

#: Why a training box is dropped, by the code :func:`box_drop_codes` gives (0: kept), in the order they are tested.
BOX_DROP_REASONS: dict[int, str] = {
    1: "crowd region (iscrowd=1: never trained on, evaluation keeps it)",
    2: "coordinates not finite",
    3: "zero or negative width or height",
    4: "outside the image",
    5: "at most data.min_box_size px wide or tall (after clamping to the image)",
}
#: The reason of a box that passes the box rule but whose image is left out of training.
IMAGE_LEFT_OUT = "its image is left out (no annotation box > 1 px; data.remove_images_without_annotations)"


def box_drop_codes(
    boxes: Tensor, iscrowd: Tensor, width: Tensor | float, height: Tensor | float, min_box_size: float
) -> Tensor:
    """Which training boxes are kept (0) and why the others are dropped (a key of :data:`BOX_DROP_REASONS`).

    The one rule of the training targets: :class:`DetectionTransform` keeps the boxes with code 0, and the setup
    report (:func:`box_usage`, printed by ``python -m diffkd.data.check``) counts the others by code. A box is kept
    when it is not a crowd, is finite, and, clamped to its image, is wider and taller than ``min_box_size``.

    Args:
        boxes: (N, 4) xyxy in pixels, as the json's ``[x, y, w, h]`` gives them (``x + w``, ``y + h``).
        iscrowd: (N,) the json's ``iscrowd``.
        width, height: the image size in pixels, one for all boxes or one per box ((N,) tensors).
        min_box_size: the size a kept box must exceed on both axes (>= 0).

    Returns:
        (N,) int64 codes.
    """
    boxes = boxes.reshape(-1, 4)
    width = torch.as_tensor(width, dtype=boxes.dtype)
    height = torch.as_tensor(height, dtype=boxes.dtype)
    x1, y1, x2, y2 = boxes.unbind(-1)
    zero = torch.zeros((), dtype=boxes.dtype)
    clamped_w = x2.maximum(zero).minimum(width) - x1.maximum(zero).minimum(width)
    clamped_h = y2.maximum(zero).minimum(height) - y1.maximum(zero).minimum(height)
    codes = torch.where((clamped_w > min_box_size) & (clamped_h > min_box_size), 0, 5)
    codes = torch.where((clamped_w <= 0) | (clamped_h <= 0), 4, codes)
    codes = torch.where((x2 - x1 <= 0) | (y2 - y1 <= 0), 3, codes)
    codes = torch.where(torch.isfinite(boxes).all(dim=-1), codes, 2)
    return torch.where(torch.as_tensor(iscrowd).reshape(-1) != 0, 1, codes).to(torch.int64)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}{'es' if word.endswith(('s', 'x')) else 's'}"


@dataclass
class BoxUsage:
    """What training makes of one split's annotations: the boxes it trains on, those it drops (by reason), the
    images it leaves out and those it keeps without a box (see :func:`box_usage`).

    Attributes:
        split: the split's name (``train2017``).
        path: its annotation json.
        images: image entries in the json.
        annotations: annotations in the json.
        train_images: images in the training set.
        usable: training images with at least one box to train on.
        boxes: boxes trained on.
        dropped: reason → boxes dropped for it (a value of :data:`BOX_DROP_REASONS`, or :data:`IMAGE_LEFT_OUT`).
        examples: reason → ``(image id, annotation id)`` of the first box dropped for it.
        left_out: image ids in the json that are not in the training set, in id order.
        no_box: training image ids without a box to train on, in id order.
    """

    split: str
    path: str
    images: int
    annotations: int
    train_images: int
    usable: int
    boxes: int
    dropped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, tuple[int, int]] = field(default_factory=dict)
    left_out: list[int] = field(default_factory=list)
    no_box: list[int] = field(default_factory=list)

    @property
    def any_dropped(self) -> bool:
        """Whether anything besides crowd regions is not trained on (crowds never are, by design)."""
        crowd = BOX_DROP_REASONS[1]
        return bool(self.left_out or self.no_box or any(r != crowd for r in self.dropped))

    def parts(self) -> list[str]:
        """One phrase per count: each drop reason, the images left out, the images without a box."""
        out = [
            f"{_plural(n, 'box')} dropped: {reason} (e.g. image id {self.examples[reason][0]}, annotation "
            f"{self.examples[reason][1]})"
            for reason, n in self.dropped.items()
        ]
        if self.left_out:
            out.append(
                f"{len(self.left_out)} of {_plural(self.images, 'image')} left out of training: no annotation box "
                f"> 1 px wide and tall (e.g. image id {self.left_out[0]}; data.remove_images_without_annotations)"
            )
        if self.no_box:
            out.append(
                f"{_plural(len(self.no_box), 'training image')} with no box to train on (e.g. image id "
                f"{self.no_box[0]})"
            )
        return out

    def summary(self) -> str:
        """One line: the split, the file, what is trained on and every count."""
        head = (
            f"COCO {self.split} ({self.path}): {self.boxes} of {_plural(self.annotations, 'annotation')} trained on, "
            f"in {self.usable} of {self.train_images} training images"
        )
        return "; ".join([head, *self.parts()])

    def issues(self) -> list[DataIssue]:
        """The counts as notes of a check, one per reason (``python -m diffkd.data.check`` prints them)."""
        kinds = ["dropped box"] * len(self.dropped)
        kinds += ["image left out"] * bool(self.left_out) + ["image without box"] * bool(self.no_box)
        return [
            DataIssue(self.path, kind, f"training ({self.split}): {part}", "note")
            for kind, part in zip(kinds, self.parts(), strict=True)
        ]


def box_usage(coco: Any, train_ids: Sequence[int], split: str, path: str | Path, min_box_size: float) -> BoxUsage:
    """Apply the training box rule (:func:`box_drop_codes`) to every annotation of ``coco`` at once.

    Args:
        coco: the split's ``pycocotools`` index.
        train_ids: the image ids of the training set (after ``remove_images_without_annotations``).
        split: the split's name, for the report.
        path: its annotation json, for the report.
        min_box_size: as :class:`DetectionTransform`.
    """
    anns = coco.dataset["annotations"]
    sizes = {image_id: (float(info["width"]), float(info["height"])) for image_id, info in coco.imgs.items()}
    # float32 x + w, as torchvision's dataset wrapper converts [x, y, w, h] for the transform
    xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
    boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
    width, height = torch.tensor([sizes[a["image_id"]] for a in anns], dtype=torch.float32).reshape(-1, 2).unbind(1)
    iscrowd = torch.tensor([int(a["iscrowd"]) for a in anns], dtype=torch.int64)
    codes = box_drop_codes(boxes, iscrowd, width, height, min_box_size).tolist()
    in_training = set(train_ids)
    dropped: Counter[str] = Counter()
    examples: dict[str, tuple[int, int]] = {}
    with_box: set[int] = set()
    for ann, code in zip(anns, codes, strict=True):
        image_id = ann["image_id"]
        if code == 0 and image_id in in_training:
            with_box.add(image_id)
            continue
        reason = BOX_DROP_REASONS[code] if code else IMAGE_LEFT_OUT
        dropped[reason] += 1
        examples.setdefault(reason, (image_id, ann["id"]))
    order = [*BOX_DROP_REASONS.values(), IMAGE_LEFT_OUT]
    return BoxUsage(
        split=split,
        path=str(path),
        images=len(coco.imgs),
        annotations=len(anns),
        train_images=len(in_training),
        usable=len(with_box),
        boxes=sum(1 for ann, code in zip(anns, codes, strict=True) if code == 0 and ann["image_id"] in in_training),
        dropped={reason: dropped[reason] for reason in order if dropped[reason]},
        examples=examples,
        left_out=sorted(set(coco.imgs) - in_training),
        no_box=sorted(in_training - with_box),
    )


class DetectionTransform:
    """``(PIL image, wrapped COCO target)`` → ``(float image (3, H, W) in [0, 1], detection target)``.

    The input target is what ``wrap_dataset_for_transforms_v2`` gives for ``CocoDetection`` with the keys
    ``image_id, boxes, labels, area, iscrowd`` (only ``image_id`` for an image without annotations).

    Training (``train=True``): boxes are clamped to the image; crowd boxes and boxes at most ``min_box_size`` px
    wide or tall are removed (the detectors' losses must not see them; the rule is :func:`box_drop_codes`, which
    the datamodule's setup report counts with); then the geometric augmentation runs on
    image and boxes together. Evaluation keeps every annotation as in the json, crowds with ``iscrowd=1``, for
    COCO evaluation. ``area`` is the json's (original image scale) either way.

    Args:
        train: training or evaluation behaviour (above).
        hflip_prob: probability of a horizontal flip (training only).
        min_sizes: shorter-side choices of a ``RandomShortestSize`` (training only); ``None``: no resize.
        max_size: longest side allowed by that resize.
        category_to_label: category id → label; ``None`` keeps the category ids as labels.
        min_box_size: training boxes must be wider and taller than this, in pixels.
    """

    def __init__(
        self,
        train: bool,
        hflip_prob: float = 0.5,
        min_sizes: Sequence[int] | None = None,
        max_size: int = 1333,
        category_to_label: Mapping[int, int] | None = None,
        min_box_size: float = 1.0,
    ) -> None:
        if not min_box_size >= 0:
            raise ValueError(f"data.min_box_size must be >= 0 (pixels), got {min_box_size}")
        self.train = train
        self.category_to_label = dict(category_to_label) if category_to_label is not None else None
        self.min_box_size = float(min_box_size)
        steps: list[Any] = []
        if train and min_sizes:
            steps.append(v2.RandomShortestSize(min_size=[int(s) for s in min_sizes], max_size=int(max_size)))
        if train and hflip_prob > 0:
            steps.append(v2.RandomHorizontalFlip(p=float(hflip_prob)))
        self.augment = v2.Compose(steps) if steps else None
        self.to_float = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])

    def __call__(self, image: Image.Image, target: Mapping[str, Any]) -> tuple[Tensor, Target]:
        width, height = image.size
        if "boxes" in target:
            boxes = target["boxes"].as_subclass(Tensor).to(torch.float32).reshape(-1, 4).clone()
            labels = torch.as_tensor(target["labels"], dtype=torch.int64)
            area = torch.as_tensor(target["area"], dtype=torch.float32)
            iscrowd = torch.as_tensor(target["iscrowd"], dtype=torch.int64)
        else:
            boxes = torch.zeros(0, 4)
            labels, iscrowd = torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
            area = torch.zeros(0)
        if self.train:
            keep = box_drop_codes(boxes, iscrowd, width, height, self.min_box_size) == 0
            boxes[:, 0::2].clamp_(0, width)
            boxes[:, 1::2].clamp_(0, height)
            boxes, labels, area, iscrowd = boxes[keep], labels[keep], area[keep], iscrowd[keep]
        if self.category_to_label is not None:
            labels = torch.tensor([self.category_to_label[c] for c in labels.tolist()], dtype=torch.int64)
        if self.augment is not None:
            wrapped = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width))
            image, wrapped = self.augment(image, wrapped)
            boxes = wrapped.as_subclass(Tensor)
        pixels = self.to_float(image).as_subclass(Tensor)
        out = {"boxes": boxes, "labels": labels, "image_id": int(target["image_id"]), "area": area, "iscrowd": iscrowd}
        return pixels, out


def collate_detection(samples: Sequence[tuple[Tensor, Target]]) -> Batch:
    """List collation: ``[(image, target), ...]`` → ``(images, targets)``, two lists (images differ in size)."""
    return [s[0] for s in samples], [s[1] for s in samples]


# ------------------------------------------------------------------------------------------ sampling


class GroupedBatchSampler(EpochCodedBatchSampler):
    """Batches whose images all come from one aspect-ratio group, in (nearly) the order of ``sampler``.

    Indices from ``sampler`` are buffered per group, and a group's buffer is yielded as soon as it holds
    ``batch_size`` indices (the scheme of torchvision's references). In data-parallel training ``sampler`` is a
    ``DistributedSampler``: each rank groups only its own shard.

    At the end of the pass the partly filled buffers are topped up with earlier indices of the same group from this
    pass (fullest first), so every batch is full and of one group. ``len(self)`` depends only on the shard size and
    the number of groups, never on the shuffle, so every rank yields the same number of batches (unequal counts would
    hang DDP's gradient all-reduce):

    - ``drop_last=False``: ``min(n, (n + G·(batch_size − 1)) // batch_size)`` batches for a shard of ``n`` indices and
      ``G`` groups in ``group_ids``; every index of the shard is in a batch, and the few batches still missing after
      the partial ones are repeats of the first batches of the pass.
    - ``drop_last=True``: ``n // batch_size`` batches, torchvision's count: only as many partial buffers as fit in
      that count are yielded, so up to ``G`` (for ``batch_size`` 2) leftover indices miss the pass.

    Lightning can swap ``sampler`` for its own ``DistributedSampler`` (it re-creates this class with the saved
    arguments, ``sampler`` replaced): the grouping is unchanged. ``set_epoch`` is passed on to ``sampler``.

    Args:
        sampler: source of dataset indices (its order is kept as far as grouping allows).
        group_ids: group of every dataset index (``group_ids[i]`` for index ``i``).
        batch_size: indices per batch.
        drop_last: the end-of-pass rule above.
        epoch_codes: yield :class:`~diffkd.data.resumable.SeededSamples` codes ``epoch × len(group_ids) + index``
            instead of indices — for a data set wrapped in ``SeededSamples``.
        epoch_fn: the trainer's epoch, handed to ``sampler.set_epoch`` when a pass starts (see
            :class:`~diffkd.data.resumable.EpochCodedBatchSampler`).
    """

    def __init__(
        self,
        sampler: Sampler[int],
        group_ids: Sequence[int],
        batch_size: int,
        drop_last: bool = False,
        epoch_codes: bool = False,
        epoch_fn: Callable[[], int] | None = None,
    ) -> None:
        super().__init__(sampler, batch_size, drop_last, size=len(group_ids), codes=epoch_codes, epoch_fn=epoch_fn)
        self.group_ids = [int(g) for g in group_ids]
        self.num_groups = len(set(self.group_ids))

    def __len__(self) -> int:
        n, b = len(self.sampler), self.batch_size
        if self.drop_last:
            return n // b
        return min(n, (n + self.num_groups * (b - 1)) // b)

    def batches(self) -> Iterator[list[int]]:
        b, target = self.batch_size, len(self)
        buffers: dict[int, list[int]] = defaultdict(list)
        seen: dict[int, list[int]] = defaultdict(list)
        first: list[list[int]] = []  # the first batches of the pass, repeated when drop_last=False needs more
        count = 0
        for index in self.sampler:
            index = int(index)
            group = self.group_ids[index]
            buffers[group].append(index)
            seen[group].append(index)
            if len(buffers[group]) == b:
                batch = buffers.pop(group)
                if len(first) < self.num_groups:
                    first.append(batch)
                yield batch
                count += 1
        for group, part in sorted(buffers.items(), key=lambda item: -len(item[1])):
            if count >= target:
                return
            pool = seen[group]
            batch = part + [pool[i % len(pool)] for i in range(b - len(part))]
            if len(first) < self.num_groups:
                first.append(batch)
            yield batch
            count += 1
        for i in range(target - count):
            yield list(first[i % len(first)])


# ------------------------------------------------------------------------------------------ the datamodule


@loader_keywords(
    after="root",
    moved={"drop_last": "aspect_ratio_group_factor"},
    batch_size=2,
    val_batch_size=2,
    num_workers=4,
    drop_last=False,
)
class COCODataModule(ImageFileChecks, DataModuleBase):
    """COCO 2017 detection (or any COCO-format set) for torchvision's detectors.

    Built on ``torchvision.datasets.CocoDetection`` + ``wrap_dataset_for_transforms_v2`` + transforms v2. See the
    module docstring for the layout and the batch format. In short:

    - Training: horizontal flip (``hflip_prob``), or with ``multiscale`` the references' multiscale preset
      (``RandomShortestSize`` over 480..800 step 32, longest side ≤ 1333) before the flip; then float [0, 1]. **No
      normalisation, no resize by default**: the detectors' ``GeneralizedRCNNTransform`` normalises and resizes
      inside the model, so teacher and student see the same transformed batch when the distiller runs that transform
      once. With ``multiscale: true`` build the detectors with torchvision's ``_skip_resize=True`` (as the references'
      ``train.py`` does), otherwise their transform resizes the image again to ``min_size``.
    - Training targets have no crowd boxes and no boxes ≤ 1 px wide or tall; with
      ``remove_images_without_annotations`` the images without any annotation box > 1 px (crowds included,
      torchvision's rule, :func:`has_valid_annotation`) are left out. Evaluation keeps every image and every
      annotation (crowds with ``iscrowd=1``). ``setup`` counts what training leaves out (:func:`box_usage`, one
      warning, ``box_usage``) and raises :class:`~diffkd.data.usable.EmptySplitError` for a training split with no
      box to train on or an evaluation split with no image or no non-crowd annotation.
    - Labels are COCO's category ids (1..90 on COCO: ``num_classes = 91`` with background 0, as torchvision's
      detectors expect) or, with ``contiguous_labels``, 1..K in category-id order (``num_classes = K + 1``).
      ``label_to_category`` maps labels back to category ids for COCO evaluation, either way.
    - Training batches are grouped by aspect ratio (:class:`GroupedBatchSampler`, groups from the json's
      ``width``/``height``, no image decoding) unless ``aspect_ratio_group_factor < 0``.

    Data-parallel training: the training loader shards with a ``DistributedSampler`` (rank and world size from the
    attached trainer's ``distributed_sampler_kwargs``; shuffled with ``seed + epoch``) and groups each shard; Lightning
    calls ``set_epoch`` on it every epoch. What Lightning 2.6 does with that loader:

    - ``use_distributed_sampler=True`` (the default): a ``DataLoader`` built with ``batch_sampler=`` has a
      ``SequentialSampler`` as its ``sampler``, so Lightning does not see the ``DistributedSampler`` and re-creates
      the :class:`GroupedBatchSampler` (from the arguments it recorded during the hook) around its own
      ``DistributedSampler(shuffle=True, seed=PL_GLOBAL_SEED)``. That is the module's sampler again when ``seed`` is
      ``None`` (``PL_GLOBAL_SEED``): same shards, same order, same grouping. An explicit ``seed`` is replaced by
      ``PL_GLOBAL_SEED`` there.
    - ``use_distributed_sampler=False``: the loader is used as built (the module's shard, its ``seed``).
    - Without grouping (``aspect_ratio_group_factor < 0``) the same with plain batches
      (:class:`~diffkd.data.resumable.EpochCodedBatchSampler`).

    Exact resume: the batch samplers hand the data set codes ``epoch × N + index``, and ``SeededSamples`` seeds each
    sample's flip and scale from ``(seed, epoch, index)``; a run resumed from a mid-epoch checkpoint skips (without
    loading them) the batches it had already trained. Killed and resumed, a run sees the batches of the
    uninterrupted one.

    Evaluation loaders are sequential and ungrouped; Lightning shards them in DDP (its ``DistributedSampler`` pads
    the last shard with repeated images when the split does not divide evenly).

    Args:
        root: the data folder (layout in the module docstring).
        batch_size: training images per device (the references: 2 × 8 GPUs = 16).
        val_batch_size: evaluation images per device.
        num_workers: loader worker processes (0 loads in the main process).
        pin_memory: pin host memory for faster host-to-device copies.
        train_split: name of the training split (``{split}`` in the two patterns below).
        val_split: name of the evaluation split; may equal ``train_split``.
        image_dir: image folder of a split, relative to ``root``.
        annotation_file: annotation json of a split, relative to ``root``.
        hflip_prob: horizontal flip probability in training.
        multiscale: the references' ``multiscale`` preset (see above).
        multiscale_min_sizes: its shorter-side choices.
        multiscale_max_size: its longest-side limit.
        contiguous_labels: labels 1..K instead of the category ids.
        remove_images_without_annotations: leave out training images without a usable box (see above).
        aspect_ratio_group_factor: ``k`` of :func:`aspect_ratio_group_ids` (3: the references); negative: no
            grouping, plain shuffled batches.
        drop_last: see :class:`GroupedBatchSampler`; without grouping, drop the last incomplete batch.
        min_box_size: training boxes must be wider and taller than this (pixels, after clamping to the image).
        seed: shuffle seed of the training sampler; ``None``: ``PL_GLOBAL_SEED`` (set by ``seed_everything``) or 0.
        verify: decode every image at setup (and compare it with its annotations) and raise one error listing the
            unreadable files (see :class:`~diffkd.data.image_checks.ImageFileChecks`).
        skip_bad_images: replace a sample whose image does not decode by the next readable one, with a warning;
            ``skipped_images`` counts them (default: such an image raises :class:`ImageReadError` naming it).
    """

    checks_name = "COCO"
    task: ClassVar[str] = "detection"
    no_class_hint = "the box labels of the targets (targets[k]['labels']), or a method that needs no per-image class"

    def __init__(
        self,
        root: str = "data/coco",
        train_split: str = "train2017",
        val_split: str = "val2017",
        image_dir: str = "{split}",
        annotation_file: str = "annotations/instances_{split}.json",
        hflip_prob: float = 0.5,
        multiscale: bool = False,
        multiscale_min_sizes: Sequence[int] = MULTISCALE_MIN_SIZES,
        multiscale_max_size: int = 1333,
        contiguous_labels: bool = False,
        remove_images_without_annotations: bool = True,
        aspect_ratio_group_factor: int = 3,
        min_box_size: float = 1.0,
        seed: int | None = None,
        verify: bool = False,
        skip_bad_images: bool = False,
        **loader_options: Any,
    ) -> None:
        super().__init__(LoaderOptions(**loader_options))
        self.init_image_checks(verify, skip_bad_images)
        self.root = Path(root)
        self.train_split = train_split
        self.val_split = val_split
        self.image_dir = image_dir
        self.annotation_file = annotation_file
        self.hflip_prob = float(hflip_prob)
        self.multiscale = bool(multiscale)
        self.multiscale_min_sizes = tuple(int(s) for s in multiscale_min_sizes)
        self.multiscale_max_size = int(multiscale_max_size)
        self.contiguous_labels = bool(contiguous_labels)
        self.remove_images_without_annotations = bool(remove_images_without_annotations)
        self.aspect_ratio_group_factor = int(aspect_ratio_group_factor)
        self.min_box_size = float(min_box_size)
        self.seed = seed
        self.train_group_ids: list[int] | None = None
        self.box_usage: BoxUsage | None = None
        self.category_ids: list[int] = []
        self.category_names: dict[int, str] = {}
        self._categories_from: Path | None = None

    # ---------------------------------------------------------------- paths and categories

    def split_paths(self, split: str) -> tuple[Path, Path]:
        """``(image folder, annotation json)`` of ``split``."""
        return self.root / self.image_dir.format(split=split), self.root / self.annotation_file.format(split=split)

    def _check_files(self, splits: Sequence[str]) -> None:
        missing = []
        for split in splits:
            images, annotations = self.split_paths(split)
            if not images.is_dir():
                missing.append(f"{images}/ (missing image folder)")
            if not annotations.is_file():
                missing.append(f"{annotations} (missing annotation file)")
        if not missing:
            return
        layout = []
        for split in dict.fromkeys((self.train_split, self.val_split)):
            images, annotations = self.split_paths(split)
            layout += [f"{images}/*.jpg", str(annotations)]
        raise DataNotFoundError(
            f"COCO-format detection data ({len(missing)} path(s) missing)",
            searched=missing,
            layout=layout,
            remedies=[
                f"COCO 2017: download {COCO_URLS['train2017']}, {COCO_URLS['val2017']} and "
                f"{COCO_URLS['annotations']}, and unzip all three into {self.root}",
                "or point data.root at a folder that has them (data.train_split / data.val_split / "
                "data.image_dir / data.annotation_file for other names)",
            ],
        )

    def _set_categories(self, data: Mapping[str, Any], source: Path) -> None:
        categories = sorted(data["categories"], key=lambda c: int(c["id"]))
        ids = [int(c["id"]) for c in categories]
        if self._categories_from is not None:
            if ids != self.category_ids:
                raise AnnotationFormatError(
                    f"{source} and {self._categories_from} have different categories "
                    f"({ids} vs {self.category_ids}): the labels of the two splits would not agree"
                )
            return
        if not ids or min(ids) < 1:
            raise AnnotationFormatError(f"{source}: category ids must be >= 1 (0 is the background), got {ids}")
        self.category_ids = ids
        self.category_names = {int(c["id"]): str(c.get("name", c["id"])) for c in categories}
        self._categories_from = source

    @property
    def category_to_label(self) -> dict[int, int]:
        """Category id → label (identity unless ``contiguous_labels``)."""
        self._need_categories()
        if self.contiguous_labels:
            return {c: i + 1 for i, c in enumerate(self.category_ids)}
        return {c: c for c in self.category_ids}

    @property
    def label_to_category(self) -> dict[int, int]:
        """Label → category id, for writing detections back in COCO's ids (evaluation)."""
        return {label: c for c, label in self.category_to_label.items()}

    @property
    def num_classes(self) -> int:
        """Classes including background 0, as torchvision's detectors count them (91 on COCO, 81 contiguous).

        Reads the annotations on first use (the evaluation split's, unless the training split is already loaded).
        """
        self._need_categories()
        return max(self.category_to_label.values()) + 1

    @property
    def class_names(self) -> list[str]:
        """Name of each label 0..num_classes-1: ``"__background__"`` for 0, ``"N/A"`` for unused ids."""
        names = ["__background__"] + ["N/A"] * (self.num_classes - 1)
        for category, label in self.category_to_label.items():
            names[label] = self.category_names[category]
        return names

    def _need_categories(self) -> None:
        if self._categories_from is None:
            self.setup("validate")

    # ---------------------------------------------------------------- data sets

    def _build(self, split: str, data: dict[str, Any], train: bool) -> tuple[Dataset, CocoImages]:
        """The data set of ``split``, wrapped for transforms v2, and the ``CocoImages`` inside it (its ``usage``:
        the :class:`BoxUsage` of a training split, ``None`` for evaluation)."""
        coco = _coco_index(data)
        ids = sorted(coco.imgs)
        if train and self.remove_images_without_annotations:
            ids = [i for i in ids if has_valid_annotation(coco.imgToAnns.get(i, []))]
        path = self.split_paths(split)[1]
        transform = DetectionTransform(
            train=train,
            hflip_prob=self.hflip_prob,
            min_sizes=self.multiscale_min_sizes if self.multiscale else None,
            max_size=self.multiscale_max_size,
            category_to_label=self.category_to_label if self.contiguous_labels else None,
            min_box_size=self.min_box_size,
        )
        images = CocoImages(self.split_paths(split)[0], coco, ids, transforms=transform)
        if train:
            images.usage = box_usage(coco, ids, split, path, self.min_box_size)
        keys = ("image_id", "boxes", "labels", "area", "iscrowd")  # what DetectionTransform reads
        dataset = wrap_dataset_for_transforms_v2(images, target_keys=keys)
        log.info(
            "COCO %s (%s): %d of %d images, %d annotations, %d categories",
            split,
            "train" if train else "eval",
            len(ids),
            len(coco.imgs),
            len(coco.anns),
            len(self.category_ids),
        )
        return dataset, images

    def setup(self, stage: str | None = None) -> None:
        """Read the annotation files and build the data sets (once): both for ``fit``/``None``, evaluation only for
        ``validate``, ``test`` and ``predict``."""
        want_train = stage in (None, "fit") and self.train_set is None
        want_val = self.val_set is None
        if not (want_train or want_val):
            return
        splits = ([self.train_split] if want_train else []) + ([self.val_split] if want_val else [])
        self._check_files(splits)
        loaded: dict[str, dict[str, Any]] = {}
        for split in dict.fromkeys(splits):
            path = self.split_paths(split)[1]
            loaded[split] = load_coco_annotations(path)
            self._set_categories(loaded[split], path)
        built: dict[str, Dataset] = {}
        problems: list[SplitProblem | None] = []
        if want_val:
            built["val"], val_images = self._build(self.val_split, loaded[self.val_split], train=False)
            problems.append(self._val_problem(val_images))
        if want_train:
            built["train"], images = self._build(self.train_split, loaded[self.train_split], train=True)
            problems.append(self._train_problem(images.usage))
        raise_problems("COCO", problems)  # both splits looked at first; before data.verify decodes anything
        if want_train:
            self.box_usage = images.usage
            log_usage = log.warning if images.usage.any_dropped else log.info
            log_usage("%s", images.usage.summary())
        built = self.guard_image_sets(built)  # data.verify checks both splits before raising
        self.val_set = built.get("val", self.val_set)
        self.train_set = built.get("train", self.train_set)
        if want_train and self.aspect_ratio_group_factor >= 0:
            sizes = [images.height_and_width(i) for i in range(len(images))]
            self.train_group_ids = aspect_ratio_group_ids(sizes, self.aspect_ratio_group_factor)
            counts = sorted(Counter(self.train_group_ids).items())
            log.info("COCO %s: images per aspect-ratio group %s", self.train_split, counts)

    def _train_problem(self, usage: BoxUsage) -> SplitProblem | None:
        """Why the training split has nothing to train on (no image with a box after the box rule), or None."""
        if usage.usable:
            return None
        where = f"{self.train_split}, {usage.path}"
        split_keys = "data.annotation_file / data.train_split"
        if not usage.images:
            return SplitProblem("train", where, "the file lists no images", f"point {split_keys} at the right json")
        if not usage.annotations:
            why = f"the file lists {_plural(usage.images, 'image')} but no annotations"
            return SplitProblem("train", where, why, f"point {split_keys} at the json with this split's boxes")
        why = f"none of its {usage.images} images has a box to train on ({'; '.join(usage.parts())})"
        fix = (
            "boxes must be [x, y, width, height] in pixels of their image (the json's width/height): check how the "
            f"json was written, or lower data.min_box_size (now {self.min_box_size:g})"
        )
        return SplitProblem("train", where, why, fix)

    def train_location(self) -> str:
        """``<train split>, <its annotation json>`` (for the "no training batch" error)."""
        return f"{self.train_split}, {self.split_paths(self.train_split)[1]}"

    def empty_split_name(self) -> str:
        return self.checks_name

    def _val_problem(self, images: CocoImages) -> SplitProblem | None:
        """Why the evaluation split has nothing to evaluate against (no image, or no non-crowd annotation), or
        None. Evaluation keeps every box, so any non-crowd annotation is a ground truth to score."""
        where = f"{self.val_split}, {self.split_paths(self.val_split)[1]}"
        fix = "point data.annotation_file / data.val_split at the json with this split's images and boxes"
        if not images.coco.imgs:
            return SplitProblem("val", where, "the file lists no images", fix)
        if not any(not ann["iscrowd"] for ann in images.coco.anns.values()):
            crowds = len(images.coco.anns)
            what = f"only {_plural(crowds, 'crowd region')}" if crowds else "no annotations"
            why = f"the file lists {_plural(len(images.coco.imgs), 'image')} but {what}: COCO mAP has nothing to score"
            return SplitProblem("val", where, why, fix)
        return None

    # ---------------------------------------------------------------- loaders

    def _seed(self) -> int:
        return int(os.environ.get("PL_GLOBAL_SEED", 0)) if self.seed is None else int(self.seed)

    def train_seed(self) -> int:
        """``seed``, else ``PL_GLOBAL_SEED`` (0 when unset): the shuffle and the augmentation draws."""
        return self._seed()

    @property
    def example_seed(self) -> int:  # type: ignore[override]
        """:meth:`example_batch` draws its flips and scales from the training seed: the same batch every call."""
        return self._seed()

    def collate_fn(self) -> Callable[[list[Any]], Any]:
        """:func:`collate_detection`: images differ in size, so a batch is two lists."""
        return collate_detection

    def _distributed_kwargs(self) -> dict[str, int]:
        """``num_replicas`` and ``rank`` of the attached trainer (1 and 0 without one or without data parallelism)."""
        kwargs = getattr(self.trainer, "distributed_sampler_kwargs", None) or {}
        return {"num_replicas": int(kwargs.get("num_replicas", 1)), "rank": int(kwargs.get("rank", 0))}

    def train_sampler(self) -> DistributedSampler:
        """The shuffled shard of this rank (``DistributedSampler``; one shard of all without data parallelism)."""
        self.setup("fit")
        return DistributedSampler(
            self.train_set, shuffle=True, seed=self._seed(), drop_last=False, **self._distributed_kwargs()
        )

    def train_batch_sampler(self, size: int) -> EpochCodedBatchSampler:
        """This rank's shuffled shard (:meth:`train_sampler`) in aspect-ratio-grouped batches
        (:class:`GroupedBatchSampler`), or plain ones without grouping; both hand the data set the codes
        ``epoch × N + index`` (each sample's flip and scale drawn from (seed, epoch, index)) and follow the trainer's
        epoch, so a resumed run sees the batches of the uninterrupted one."""
        sampler = self.train_sampler()
        if self.train_group_ids is None:
            return EpochCodedBatchSampler(
                sampler, self.batch_size, self.drop_last, size=size, epoch_fn=self._resume_epoch
            )
        return GroupedBatchSampler(
            sampler,
            self.train_group_ids,
            self.batch_size,
            self.drop_last,
            epoch_codes=True,
            epoch_fn=self._resume_epoch,
        )
