"""ImageNet classifiers: torchvision and timm models under registry names, plus ``tv:`` / ``timm:`` fallbacks.

Registered names (tag ``"imagenet"``) follow the official DiffKD code (spec §C.1) where it has a name; the
weights ``pretrained=True`` loads by default:

* torchvision: ``tv_resnet18``, ``tv_resnet34``, ``tv_resnet50``, ``tv_resnet101``, ``tv_mobilenet_v2`` —
  ``IMAGENET1K_V1`` (R34 73.31, R50 76.16: the paper's B1 teachers).
* timm ``mobilenetv1_100`` — ``ra4_e3600_r224_in1k``; ``mobilenetv2_100`` and ``efficientnet_b0`` — ``ra_in1k``.
* timm ``resnet50`` — ``a1_in1k`` ("ResNet strikes back" A1: the paper's B2 teacher "ResNet-50-SB, 80.1").
* timm ``swin_tiny_patch4_window7_224`` — ``ms_in1k``.
* timm ``swin_large_patch4_window7_224`` — ``ms_in22k_ft_in1k`` (ImageNet-22k pre-trained, fine-tuned on 1k:
  the paper's B3 teacher, 86.3).

Every entry point is ``fn(num_classes=1000, pretrained=False, weights=None, **kwargs)``: ``weights`` picks other
published weights (a torchvision enum member name such as ``"IMAGENET1K_V2"``, or a timm pretrained tag such as
``"a2_in1k"``) and is only read when ``pretrained=True``; ``**kwargs`` go to the torchvision builder or to
``timm.create_model`` (e.g. ``drop_path_rate=0.2``). With ``pretrained=True`` and ``num_classes != 1000`` the
classifier is re-initialised at the new width. The forward pass returns logits (B, num_classes).

Any other model: ``create_model("tv:<torchvision classification model>")`` or
``create_model("timm:<timm model name>[.<tag>]")`` builds it without a registered entry point.

Weights download on first use: torchvision's into ``torch.hub.get_dir()/checkpoints`` (``$TORCH_HOME``), timm's
from the Hugging Face Hub into its cache (``$HF_HOME``). Offline, a failed download raises
:class:`WeightsDownloadError` naming the weights, where they come from and where to put them.

Distillation points (spec §C.1; :data:`DISTILL_POINTS`): the last feature map before global pooling and the logits
module, by module path for ``register_forward_hook``. Shapes are at 224² input; CNN feature maps are
(B, C, 7, 7) post-activation, Swin ``norm`` is channels-last (B, 7, 7, C) in timm ≥ 0.9 (the official code
assumed (B, 49, C), spec §F.2 item 5).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from diffkd.models.registry import register_model_prefix
from diffkd.models.variants import entry_point

__all__ = [
    "DISTILL_POINTS",
    "DistillPoints",
    "WeightsDownloadError",
    "build_timm",
    "build_torchvision",
]

_IMAGENET_CLASSES = 1000


class WeightsDownloadError(OSError):
    """Pretrained weights could not be fetched (usually: no network on first use)."""


@dataclass(frozen=True)
class DistillPoints:
    """Where to hook a model for distillation (the official ``KD_MODULES`` pair, spec §C.1).

    Attributes:
        feature: module path of the last feature map before global pooling.
        feature_shape: that module's output shape at 224² input, without the batch dimension.
        layout: ``"BCHW"`` or ``"BHWC"`` (channels-last: Swin ``norm`` in current timm).
        logits: module path whose output is the logits (B, num_classes).
    """

    feature: str
    feature_shape: tuple[int, int, int]
    layout: Literal["BCHW", "BHWC"]
    logits: str

    @property
    def channels(self) -> int:
        """Feature channels C."""
        return self.feature_shape[0] if self.layout == "BCHW" else self.feature_shape[-1]


DISTILL_POINTS: dict[str, DistillPoints] = {
    "tv_resnet18": DistillPoints("layer4", (512, 7, 7), "BCHW", "fc"),
    "tv_resnet34": DistillPoints("layer4", (512, 7, 7), "BCHW", "fc"),
    "tv_resnet50": DistillPoints("layer4", (2048, 7, 7), "BCHW", "fc"),
    "tv_resnet101": DistillPoints("layer4", (2048, 7, 7), "BCHW", "fc"),
    "tv_mobilenet_v2": DistillPoints("features.18", (1280, 7, 7), "BCHW", "classifier"),
    # timm MobileNetV1 has no head conv: conv_head/bn2 are Identity, `blocks` ends in BN+ReLU6.
    "mobilenetv1_100": DistillPoints("blocks", (1024, 7, 7), "BCHW", "classifier"),
    # timm EfficientNet-family: `conv_head` is pre-BN; `bn2` (BatchNormAct2d) is post-activation.
    "mobilenetv2_100": DistillPoints("bn2", (1280, 7, 7), "BCHW", "classifier"),
    "efficientnet_b0": DistillPoints("bn2", (1280, 7, 7), "BCHW", "classifier"),
    "resnet50": DistillPoints("layer4", (2048, 7, 7), "BCHW", "fc"),
    "swin_tiny_patch4_window7_224": DistillPoints("norm", (7, 7, 768), "BHWC", "head"),
    "swin_large_patch4_window7_224": DistillPoints("norm", (7, 7, 1536), "BHWC", "head"),
}
"""Registry name → distillation points (feature module, shape at 224², layout, logits module)."""


# --------------------------------------------------------------------------------------------- torchvision


def _torchvision_names() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def _replace_last_linear(model: nn.Module, num_classes: int) -> None:
    """Swap the last ``nn.Linear`` of ``model`` (its classifier) for a fresh one with ``num_classes`` outputs."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    if last is None:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier to resize to {num_classes}")
    old = model.get_submodule(last)
    parent_name, _, attr = last.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, nn.Linear(old.in_features, num_classes, bias=old.bias is not None))


def build_torchvision(
    arch: str,
    num_classes: int = _IMAGENET_CLASSES,
    pretrained: bool = False,
    weights: str | None = None,
    *,
    default_weights: str = "DEFAULT",
    label: str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build the torchvision classification model ``arch`` (``torchvision.models.get_model``).

    Args:
        arch: a torchvision classification model name (``torchvision.models.list_models(torchvision.models)``).
        num_classes: classifier width; with ``pretrained`` and a width other than the weights' 1000 the last
            ``nn.Linear`` is replaced by a freshly initialised one.
        pretrained: load published weights (download on first use into ``torch.hub.get_dir()``).
        weights: member name of the model's weights enum (``"IMAGENET1K_V1"``, ``"IMAGENET1K_V2"``,
            ``"DEFAULT"``); ``None`` uses ``default_weights``. Read only when ``pretrained``.
        default_weights: the weights ``pretrained=True`` loads when ``weights`` is ``None``.
        label: the name shown in error messages (default ``"tv:<arch>"``).
        **kwargs: passed to the torchvision builder.

    Returns:
        the model; ``forward(x: (B, 3, H, W)) -> (B, num_classes)`` logits.
    """
    import torchvision

    label = label or f"tv:{arch}"
    if arch not in _torchvision_names():
        raise KeyError(f"{arch!r} is not a torchvision classification model ({label})")
    if not pretrained:
        return torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)

    enum = torchvision.models.get_model_weights(arch)
    choice = weights or default_weights
    try:
        w = enum.verify(choice)
    except (KeyError, ValueError) as e:
        names = ", ".join(["DEFAULT", *(m.name for m in enum)])
        raise ValueError(f"unknown weights {choice!r} for {label}; {enum.__name__} has: {names}") from e
    try:
        model = torchvision.models.get_model(arch, weights=w, **kwargs)
    except OSError as e:
        import torch

        raise WeightsDownloadError(
            f"could not load the pretrained weights {w} for {label} from {w.url}: {str(e).rstrip('.')}. "
            f"torchvision weights download on first use into {torch.hub.get_dir()}/checkpoints "
            "(set $TORCH_HOME to move it) and need network access once; run once where there is a network, "
            f"or copy {w.url.rsplit('/', 1)[-1]} into that folder."
        ) from e
    if num_classes != len(w.meta["categories"]):
        _replace_last_linear(model, num_classes)
    return model


# --------------------------------------------------------------------------------------------------- timm


def build_timm(
    arch: str,
    num_classes: int = _IMAGENET_CLASSES,
    pretrained: bool = False,
    weights: str | None = None,
    *,
    label: str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build ``timm.create_model(arch[.weights], pretrained=..., num_classes=..., **kwargs)``.

    Args:
        arch: a timm model name, optionally with a pretrained tag (``"resnet50.a1_in1k"``), or an
            ``hf-hub:`` / ``local-dir:`` name that timm understands.
        num_classes: classifier width (timm re-initialises the classifier when it differs from the weights').
        pretrained: load published weights (download on first use from the Hugging Face Hub).
        weights: a pretrained tag appended to ``arch`` (``"a1_in1k"``); read only when ``pretrained``.
        label: the name shown in error messages (default ``"timm:<arch>"``).
        **kwargs: passed to ``timm.create_model`` (``drop_path_rate``, ``img_size``,
            ``pretrained_cfg_overlay=dict(file="/path/model.safetensors")`` to load a local file, ...).

    Returns:
        the model; ``forward(x: (B, 3, H, W)) -> (B, num_classes)`` logits.
    """
    import timm

    label = label or f"timm:{arch}"
    name = arch
    if pretrained and weights:
        if "." in arch.rpartition("/")[-1] or ":" in arch:
            raise ValueError(f"{label}: give the pretrained tag either in the name or as weights={weights!r}")
        name = f"{arch}.{weights}"
    if pretrained and ":" not in name:
        try:
            cfg = timm.models.get_pretrained_cfg(name)
        except RuntimeError:  # "Invalid pretrained tag"
            cfg = None
        if cfg is None:
            base = name.partition(".")[0]
            tags = ", ".join(timm.list_pretrained(f"{base}.*")) or "none"
            raise ValueError(f"timm has no pretrained weights {name!r} ({label}); available: {tags}")
        source = f"https://huggingface.co/{cfg.hf_hub_id}" if cfg.hf_hub_id else (cfg.url or "?")
        weights_name = f"{cfg.architecture}.{cfg.tag}" if cfg.tag else name
    else:
        source, weights_name = name, name
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except OSError as e:
        raise WeightsDownloadError(
            f"could not load the pretrained weights {weights_name} for {label} from {source}: {str(e).rstrip('.')}. "
            "timm weights download on first use into the Hugging Face cache ($HF_HOME, default "
            "~/.cache/huggingface) and need network access once; run once where there is a network, or pass "
            "pretrained_cfg_overlay=dict(file='/path/to/model.safetensors'). HF_HUB_OFFLINE=1 fails fast "
            "instead of retrying."
        ) from e


# ------------------------------------------------------------------------------------------------ prefixes


def _resolve_tv(arch: str):
    if arch not in _torchvision_names():
        raise KeyError(
            f"{arch!r} is not a torchvision classification model; see torchvision.models.list_models("
            "module=torchvision.models)"
        )

    def fn(num_classes: int = _IMAGENET_CLASSES, pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return build_torchvision(arch, num_classes, pretrained, label=f"tv:{arch}", **kwargs)

    fn.__doc__ = f"torchvision ``{arch}`` (generic ``tv:`` entry)."
    return fn


def _resolve_timm(arch: str):
    import timm

    if not (arch.startswith(("hf-hub:", "local-dir:")) or timm.is_model(arch)):
        raise KeyError(f"{arch!r} is not a timm model; see timm.list_models()")

    def fn(num_classes: int = _IMAGENET_CLASSES, pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return build_timm(arch, num_classes, pretrained, label=f"timm:{arch}", **kwargs)

    fn.__doc__ = f"timm ``{arch}`` (generic ``timm:`` entry)."
    return fn


register_model_prefix("tv", _resolve_tv)
register_model_prefix("timm", _resolve_timm)


# ---------------------------------------------------------------------------------- torchvision entries

_TAGS_TV = ("imagenet", "torchvision")
_TAGS_TIMM = ("imagenet", "timm")
Entry = Callable[..., nn.Module]


def _tv(arch: str, default_weights: str = "IMAGENET1K_V1") -> Callable[[Callable[[], object]], Entry]:
    """Turn a docstring-only stub into the entry point of torchvision's ``arch`` (see :mod:`diffkd.models.variants`):
    ``fn(num_classes=1000, pretrained=False, weights=None, **kwargs) -> nn.Module``."""

    def make(stub: Callable[[], object]) -> Entry:
        name = stub.__name__

        def entry(
            num_classes: int = _IMAGENET_CLASSES, pretrained: bool = False, weights: str | None = None, **kwargs: Any
        ) -> nn.Module:
            return build_torchvision(
                arch, num_classes, pretrained, weights, default_weights=default_weights, label=name, **kwargs
            )

        return entry_point(entry, stub, _TAGS_TV)

    return make


def _timm(default_tag: str) -> Callable[[Callable[[], object]], Entry]:
    """Turn a docstring-only stub named after a timm model into its entry point, pretrained tag ``default_tag``
    unless ``weights`` names another: ``fn(num_classes=1000, pretrained=False, weights=None, **kwargs)``."""

    def make(stub: Callable[[], object]) -> Entry:
        arch = stub.__name__

        def entry(
            num_classes: int = _IMAGENET_CLASSES, pretrained: bool = False, weights: str | None = None, **kwargs: Any
        ) -> nn.Module:
            return build_timm(arch, num_classes, pretrained, weights or default_tag, label=arch, **kwargs)

        return entry_point(entry, stub, _TAGS_TIMM)

    return make


# ---------------------------------------------------------------------------------- torchvision entries


@_tv("resnet18")
def tv_resnet18() -> None:
    """torchvision ResNet-18 (11.7M params); pretrained ``IMAGENET1K_V1`` (69.76): the paper's B1 student.

    Feature point ``layer4`` → (B, 512, 7, 7) post-ReLU at 224²; logits ``fc`` → (B, num_classes).
    """


@_tv("resnet34")
def tv_resnet34() -> None:
    """torchvision ResNet-34 (21.8M params); pretrained ``IMAGENET1K_V1`` (73.31): the paper's B1 teacher.

    Feature point ``layer4`` → (B, 512, 7, 7) post-ReLU at 224²; logits ``fc`` → (B, num_classes).
    """


@_tv("resnet50")
def tv_resnet50() -> None:
    """torchvision ResNet-50 (25.6M params); pretrained ``IMAGENET1K_V1`` (76.16): the paper's B1 teacher.

    ``weights="IMAGENET1K_V2"`` gives torchvision's newer 80.86 recipe instead.
    Feature point ``layer4`` → (B, 2048, 7, 7) post-ReLU at 224²; logits ``fc`` → (B, num_classes).
    """


@_tv("resnet101")
def tv_resnet101() -> None:
    """torchvision ResNet-101 (44.5M params); pretrained ``IMAGENET1K_V1`` (77.37).

    Feature point ``layer4`` → (B, 2048, 7, 7) post-ReLU at 224²; logits ``fc`` → (B, num_classes).
    """


@_tv("mobilenet_v2")
def tv_mobilenet_v2() -> None:
    """torchvision MobileNetV2 (3.5M params); pretrained ``IMAGENET1K_V1`` (71.88).

    Feature point ``features.18`` (last Conv-BN-ReLU6) → (B, 1280, 7, 7) at 224²; logits ``classifier``
    (Dropout + Linear) → (B, num_classes).
    """


# ----------------------------------------------------------------------------------------- timm entries


@_timm("ra4_e3600_r224_in1k")
def mobilenetv1_100() -> None:
    """timm MobileNetV1 ×1.0 (4.2M params); pretrained tag ``ra4_e3600_r224_in1k``: the paper's MBV1 student.

    Feature point ``blocks`` (last depthwise-separable block, ends in BN+ReLU6) → (B, 1024, 7, 7) at 224²;
    ``conv_head``/``bn2`` are ``Identity`` here. Logits ``classifier`` → (B, num_classes).
    """


@_timm("ra_in1k")
def mobilenetv2_100() -> None:
    """timm MobileNetV2 ×1.0 (3.5M params); pretrained tag ``ra_in1k``: the paper's B2 MobileNetV2 student.

    Feature point ``bn2`` (BatchNormAct2d after ``conv_head``, post-ReLU6) → (B, 1280, 7, 7) at 224²
    (``conv_head`` alone is pre-BN). Logits ``classifier`` → (B, num_classes).
    """


@_timm("ra_in1k")
def efficientnet_b0() -> None:
    """timm EfficientNet-B0 (5.3M params); pretrained tag ``ra_in1k``: the paper's B2 EfficientNet-B0 student.

    Feature point ``bn2`` (BatchNormAct2d after ``conv_head``, post-SiLU) → (B, 1280, 7, 7) at 224²
    (the official code hooks ``conv_head``, which is pre-BN). Logits ``classifier`` → (B, num_classes).
    """


@_timm("a1_in1k")
def resnet50() -> None:
    """timm ResNet-50 (25.6M params); pretrained tag ``a1_in1k``: the paper's B2 teacher "ResNet-50-SB (80.1)".

    ``a1_in1k`` is the "ResNet strikes back" A1 recipe (timm evaluates it at crop_pct 0.95 bicubic; at the
    official 224/0.875 bilinear pipeline it scores lower, presumably the paper's 80.1). As a B3 student it
    is trained from scratch. Feature point ``layer4`` → (B, 2048, 7, 7) post-ReLU at 224²; logits ``fc``.
    """


@_timm("ms_in1k")
def swin_tiny_patch4_window7_224() -> None:
    """timm Swin-T (28.3M params); pretrained tag ``ms_in1k`` (81.2): the paper's B3 student.

    Input must be 224² (window 7; ``img_size=`` changes it). Feature point ``norm`` → channels-last
    (B, 7, 7, 768) at 224² — permute to (B, 768, 7, 7) before a conv. Logits ``head`` → (B, num_classes).
    """


@_timm("ms_in22k_ft_in1k")
def swin_large_patch4_window7_224() -> None:
    """timm Swin-L (196.5M params); pretrained tag ``ms_in22k_ft_in1k`` (86.3): the paper's B3 teacher.

    ImageNet-22k pre-trained, fine-tuned on 1k. Input must be 224². Feature point ``norm`` → channels-last
    (B, 7, 7, 1536) at 224². Logits ``head`` → (B, num_classes).
    """
