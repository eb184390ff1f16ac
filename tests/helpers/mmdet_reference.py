"""MMDetection 3.3 as the reference of the MMDetection-compatible detectors (``pip install -e .[mmdet-ref]``).

mmdet installs as pure Python (``mmdet==3.3.0``, ``mmengine``, ``mmcv-lite==2.1.0``); mmcv's compiled ops
(``mmcv._ext``) are absent, so :func:`import_mmdet` puts a stand-in module in their place (any call of a compiled op
raises) and supplies NMS and RoIAlign from torchvision's ops, which compute the same thing. Nothing of mmdet enters
``src/``: tests build MMDetection's own model from its own config, give it random weights and non-trivial BatchNorm
statistics, and compare it with ours after converting its state dict.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn


def mmdet_installed() -> bool:
    return all(importlib.util.find_spec(n) is not None for n in ("mmdet", "mmengine", "mmcv"))


needs_mmdet = pytest.mark.skipif(not mmdet_installed(), reason="needs the reference extra: pip install -e .[mmdet-ref]")


def _stand_in_ext() -> None:
    if "mmcv._ext" in sys.modules:
        return
    ext = types.ModuleType("mmcv._ext")

    def missing(name: str):
        def call(*args: Any, **kwargs: Any) -> Any:
            raise NotImplementedError(f"mmcv._ext.{name}: a compiled mmcv op (not installed; mmcv-lite)")

        return call

    def getattr_(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return missing(name)

    ext.__getattr__ = getattr_  # type: ignore[attr-defined]
    sys.modules["mmcv._ext"] = ext


def _torchvision_ops() -> None:
    import mmcv.ops
    import torchvision

    # the module, not the function: mmcv.ops re-exports its nms under the module's name, and batched_nms looks its
    # NMS up (eval('nms')) in the module's globals
    mmcv_nms = sys.modules["mmcv.ops.nms"]

    def nms(boxes, scores, iou_threshold, offset=0, score_threshold=0, max_num=-1):
        assert offset == 0, "mmcv's offset=1 boxes are not used by the configs compared here"
        keep = torchvision.ops.nms(boxes.float(), scores.float(), float(iou_threshold))
        if max_num > 0:
            keep = keep[:max_num]
        return torch.cat([boxes[keep], scores[keep][:, None]], dim=-1), keep

    class RoIAlign(nn.Module):
        def __init__(self, output_size, spatial_scale=1.0, sampling_ratio=0, pool_mode="avg", aligned=True, **_):
            super().__init__()
            assert pool_mode == "avg"
            size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
            self.output_size, self.spatial_scale = size, float(spatial_scale)  # mmcv's _pair: the extractor reads it
            self.sampling_ratio, self.aligned = int(sampling_ratio), bool(aligned)

        def forward(self, features, rois):
            return torchvision.ops.roi_align(
                features, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned
            )

    mmcv_nms.nms = nms
    mmcv.ops.nms = nms
    mmcv.ops.RoIAlign = RoIAlign


_READY = False


def import_mmdet() -> Any:
    """``mmdet`` with the stand-in ops, its modules registered."""
    global _READY
    if not _READY:
        _stand_in_ext()
        _torchvision_ops()
        import logging

        from mmdet.utils import register_all_modules

        register_all_modules()
        logging.getLogger("mmengine").setLevel(logging.WARNING)  # init_weights logs every tensor at INFO
        from mmengine.logging import MMLogger

        MMLogger.get_current_instance().setLevel(logging.WARNING)
        _READY = True
    import mmdet

    return mmdet


def config_path(name: str) -> Path:
    """The file of a config shipped with mmdet, e.g. ``"retinanet/retinanet_r50_fpn_2x_coco"``."""
    mmdet = import_mmdet()
    path = Path(mmdet.__file__).parent / ".mim" / "configs" / f"{name}.py"
    if not path.is_file():
        raise FileNotFoundError(path)
    return path


def build_mmdet_model(name: str, seed: int = 0) -> nn.Module:
    """MMDetection's model of config ``name``: its own code, random weights (seeded; no pretrained download),
    non-trivial BatchNorm statistics (running mean/var drawn per channel), in eval mode."""
    import_mmdet()
    from mmdet.registry import MODELS
    from mmengine.config import Config

    cfg = Config.fromfile(str(config_path(name)))
    cfg.model.backbone.init_cfg = None
    torch.manual_seed(seed)
    model = MODELS.build(cfg.model)
    model.init_weights()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
    return model.eval()


def mmdet_config(name: str) -> Any:
    import_mmdet()
    from mmengine.config import Config

    return Config.fromfile(str(config_path(name)))


def as_checkpoint(model: nn.Module) -> dict[str, Any]:
    """``model``'s weights as an MMDetection v3 checkpoint file holds them."""
    return {"state_dict": {k: v.clone() for k, v in model.state_dict().items()}, "meta": {"mmdet_version": "3.3.0"}}
