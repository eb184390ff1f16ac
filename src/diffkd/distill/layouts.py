"""The layout of a tapped tensor, from what the model declares rather than from its shape.

For a 4-D tap the module that produced it (then its ancestors, nearest first) is asked, and the first answer wins:

1. a layer that only exists in NCHW (``nn.Conv2d``, ``nn.BatchNorm2d``, 2-D pooling, ...) → ``bchw``;
2. timm's declaration ``output_fmt`` (``"NHWC"`` → ``bhwc``, ``"NCHW"`` → ``bchw``), as its Swin models set;
3. the library it comes from: torchvision is NCHW except its Swin family (NHWC); timm without ``output_fmt``
   is NCHW; diffkd's own zoo is NCHW.

Only when nothing declares a layout is the shape read, and a shape that fits both readings — (B, 64, 64, 128) is
a 64-channel 64×128 map *or* a 64×64 map of 128 channels — is an error naming the setting that decides it,
never a silent permute.
"""

from __future__ import annotations

from torch import Tensor, nn

from diffkd.method.layout import Layout

__all__ = ["declared_layout", "resolve_layout"]

_NCHW_LAYERS = (
    nn.Conv2d,
    nn.ConvTranspose2d,
    nn.BatchNorm2d,
    nn.SyncBatchNorm,
    nn.InstanceNorm2d,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.Dropout2d,
    nn.Upsample,
    nn.PixelShuffle,
)
_FORMATS: dict[str, Layout] = {"NHWC": "bhwc", "NCHW": "bchw"}


def _chain(model: nn.Module, path: str) -> list[nn.Module]:
    """The tapped module and its ancestors, nearest first, ending with ``model``."""
    parts = path.split(".") if path else []
    chain = [model]
    for i in range(len(parts)):
        chain.append(model.get_submodule(".".join(parts[: i + 1])))
    return chain[::-1]


def _library_layout(module: nn.Module) -> Layout | None:
    origin = type(module).__module__
    if origin.startswith("torchvision.models.swin_transformer"):
        return "bhwc"
    if origin.startswith(("torchvision.", "timm.", "diffkd.")):
        return "bchw"
    return None


def declared_layout(model: nn.Module, path: str) -> Layout | None:
    """What ``model`` declares for the 4-D output of module ``path`` ('' = the model), or ``None``."""
    for module in _chain(model, path):
        if isinstance(module, _NCHW_LAYERS):
            return "bchw"
        fmt = getattr(module, "output_fmt", None)
        if fmt is not None:
            key = getattr(fmt, "value", fmt)  # timm's Format enum or a plain string
            if str(key).upper() in _FORMATS:
                return _FORMATS[str(key).upper()]
        library = _library_layout(module)
        if library is not None:
            return library
    return None


def resolve_layout(
    model: nn.Module, path: str, value: Tensor, explicit: Layout | None, role: str, point: str, key: str
) -> tuple[Layout, str]:
    """``(layout, source)`` of a tapped tensor; ``source`` says where it came from (``config``, ``declared``,
    ``shape``) for ``describe()``.

    Args:
        model, path: the tapped model and module path.
        value: the tapped tensor of the dry run.
        explicit: the point's ``student_layout``/``teacher_layout``.
        role, point, key: for the error message (``student``, the point name, ``student_layout``).
    """
    if explicit is not None:
        return explicit, "config"
    if value.dim() == 2:
        return "vector", "shape"
    if value.dim() == 3:
        return "tokens", "shape"
    if value.dim() != 4:
        raise ValueError(
            f"point {point!r}: the {role} tap {path!r} is a {value.dim()}-D tensor of shape {tuple(value.shape)}; "
            "tap a (B, C), (B, N, C) or 4-D map"
        )
    declared = declared_layout(model, path)
    if declared is not None:
        return declared, "declared"
    _, d1, d2, d3 = value.shape
    if d1 == d2 and d3 != d1:
        raise ValueError(
            f"point {point!r}: the {role} tap {path!r} has shape {tuple(value.shape)}, which reads as "
            f"(B, C={d1}, H={d2}, W={d3}) or as channels-last (B, H={d1}, W={d2}, C={d3}), and "
            f"{type(model).__name__} does not declare its layout (timm's output_fmt). Set "
            f"++distill.points.{point}.{key}=bchw (or bhwc)"
        )
    return "bchw", "shape"
