"""Head parameters and MACs per sample (spec §B.7): counts, conventions, and no side effects on training."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffkd.distill import Distiller
from diffkd.method import DiffKD
from diffkd.method.profile import (
    HeadProfile,
    diffkd_head_profile,
    format_count,
    profile_head,
)

# spec §B.7: (C_s, C_t, spatial, head kwargs) → (params, MACs/iter in G); MACs within 3 %
SPEC_B7 = {
    "R34→R18 feature, AE 1024": ((512, 512, (7, 7)), {"use_ae": True, "ae_channels": 1024}, 7_644_418, 1.11),
    "R34→R18 logits": ((1000, 1000, (1, 1)), {}, 23_323_002, 0.10),
    "R50→MBV1 feature, AE 1024": ((1024, 2048, (7, 7)), {"use_ae": True, "ae_channels": 1024}, 11_315_970, 1.29),
    "R50→MBV1 feature, no AE": ((1024, 2048, (7, 7)), {}, 23_703_042, 4.24),
    "WRN-40-2→WRN-40-1 feature": ((64, 128, (8, 8)), {}, 248_802, 0.0216),
    "Swin-L→Swin-T feature, AE 768": ((768, 1536, (7, 7)), {"use_ae": True, "ae_channels": 768}, 6_616_130, 0.73),
}


@pytest.mark.parametrize("point", list(SPEC_B7))
def test_params_and_macs_match_spec_b7(point):
    (c_s, c_t, spatial), kwargs, params, gmacs = SPEC_B7[point]
    p = diffkd_head_profile(c_s, c_t, spatial, **kwargs)
    assert p.params == params
    assert p.macs / 1e9 == pytest.approx(gmacs, rel=0.03)


def test_r34_r18_feature_breakdown_is_six_denoiser_calls_plus_the_rest():
    p = diffkd_head_profile(512, 512, (7, 7), use_ae=True, ae_channels=1024)
    hw = 49
    per_call = (2 * (1024 * 256 + 256 * 256 * 9 + 256 * 1024) + 1024 * 1024) * hw  # 2 bottlenecks + 1×1 conv
    assert p.macs_by_module == {
        "trans": 512 * 1024 * hw,
        "ae": 2 * 512 * 1024 * hw,  # encoder + decoder
        "model": 6 * per_call,  # 5 DDIM steps + the diffusion loss
        "noise_adapter": (1024 * 128 + 128 * 128 * 9 + 128 * 1024) * hw + 1024 * 2,
        "proj": 1024 * 1024 * hw,
    }
    assert sum(p.macs_by_module.values()) == p.macs == 1_111_902_208
    assert str(p) == "7.64M params, 1.11G MACs/sample"


def test_profile_leaves_training_state_and_rng_alone():
    head = DiffKD(16, 32, use_ae=True)
    bn = head.proj[1]
    before = (bn.running_mean.clone(), int(bn.num_batches_tracked))
    head.train()
    head.model.eval()  # a mixed state must come back as it was
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    for fake in (False, True):
        p = profile_head(head, (16, 4, 4), (32, 4, 4), fake=fake)
        assert p.params == sum(x.numel() for x in head.parameters())
    assert torch.equal(torch.rand(3), expected)
    assert torch.equal(bn.running_mean, before[0]) and int(bn.num_batches_tracked) == before[1]
    assert head.training and not head.model.training and head.proj.training


def test_fake_and_real_counts_agree_and_layouts_are_accepted():
    head = DiffKD(24, 48, use_ae=True, ae_channels=32)
    real = profile_head(head, (24, 7, 7), (48, 7, 7))
    fake = profile_head(head, (24, 7, 7), (48, 7, 7), fake=True)
    nhwc = profile_head(head, (7, 7, 24), (7, 7, 48))  # Swin's channels-last `norm` output
    assert real == fake == nhwc
    logits = DiffKD(10, 10, kernel_size=1)
    assert profile_head(logits, (10,)).macs == profile_head(logits, (10, 1, 1)).macs > 0


def test_single_input_heads_and_formatting():
    adapter = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16))
    p = profile_head(adapter, (8, 5, 5))
    assert p == HeadProfile(params=8 * 16 + 2 * 16, macs=8 * 16 * 25, macs_by_module={"0": 8 * 16 * 25})
    assert [format_count(n) for n in (7_644_418, 1_111_902_208, 8300, 924)] == ["7.64M", "1.11G", "8.3k", "924"]


class _Net(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(width, 5)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.fc(self.body(x).mean((2, 3)))


def test_point_profiles_use_the_build_dry_runs():
    student, teacher = _Net(8), _Net(16)
    distiller = Distiller(
        {
            "feature": {"head": "diffkd", "distance": {"name": "mse"}},
            "logits": {"student": "", "teacher": "", "head": "diffkd", "distance": {"name": "kl"}},
        }
    )
    x = torch.randn(2, 3, 12, 12)
    distiller.build(student, teacher, x)
    assert (student.calls, teacher.calls) == (1, 1)  # one dry run each finds paths, shapes and layouts
    profiles = distiller.profile()
    assert (student.calls, teacher.calls) == (1, 1)  # the profile reuses what build found: no extra forward
    assert profiles["feature"] == profile_head(distiller.heads["feature"], (8, 6, 6), (16, 6, 6))
    assert profiles["logits"] == profile_head(distiller.heads["logits"], (5, 1, 1), (5, 1, 1))
    described = distiller.describe()
    assert described["feature"]["student_shape"] == [8, 6, 6] and described["feature"]["teacher_shape"] == [16, 6, 6]
    assert described["logits"]["layouts"] == ["vector", "vector"]
