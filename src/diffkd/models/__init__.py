"""Model registry and zoo. ``create_model(name, num_classes=...)`` builds any registered model."""

from diffkd.models.registry import create_model, get_model_entry, list_models, register_model

__all__ = ["create_model", "get_model_entry", "list_models", "register_model"]
