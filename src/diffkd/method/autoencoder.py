"""The linear teacher autoencoder that compresses (or widens) the teacher feature into the DiffKD latent."""

from __future__ import annotations

from torch import Tensor, nn

from diffkd.method.pointwise import Conv1x1

__all__ = ["AutoEncoder"]


class AutoEncoder(nn.Module):
    """encoder = Conv1×1(C_t → C) → BN; decoder = Conv1×1(C → C_t) (spec §B.4).

    Shapes: x (B, C_t, H, W) → (hidden (B, C, H, W), reconstruction (B, C_t, H, W)).
    """

    def __init__(self, channels: int, latent_channels: int) -> None:
        super().__init__()
        self.encoder = nn.Sequential(Conv1x1(channels, latent_channels), nn.BatchNorm2d(latent_channels))
        self.decoder = nn.Sequential(Conv1x1(latent_channels, channels))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        hidden = self.encoder(x)
        return hidden, self.decoder(hidden)
