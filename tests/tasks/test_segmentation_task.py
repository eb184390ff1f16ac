"""The segmentation task and its distances: pixel KD and CWD against naive float64 references, the poly schedule,
evaluation (dataset mIoU against a hand-made confusion matrix, flip / multi-scale averaging, the per-class table),
and what the distances receive from the batch."""

from __future__ import annotations

import functools
import math

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from diffkd.distill import Distiller
from diffkd.distill.registry import build_distance, list_distances
from diffkd.optim import PolyLR
from diffkd.tasks import SegmentationModule
from diffkd.tasks.segmentation import format_iou_table, mean_iou

# ------------------------------------------------------------------------------------------------ references


def _softmax64(z: list[float]) -> list[float]:
    top = max(z)
    e = [math.exp(v - top) for v in z]
    return [v / sum(e) for v in e]


def pixel_kd_reference(s: Tensor, t: Tensor, tau: float, mask: Tensor | None = None) -> float:
    """τ² · mean over the (valid) pixels of Σ_k p_k (log p_k − log q_k), one pixel at a time in float64."""
    n, k, h, w = s.shape
    terms = []
    for i in range(n):
        for y in range(h):
            for x in range(w):
                if mask is not None and not mask[i, y, x]:
                    continue
                p = _softmax64([float(t[i, c, y, x]) / tau for c in range(k)])
                q = _softmax64([float(s[i, c, y, x]) / tau for c in range(k)])
                terms.append(sum(pc * (math.log(pc) - math.log(qc)) for pc, qc in zip(p, q)))
    return sum(terms) / len(terms) * tau**2


def cwd_reference(s: Tensor, t: Tensor, tau: float, mask: Tensor | None = None) -> float:
    """τ²/(N·C) · Σ_{n,c} KL over the (valid) positions of each channel, in float64."""
    n, c, h, w = s.shape
    total = 0.0
    for i in range(n):
        where = [(y, x) for y in range(h) for x in range(w) if mask is None or mask[i, y, x]]
        if not where:
            continue
        for ch in range(c):
            p = _softmax64([float(t[i, ch, y, x]) / tau for y, x in where])
            q = _softmax64([float(s[i, ch, y, x]) / tau for y, x in where])
            total += sum(pv * (math.log(pv) - math.log(qv)) for pv, qv in zip(p, q))
    return total * tau**2 / (n * c)


def _maps(seed: int = 0, shape: tuple[int, ...] = (2, 5, 4, 6)) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    s, t = 3 * torch.randn(*shape, generator=g), 3 * torch.randn(*shape, generator=g)
    mask = torch.rand(shape[0], *shape[2:], generator=g) > 0.3
    return s, t, mask


# ------------------------------------------------------------------------------------------------ pixel KD


def test_distances_are_registered():
    assert {"pixel_kd", "cwd"} <= set(list_distances())


@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_pixel_kd_matches_reference_and_cirkd(tau):
    s, t, mask = _maps()
    loss = build_distance("pixel_kd", tau=tau)(s, t, valid_mask=mask)  # masked=False: the mask is not used
    assert loss.item() == pytest.approx(pixel_kd_reference(s, t, tau), rel=1e-5)
    # CIRKD's CriterionKD: rows of (B·H·W, K), kl_div batchmean, × τ²
    rows_s, rows_t = s.permute(0, 2, 3, 1).reshape(-1, 5), t.permute(0, 2, 3, 1).reshape(-1, 5)
    cirkd = F.kl_div(F.log_softmax(rows_s / tau, 1), F.softmax(rows_t / tau, 1), reduction="batchmean") * tau**2
    torch.testing.assert_close(loss, cirkd)
    # the built-in classification kl sums positions per image: H·W times this mean
    kl = build_distance("kl", tau=tau)(s, t)
    assert kl.item() == pytest.approx(loss.item() * 4 * 6, rel=1e-5)


def test_masked_pixel_kd_ignores_masked_pixels():
    s, t, mask = _maps(1)
    distance = build_distance("pixel_kd", tau=2.0, masked=True)
    loss = distance(s, t, valid_mask=mask)
    assert loss.item() == pytest.approx(pixel_kd_reference(s, t, 2.0, mask), rel=1e-5)
    t2, s2 = t.clone(), s.clone()
    t2.permute(0, 2, 3, 1)[~mask] = 100 * torch.randn(int((~mask).sum()), 5)
    s2.permute(0, 2, 3, 1)[~mask] = -50.0
    torch.testing.assert_close(distance(s2, t2, valid_mask=mask), loss)
    # a label-size mask is resized to the map (nearest); an all-invalid batch gives 0, not NaN
    big = mask.repeat_interleave(8, 1).repeat_interleave(8, 2)
    torch.testing.assert_close(distance(s, t, valid_mask=big), loss)
    assert distance(s, t, valid_mask=torch.zeros_like(mask)).item() == 0.0


def test_pixel_kd_gradient_reaches_the_student_only():
    s, t, mask = _maps(2)
    s.requires_grad_(True)
    t.requires_grad_(True)
    build_distance("pixel_kd", masked=True)(s, t, valid_mask=mask).backward()
    assert s.grad is not None and t.grad is None
    assert torch.all(s.grad.permute(0, 2, 3, 1)[~mask] == 0) and s.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------ CWD


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_cwd_matches_reference(tau):
    s, t, mask = _maps(3)
    loss = build_distance("cwd", tau=tau)(s, t, valid_mask=mask)  # masked=False: every position counts
    assert loss.item() == pytest.approx(cwd_reference(s, t, tau), rel=1e-5)
    # CIRKD's CriterionCWD(norm_type='channel', divergence='kl'): KLDivLoss(sum) on log(softmax), / (N·C), × τ²
    n, c = s.shape[:2]
    norm_s = (s.reshape(n, c, -1) / tau).softmax(-1)
    norm_t = (t.reshape(n, c, -1) / tau).softmax(-1)
    cirkd = nn.KLDivLoss(reduction="sum")(norm_s.log(), norm_t) / (n * c) * tau**2
    torch.testing.assert_close(loss, cirkd)


def test_masked_cwd_takes_the_softmax_over_valid_positions():
    s, t, mask = _maps(4)
    mask[1] = False  # an image without any valid position adds nothing
    distance = build_distance("cwd", tau=4.0, masked=True)
    s.requires_grad_(True)
    loss = distance(s, t, valid_mask=mask)
    assert loss.item() == pytest.approx(cwd_reference(s.detach(), t, 4.0, mask), rel=1e-5)
    loss.backward()
    assert torch.isfinite(s.grad).all() and torch.all(s.grad.permute(0, 2, 3, 1)[~mask] == 0)
    t2 = t.clone()
    t2.permute(0, 2, 3, 1)[~mask] = 1e4
    torch.testing.assert_close(distance(s.detach(), t2, valid_mask=mask), loss.detach())


def test_cwd_needs_equal_maps():
    with pytest.raises(ValueError, match="conv1x1"):
        build_distance("cwd")(torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4))


# ------------------------------------------------------------------------------------------------ poly schedule


def _lrs(scheduler: PolyLR, steps: int) -> list[float]:
    out = [scheduler.get_last_lr()[0]]
    for _ in range(steps):
        scheduler.optimizer.step()
        scheduler.step()
        out.append(scheduler.get_last_lr()[0])
    return out


def _sgd(lr: float = 0.02) -> torch.optim.Optimizer:
    return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)


def test_poly_lr_is_cirkd_adjust_lr():
    """CIRKD: lr = base · (1 − (iteration − 1) / max) ** 0.9 before the iteration's step (iteration from 1)."""
    lrs = _lrs(PolyLR(_sgd(), total_steps=100, power=0.9), 120)
    for iteration in (1, 2, 50, 100):
        assert lrs[iteration - 1] == pytest.approx(0.02 * (1 - (iteration - 1) / 100) ** 0.9, rel=1e-12)
    assert lrs[100] == 0.0 and lrs[120] == 0.0


def test_poly_lr_with_the_dist_kd_floor():
    """DIST_KD / MasKD: lr = 1e-4 + (base − 1e-4) · (1 − it/max) ** 0.9."""
    sched = PolyLR(_sgd(), total_steps=40000, power=0.9, min_lr=1e-4)
    lrs = _lrs(sched, 3)
    assert lrs[0] == 0.02 and lrs[1] == pytest.approx(1e-4 + (0.02 - 1e-4) * (1 - 1 / 40000) ** 0.9, rel=1e-12)
    assert sched.lr_at(0.02, 20000) == pytest.approx(1e-4 + 0.0199 * 0.5**0.9, rel=1e-12)
    assert sched.lr_at(0.02, 40000) == pytest.approx(1e-4) and sched.lr_at(0.02, 50000) == pytest.approx(1e-4)


def test_poly_lr_scales_every_group_and_resumes():
    opt = torch.optim.SGD([{"params": [nn.Parameter(torch.zeros(1))]}, {"params": [nn.Parameter(torch.zeros(1))]}])
    opt.param_groups[0]["lr"], opt.param_groups[1]["lr"] = 0.02, 0.002
    sched = PolyLR(opt, total_steps=10, power=0.9)
    _lrs(sched, 4)
    assert sched.get_last_lr() == pytest.approx([0.02 * 0.6**0.9, 0.002 * 0.6**0.9])
    state = sched.state_dict()
    fresh = torch.optim.SGD([{"params": [nn.Parameter(torch.zeros(1))]}, {"params": [nn.Parameter(torch.zeros(1))]}])
    for g, old in zip(fresh.param_groups, opt.param_groups):
        g["initial_lr"] = old["initial_lr"]
    resumed = PolyLR(fresh, total_steps=10, power=0.9, last_epoch=4)
    resumed.load_state_dict(state)
    assert _lrs(resumed, 3)[1:] == pytest.approx(_lrs(sched, 3)[1:])
    with pytest.raises(ValueError, match="total_steps"):
        PolyLR(_sgd(), total_steps=None)


# ------------------------------------------------------------------------------------------------ the module


class LogitsAreInputs(nn.Module):
    """A 'segmenter' whose logits are its input plus a fixed map: the test chooses every prediction."""

    def __init__(self, bias: Tensor | None = None, aux: bool = False) -> None:
        super().__init__()
        self.register_buffer("bias", bias if bias is not None else torch.zeros(()))
        self.scale = nn.Parameter(torch.ones(()))
        self.aux = aux

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        out = {"out": x * self.scale + self.bias}
        if self.aux:
            out["aux"] = x.flip(1)
        return out


K = 4


def _module(student: nn.Module, **kwargs) -> SegmentationModule:
    return SegmentationModule(
        student=student, distiller=Distiller(), optimizer=functools.partial(torch.optim.SGD, lr=0.1), **kwargs
    )


def _batches(n: int = 3, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    """Logit-like images (2, K, 6, 10) and labels with ignored pixels and class 3 never present."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        images = torch.randn(2, K, 6, 10, generator=g)
        images[:, 3] -= 100  # class 3 is never predicted either: absent from both
        labels = torch.randint(0, 3, (2, 6, 10), generator=g)
        labels[torch.rand(2, 6, 10, generator=g) < 0.2] = 255
        out.append((images, labels))
    return out


def _validate(module: SegmentationModule, batches: list, split: str = "val") -> dict[str, float]:
    module.build(batches[0])
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    run = trainer.validate if split == "val" else trainer.test
    run(module, dataloaders=DataLoader(batches, batch_size=None), verbose=False)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def _confusion(batches: list, predict) -> np.ndarray:
    cm = np.zeros((K, K), dtype=np.int64)
    for images, labels in batches:
        pred, lab = predict(images).numpy().ravel(), labels.numpy().ravel()
        keep = lab != 255
        np.add.at(cm, (lab[keep], pred[keep]), 1)
    return cm


def _ious(cm: np.ndarray) -> np.ndarray:
    tp = np.diag(cm).astype(float)
    union = cm.sum(0) + cm.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


@pytest.mark.parametrize("absent", ["exclude", "zero"])
def test_dataset_miou_matches_a_hand_confusion_matrix(absent, capsys):
    batches = _batches()
    metrics = _validate(_module(LogitsAreInputs(), absent_classes=absent, class_names=["a", "b", "c", "d"]), batches)
    iou = _ious(_confusion(batches, lambda x: x.argmax(1)))
    assert np.isnan(iou[3]) and not np.isnan(iou[:3]).any()
    expected = np.nanmean(iou) if absent == "exclude" else np.nan_to_num(iou).mean()  # Cityscapes | CIRKD
    assert metrics["val/miou"] == pytest.approx(expected, rel=1e-6)
    assert metrics["val/miou_best"] == pytest.approx(expected, rel=1e-6)
    for c in range(3):
        assert metrics[f"val/iou/{c}"] == pytest.approx(iou[c], rel=1e-6)
    assert "val/iou/3" not in metrics  # absent: no IoU
    cm = _confusion(batches, lambda x: x.argmax(1))
    assert metrics["val/pixel_acc"] == pytest.approx(np.trace(cm) / cm.sum(), rel=1e-6)
    out = capsys.readouterr().out
    assert "val, step 0" in out and f"{100 * expected:6.2f}" in out
    assert [line.split()[-1] for line in out.splitlines() if line.startswith(("a ", "d "))] == [
        f"{100 * iou[0]:.2f}",
        "n/a",
    ]


def test_cityscapes_miou_equals_torchmetrics_macro():
    from torchmetrics.classification import MulticlassJaccardIndex

    batches = _batches(seed=3)
    macro = MulticlassJaccardIndex(K, ignore_index=255, average="macro")
    for images, labels in batches:
        macro.update(images.argmax(1), labels)
    metrics = _validate(_module(LogitsAreInputs(), iou_table=False), batches)
    assert metrics["val/miou"] == pytest.approx(float(macro.compute()), rel=1e-6)


def test_flip_eval_of_a_flip_equivariant_model_changes_nothing():
    batches = _batches(seed=1)
    plain = _validate(_module(LogitsAreInputs(), iou_table=False), batches)
    for average in ("logits", "softmax"):
        flipped = _validate(_module(LogitsAreInputs(), iou_table=False, flip_eval=True, eval_average=average), batches)
        assert flipped["val/miou"] == pytest.approx(plain["val/miou"], abs=1e-7)
        assert flipped["val/pixel_acc"] == pytest.approx(plain["val/pixel_acc"], abs=1e-7)


@pytest.mark.parametrize("average", ["logits", "softmax"])
def test_flip_eval_averages_the_image_and_its_flip(average):
    bias = torch.linspace(-3, 3, 10).expand(K, 6, 10) * torch.arange(1, K + 1).view(K, 1, 1)  # not flip-symmetric
    module = _module(LogitsAreInputs(bias), flip_eval=True, eval_average=average, iou_table=False)
    images = torch.randn(2, K, 6, 10)
    direct, mirrored = images + bias, (images.flip(-1) + bias).flip(-1)
    if average == "softmax":
        direct, mirrored = direct.softmax(1), mirrored.softmax(1)
    torch.testing.assert_close(module.predict(images, (6, 10)), (direct + mirrored) / 2)
    batches = [(images, torch.randint(0, K, (2, 6, 10)))]
    metrics = _validate(module, batches)
    iou = _ious(_confusion(batches, lambda x: ((direct + mirrored) / 2).argmax(1)))
    assert metrics["val/miou"] == pytest.approx(np.nanmean(iou), rel=1e-6)


def test_multi_scale_eval_resizes_back_to_the_labels():
    module = _module(LogitsAreInputs(), eval_scales=[0.5, 1.0], align_corners=True, iou_table=False)
    images = torch.randn(1, K, 8, 12)
    half = F.interpolate(images, scale_factor=0.5, mode="bilinear", align_corners=True)
    expected = (F.interpolate(half, size=(8, 12), mode="bilinear", align_corners=True) + images) / 2
    torch.testing.assert_close(module.predict(images, (8, 12)), expected)


def test_low_resolution_logits_are_resized_with_the_models_align_corners():
    class Stride2(nn.Module):
        align_corners = True

        def forward(self, x: Tensor) -> dict[str, Tensor]:
            return {"out": x[..., ::2, ::2]}

    module = _module(Stride2())
    assert module.align_corners is True
    images = torch.randn(1, K, 6, 10)
    expected = F.interpolate(images[..., ::2, ::2], size=(6, 10), mode="bilinear", align_corners=True)
    torch.testing.assert_close(module.predict(images, (6, 10)), expected)
    assert _module(Stride2(), align_corners=False).align_corners is False


def test_test_split_logs_test_metrics(capsys):
    metrics = _validate(_module(LogitsAreInputs()), _batches(), split="test")
    assert 0 <= metrics["test/miou"] <= 1 and "test/miou_best" not in metrics
    assert "test, step 0" in capsys.readouterr().out


def test_distances_get_the_valid_mask_unless_told_not_to():
    images, labels = _batches(1)[0]
    inputs = _module(LogitsAreInputs()).distill_inputs((images, labels))
    assert torch.equal(inputs["valid_mask"], labels != 255) and inputs["labels"] is labels
    assert "valid_mask" not in _module(LogitsAreInputs(), distill_valid_mask=False).distill_inputs((images, labels))


def test_aux_weight_only_for_students_with_an_aux_head():
    batch = _batches(1)[0]
    with_aux, without = _module(LogitsAreInputs(aux=True)), _module(LogitsAreInputs())
    with_aux.build(batch)
    without.build(batch)
    assert with_aux.task_weights == {"aux_ce": 0.4} and without.task_weights == {}
    losses = with_aux.task_losses(with_aux.student(batch[0]), batch)
    assert set(losses) == {"ce", "aux_ce"}
    torch.testing.assert_close(losses["ce"], F.cross_entropy(batch[0], batch[1], ignore_index=255))


def test_format_iou_table():
    table = format_iou_table([0.5, float("nan"), 0.25], ["road", "traffic light", "sky"], 0.375, "val", 0.9)
    lines = table.splitlines()
    assert lines[0] == "val" and lines[1].split() == ["class", "IoU"]
    assert lines[3].split() == ["road", "50.00"] and lines[4].endswith("n/a") and lines[4].startswith("traffic light")
    assert lines[-2].split() == ["mIoU", "37.50"] and lines[-1].split() == ["pixAcc", "90.00"]
    with pytest.raises(ValueError):
        format_iou_table([0.5], ["a", "b"], 0.5)


def test_mean_iou_conventions():
    per_class = torch.tensor([0.5, float("nan"), 1.0, 0.0])
    assert mean_iou(per_class).item() == pytest.approx(0.5)  # over the 3 classes with an IoU
    assert mean_iou(per_class, "zero").item() == pytest.approx(0.375)  # over all 4, absent as 0


def test_bad_options_fail_early():
    with pytest.raises(ValueError, match="eval_average"):
        _module(LogitsAreInputs(), eval_average="mean")
    with pytest.raises(ValueError, match="absent_classes"):
        _module(LogitsAreInputs(), absent_classes="nan")
    with pytest.raises(ValueError, match="eval_scales"):
        _module(LogitsAreInputs(), eval_scales=[])
