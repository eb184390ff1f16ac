"""MMDetection's detectors, built from torchvision's detection classes and loaded from MMDetection's model zoo.

The paper's COCO teachers and students (Tables 4 and 5) are MMDetection model-zoo checkpoints; these models compute
what MMDetection computes (backbone style, normalisation, FPN extra levels, anchors, box coders, RoIAlign, heads,
assigners, samplers, losses, test settings), so that a zoo file loads key for key and a student trains as
MMDetection trains it. :mod:`diffkd.models.mmdet.common` holds the shared parts; one module per family registers
its models (``mmdet_<family>_<backbone>_fpn``).
"""

from diffkd.models.mmdet import faster_rcnn, fcos, retinanet  # noqa: F401  (register the models)
from diffkd.models.mmdet.common import EvalBatchNorm2d, MMDetAnchorGenerator, MMDetTransform, MMDetWeightsError

__all__ = ["EvalBatchNorm2d", "MMDetAnchorGenerator", "MMDetTransform", "MMDetWeightsError"]
