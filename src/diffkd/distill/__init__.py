"""Where a teacher meets a student, for any task: feature taps and the distillers that turn them into losses."""

from diffkd.distill.distillers import Distiller, DistillOutput, PointSpec
from diffkd.distill.taps import AUTO_FEATURE, FeatureTaps, find_last_feature_map, probe_shapes

__all__ = [
    "AUTO_FEATURE",
    "DistillOutput",
    "Distiller",
    "FeatureTaps",
    "PointSpec",
    "find_last_feature_map",
    "probe_shapes",
]
