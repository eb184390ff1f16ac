"""Adaptive noise matching (ANM): predicts γ, the share of the student latent in the initial noisy state."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from diffkd.method.denoiser import Bottleneck
from diffkd.method.layout import channels_last_grad
from diffkd.method.pointwise import Conv1x1

__all__ = ["NoiseAdapter"]


class NoiseAdapter(nn.Module):
    """γ = softmax(Linear(feat(S)))[:, 0] ∈ (0, 1), one value per sample (spec §B.3, paper Fig. 3).

    - ``kernel_size=3``: feat = Bottleneck(C, reduction 8) → global average pool.
    - otherwise (logits, H = W = 1): feat = Conv(C, 2C) → BN → ReLU → Conv(2C, C) → BN (no pooling).

    Shapes: x (B, C, H, W) → γ (B,) float32.
    """

    def __init__(self, channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        if kernel_size == 3:
            self.feat = nn.Sequential(Bottleneck(channels, reduction=8), nn.AdaptiveAvgPool2d(1))
        else:
            self.feat = nn.Sequential(
                Conv1x1(channels, channels * 2),
                nn.BatchNorm2d(channels * 2),
                nn.ReLU(inplace=True),
                Conv1x1(channels * 2, channels),
                nn.BatchNorm2d(channels),
            )
        self.pred = nn.Linear(channels, 2)

    def forward(self, x: Tensor) -> Tensor:
        if self.kernel_size == 3:  # Bottleneck → pool; the pool's gradient comes back NCHW
            h = self.feat[1](channels_last_grad(self.feat[0](x)))
        else:
            h = self.feat(x)
        if h.shape[-2:] != (1, 1):
            raise ValueError(
                f"the logits NoiseAdapter (kernel_size={self.kernel_size}) needs 1×1 inputs, got {tuple(x.shape)};"
                " use kernel_size=3 for feature maps"
            )
        return torch.softmax(self.pred(h.flatten(1)).float(), dim=1)[:, 0]
