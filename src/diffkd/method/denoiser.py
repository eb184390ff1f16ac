"""Φθ, the light diffusion model that predicts the noise ε of a latent feature (spec §B.1–B.2).

Module and attribute names (``time_embedding``, ``pred``, ``block``) match the official code so that its
state_dicts load unchanged.
"""

from __future__ import annotations

from torch import Tensor, nn

from diffkd.method.pointwise import Conv1x1

__all__ = ["Bottleneck", "DiffusionModel"]


class Bottleneck(nn.Module):
    """Residual bottleneck: 1×1 → 3×3 → 1×1 convs with BN, identity shortcut and no ReLU after the sum.

    Unlike torchvision's Bottleneck the convs have biases and there is no post-add ReLU (official layout).

    Args:
        in_channels: C; the output has C channels too (identity residual).
        reduction: the hidden width is C // reduction.

    Shapes: (B, C, H, W) → (B, C, H, W).
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, reduction: int = 4) -> None:
        super().__init__()
        out_channels = out_channels or in_channels
        if out_channels != in_channels:
            raise ValueError("Bottleneck has an identity residual: out_channels must equal in_channels")
        hidden = in_channels // reduction
        if hidden < 1:
            raise ValueError(f"in_channels={in_channels} is smaller than reduction={reduction}")
        self.block = nn.Sequential(
            Conv1x1(in_channels, hidden),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            Conv1x1(hidden, out_channels),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x) + x


def _logits_mlp(channels: int, layers: int) -> nn.Sequential:
    c, h = channels, 4 * channels
    if layers == 4:  # official code: two 1×1 "MLP" blocks, four linear layers, no residual
        return nn.Sequential(
            Conv1x1(c, h),
            nn.BatchNorm2d(h),
            nn.ReLU(inplace=True),
            Conv1x1(h, c),
            nn.BatchNorm2d(c),
            Conv1x1(c, h),
            nn.BatchNorm2d(h),
            nn.ReLU(inplace=True),
            Conv1x1(h, c),
        )
    if layers == 2:  # paper App. B.2: "two linear layers associated with an activation function"
        return nn.Sequential(Conv1x1(c, h), nn.BatchNorm2d(h), nn.ReLU(inplace=True), Conv1x1(h, c))
    raise ValueError(f"logits_denoiser_layers must be 4 (official) or 2 (paper), got {layers}")


class DiffusionModel(nn.Module):
    """Noise predictor ε̂ = Φθ(x_t, t).

    A learned timestep embedding (``nn.Embedding(1280, C)``, rows ≥ T unused, as in the official code) is added
    to the input as a per-channel bias, then:

    - ``kernel_size=3`` (feature maps): Bottleneck → Bottleneck → Conv1×1 → BN.
    - otherwise (logits, H = W = 1): the 1×1 MLP, 4 layers (official) or 2 (paper).

    Args:
        channels: C, the latent width.
        kernel_size: 3 for feature maps, 1 for logits.
        logits_layers: depth of the logits MLP (4 or 2); ignored for ``kernel_size=3``.

    Shapes: x (B, C, H, W); t an ``int`` (one timestep for the batch) or an int64 tensor (B,); out (B, C, H, W).
    """

    def __init__(self, channels: int, kernel_size: int = 3, logits_layers: int = 4) -> None:
        super().__init__()
        self.time_embedding = nn.Embedding(1280, channels)
        if kernel_size == 3:
            self.pred = nn.Sequential(
                Bottleneck(channels),
                Bottleneck(channels),
                Conv1x1(channels, channels),
                nn.BatchNorm2d(channels),
            )
        else:
            self.pred = _logits_mlp(channels, logits_layers)

    def forward(self, x: Tensor, t: int | Tensor) -> Tensor:
        if isinstance(t, int):
            emb = self.time_embedding.weight[t][None, :, None, None]  # a view: no host sync, no H2D copy
        else:
            emb = self.time_embedding(t)[..., None, None]
        return self.pred(x + emb.to(x.dtype))
