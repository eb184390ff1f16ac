"""Where a teacher meets a student, for any task: feature taps, the head and distance registries, and the
distiller that turns tapped pairs into named loss terms.

The registries import none of their heads and distances: each plugin registers itself when imported, and this
package imports them all — the built-in ones (``builtins``) and every file of ``losses/`` (one per further method) —
so whatever reads a registry through ``diffkd.distill`` sees every name.
"""

from diffkd.distill import builtins, losses  # noqa: F401  (register the heads and distances)
from diffkd.distill.distillers import Distiller, DistillOutput, PointInfo, PointSpec
from diffkd.distill.registry import (
    HeadOutput,
    build_distance,
    get_distance,
    get_head,
    list_distances,
    list_heads,
    register_distance,
    register_head,
)
from diffkd.distill.taps import (
    AUTO_FEATURE,
    DryRun,
    FeatureTaps,
    TapAddress,
    dry_run,
    find_last_feature_map,
    probe_shapes,
)

__all__ = [
    "AUTO_FEATURE",
    "DistillOutput",
    "Distiller",
    "DryRun",
    "FeatureTaps",
    "HeadOutput",
    "PointInfo",
    "PointSpec",
    "TapAddress",
    "build_distance",
    "dry_run",
    "find_last_feature_map",
    "get_distance",
    "get_head",
    "list_distances",
    "list_heads",
    "probe_shapes",
    "register_distance",
    "register_head",
]
