"""The DiffKD method in plain PyTorch: no Lightning, no Hydra, no data."""

from diffkd.method.autoencoder import AutoEncoder
from diffkd.method.compat import convert_official_state_dict, split_official_checkpoint
from diffkd.method.denoiser import Bottleneck, DiffusionModel
from diffkd.method.distances import DIST, DKD, MSE, KLDivergence, mask_like
from diffkd.method.head import DiffKD, DiffKDOutput
from diffkd.method.layout import guess_layout, to_bchw
from diffkd.method.noise_adapter import NoiseAdapter
from diffkd.method.schedule import BETA_SCHEDULES, DDIMSchedule, DDIMStep, make_betas

__all__ = [
    "BETA_SCHEDULES",
    "DIST",
    "DKD",
    "MSE",
    "AutoEncoder",
    "Bottleneck",
    "DDIMSchedule",
    "DDIMStep",
    "DiffKD",
    "DiffKDOutput",
    "DiffusionModel",
    "KLDivergence",
    "NoiseAdapter",
    "convert_official_state_dict",
    "guess_layout",
    "make_betas",
    "mask_like",
    "split_official_checkpoint",
    "to_bchw",
]
