"""Taps on structured outputs: dict/tuple entries, '*' expansion (per-entry or shared heads), every call of a
module that runs several times, layouts from declarations, and the registries."""

from collections import OrderedDict

import pytest
import torch
from torch import nn

from diffkd.distill import (
    Distiller,
    FeatureTaps,
    HeadOutput,
    get_distance,
    list_distances,
    list_heads,
    register_distance,
    register_head,
)


class Pyramid(nn.Module):
    """A backbone returning an FPN-like OrderedDict of levels, and a head shared by the levels."""

    output_fmt = "NCHW"  # declared, as timm models do: (B, 8, 8, 12) is not read as channels-last

    def __init__(self, width: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.fpn = Levels()
        self.head = nn.Conv2d(width, 2, 1)

    def forward(self, x):
        levels = self.fpn(self.stem(x))
        return {"levels": levels, "logits": [self.head(v) for v in levels.values()]}


class Levels(nn.Module):
    def forward(self, x):
        return OrderedDict([("0", x), ("1", x[..., ::2, ::2]), ("pool", x[..., ::4, ::4])])


def build(points, s_width=4, t_width=8, x=None):
    student, teacher = Pyramid(s_width), Pyramid(t_width).eval()
    d = Distiller(points, diffkd={"inference_steps": 1})
    x = torch.randn(2, 3, 16, 24) if x is None else x
    d.build(student, teacher, x)
    return d, student, teacher, x


def terms(d, student, teacher, x):
    s_paths, t_paths = d.tap_paths()
    _, sf = FeatureTaps(student, s_paths, {"head"})(x)
    with torch.no_grad():
        _, tf = FeatureTaps(teacher, t_paths, {"head"})(x)
    return d(sf, tf).terms


def test_star_expands_one_point_and_head_per_entry():
    d, s, t, x = build({"fpn": {"student": "fpn:*", "teacher": "fpn:*", "head": "diffkd"}})
    assert list(d.points) == ["fpn_0", "fpn_1", "fpn_pool"]
    assert d.points["fpn_pool"].student == "fpn:pool" and d.points["fpn_pool"].teacher_shape == (8, 4, 6)
    assert set(d.heads) == {"fpn_0", "fpn_1", "fpn_pool"} and d.heads["fpn_0"] is not d.heads["fpn_1"]
    out = terms(d, s, t, x)
    assert set(out) == {f"fpn_{k}/{term}" for k in ("0", "1", "pool") for term in ("kd", "diff")}
    assert all(torch.isfinite(v) for v in out.values())


def test_shared_head_is_one_module_for_every_entry():
    d, s, t, x = build({"fpn": {"student": "fpn:*", "teacher": "fpn:*", "head": "diffkd", "shared_head": True}})
    assert list(d.heads) == ["fpn"] and {p.head for p in d.points.values()} == {"fpn"}
    assert d.describe()["fpn_1"]["shared_head"] == "fpn"
    loss = sum(terms(d, s, t, x).values())
    loss.backward()
    assert d.heads["fpn"].trans.weight.grad is not None


def test_one_entry_and_nested_output_selectors():
    d, s, t, x = build({"p": {"student": ":levels:1", "teacher": "fpn:1", "head": "conv1x1"}})
    assert d.points["p"].student_shape == (4, 8, 12) and d.points["p"].teacher_shape == (8, 8, 12)
    assert set(terms(d, s, t, x)) == {"p/kd"}


def test_every_call_of_a_module_is_kept():
    d, s, _, x = build({"cls": {"student": "head:*", "teacher": "head:*"}})
    assert list(d.points) == ["cls_0", "cls_1", "cls_2"]
    assert [p.student_shape for p in d.points.values()] == [(2, 16, 24), (2, 8, 12), (2, 4, 6)]
    one = build({"cls": {"student": "head:2", "teacher": "head:2"}})[0]
    assert one.points["cls"].teacher_shape == (2, 4, 6)
    taps = FeatureTaps(s, ["head:*".replace("*", "1")], multi_call={"head"})
    _, feats = taps(x)
    assert feats["head:1"].shape == (2, 2, 8, 12)


def test_structured_tap_errors_name_the_fix():
    with pytest.raises(ValueError, match=r"runs 3 times per forward; tap every call with 'head:\*'"):
        build({"cls": {"student": "head", "teacher": "head"}})
    with pytest.raises(KeyError, match=r"no entry 'p6'; its entries: \['0', '1', 'pool'\]"):
        build({"f": {"student": "fpn:p6", "teacher": "fpn:0", "head": "conv1x1"}})
    with pytest.raises(
        TypeError, match=r"'fpn' is a OrderedDict with entries \['0', '1', 'pool'\], not a tensor.*fpn:\*"
    ):
        build({"f": {"student": "fpn", "teacher": "fpn", "head": "conv1x1"}})
    with pytest.raises(ValueError, match=r"both sides must expand"):
        build({"f": {"student": "fpn:*", "teacher": "fpn:0", "head": "conv1x1"}})
    with pytest.raises(KeyError, match=r"student Pyramid has no module 'fnp'.*fpn"):
        build({"f": {"student": "fnp:*", "teacher": "fpn:*"}})


class _Maps(nn.Module):
    """Returns a (B, 64, 64, 128) tensor: a 64-channel 64×128 map, or a 64×64 map of 128 channels?"""

    def forward(self, x):
        return x.new_zeros(x.shape[0], 64, 64, 128) + x.mean()


class _Model(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x):
        return self.body(x)


def test_declared_nchw_map_is_not_permuted():
    conv = _Model(nn.Conv2d(3, 64, 1))  # a Conv2d only produces NCHW
    d = Distiller({"f": {"student": "body", "teacher": "body", "head": "identity"}})
    d.build(conv, _Model(nn.Conv2d(3, 64, 1)), torch.randn(2, 3, 64, 128))
    assert d.points["f"].student_layout == "bchw" and d.points["f"].layout_source == ("declared", "declared")
    assert d.points["f"].student_shape == (64, 64, 128)


def test_ambiguous_layout_raises_with_the_fix_and_the_fix_works():
    with pytest.raises(ValueError, match=r"\+\+distill\.points\.f\.student_layout=bchw"):
        Distiller({"f": {"student": "body", "teacher": "body"}}).build(
            _Model(_Maps()), _Model(_Maps()), torch.randn(2, 3, 8, 8)
        )
    d = Distiller({"f": {"student": "body", "teacher": "body", "student_layout": "bchw", "teacher_layout": "bchw"}})
    d.build(_Model(_Maps()), _Model(_Maps()), torch.randn(2, 3, 8, 8))
    assert d.points["f"].student_shape == (64, 64, 128)


def test_timm_output_fmt_declares_channels_last():
    from diffkd.models import create_model

    swin = create_model("timm:swin_tiny_patch4_window7_224", num_classes=10)
    d = Distiller({"f": {"student": "norm", "teacher": "norm"}})
    d.build(swin, swin, torch.randn(1, 3, 224, 224))
    assert d.points["f"].student_layout == "bhwc" and d.points["f"].layout_source[0] == "declared"
    assert d.points["f"].student_shape == (768, 7, 7)


def test_registries_take_new_heads_and_distances_without_editing_the_distiller():
    @register_distance("test_l1")
    class L1(nn.Module):
        needs = ("labels",)

        def forward(self, s, t, labels):
            assert labels.shape == (2,)
            return (s - t).abs().mean()

    def apply(head, s, t):
        return HeadOutput(head(s), t, {"extra": s.square().mean()}, {"norm": s.norm()})

    @register_head("test_scale", apply=apply)
    def build_scale(c_s, c_t, *, vector, **kwargs):
        return nn.Conv2d(c_s, c_t, 1)

    assert "test_l1" in list_distances() and "test_scale" in list_heads()
    assert get_distance("test_l1").needs == ("labels",) and get_distance("dist").accepts == ("valid_mask",)
    point = {"student": "fpn:0", "teacher": "fpn:0", "head": "test_scale", "distance": {"name": "test_l1"}}
    d, s, t, x = build({"p": {**point, "term_weights": {"extra": 0.5}}})
    s_paths, t_paths = d.tap_paths()
    _, sf = FeatureTaps(s, s_paths)(x)
    _, tf = FeatureTaps(t, t_paths)(x)
    with pytest.raises(ValueError, match=r"distance 'test_l1' needs \['labels'\] from the batch"):
        d(sf, tf, {})
    out = d(sf, tf, {"labels": torch.zeros(2, dtype=torch.long)})
    assert set(out.terms) == {"p/extra", "p/kd"} and set(out.stats) == {"norm/p"}
    with pytest.raises(ValueError, match=r"unknown head 'difkd'.*Did you mean diffkd"):
        Distiller({"p": {"head": "difkd"}})
