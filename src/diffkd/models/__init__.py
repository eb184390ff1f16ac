"""Model registry and zoo. ``create_model(name, num_classes=...)`` builds any registered model."""

from diffkd.models.checkpoint import load_weights
from diffkd.models.registry import create_model, get_model_entry, list_models, register_model
from diffkd.models.teacher import create_teacher

__all__ = ["create_model", "create_teacher", "get_model_entry", "list_models", "load_weights", "register_model"]
