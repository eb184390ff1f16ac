"""diffkd — DiffKD (Knowledge Diffusion for Distillation) and its baselines, in PyTorch Lightning + Hydra.

The method core (``diffkd.method``) is plain PyTorch::

    from diffkd import DiffKD
"""

from diffkd.method import DIST, DKD, MSE, DiffKD, DiffKDOutput, KLDivergence, to_bchw
from diffkd.utils.precision import register_resolvers

# conf/trainer/default.yaml's precision is ${diffkd.auto_precision:...}: any config of ours resolves once diffkd is in
register_resolvers()

__version__ = "0.1.0"

__all__ = [
    "DIST",
    "DKD",
    "MSE",
    "DiffKD",
    "DiffKDOutput",
    "KLDivergence",
    "__version__",
    "create_model",
    "to_bchw",
]


def __getattr__(name: str):
    if name in ("create_model", "list_models"):  # lazy: the model zoo imports torchvision/timm
        from diffkd import models

        return getattr(models, name)
    raise AttributeError(f"module 'diffkd' has no attribute {name!r}")
