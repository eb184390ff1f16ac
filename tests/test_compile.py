"""``model.compile``: which parts are compiled, and the frozen teacher's compiled graph (inductor freezing)."""

import copy
from functools import partial

import pytest
import torch

from diffkd.distill import Distiller
from diffkd.models import create_model
from diffkd.tasks import ClassificationModule
from diffkd.tasks.base import _compile_parts

POINTS = {
    "feature": {"head": "diffkd", "distance": {"name": "mse"}},
    "logits": {"student": "", "teacher": "", "head": "diffkd", "distance": {"name": "kl", "tau": 1.0}},
}


@pytest.mark.parametrize(
    ("value", "parts"),
    [
        (True, ("student", "teacher", "heads")),
        (False, ()),
        (None, ()),
        ("teacher", ("teacher",)),
        (["heads", "teacher"], ("teacher", "heads")),
    ],
)
def test_compile_parts(value, parts):
    assert _compile_parts(value) == parts


def test_unknown_compile_part_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown part\(s\) \['techer'\].*'student', 'teacher', 'heads'"):
        _compile_parts(["techer"])


def _module(compile):
    torch.manual_seed(0)
    module = ClassificationModule(
        student=create_model("resnet8", num_classes=10),
        teacher=create_model("resnet14", num_classes=10),
        distiller=Distiller(POINTS),
        optimizer=partial(torch.optim.SGD, lr=0.05),
        input_size=(3, 32, 32),
        compile=compile,
    )
    return module


@pytest.mark.parametrize("channels_last", [False, True])
def test_every_compiled_part_is_one_graph_without_breaks(channels_last):
    """CUDA graphs (compile_mode=reduce-overhead) replay whole graphs: a graph break would split the step into
    pieces with eager code between them. The tapped student and teacher (forward hooks) and each DiffKD head trace
    as one graph each."""
    import torch._dynamo as dynamo

    torch.manual_seed(0)
    module = ClassificationModule(
        student=create_model("wrn_16_2"),
        teacher=create_model("wrn_40_2"),
        distiller=Distiller(POINTS),
        optimizer=partial(torch.optim.SGD, lr=0.05),
        input_size=(3, 32, 32),
        channels_last=channels_last,
    )
    x = torch.randn(4, 3, 32, 32)
    module.build(x)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x.to(memory_format=fmt)
    parts = {"student": (module.student, (x,)), "teacher": (module.teacher, (x,))}
    s_feat, t_feat = torch.randn(4, 128, 8, 8).to(memory_format=fmt), torch.randn(4, 128, 8, 8).to(memory_format=fmt)
    parts["feature head"] = (module.distiller.heads["feature"], (s_feat, t_feat))
    logits = torch.randn(4, 100, 1, 1), torch.randn(4, 100, 1, 1)  # as the distiller hands vectors to the head
    parts["logits head"] = (module.distiller.heads["logits"], logits)
    for name, (part, args) in parts.items():
        explained = dynamo.explain(part)(*args)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), (name, explained.break_reasons)
    assert module.student_taps is not None and len(module.student_taps.paths) == 2


def test_compiled_frozen_teacher_matches_eager_and_freezing_stays_scoped():
    import torch._inductor.config as inductor_config

    module = _module(compile="teacher")
    eager_teacher = copy.deepcopy(module.teacher)
    module.build(torch.randn(2, 3, 32, 32))
    assert module.teacher._compiled_call_impl is not None
    assert module.student._compiled_call_impl is None
    assert all(h._compiled_call_impl is None for h in module.distiller.heads.values())

    with module._teacher_compile_context():
        assert inductor_config.freezing is True
    x = torch.randn(8, 3, 32, 32)
    feats = module.teacher_features(x)
    assert inductor_config.freezing is False  # only the teacher's calls compile with freezing
    with torch.no_grad():
        eager_logits = eager_teacher(x)
    assert set(feats) == {"", *module.distiller.tap_paths()[1]}
    torch.testing.assert_close(feats[""], eager_logits, rtol=1e-4, atol=1e-4)
    assert not feats[""].requires_grad


def test_compile_mode_reaches_every_compiled_part(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: calls.append((type(self).__name__, kw)))
    module = _module(compile=["student", "heads"])
    module.compile_mode = "reduce-overhead"
    module.build(torch.randn(2, 3, 32, 32))
    mode = {"mode": "reduce-overhead"}
    static = {"dynamic": False, **mode}  # the two heads share a forward: keep each graph static
    assert calls == [("ResNet", mode), ("DiffKD", static), ("DiffKD", static)]  # student, then the two heads


def test_unknown_compile_mode_names_the_choices():
    with pytest.raises(ValueError, match=r"compile_mode='fast'.*'reduce-overhead'"):
        ClassificationModule(
            student=create_model("resnet8", num_classes=10), distiller=Distiller({}), compile_mode="fast"
        )


@pytest.mark.slow
def test_reduce_overhead_mode_trains_end_to_end():
    """The CUDA-graph mode's Python path (step marks, static heads) on the CPU, where inductor skips the graphs."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    module = _module(compile=True)
    module.compile_mode = "reduce-overhead"
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)  # fmt: skip
    trainer.fit(module, train_dataloaders=DataLoader(TensorDataset(x, y), batch_size=8))
    assert trainer.global_step == 3
    assert module.student._compiled_call_impl is not None
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
