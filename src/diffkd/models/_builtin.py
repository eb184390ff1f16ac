"""Imports every model family so that their ``@register_model`` entry points run."""

from diffkd.models import cifar, detection, imagenet, segmentation, small  # noqa: F401
