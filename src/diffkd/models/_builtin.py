"""Imports every model family so that their ``@register_model`` entry points run."""

from diffkd.models import cifar, demo_detection, demo_segmentation, detection, imagenet, mmdet, segmentation, small  # noqa: F401
