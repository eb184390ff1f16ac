"""CRD: agreement with mdistiller's CRD code on stored figures (loss, gradients, memory banks, Z), its
hyper-parameters and parameter counts, the contrast sampling, the memory banks in the state_dict, the errors, a few
training steps through ``diffkd.train`` and an exact resume after a kill mid-epoch.

The figures in ``tests/fixtures/mdistiller_crd.json`` were computed by running mdistiller's own ``CRD.crd_loss``
(commit and method recorded in the file's ``provenance``) in float64; mdistiller is not needed here.
"""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from diffkd.distill import Distiller
from diffkd.distill.losses.crd import l2_normalize
from diffkd.distill.registry import build_distance, get_head
from diffkd.models import create_model
from diffkd.train import build_module, train
from diffkd.utils.seeding import seed_step
from tests.conftest import compose_config
from tests.helpers.parity import as_float64 as _t
from tests.helpers.parity import max_rel

FIXTURE = json.loads((Path(__file__).resolve().parents[1] / "fixtures" / "mdistiller_crd.json").read_text())
CONF = Path(__file__).resolve().parents[2] / "conf" / "distill" / "crd.yaml"
RTOL = 1e-5


def _reference_modules():
    """Our head and distance in float64 with mdistiller's initial weights and banks (the fixture's ``init``)."""
    sizes, init = FIXTURE["sizes"], FIXTURE["init"]
    entry = get_head("crd")
    head = entry.build(sizes["CS"], sizes["CT"], vector=True, feat_dim=sizes["FEAT"]).double()
    head.student.linear.load_state_dict({k: _t(v) for k, v in init["embed_s"].items()})
    head.teacher.linear.load_state_dict({k: _t(v) for k, v in init["embed_t"].items()})
    k, temperature, _, _, momentum = init["params"]
    distance = build_distance(
        "crd", feat_dim=sizes["FEAT"], num_negatives=int(k), temperature=temperature, momentum=momentum
    ).double()
    distance.bind_data(sizes["N"], torch.tensor(FIXTURE["labels"]))
    with torch.no_grad():
        distance.memory_student.copy_(_t(init["memory_v1"]))
        distance.memory_teacher.copy_(_t(init["memory_v2"]))
    return entry, head, distance


# ------------------------------------------------------------------ parity
def test_crd_matches_mdistiller_over_three_steps():
    """Three successive steps on one module: Z set by the first and kept, the banks carried over."""
    entry, head, distance = _reference_modules()
    assert float(distance.z_student) < 0 and float(distance.z_teacher) < 0
    worst = 0.0
    for step in FIXTURE["steps"]:
        f_s = _t(step["f_s"]).requires_grad_(True)
        f_t = _t(step["f_t"]).requires_grad_(True)
        head.zero_grad()
        out = entry.apply(head, f_s[:, :, None, None], f_t[:, :, None, None])  # pooled taps as the distiller hands them
        index, contrast = torch.tensor(step["index"]), torch.tensor(step["contrast_index"])
        loss = distance(out.student, out.teacher, sample_index=index, contrast_index=contrast)
        # the teacher side: mdistiller's f_t carries a gradient to its embed head; ours detaches the teacher
        # features (frozen teacher) but the embed head's gradient is the same
        loss.backward()
        checks = [
            (loss, step["loss"]),
            (f_s.grad, step["grad_f_s"]),
            (distance.memory_student, step["memory_v1_after"]),
            (distance.memory_teacher, step["memory_v2_after"]),
            (distance.z_student, step["z_v1"]),
            (distance.z_teacher, step["z_v2"]),
        ]
        for side, key in ((head.student.linear, "grad_embed_s"), (head.teacher.linear, "grad_embed_t")):
            checks += [(p.grad, step[key][name]) for name, p in side.named_parameters()]
        for ours, ref in checks:
            worst = max(worst, max_rel(ours, _t(ref)))
    assert worst < RTOL, worst


def test_teacher_feature_gradient_matches_mdistiller_when_not_detached():
    """The teacher-side input gradient too (ours detaches the frozen teacher's features; the embed head alone)."""
    _, head, distance = _reference_modules()
    step = FIXTURE["steps"][0]
    f_t = _t(step["f_t"]).requires_grad_(True)
    v_s = head.student(_t(step["f_s"]))
    loss = distance(v_s, head.teacher(f_t), torch.tensor(step["index"]), torch.tensor(step["contrast_index"]))
    loss.backward()
    assert max_rel(f_t.grad, _t(step["grad_f_t"])) < RTOL


def test_config_carries_mdistillers_hyper_parameters():
    cfg = FIXTURE["cfg"]
    conf = OmegaConf.to_container(OmegaConf.load(CONF))
    assert conf["task_weight"] == cfg["LOSS"]["CE_WEIGHT"] == 1.0
    point = conf["points"]["embedding"]
    assert point["weight"] == cfg["LOSS"]["FEAT_WEIGHT"] == 0.8
    assert point["head"] == "crd" and point["head_kwargs"] == {"feat_dim": cfg["FEAT"]["DIM"]}
    d = point["distance"]
    assert (d["feat_dim"], d["num_negatives"], d["temperature"], d["momentum"], d["mode"]) == (
        cfg["FEAT"]["DIM"],
        cfg["NCE"]["K"],
        cfg["NCE"]["TEMPERATURE"],
        cfg["NCE"]["MOMENTUM"],
        cfg["MODE"],
    )
    default = build_distance("crd")  # the class defaults are mdistiller's too
    assert (default.feat_dim, default.num_negatives, default.temperature, default.momentum, default.mode) == (
        128,
        16384,
        0.07,
        0.5,
        "exact",
    )


# ------------------------------------------------------------------ parameter counts
PAIRS = {
    "wrn_40_2->wrn_16_2": ("wrn_40_2", "wrn_16_2"),
    "wrn_40_2->wrn_40_1": ("wrn_40_2", "wrn_40_1"),
    "resnet56->resnet20": ("resnet56", "resnet20"),
    "resnet32x4->resnet8x4": ("resnet32x4", "resnet8x4"),
    "ResNet50->MobileNetV2": ("ResNet50", "MobileNetV2"),
    "resnet32x4->ShuffleV1": ("resnet32x4", "ShuffleV1"),
    "resnet32x4->ShuffleV2": ("resnet32x4", "ShuffleV2"),
}


@pytest.mark.parametrize("pair", list(PAIRS))
def test_parameter_counts_equal_mdistillers(pair):
    teacher, student = PAIRS[pair]
    ref = FIXTURE["trainable_params"][pair]
    conf = OmegaConf.to_container(OmegaConf.load(CONF))
    conf.pop("_target_")
    distiller = Distiller(**conf)
    s, t = create_model(student, num_classes=100), create_model(teacher, num_classes=100)
    distiller.build(s, t, torch.randn(2, 3, 32, 32))
    info = distiller.describe()["embedding"]
    assert (info["student_shape"][0], info["teacher_shape"][0]) == (ref["student_dim"], ref["teacher_dim"])
    trainable = sum(p.numel() for p in distiller.parameters() if p.requires_grad)
    assert trainable == info["params"] == ref["trainable"]
    # mdistiller's get_extra_parameters() also counts its banks (N = 50000) and its 5 params
    distiller.bind_data({"num_train_samples": 50000, "train_labels": torch.arange(50000) % 100})
    banks = sum(b.numel() for n, b in distiller.distances["embedding"].named_buffers() if n.startswith("memory"))
    assert list(distiller.distances["embedding"].memory_teacher.shape) == ref["memory_shape"]
    assert trainable + banks + 5 == ref["extra_parameters"]


# ------------------------------------------------------------------ sampling
def _bound(mode: str = "exact", n: int = 40, classes: int = 4, k: int = 6, **kwargs):
    distance = build_distance("crd", feat_dim=4, num_negatives=k, mode=mode, **kwargs)
    labels = torch.arange(n) % classes
    distance.bind_data(n, labels if mode != "uniform" else None)
    return distance, labels


def test_exact_negatives_are_distinct_samples_of_other_classes():
    distance, labels = _bound("exact", k=6)
    index = torch.tensor([0, 5, 10, 39])
    torch.manual_seed(3)
    idx = distance.sample_contrast(index)
    assert idx.shape == (4, 7) and idx.dtype == torch.int64
    assert torch.equal(idx[:, 0], index)
    assert (labels[idx[:, 1:]] != labels[index][:, None]).all()
    assert all(len(set(row.tolist())) == 7 for row in idx)  # without replacement
    torch.manual_seed(3)
    assert torch.equal(distance.sample_contrast(index), idx)  # the seeded global generator decides
    torch.manual_seed(4)
    assert not torch.equal(distance.sample_contrast(index), idx)


def test_exact_draws_with_replacement_when_k_exceeds_the_other_classes():
    distance, labels = _bound("exact", n=12, classes=3, k=20)  # 8 samples of other classes, K = 20
    index = torch.tensor([0, 1, 2])
    idx = distance.sample_contrast(index)
    assert idx.shape == (3, 21) and torch.equal(idx[:, 0], index)
    assert (labels[idx[:, 1:]] != labels[index][:, None]).all()
    counts = torch.bincount(idx[:, 1:].flatten(), minlength=12)
    assert (counts[labels != 0] > 0).all()  # every other-class sample of class 1 and 2 is reachable


def test_relax_and_uniform_modes():
    distance, labels = _bound("relax")
    index = torch.arange(0, 40, 3)
    idx = distance.sample_contrast(index)
    assert (labels[idx[:, 0]] == labels[index]).all()  # positive: a sample of the same class
    assert (labels[idx[:, 1:]] != labels[index][:, None]).all()
    distance, _ = _bound("uniform", k=50)
    idx = distance.sample_contrast(index)
    assert idx.shape == (len(index), 51) and torch.equal(idx[:, 0], index)
    assert idx.min() >= 0 and idx.max() < 40
    assert distance.data_facts == ("num_train_samples",)  # no labels needed
    assert _bound("exact")[0].data_facts == ("num_train_samples", "train_labels")


# ------------------------------------------------------------------ state_dict and resume of the banks
def test_banks_and_z_are_in_the_state_dict_and_load_into_an_unbound_loss():
    distance, _ = _bound("exact")
    v = torch.nn.functional.normalize(torch.randn(4, 4), dim=1)
    before = distance.memory_student.clone()
    distance(v, v.clone(), torch.tensor([0, 1, 2, 3]))
    assert not torch.equal(distance.memory_student, before)  # updated rows
    assert torch.equal(distance.memory_student[4:], before[4:])
    state = distance.state_dict()
    assert {"memory_student", "memory_teacher", "z_student", "z_teacher"} <= set(state)
    assert "train_labels" not in state  # derived from the data module at every start
    assert float(state["z_student"]) > 0 and float(state["z_teacher"]) > 0
    fresh = build_distance("crd", feat_dim=4, num_negatives=6)
    fresh.load_state_dict(state)  # evaluation: no data facts, the banks come from the checkpoint
    assert torch.equal(fresh.memory_student, distance.memory_student)
    assert torch.equal(fresh.z_teacher, distance.z_teacher)
    other, _ = _bound("exact", n=30)
    with pytest.raises(ValueError, match="another training set"):
        other.load_state_dict(state)


def test_a_resumed_loss_continues_exactly():
    """Steps 3-4 after a state_dict round trip into a freshly bound loss (what a resume does: setup binds a new,
    randomly initialised bank, then the checkpoint is loaded) equal the uninterrupted steps 3-4: the banks and Z come
    from the state_dict and the negatives from the step's seed."""
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 4, generator=g), torch.randn(4, 4, generator=g), torch.randperm(40, generator=g)[:4])]
    batches += [
        (torch.randn(4, 4, generator=g), torch.randn(4, 4, generator=g), torch.randperm(40, generator=g)[:4])
        for _ in range(3)
    ]

    def step(distance, i):
        seed_step(0, 0, i, 0)
        f_s, f_t, index = batches[i]
        return distance(l2_normalize(f_s), l2_normalize(f_t), index)

    torch.manual_seed(1)
    uninterrupted, _ = _bound("exact")
    losses = [step(uninterrupted, i) for i in range(4)]
    torch.manual_seed(1)
    first, _ = _bound("exact")
    for i in range(2):
        step(first, i)
    state = {k: v.clone() for k, v in first.state_dict().items()}
    torch.manual_seed(2)  # another initialisation: the checkpoint must replace it
    resumed, _ = _bound("exact")
    resumed.load_state_dict(state)
    assert [step(resumed, i) for i in (2, 3)] == losses[2:]
    for name, value in uninterrupted.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name


def _ddp_update(rank: int, world: int, init: str, out: str) -> None:
    """One rank of the DDP bank test: bind equal banks, update them with this rank's half of the batch."""
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        distance, _ = _bound("exact")
        g = torch.Generator().manual_seed(5)
        v_s, v_t = l2_normalize(torch.randn(8, 4, generator=g)), l2_normalize(torch.randn(8, 4, generator=g))
        index = torch.randperm(40, generator=g)[:8]
        part = slice(4 * rank, 4 * rank + 4)
        distance.update_memory(v_s[part], v_t[part], index[part])
        state = {k: v.clone() for k, v in distance.state_dict().items()}
        distance(v_s[part], v_t[part], index[part])  # the first step sets Z: the same on both ranks
        state.update(z_student=distance.z_student.clone(), z_teacher=distance.z_teacher.clone())
        torch.save(state, f"{out}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # two spawned processes (~30 s on 2 busy cores)
def test_under_ddp_every_rank_applies_the_whole_batch_to_its_banks(tmp_path):
    """Two gloo ranks, each with half of a batch: both banks end as one process's update with the whole batch, and
    the first step's Z is the same on both ranks."""
    torch.multiprocessing.spawn(
        _ddp_update, args=(2, f"file://{tmp_path / 'init'}", str(tmp_path)), nprocs=2, join=True
    )
    torch.manual_seed(0)
    single, _ = _bound("exact")
    g = torch.Generator().manual_seed(5)
    v_s, v_t = l2_normalize(torch.randn(8, 4, generator=g)), l2_normalize(torch.randn(8, 4, generator=g))
    single.update_memory(v_s, v_t, torch.randperm(40, generator=g)[:8])
    states = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    for state in states:
        for name in ("memory_student", "memory_teacher"):
            torch.testing.assert_close(state[name], getattr(single, name), rtol=0, atol=0)
    for name in ("z_student", "z_teacher"):
        assert float(states[0][name]) > 0 and torch.equal(states[0][name], states[1][name])


# ------------------------------------------------------------------ errors
def test_errors_name_the_problem_and_the_fix():
    distance = build_distance("crd", feat_dim=4, num_negatives=6)
    v = torch.randn(2, 4)
    with pytest.raises(RuntimeError, match="no memory bank yet"):
        distance(v, v, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="needs the training labels; or use mode: uniform"):
        distance.bind_data(10)
    with pytest.raises(ValueError, match=r"one class; use distance\.mode: uniform"):
        distance.bind_data(10, torch.zeros(10, dtype=torch.int64))
    with pytest.raises(ValueError, match="mode must be one of exact, relax, uniform"):
        build_distance("crd", mode="hard")
    bound, _ = _bound("exact")
    with pytest.raises(ValueError, match=r"embeddings \(B, 4\).*same feat_dim"):
        bound(torch.randn(2, 8), torch.randn(2, 8), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="3 sample indices for a batch of 2"):
        bound(torch.randn(2, 4), torch.randn(2, 4), torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="feat_dim only"):
        get_head("crd").build(8, 8, vector=True, dim=3)


def _cifar_crd_module():
    cfg = compose_config(["experiment=cifar_res56_res20", "distill=crd", "model.teacher.weights=null"])
    return build_module(cfg, 100)


def test_a_datamodule_without_sample_indices_is_refused_by_name():
    module = _cifar_crd_module()

    class PlainData:  # a datamodule of someone's own, without the sample-index capability
        batch_size = 2

        def example_batch(self, size: int = 2, split: str = "train"):
            return torch.randn(size, 3, 32, 32), torch.zeros(size, dtype=torch.int64)

    module._trainer = SimpleNamespace(datamodule=PlainData())
    with pytest.raises(TypeError, match=r"crd \(point 'embedding'\).*PlainData cannot give them.*enable_sample_index"):
        module.setup("fit")


def test_a_datamodule_without_per_sample_classes_is_refused_by_name():
    module = _cifar_crd_module()

    class BoxesData:
        batch_size = 2

        def enable_sample_index(self) -> None:
            pass

        def num_train_samples(self) -> int:
            return 10

        def train_labels(self):
            raise TypeError("BoxesData has no per-image class (its samples are images with boxes)")

    module._trainer = SimpleNamespace(datamodule=BoxesData())
    with pytest.raises(TypeError, match=r"crd \(point 'embedding'\) reads train_labels\(\) from BoxesData: .*boxes"):
        module.setup("fit")


# ------------------------------------------------------------------ training
def test_trains_a_few_steps_and_updates_its_banks(cifar_cfg):
    metrics, objs = train(cifar_cfg("cifar_res56_res20", "distill=crd", "trainer.limit_train_batches=3"))
    assert math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["train/loss/embedding/kd"])
    assert {k for k in metrics if k.startswith("train/loss/")} == {"train/loss/ce", "train/loss/embedding/kd"}
    distance = objs["module"].distiller.distances["embedding"]
    n = objs["datamodule"].num_train_samples()
    assert distance.num_samples == n
    assert float(distance.z_student) > 0 and float(distance.z_teacher) > 0
    norms = distance.memory_student.norm(dim=1)
    assert ((norms - 1).abs() < 1e-5).sum() > 0  # the rows of the batches seen are unit rows now
    assert ((norms - 1).abs() > 1e-3).sum() > 0  # the others still carry their uniform initialisation


@pytest.mark.slow
def test_resumes_exactly_after_a_kill_mid_epoch(tmp_path, fmnist_root):
    from tests.test_resume import _run, _weights

    extra = [
        "distill=crd",
        "callbacks.last_checkpoint.every_n_train_steps=4",
        "distill.points.embedding.distance.num_negatives=64",
    ]
    full = _run(tmp_path, fmnist_root, tmp_path / "full", *extra)
    assert full.returncode == 0, full.stderr[-3000:]
    out = tmp_path / "killed"
    killer = ["+callbacks.killer._target_=tests.helpers.killer.KillAtStep", "+callbacks.killer.step=13"]
    killed = _run(tmp_path, fmnist_root, out, *extra, *killer)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = _run(tmp_path, fmnist_root, out, *extra, "ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = _weights(tmp_path / "full"), _weights(out)
    assert a.keys() == b.keys()
    assert any(k.endswith("memory_student") for k in a) and any(k.endswith("z_teacher") for k in a)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
