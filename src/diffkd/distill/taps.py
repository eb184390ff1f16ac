"""Feature taps: forward hooks that keep a model's intermediate outputs by module path.

Paths are ``named_modules()`` names (``"layer4"``, ``"features.18"``, ``"backbone.fpn"``); the empty path ``""``
means the model's own output. ``"@feature"`` is resolved once, by a dry-run forward, to the model's last
spatial feature map (the module whose output the global pooling consumes). Hooks keep references only: no copies.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["AUTO_FEATURE", "FeatureTaps", "find_last_feature_map", "module_path_error", "probe_shapes"]

AUTO_FEATURE = "@feature"
OUTPUT = ""


def module_path_error(model: nn.Module, path: str, role: str = "model") -> KeyError:
    """A ``KeyError`` for an unknown module path, listing the nearest real names."""
    names = [n for n, _ in model.named_modules() if n]
    near = difflib.get_close_matches(path, names, n=6, cutoff=0.3)
    if not near:  # fall back to names sharing the last component, then to the top-level children
        last = path.rsplit(".", 1)[-1]
        near = [n for n in names if n.rsplit(".", 1)[-1] == last][:6] or [n for n, _ in model.named_children()][:8]
    return KeyError(
        f"{role} {type(model).__name__} has no module {path!r}. Nearest module names: {', '.join(near)}. "
        f"Use '' for the model output or '{AUTO_FEATURE}' for its last feature map."
    )


def _first_tensor(output: Any) -> Any:
    # Some blocks return (out, extra) tuples (e.g. RepDistiller's `is_last` blocks): the first element is the feature.
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    return output


def _is_spatial(x: Any) -> bool:
    if not isinstance(x, Tensor) or x.dim() not in (3, 4):
        return False
    if x.dim() == 4:
        _, d1, d2, d3 = x.shape
        spatial = (d1 * d2) if (d1 == d2 and d3 != d1) else (d2 * d3)  # bhwc vs bchw
        return spatial > 1
    return x.shape[1] > 1  # tokens (B, N, C)


@torch.no_grad()
def _dry_run(model: nn.Module, example: Tensor, hook_paths: Iterable[str] | None) -> tuple[Any, list[tuple[str, Any]]]:
    """Run ``model(example)`` in eval mode (no BatchNorm statistics change), recording module outputs in
    completion order. Returns (model output, [(path, output), ...])."""
    records: list[tuple[str, Any]] = []
    handles: list[RemovableHandle] = []
    wanted = None if hook_paths is None else set(hook_paths)
    for name, module in model.named_modules():
        if name and (wanted is None or name in wanted):
            handles.append(module.register_forward_hook(lambda m, i, o, n=name: records.append((n, _first_tensor(o)))))
    was_training = model.training
    model.eval()
    try:
        out = model(example)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return out, records


def find_last_feature_map(model: nn.Module, example: Tensor) -> str:
    """The path of the last module (outermost on ties) whose output is a spatial map (B, C, H, W), (B, H, W, C)
    or tokens (B, N, C) — the feature the classifier pools. Raises when the model has none."""
    _, records = _dry_run(model, example, None)
    spatial = [name for name, out in records if _is_spatial(out)]
    if not spatial:
        raise ValueError(f"{type(model).__name__} produced no spatial feature map; name a module path instead")
    return spatial[-1]


def probe_shapes(model: nn.Module, example: Tensor, paths: Iterable[str]) -> dict[str, torch.Size]:
    """Output shape of each path ('' = model output) for ``example``, from one dry-run forward."""
    paths = list(paths)
    modules = dict(model.named_modules())
    for p in paths:
        if p and p not in modules:
            raise module_path_error(model, p)
    out, records = _dry_run(model, example, [p for p in paths if p])
    found = {name: o for name, o in records}
    shapes: dict[str, torch.Size] = {}
    for p in paths:
        value = _first_tensor(out) if p == OUTPUT else found.get(p)
        if not isinstance(value, Tensor):
            raise TypeError(
                f"module {p!r} returned {type(value).__name__}, not a tensor; tap a module that returns one"
            )
        shapes[p] = value.shape
    return shapes


class _TapHook:
    """A forward hook writing a module's output into a shared dict; a class (not a closure) so that models with
    taps still pickle (``ddp_spawn``) and deep-copy (EMA) consistently."""

    def __init__(self, store: dict[str, Tensor], path: str) -> None:
        self.store, self.path = store, path

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> None:
        self.store[self.path] = _first_tensor(output)


class FeatureTaps:
    """Keeps the outputs of the given module paths of ``model`` at every forward.

    >>> taps = FeatureTaps(model, ["layer4", ""])
    >>> out, feats = taps(x)            # feats["layer4"]: (B, 512, 7, 7); feats[""] is ``out``

    Hooks hold references to the outputs (no copies) and are cleared by each call.
    """

    def __init__(self, model: nn.Module, paths: Iterable[str]) -> None:
        self.model = model
        self.paths = list(dict.fromkeys(paths))
        self._store: dict[str, Tensor] = {}
        self._handles: list[RemovableHandle] = []
        modules = dict(model.named_modules())
        for p in self.paths:
            if p == OUTPUT:
                continue
            if p not in modules:
                raise module_path_error(model, p)
            self._handles.append(modules[p].register_forward_hook(_TapHook(self._store, p)))

    def __call__(self, *args: Any, **kwargs: Any) -> tuple[Any, dict[str, Tensor]]:
        return self.collect(self.model(*args, **kwargs))

    def collect(self, output: Any) -> tuple[Any, dict[str, Tensor]]:
        """After a forward of ``model`` run elsewhere: (output, {path: tapped tensor})."""
        feats = dict(self._store)
        self._store.clear()
        if OUTPUT in self.paths:
            feats[OUTPUT] = _first_tensor(output)
        missing = [p for p in self.paths if p not in feats]
        if missing:
            hint = (
                " The model is compiled: torch.compile did not keep these forward hooks — use model.compile=heads"
                if getattr(self.model, "_compiled_call_impl", None) is not None
                else ""
            )
            raise RuntimeError(f"modules {missing} did not run in this forward; they can't be distilled.{hint}")
        return output, feats

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
