"""Feature taps: hooks by path, the inferred last feature map, clear errors for wrong names."""

import copy
import pickle

import pytest
import torch
from torch import nn

from diffkd.distill import FeatureTaps, find_last_feature_map, probe_shapes
from diffkd.models import create_model


@pytest.mark.parametrize(
    ("name", "path", "shape"),
    [
        ("wrn_40_2", "relu", (2, 128, 8, 8)),
        ("resnet20", "layer3", (2, 64, 8, 8)),
        ("resnet8x4", "layer3", (2, 256, 8, 8)),
        ("vgg8", "relu4", (2, 512, 4, 4)),
        ("ShuffleV1", "layer3", (2, 960, 4, 4)),
        ("MobileNetV2", "conv2", (2, 1280, 2, 2)),
    ],
)
def test_last_feature_map_is_inferred(name, path, shape):
    model = create_model(name)
    x = torch.randn(2, 3, 32, 32)
    assert find_last_feature_map(model, x) == path
    assert probe_shapes(model, x, [path, ""]) == {path: shape, "": (2, 100)}


def test_swin_channels_last_norm_is_found():
    model = create_model("timm:swin_tiny_patch4_window7_224", num_classes=10).eval()
    assert find_last_feature_map(model, torch.randn(1, 3, 224, 224)) == "norm"


def test_dry_run_does_not_touch_batchnorm_statistics():
    model = create_model("resnet20").train()
    before = copy.deepcopy(model.state_dict())
    find_last_feature_map(model, torch.randn(2, 3, 32, 32) * 5)
    assert model.training
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])


def test_taps_keep_references_and_output():
    model = create_model("wrn_16_2")
    taps = FeatureTaps(model, ["relu", "block2", ""])
    out, feats = taps(torch.randn(2, 3, 32, 32))
    assert feats[""] is out
    assert feats["relu"].shape == (2, 128, 8, 8) and feats["block2"].shape == (2, 64, 16, 16)
    _, again = taps(torch.randn(2, 3, 32, 32))
    assert again["relu"] is not feats["relu"]


def test_wrong_path_lists_nearest_names():
    model = create_model("wrn_16_2")
    with pytest.raises(
        KeyError, match=r"no module 'block3.layer.1.relu'.*Nearest module names: .*block3\.layer\.1\.relu1"
    ):
        FeatureTaps(model, ["block3.layer.1.relu"])
    with pytest.raises(KeyError, match=r"no module 'layer4'"):
        probe_shapes(model, torch.randn(2, 3, 32, 32), ["layer4"])


def test_tuple_outputs_use_their_first_tensor():
    class Block(nn.Module):
        def forward(self, x):
            return x * 2, x  # RepDistiller's (out, preact) blocks

    model = nn.Sequential(Block(), nn.Identity())
    _, feats = FeatureTaps(model, ["0"])(torch.ones(1, 2, 3, 3))
    assert feats["0"].shape == (1, 2, 3, 3) and feats["0"].max() == 2


def test_models_with_taps_pickle_and_deepcopy():
    model = create_model("resnet20")
    taps = FeatureTaps(model, ["layer3", ""])
    clone = pickle.loads(pickle.dumps((model, taps)))
    _, feats = clone[1](torch.randn(2, 3, 32, 32))
    assert feats["layer3"].shape == (2, 64, 8, 8)
    twin = copy.deepcopy(taps)
    _, feats = twin(torch.randn(2, 3, 32, 32))
    assert feats["layer3"].shape == (2, 64, 8, 8)
