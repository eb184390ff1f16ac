"""``Conv1x1``: a 1×1 ``nn.Conv2d`` that runs as a matrix product where that is cheaper."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from diffkd.method.layout import is_channels_last

__all__ = ["Conv1x1"]


class Conv1x1(nn.Conv2d):
    """``nn.Conv2d(in_channels, out_channels, 1)`` — same parameters, state-dict keys and initialisation.

    The forward is a matrix product over the channels where the memory layout allows it without copies:
    (B, C, 1, 1) inputs (the logits point) become (B, C) and channels_last inputs (B, H, W, C) in memory; other
    inputs take the ordinary convolution. On the CPU a 1×1 convolution over a 1×1 map costs ≈0.2 ms forward and
    ≈0.5 ms backward in oneDNN against tens of microseconds as ``F.linear``; over a channels_last 8×8 map the
    product is ≈25 % faster too.

    Shapes: (B, C_in, H, W) → (B, C_out, H, W).
    """

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, 1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            return super().forward(x)
        b, _, h, w = x.shape
        weight = self.weight.view(self.out_channels, self.in_channels)
        if h == 1 and w == 1:
            return F.linear(x.reshape(b, -1), weight, self.bias).view(b, -1, 1, 1)
        if is_channels_last(x):
            return F.linear(x.permute(0, 2, 3, 1), weight, self.bias).permute(0, 3, 1, 2)
        return super().forward(x)
