"""Layout helpers: every supported layout to (B, C, H, W), and errors that name the shape."""

import pytest
import torch

from diffkd.method import guess_layout, to_bchw


def test_vector_to_1x1():
    assert to_bchw(torch.randn(3, 100)).shape == (3, 100, 1, 1)


def test_tokens_to_grid_keeps_values():
    x = torch.randn(2, 49, 768)
    y = to_bchw(x)
    assert y.shape == (2, 768, 7, 7)
    torch.testing.assert_close(y[1, :, 2, 3], x[1, 2 * 7 + 3])


def test_channels_last_swin_output():
    x = torch.randn(2, 7, 7, 768)
    assert guess_layout(x) == "bhwc"
    y = to_bchw(x)
    assert y.shape == (2, 768, 7, 7)
    torch.testing.assert_close(y[0, 5, 1, 2], x[0, 1, 2, 5])


def test_bchw_unchanged_and_explicit_override():
    x = torch.randn(2, 64, 8, 8)
    assert to_bchw(x) is x
    sq = torch.randn(2, 8, 8, 8)  # ambiguous: guessed bchw, explicit bhwc permutes
    assert to_bchw(sq) is sq
    assert to_bchw(sq, "bhwc").shape == (2, 8, 8, 8)


@pytest.mark.parametrize(
    ("shape", "layout", "match"),
    [
        ((2, 50, 768), None, r"N=50 is not a square"),
        ((2, 3, 4, 5, 6), None, r"5-D tensor of shape \(2, 3, 4, 5, 6\)"),
        ((2, 10), "tokens", r"expects \(B, N, C\), got shape \(2, 10\)"),
        ((2, 10, 1, 1), "vector", r"expects \(B, C\)"),
    ],
)
def test_unmappable_shapes_name_the_shape(shape, layout, match):
    with pytest.raises(ValueError, match=match):
        to_bchw(torch.randn(shape), layout)


def test_channels_last_grad_is_an_identity_with_a_channels_last_gradient():
    import torch.nn.functional as F

    from diffkd.method.layout import channels_last_grad

    x = torch.randn(2, 3, 4, 4).contiguous(memory_format=torch.channels_last).requires_grad_()
    y = channels_last_grad(x)
    torch.testing.assert_close(y, x)
    seen = []
    y.register_hook(lambda g: seen.append(g.is_contiguous()))  # what mse_loss hands back: contiguous NCHW
    F.mse_loss(y, torch.zeros_like(y)).backward()
    assert seen == [True]
    assert x.grad.is_contiguous(memory_format=torch.channels_last) and not x.grad.is_contiguous()
    torch.testing.assert_close(x.grad, 2 * x.detach() / x.numel())
    plain = torch.randn(2, 3, 4, 4)
    assert channels_last_grad(plain) is plain
