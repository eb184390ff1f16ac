"""The task metrics reach their maximum on the ground truth: COCO AP = 1 and Cityscapes mIoU = 1.

Each test drives the whole evaluation path — the real datamodule on data written in the real on-disk format
(``tests/helpers/fake_coco.py``, ``tests/helpers/fake_cityscapes.py``), the task module's ``setup``/``build``,
``validation_step`` and epoch-end logging, under ``lightning.Trainer.validate`` — with a stand-in student whose
forward looks up the perfect answer for each image it is given. The answers come from the files (the COCO json, the
labelIds PNGs through cityscapesScripts' labelId → trainId table), not from the datamodule, so a datamodule that
moved a box or mapped a label wrongly would fail here too.

The README's "Detection (COCO)" and "Segmentation (Cityscapes)" sections are checked here as well: every
``python -m diffkd.train`` command they show composes with Hydra.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image
from torch import Tensor, nn

from diffkd.data.cityscapes import CityscapesDataModule
from diffkd.data.coco import COCODataModule
from diffkd.distill import Distiller
from diffkd.tasks import DetectionModule, SegmentationModule
from tests.conftest import compose_config
from tests.helpers.fake_cityscapes import write_fake_cityscapes
from tests.helpers.fake_coco import write_fake_coco

REPO = Path(__file__).resolve().parents[2]

# cityscapesScripts labels.py: labelId → trainId of the 19 evaluated classes; every other labelId is ignored (255)
TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13,
             27: 14, 28: 15, 31: 16, 32: 17, 33: 18}  # fmt: skip


def _validate(module: L.LightningModule, datamodule: L.LightningDataModule) -> dict[str, float]:
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    (metrics,) = trainer.validate(module, datamodule=datamodule, verbose=False)
    return {k: float(v) for k, v in metrics.items()}


# --------------------------------------------------------------------------------------------------------------------
# detection: COCO AP


class PerfectDetector(nn.Module):
    """A stand-in torchvision detector (``transform`` + ``backbone``, as DetectionModule checks) whose evaluation
    forward returns, for each image, the json's boxes with score 1: found by the image's (H, W), unique in the split.
    """

    def __init__(self, answers: dict[tuple[int, int], dict[str, Tensor]]) -> None:
        super().__init__()
        self.transform = nn.Identity()
        self.backbone = nn.Identity()
        self.anchor = nn.Parameter(torch.zeros(()))  # a parameter, so the module has a device and a dtype
        self.answers = answers

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None) -> list[dict[str, Tensor]]:
        assert not self.training, "the stand-in only evaluates"
        return [{k: v.clone() for k, v in self.answers[tuple(image.shape[-2:])].items()} for image in images]


def _coco_answers(data: dict, to_label: dict[int, int], with_crowds: bool) -> dict[tuple[int, int], dict]:
    """(H, W) → {boxes xyxy, scores, labels} of every image of a COCO json (crowds only when ``with_crowds``)."""
    answers = {}
    for image in data["images"]:
        anns = [a for a in data["annotations"] if a["image_id"] == image["id"] and (with_crowds or not a["iscrowd"])]
        boxes = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]
        answers[(image["height"], image["width"])] = {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "scores": torch.ones(len(anns)),
            "labels": torch.tensor([to_label[a["category_id"]] for a in anns], dtype=torch.int64),
        }
    assert len(answers) == len(data["images"]), "the stand-in finds images by size: sizes must be unique"
    return answers


@pytest.fixture(scope="module")
def fake_coco(tmp_path_factory):
    return write_fake_coco(tmp_path_factory.mktemp("coco"))


@pytest.mark.parametrize(
    ("backend", "contiguous_labels", "with_crowds"),
    [
        ("faster_coco_eval", False, False),
        ("pycocotools", False, False),
        ("faster_coco_eval", True, True),
        ("pycocotools", True, True),
    ],
)
def test_ground_truth_detections_give_ap_1(fake_coco, backend, contiguous_labels, with_crowds):
    val = fake_coco.val
    crowds = [a for a in val["annotations"] if a["iscrowd"]]
    annotated = {a["image_id"] for a in val["annotations"]}
    assert crowds and any(i["id"] not in annotated for i in val["images"])  # a crowd and an empty image are there

    datamodule = COCODataModule(root=str(fake_coco.root), val_batch_size=2, num_workers=0,
                                contiguous_labels=contiguous_labels)  # fmt: skip
    categories = sorted(c["id"] for c in val["categories"])
    # the model's label space: category ids (torchvision), or 1..K in category-id order
    to_label = {c: i + 1 for i, c in enumerate(categories)} if contiguous_labels else {c: c for c in categories}
    student = PerfectDetector(_coco_answers(val, to_label, with_crowds))
    module = DetectionModule(student=student, distiller=Distiller({}), map_backend=backend)

    metrics = _validate(module, datamodule)

    # without crowds: the crowd box has no detection and must not count as missed; with them: a detection on a
    # crowd region is ignored, not a false positive
    for key in ("val/map", "val/map_50", "val/map_75", "val/map_best"):
        assert metrics[key] == pytest.approx(1.0), (key, metrics)
    # every box of the fake val split is small (json areas below 32²): the other size classes have no ground
    # truth, which COCO reports as -1
    assert metrics["val/map_small"] == pytest.approx(1.0)
    assert metrics["val/map_medium"] == metrics["val/map_large"] == -1.0


def test_a_missed_box_lowers_ap(fake_coco):
    """The check above can fail: one non-crowd box left out and AP drops below 1."""
    val = fake_coco.val
    answers = _coco_answers(val, {c["id"]: c["id"] for c in val["categories"]}, with_crowds=False)
    size, answer = next((s, a) for s, a in answers.items() if len(a["labels"]) == 2)
    answers[size] = {k: v[1:] for k, v in answer.items()}
    datamodule = COCODataModule(root=str(fake_coco.root), val_batch_size=2, num_workers=0)
    module = DetectionModule(student=PerfectDetector(answers), distiller=Distiller({}))
    assert _validate(module, datamodule)["val/map"] < 0.99


# --------------------------------------------------------------------------------------------------------------------
# segmentation: Cityscapes mIoU


class PerfectSegmenter(nn.Module):
    """A stand-in segmenter whose ``out`` logits (full resolution) put the true trainId on top at every labelled
    pixel and class 0 at ignored ones (so the metric must leave those out to reach 1). The image is recognised as
    the nearest of the split's images (as the datamodule serves them)."""

    def __init__(self, images: Tensor, logits: Tensor) -> None:
        super().__init__()
        self.register_buffer("images", images)  # (N, 3, H, W)
        self.register_buffer("logits", logits)  # (N, K, H, W)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        distance = (x[:, None] - self.images[None]).flatten(2).abs().amax(-1)  # (B, N)
        best = distance.argmin(1)
        assert bool((distance.gather(1, best[:, None]) < 1e-4).all()), "an image the stand-in does not know"
        return {"out": self.logits[best]}


def _true_train_ids(label_path: Path) -> np.ndarray:
    label_ids = np.asarray(Image.open(label_path))
    train_ids = np.full(label_ids.shape, 255, dtype=np.int64)
    for label_id, train_id in TRAIN_IDS.items():
        train_ids[label_ids == label_id] = train_id
    return train_ids


@pytest.mark.parametrize("absent_classes", ["exclude", "zero"])
def test_ground_truth_logits_give_miou_1(tmp_path, absent_classes):
    fake = write_fake_cityscapes(tmp_path / "cityscapes")
    datamodule = CityscapesDataModule(root=str(fake.root), val_batch_size=2, num_workers=0)
    datamodule.setup("validate")
    dataset = datamodule.val_set
    images, logits = [], []
    for i in range(len(dataset)):
        image, _ = dataset[i]
        key = Path(dataset.images[i]).name.removesuffix("_leftImg8bit.png")
        (label_path,) = [fake.label_path("val", k) for k in fake.keys["val"] if k.endswith(key)]
        truth = torch.from_numpy(_true_train_ids(label_path))
        assert (truth == 255).any() and set(truth.unique().tolist()) == {*range(19), 255}  # all 19 and ignored
        guess = torch.where(truth == 255, 0, truth)  # class 0 wherever the pixel is ignored
        images.append(image)
        logits.append(10.0 * F.one_hot(guess, 19).permute(2, 0, 1).float())
    student = PerfectSegmenter(torch.stack(images), torch.stack(logits))
    module = SegmentationModule(student=student, distiller=Distiller({}), num_classes=19,
                                absent_classes=absent_classes, iou_table=False)  # fmt: skip

    metrics = _validate(module, datamodule)

    assert metrics["val/miou"] == pytest.approx(1.0), metrics
    assert metrics["val/miou_best"] == pytest.approx(1.0)
    assert metrics["val/pixel_acc"] == pytest.approx(1.0)
    assert {k: v for k, v in metrics.items() if k.startswith("val/iou/")} == {f"val/iou/{i}": 1.0 for i in range(19)}


def test_ignored_pixels_count_when_the_labels_do_not_mark_them():
    """The check above can fail: the same class-0 guesses on pixels that are labelled (not 255) lower the mIoU."""
    module = SegmentationModule(student=nn.Identity(), distiller=Distiller({}), num_classes=3, iou_table=False)
    module.build((torch.randn(1, 3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long)))
    labels = torch.tensor([[[1, 2, 255, 255]]])
    wrong = torch.tensor([[[1, 2, 0, 0]]])
    module.val_iou.update(wrong, labels)
    assert module.val_iou.compute()[1:].tolist() == [1.0, 1.0]
    module.val_iou.reset()
    module.val_iou.update(wrong, torch.tensor([[[1, 2, 1, 2]]]))
    assert module.val_iou.compute()[1:].tolist() == [0.5, 0.5]


# --------------------------------------------------------------------------------------------------------------------
# the README's detection and segmentation commands compose


def _readme_section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", (REPO / "README.md").read_text(), re.S | re.M)
    assert match, f"README lost its {title!r} section"
    return match.group(0)


def _train_commands(section: str) -> list[list[str]]:
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            args = shlex.split(line, comments=True)
            if args[:3] == ["python", "-m", "diffkd.train"]:
                commands.append(args[3:])
    return commands


def _points(args: list[str]) -> list[list[str]]:
    """The overrides of one command line, one list per point of its sweeps (``key=a,b``: every value)."""
    runs: list[list[str]] = [[]]
    for token in args:
        if token.startswith("-"):  # -m
            continue
        key, _, value = token.partition("=")
        values = value.split(",") if "," in value and not set(value) & set("[{'\"") else [value]
        runs = [[*run, f"{key}={v}"] for run in runs for v in values]
    return runs


@pytest.mark.parametrize(
    ("title", "data", "task"),
    [
        ("Detection (COCO)", "coco", "DetectionModule"),
        ("Segmentation (Cityscapes)", "cityscapes", "SegmentationModule"),
    ],
)
def test_readme_task_commands_compose(title, data, task, tmp_path):
    section = _readme_section(title)
    commands = _train_commands(section)
    assert len(commands) >= 3, commands
    runs = [run for args in commands for run in _points(args)]
    # and every experiment of the section's table, as it stands
    table = re.findall(r"^\| `(\w+)` \|", section, re.M)
    assert len(table) >= 3, section
    runs += [[f"experiment={name}"] for name in table]
    paths = [f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path / 'out'}"]
    for run in runs:
        assert any(o.startswith("experiment=") for o in run), run
        cfg = compose_config([*run, *paths])
        assert cfg.model._target_ == f"diffkd.tasks.{task}", run
        assert Path(cfg.data.root).name == data, run
        OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
