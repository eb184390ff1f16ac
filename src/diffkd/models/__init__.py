"""Model registry and zoo. ``create_model(name, num_classes=...)`` builds any registered model.

Importing this package imports every model family, which registers its models (the registry itself imports none;
``import diffkd`` does not import the zoo: ``diffkd.create_model`` loads it on first use).
"""

from diffkd.models import (  # noqa: F401  (each family registers its models)
    cifar,
    demo_detection,
    demo_segmentation,
    detection,
    imagenet,
    mmdet,
    segmentation,
    small,
)
from diffkd.models.checkpoint import load_weights
from diffkd.models.registry import create_model, get_model_entry, list_models, register_model
from diffkd.models.teacher import create_teacher

__all__ = ["create_model", "create_teacher", "get_model_entry", "list_models", "load_weights", "register_model"]
