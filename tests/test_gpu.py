"""GPU-only checks (skipped without CUDA; `make bench-gpu` runs them on a lent GPU)."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from diffkd.distill import Distiller
from diffkd.models import create_model
from diffkd.tasks import ClassificationModule

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

POINTS = {
    "feature": {"head": "diffkd", "distance": {"name": "mse"}},
    "logits": {"student": "", "teacher": "", "head": "diffkd", "distance": {"name": "kl", "tau": 1.0}},
}


def _module(**kwargs) -> ClassificationModule:
    module = ClassificationModule(
        student=create_model("wrn_16_2"),
        teacher=create_model("wrn_40_2"),
        distiller=Distiller(POINTS),
        optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9),
        input_size=(3, 32, 32),
        **kwargs,
    ).cuda()
    module.build(torch.randn(2, 3, 32, 32, device="cuda"))
    return module


def test_training_step_has_no_host_sync():
    module = _module(channels_last=True, teacher_dtype="bfloat16", nonfinite_check_every=10_000)
    module.log = lambda *a, **k: None  # no Trainer here; logging is Lightning's business
    module.log_dict = lambda *a, **k: None
    module.training_step_extra = lambda *a, **k: None
    opt = torch.optim.SGD(module.parameters(), lr=0.01)
    x = torch.randn(64, 3, 32, 32, device="cuda")
    y = torch.randint(0, 100, (64,), device="cuda")
    module.training_step((x, y), 0).backward()  # warm-up: cuDNN autotuning may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = module.training_step((x, y), 1)
        loss.backward()
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert math.isfinite(loss.item())


def test_bf16_autocast_stays_finite_over_steps():
    module = _module()
    opt = torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9)
    module.log = lambda *a, **k: None
    module.log_dict = lambda *a, **k: None
    module.training_step_extra = lambda *a, **k: None
    for i in range(5):
        x = torch.randn(64, 3, 32, 32, device="cuda")
        y = torch.randint(0, 100, (64,), device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = module.training_step((x, y), i)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert math.isfinite(loss.item())
