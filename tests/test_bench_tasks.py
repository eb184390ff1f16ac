"""``python -m diffkd.bench_tasks``: the dense tasks' head tables and training steps, at toy sizes (``--tiny``: small
teachers, 32×64 crops, 64-px detector inputs, one warm-up and one timed step). No timing is asserted: only what was
measured and that it is consistent; the head FLOPs are checked against a count made from the modules' shapes."""

from __future__ import annotations

import json
import math

import pytest
from torch import nn

from diffkd.bench_tasks import build_head_distiller, main, point_flops, task_config

SEG_POINTS = ["out", "aux"]
FPN_POINTS = ["fpn_0", "fpn_1", "fpn_2", "fpn_3", "fpn_pool"]


def test_tiny_run_reports_heads_steps_and_ratios(tmp_path, capsys):
    out = tmp_path / "tasks.json"
    returned = main(["--tiny", "--steps", "1", "--warmup", "1", "--repeat", "1", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["ratios"] == returned["ratios"] and data["meta"]["experiments"] == {
        "segmentation": "cityscapes_dlv3r101_dlv3r18",
        "detection": "coco_frcnn_r101_r50",
    }

    seg, det = data["heads"]["segmentation"], data["heads"]["detection"]
    assert seg["distill"] == "diffkd_seg_aux" and det["distill"] == "diffkd_det"
    # the experiments' settings reached the heads
    assert all(kw["kernel_size"] == 3 and kw["use_ae"] is False for kw in seg["head_kwargs"].values())
    assert seg["distance"]["out"]["name"] == "dist" and det["distance"]["fpn"]["name"] == "mse"
    assert seg["diffkd_defaults"]["inference_steps"] == det["diffkd_defaults"]["inference_steps"] == 5
    # 19 logits at 1/8 of the 64×128 crop; the FPN of a 64×107 image padded to 64×128, strides 4..64
    assert [p["point"] for p in seg["points"]] == SEG_POINTS
    assert all(p["student_shape"] == p["teacher_shape"] == [19, 8, 16] for p in seg["points"])
    assert [p["point"] for p in det["points"]] == FPN_POINTS
    assert [p["student_shape"] for p in det["points"]] == [[256, 16, 32], [256, 8, 16], [256, 4, 8], [256, 2, 4],
                                                           [256, 1, 2]]  # fmt: skip
    for h in (seg, det):
        assert all(p["params"] > 0 and 0 < p["gflop_fwd"] < p["gflop_fwd_bwd"] for p in h["points"])
        assert h["params"] == sum(p["params"] for p in h["points"])
    assert len({p["params"] for p in det["points"]}) == 1  # one head per level, all 256 channels
    assert seg["ms_fwd_bwd"] > 0 and seg["time_batch"] == 2 and "ms_fwd_bwd" not in det

    steps = {(s["task"], s["method"]): s for s in data["steps"]}
    assert list(steps) == [("segmentation", m) for m in ("none", "kd_seg", "diffkd_seg_aux")] + [
        ("detection", m) for m in ("none", "fitnet_fpn", "diffkd_det")
    ]
    for s in steps.values():
        assert s["error"] is None and s["finite"] is True
        assert s["ms_per_step"] > 0 and s["gflop_per_step"] > 0 and s["gflop_per_s"] > 0
        assert s["losses"] and all(math.isfinite(v) for v in s["losses"].values())
    assert steps[("segmentation", "none")]["batch"] == 2 and steps[("detection", "none")]["batch"] == 1
    seg_diffkd = steps[("segmentation", "diffkd_seg_aux")]["losses"]
    assert {f"train/loss/{p}/{t}" for p in SEG_POINTS for t in ("kd", "diff")} | {"train/loss/aux_ce"} <= set(
        seg_diffkd
    )
    det_diffkd = steps[("detection", "diffkd_det")]["losses"]
    assert {f"train/loss/{p}/diff" for p in FPN_POINTS} | {"train/loss/reg_kd"} <= set(det_diffkd)
    assert "train/loss/fpn_0/kd" in steps[("detection", "fitnet_fpn")]["losses"]
    # distillation adds work: the teacher's forward, then the heads
    flops = {k: s["gflop_per_step"] for k, s in steps.items()}
    assert flops[("detection", "none")] < flops[("detection", "fitnet_fpn")] < flops[("detection", "diffkd_det")]
    assert (
        flops[("segmentation", "none")] < flops[("segmentation", "kd_seg")] < flops[("segmentation", "diffkd_seg_aux")]
    )

    ratios = {(q["task"], q["ratio"]): q for q in data["ratios"]}
    assert {("segmentation", "kd_seg/none"), ("segmentation", "diffkd_seg_aux/kd_seg"),
            ("detection", "fitnet_fpn/none"), ("detection", "diffkd_det/fitnet_fpn")} <= set(ratios)  # fmt: skip
    target = ratios[("detection", "diffkd_det/fitnet_fpn")]
    assert target["target"] == 1.6 and target["holds"] == (target["time"] <= 1.6) and target["time"] > 0
    printed = capsys.readouterr().out
    assert "target ≤ 1.6" in printed and "DiffKD heads of distill=diffkd_det" in printed


def _conv_macs(module: nn.Module, hw: tuple[int, int]) -> int:
    """Multiply-accumulates of every Conv2d / Linear in ``module`` for one sample: convolutions at stride 1 with
    'same' padding over an H×W map, linear layers on a vector (the noise adapter's, after its global pool)."""
    h, w = hw
    macs = 0
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            assert m.stride == (1, 1) and 2 * m.padding[0] == m.kernel_size[0] - 1
            kh, kw = m.kernel_size
            macs += m.out_channels * (m.in_channels // m.groups) * kh * kw * h * w
        elif isinstance(m, nn.Linear):
            macs += m.in_features * m.out_features
    return macs


@pytest.mark.parametrize(
    ("task", "shapes", "point"),
    [
        ("detection", {"0": (256, 6, 10)}, "fpn_0"),  # one FPN level
        ("segmentation", {"out": (19, 8, 16), "aux": (19, 8, 16)}, "out"),  # Cityscapes logits (+ DIST)
    ],
)
def test_head_flops_match_a_count_from_the_module_shapes(task, shapes, point):
    cfg = task_config(task, "diffkd_det" if task == "detection" else "diffkd_seg_aux", tiny=True)
    distiller = build_head_distiller(cfg, shapes, shapes)
    head = distiller.heads[point]
    _, h, w = distiller.points[point].student_shape
    # a training forward: trans, the noise adapter and proj once; the denoiser once per DDIM step + once for L_diff
    denoiser_calls = len(head.schedule.steps) + 1
    assert denoiser_calls == 6 and head.kernel_size == 3 and not head.use_ae
    once = sum(_conv_macs(m, (h, w)) for m in (head.trans, head.noise_adapter, head.proj))
    macs = once + denoiser_calls * _conv_macs(head.model, (h, w))
    forward, total = point_flops(distiller, point)
    assert forward == 2 * macs  # one MAC = 2 FLOPs; BatchNorm, the embedding and the distance count none
    assert total == 3 * forward  # backward: the input's and the weight's gradient, each as costly as the forward
    assert point_flops(distiller, point, batch=3) == (3 * forward, 3 * total)


def test_a_synthetic_batch_grows_to_the_step_batch_in_any_task_format():
    import torch

    from diffkd.bench.common import describe_batch, tile_batch

    seg = (torch.randn(2, 3, 8, 16), torch.zeros(2, 8, 16, dtype=torch.long))
    grown = tile_batch(seg, 5)
    assert grown[0].shape == (5, 3, 8, 16) and grown[1].shape == (5, 8, 16)
    assert torch.equal(grown[0][2], seg[0][0]) and describe_batch(grown) == "5×3×8×16"
    det = ([torch.rand(3, 8, 10), torch.rand(3, 8, 10)], [{"boxes": torch.ones(1, 4), "image_id": i} for i in (0, 1)])
    images, targets = tile_batch(det, 3)
    assert len(images) == len(targets) == 3 and [t["image_id"] for t in targets] == [0, 1, 0]
    assert targets[2] is not det[1][0] and describe_batch((images, targets)) == "3 images 8×10"
    with pytest.raises(TypeError, match="cannot grow a batch of str"):
        tile_batch("x", 2)
