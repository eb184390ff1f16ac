"""DiffKD head: shapes, γ, which loss trains what, sizes (spec §B.7), bf16, options, official checkpoints."""

import pytest
import torch
import torch.nn.functional as F

from diffkd import DiffKD
from diffkd.method import BETA_SCHEDULES, KLDivergence, convert_official_state_dict, split_official_checkpoint


def n_params(m):
    return sum(p.numel() for p in m.parameters())


@pytest.fixture
def feats():
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 16, 6, 6, generator=g, requires_grad=True), torch.randn(4, 32, 6, 6, generator=g)


def test_output_shapes_and_gamma(feats):
    s, t = feats
    out = DiffKD(16, 32)(s, t)
    assert out.student.shape == out.teacher.shape == (4, 32, 6, 6)
    assert out.diffusion_loss.dim() == 0 and out.ae_loss is None
    assert out.gamma.shape == (4,)
    assert ((out.gamma > 0) & (out.gamma < 1)).all()


def test_ae_changes_latent_width(feats):
    s, t = feats
    head = DiffKD(16, 32, use_ae=True, ae_channels=24)
    out = head(s, t)
    assert out.student.shape == out.teacher.shape == (4, 24, 6, 6)
    assert out.ae_loss is not None and out.ae_loss > 0
    assert DiffKD(16, 32, use_ae=True).latent_channels == 16  # official default C_t // 2


def _grads(head, loss):
    head.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    return {
        name: any(p.grad is not None and p.grad.abs().sum() > 0 for p in mod.parameters())
        for name, mod in head.named_children()
        if any(True for _ in mod.parameters())
    }


def test_gradient_flow_matches_official(feats):
    s, t = feats
    head = DiffKD(16, 32, use_ae=True, ae_channels=24)
    out = head(s, t)
    assert not out.teacher.requires_grad  # the teacher latent is detached
    kd = F.mse_loss(out.student, out.teacher)
    assert _grads(head, kd) == {"ae": False, "trans": True, "model": True, "noise_adapter": True, "proj": True}
    s.grad = None
    kd.backward(retain_graph=True)
    assert s.grad is not None and s.grad.abs().sum() > 0  # ... and reaches the student
    assert _grads(head, out.diffusion_loss) == {
        "ae": False,
        "trans": False,
        "model": True,
        "noise_adapter": False,
        "proj": False,
    }
    assert _grads(head, out.ae_loss) == {
        "ae": True,
        "trans": False,
        "model": False,
        "noise_adapter": False,
        "proj": False,
    }


def test_kd_grad_through_diffusion_off(feats):
    s, t = feats
    head = DiffKD(16, 32, kd_grad_through_diffusion=False)
    out = head(s, t)
    grads = _grads(head, F.mse_loss(out.student, out.teacher))
    assert grads["model"] is False and grads["trans"] and grads["noise_adapter"]
    assert _grads(head, out.diffusion_loss)["model"] is True


def test_injected_randomness_is_reproducible(feats):
    s, t = feats
    head = DiffKD(16, 32)
    noise, dn, ts = torch.randn(4, 32, 6, 6), torch.randn(4, 32, 6, 6), torch.tensor([0, 10, 500, 999])
    a = head(s, t, noise=noise, diffusion_noise=dn, timesteps=ts)
    b = head(s, t, noise=noise, diffusion_noise=dn, timesteps=ts)
    torch.testing.assert_close(a.student, b.student)
    torch.testing.assert_close(a.diffusion_loss, b.diffusion_loss)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [  # spec §B.7 / peers.md §6 (measured from the official code)
        (dict(student_channels=512, teacher_channels=512, use_ae=True, ae_channels=1024), 7_644_418),
        (dict(student_channels=1000, teacher_channels=1000, kernel_size=1), 23_323_002),
        (dict(student_channels=1024, teacher_channels=2048, use_ae=True, ae_channels=1024), 11_315_970),
        (dict(student_channels=100, teacher_channels=100, kernel_size=1), 352_302),
        (dict(student_channels=64, teacher_channels=128, use_ae=True, ae_channels=1024), 6_398_850),
    ],
)
def test_parameter_counts_match_official(kwargs, expected):
    assert n_params(DiffKD(**kwargs)) == expected


def test_component_sizes_match_spec():
    head = DiffKD(256, 256)
    assert n_params(head.model.pred) == 207_872  # the paper's "Efficient DM 0.21 M"
    assert n_params(head.model.time_embedding) == 327_680
    assert n_params(head.noise_adapter) == 27_074  # spec: 27.1k
    wrn = DiffKD(64, 128)
    assert n_params(wrn.trans) == 8_320 and n_params(wrn.model.pred) == 52_736


@pytest.mark.parametrize("schedule", BETA_SCHEDULES)
@pytest.mark.parametrize("kernel_size", [3, 1])
def test_finite_under_bf16_autocast(schedule, kernel_size):
    torch.manual_seed(0)
    shape_s, shape_t = ((8, 16, 4, 4), (8, 32, 4, 4)) if kernel_size == 3 else ((8, 10), (8, 10))
    cs, ct = shape_s[1], shape_t[1]
    head = DiffKD(cs, ct, kernel_size=kernel_size, beta_schedule=schedule)
    s = torch.randn(shape_s, requires_grad=True)
    t = torch.randn(shape_t)
    for _ in range(2):  # the official code's NaN appeared from the second iteration on
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = head(s, t)
            kd = (
                KLDivergence(1.0)(out.student, out.teacher)
                if kernel_size == 1
                else F.mse_loss(out.student, out.teacher)
            )
            loss = kd + out.diffusion_loss
        loss.backward()
        assert torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for p in head.parameters() if p.grad is not None)
    assert head.schedule.alphas_cumprod.dtype == torch.float32


def test_logits_input_2d_and_paper_options():
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    out = DiffKD(10, 10, kernel_size=1, logits_denoiser_layers=2, proj_bn=False, anm=False)(s, t)
    assert out.student.shape == (4, 10, 1, 1) and out.gamma is None
    vp = DiffKD(10, 10, kernel_size=1, anm_mix="variance_preserving")(s, t)
    assert torch.isfinite(vp.student).all()


def test_bad_inputs_give_clear_errors():
    with pytest.raises(TypeError, match="use_ae must be a bool"):
        DiffKD(8, 8, use_ae="False")
    with pytest.raises(ValueError, match="spatial sizes differ"):
        DiffKD(16, 16)(torch.randn(2, 16, 4, 4), torch.randn(2, 16, 5, 5))
    with pytest.raises(ValueError, match="needs 1×1 inputs"):
        DiffKD(16, 16, kernel_size=1)(torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4))
    with pytest.raises(ValueError, match="logits_denoiser_layers"):
        DiffKD(8, 8, kernel_size=1, logits_denoiser_layers=3)


# Official state_dict keys, written out from the layer tables of spec §B (kernel-1 point, 10 classes).
OFFICIAL_LOGITS_KEYS = (
    ["trans.weight", "trans.bias", "model.time_embedding.weight"]
    + [f"model.pred.{i}.{p}" for i in (0, 3, 5, 8) for p in ("weight", "bias")]
    + [
        f"model.pred.{i}.{p}"
        for i in (1, 4, 6)
        for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    ]
    + [f"noise_adapter.feat.{i}.{p}" for i in (0, 3) for p in ("weight", "bias")]
    + [
        f"noise_adapter.feat.{i}.{p}"
        for i in (1, 4)
        for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    ]
    + ["noise_adapter.pred.weight", "noise_adapter.pred.bias", "proj.0.weight", "proj.0.bias"]
    + [f"proj.1.{p}" for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
)


def test_state_dict_keys_are_the_official_ones():
    assert set(DiffKD(10, 10, kernel_size=1).state_dict()) == set(OFFICIAL_LOGITS_KEYS)
    feat_keys = set(DiffKD(8, 16, use_ae=True, ae_channels=32).state_dict())
    assert {"ae.encoder.0.weight", "ae.encoder.1.running_var", "ae.decoder.0.weight"} <= feat_keys
    assert {
        "model.pred.0.block.0.weight",
        "model.pred.1.block.7.bias",
        "noise_adapter.feat.0.block.3.weight",
    } <= feat_keys


def test_official_checkpoint_loads_strict():
    src = DiffKD(16, 32, use_ae=True, ae_channels=24)
    full = {"state_dict": {"module.conv1.weight": torch.zeros(1)}}
    full["state_dict"].update({f"module._diff.layer4.{k}": v for k, v in src.state_dict().items()})
    full["state_dict"].update(
        {f"module._diff.fc.{k}": v for k, v in DiffKD(10, 10, kernel_size=1).state_dict().items()}
    )
    heads = split_official_checkpoint(full)
    assert sorted(heads) == ["fc", "layer4"]
    dst = DiffKD(16, 32, use_ae=True, ae_channels=24)
    dst.load_state_dict(convert_official_state_dict(full, point="layer4"), strict=True)
    for k, v in src.state_dict().items():
        torch.testing.assert_close(dst.state_dict()[k], v)
    with pytest.raises(ValueError, match="several DiffKD heads"):
        convert_official_state_dict(full)


def test_june_2023_bare_conv_proj_converts_to_identical_function():
    head = DiffKD(16, 16).eval()
    sd = head.state_dict()
    old = {k: v for k, v in sd.items() if not k.startswith("proj.")}
    old["proj.weight"], old["proj.bias"] = sd["proj.0.weight"], sd["proj.0.bias"]
    new = DiffKD(16, 16).eval()
    new.load_state_dict(convert_official_state_dict(old), strict=True)
    x = torch.randn(2, 16, 3, 3)
    torch.testing.assert_close(new.proj(x), torch.nn.functional.conv2d(x, old["proj.weight"], old["proj.bias"]))


def test_channels_last_head_matches_the_contiguous_one():
    torch.manual_seed(0)
    head = DiffKD(16, 16)
    s = torch.randn(4, 16, 4, 4)
    t = torch.randn(4, 16, 4, 4)
    noise, dnoise = torch.randn(4, 16, 4, 4), torch.randn(4, 16, 4, 4)
    steps = torch.randint(0, 1000, (4,))
    grads = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        head.zero_grad()
        head.to(memory_format=fmt)
        x = s.contiguous(memory_format=fmt).detach().requires_grad_()
        out = head(x, t.contiguous(memory_format=fmt), noise=noise.contiguous(memory_format=fmt),
                   diffusion_noise=dnoise.contiguous(memory_format=fmt), timesteps=steps)  # fmt: skip
        (F.mse_loss(out.student, out.teacher) + out.diffusion_loss).backward()
        grads.append((out.student.detach(), x.grad, [p.grad.clone() for p in head.parameters()]))
    (a, ga, pa), (b, gb, pb) = grads
    assert gb.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-6)
    for p, q in zip(pb, pa, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-6)
