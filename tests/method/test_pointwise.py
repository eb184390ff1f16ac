"""``Conv1x1`` is an ``nn.Conv2d(…, 1)`` in all but speed."""

import pytest
import torch
from torch import nn

from diffkd.method.pointwise import Conv1x1


@pytest.mark.parametrize(
    ("shape", "memory_format"),
    [
        ((5, 12, 1, 1), torch.contiguous_format),  # logits point: a matrix product
        ((5, 12, 6, 7), torch.channels_last),  # channels_last map: a matrix product over (B, H, W, C)
        ((5, 12, 6, 7), torch.contiguous_format),  # NCHW map: the ordinary convolution
    ],
)
def test_same_function_and_gradients_as_conv2d(shape, memory_format):
    torch.manual_seed(0)
    ours = Conv1x1(12, 8)
    torch.manual_seed(0)
    ref = nn.Conv2d(12, 8, 1)
    torch.testing.assert_close(ours.weight, ref.weight)  # same initialisation from the same seed
    assert ours.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(shape).contiguous(memory_format=memory_format)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), ref(xb)
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-6)
    assert ya.shape == yb.shape
    if memory_format == torch.channels_last:
        assert ya.is_contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.bias.grad, ref.bias.grad, rtol=1e-5, atol=1e-5)


def test_is_a_conv2d_for_everything_that_inspects_modules():
    m = Conv1x1(4, 4, bias=False)
    assert isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.bias is None
    assert m(torch.randn(2, 4, 1, 1)).shape == (2, 4, 1, 1)
