"""Feature taps: forward hooks that keep a model's intermediate outputs, by *address*.

An address is a module path, optionally followed by selectors into the module's output:

- ``"layer4"`` — the output of ``model.layer4`` (a tuple output gives its first tensor, as RepDistiller's
  ``(out, preact)`` blocks need); ``""`` is the model's own output.
- ``"backbone.fpn:0"``, ``"backbone.fpn:pool"`` — one entry of a dict output (torchvision's FPN returns an
  ``OrderedDict`` of levels ``'0'…'3', 'pool'``); ``":out"`` — the ``'out'`` entry of the model's output (a
  torchvision segmenter); ``"block:1"`` — an element of a tuple/list output. Selectors chain: ``"m:out:0"``.
- ``"backbone.fpn:*"`` — every entry, one distillation point each (expanded by the distiller at build time).
- A module that runs several times per forward (a detection head shared by the FPN levels) keeps *every* call:
  its value is the tuple of its call outputs, so ``"head.conv:*"`` is one point per call and ``"head.conv:0"``
  the first call. Tapping it without a selector is an error that names both fixes, never a silent last call.
- ``"@feature"`` — the last spatial feature map (the module whose output the classifier pools), resolved by a
  dry run.
- ``"layer3.2.out_relu@input"`` — the *input* of a module instead of its output (its first positional argument):
  the pre-activation that a final ``ReLU`` module receives, where no module outputs it. Selectors follow as usual.

Hooks keep references only (no copies); the store is cleared at each forward of the root model and by
:meth:`FeatureTaps.collect`.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = [
    "AUTO_FEATURE",
    "EXPAND",
    "INPUT",
    "DryRun",
    "FeatureTaps",
    "TapAddress",
    "dry_run",
    "find_last_feature_map",
    "module_of",
    "module_path_error",
    "probe_shapes",
    "select",
]

AUTO_FEATURE = "@feature"
OUTPUT = ""
EXPAND = "*"
INPUT = "@input"


def module_of(path: str) -> str:
    """The module path of a tap path: ``path`` itself, or without its ``@input`` suffix."""
    return path[: -len(INPUT)] if path.endswith(INPUT) else path


def _tapped(path: str, inputs: tuple[Any, ...], output: Any) -> Any:
    """What a hook on ``path`` keeps: the module's output, or its input for an ``@input`` path."""
    if path.endswith(INPUT):
        return inputs[0] if len(inputs) == 1 else inputs
    return output


@dataclass(frozen=True)
class TapAddress:
    """A parsed address: ``path`` (module path, '' = output) and the ``selectors`` applied to its value."""

    path: str
    selectors: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> TapAddress:
        path, *selectors = str(text).split(":")
        if any(s == "" for s in selectors):
            raise ValueError(f"tap address {text!r} has an empty selector; write 'module.path:key' (e.g. ':out')")
        return cls(path, tuple(selectors))

    @property
    def expands(self) -> bool:
        return EXPAND in self.selectors

    def __str__(self) -> str:
        return ":".join((self.path, *self.selectors))


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


def entries(value: Any) -> list[str] | None:
    """The selectable entries of a value: dict keys, or tuple/list indices; ``None`` for anything else."""
    if isinstance(value, Mapping):
        return [str(k) for k in value]
    if isinstance(value, (tuple, list)):
        return [str(i) for i in range(len(value))]
    return None


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    keys = entries(value)
    if keys is not None:
        return f"a {type(value).__name__} with entries {keys}"
    return f"a {type(value).__name__}"


def _pick(value: Any, selector: str, where: str) -> Any:
    if isinstance(value, Mapping):
        for key in value:
            if str(key) == selector:
                return value[key]
        near = difflib.get_close_matches(selector, [str(k) for k in value], n=6, cutoff=0.0)
        raise KeyError(f"{where} has no entry {selector!r}; its entries: {[str(k) for k in value]} (nearest: {near})")
    if isinstance(value, (tuple, list)):
        if not selector.lstrip("-").isdigit() or not -len(value) <= int(selector) < len(value):
            raise KeyError(f"{where} is a {type(value).__name__} of {len(value)}; select an index 0..{len(value) - 1}")
        return value[int(selector)]
    raise KeyError(f"{where} is {_describe(value)}: it has no entries to select {selector!r} from")


def select(value: Any, address: TapAddress, multi_call: bool = False) -> Any:
    """Apply ``address.selectors`` to a module's value (its output, or the tuple of its calls' outputs when
    ``multi_call``). Without selectors a tuple output gives its first tensor; a multi-call value needs one."""
    if not address.selectors:
        if multi_call:
            raise ValueError(
                f"module {address.path!r} runs {len(value)} times per forward; tap every call with "
                f"'{address.path}:*' (one point per call) or one call with '{address.path}:<i>' (0..{len(value) - 1})"
            )
        return _first_tensor(value)
    where = f"module {address.path!r}" if address.path else "the model output"
    for i, sel in enumerate(address.selectors):
        if sel == EXPAND:
            raise ValueError(f"{address} still has '{EXPAND}': expand it before selecting")
        value = _pick(value, sel, where)
        where = f"{where}:{':'.join(address.selectors[: i + 1])}"
        if multi_call and i == 0:
            where = f"call {sel} of module {address.path!r}"
    return value


def _is_spatial(x: Any) -> bool:
    if not isinstance(x, Tensor) or x.dim() not in (3, 4):
        return False
    if x.dim() == 4:
        _, d1, d2, d3 = x.shape
        spatial = (d1 * d2) if (d1 == d2 and d3 != d1) else (d2 * d3)  # bhwc vs bchw
        return spatial > 1
    return x.shape[1] > 1  # tokens (B, N, C)


@dataclass
class DryRun:
    """What one dry-run forward saw: the model output, each hooked module's call outputs (in call order), and
    the completion order of the calls (``(path, output)``)."""

    output: Any
    calls: dict[str, list[Any]]
    order: list[tuple[str, Any]]

    def value(self, path: str) -> tuple[Any, bool]:
        """(value, multi_call) of a module path: its single output, or the tuple of its call outputs."""
        if path == OUTPUT:
            return self.output, False
        outs = self.calls.get(path)
        if not outs:
            raise RuntimeError(f"module {path!r} did not run in the dry-run forward; it can't be distilled")
        return (tuple(outs), True) if len(outs) > 1 else (outs[0], False)


@torch.no_grad()
def dry_run(model: nn.Module, forward: Any, hook_paths: Iterable[str] | None = None, role: str = "model") -> DryRun:
    """Run ``forward()`` (which calls ``model``) in eval mode under ``no_grad`` — BatchNorm statistics, training
    flags and every random-number generator are left as they were — recording the outputs of ``hook_paths``
    (all modules when ``None``).

    Args:
        model: the network whose modules are hooked.
        forward: a callable running the model on a real batch, or a tensor to call ``model`` with.
        hook_paths: module paths to record ('' entries are ignored; the output is always kept).
        role: ``student`` / ``teacher``, for error messages.
    """
    modules = dict(model.named_modules())
    wanted = None if hook_paths is None else {p for p in hook_paths if p}
    for p in wanted or ():
        if module_of(p) not in modules:
            raise module_path_error(model, module_of(p), role)
    calls: dict[str, list[Any]] = {}
    order: list[tuple[str, Any]] = []

    def make_hook(name: str) -> Any:
        def hook(m: nn.Module, i: Any, o: Any) -> None:
            value = _tapped(name, i, o)
            calls.setdefault(name, []).append(value)
            order.append((name, value))

        return hook

    paths = [name for name in modules if name] if wanted is None else sorted(wanted)
    handles: list[RemovableHandle] = [modules[module_of(p)].register_forward_hook(make_hook(p)) for p in paths]
    modes = {m: m.training for m in model.modules()}
    model.eval()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices):
            out = forward() if callable(forward) and not isinstance(forward, Tensor) else model(forward)
    finally:
        for m, training in modes.items():
            m.training = training
        for h in handles:
            h.remove()
    return DryRun(out, calls, order)


def find_last_feature_map(model: nn.Module, example: Any, role: str = "model") -> str:
    """The path of the last module that runs once per forward (outermost on ties) whose output is a spatial
    map (B, C, H, W), (B, H, W, C) or tokens (B, N, C) — the feature the classifier pools.

    Args:
        example: an input tensor, or a callable running the model on a real batch (see :func:`dry_run`).
    """
    run = example if isinstance(example, DryRun) else dry_run(model, example, None, role)
    spatial = [name for name, out in run.order if len(run.calls[name]) == 1 and _is_spatial(_first_tensor(out))]
    if not spatial:
        raise ValueError(f"{role} {type(model).__name__} produced no spatial feature map; name a module path instead")
    return spatial[-1]


def probe_shapes(model: nn.Module, example: Any, addresses: Iterable[str]) -> dict[str, torch.Size]:
    """Output shape of each address ('' = model output) for ``example``, from one dry-run forward."""
    parsed = {a: TapAddress.parse(a) for a in addresses}
    run = dry_run(model, example, [p.path for p in parsed.values()])
    shapes: dict[str, torch.Size] = {}
    for text, addr in parsed.items():
        value, multi = run.value(addr.path)
        value = select(value, addr, multi) if (addr.selectors or multi) else _first_tensor(value)
        if not isinstance(value, Tensor):
            raise TypeError(f"{addr} is {_describe(value)}, not a tensor; select an entry with '{addr}:<key>'")
        shapes[text] = value.shape
    return shapes


class _TapHook:
    """A forward hook appending a module's output to a shared store; a class (not a closure) so that models with
    taps still pickle (``ddp_spawn``) and deep-copy (EMA) consistently."""

    def __init__(self, store: dict[str, list[Any]], path: str) -> None:
        self.store, self.path = store, path

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> None:
        self.store.setdefault(self.path, []).append(_tapped(self.path, inputs, output))


class _ClearHook:
    """Forward pre-hook of the root model: a new forward starts with an empty store."""

    def __init__(self, store: dict[str, list[Any]]) -> None:
        self.store = store

    def __call__(self, module: nn.Module, inputs: Any) -> None:
        self.store.clear()


class FeatureTaps:
    """Keeps the tapped values of ``model`` at every forward.

    >>> taps = FeatureTaps(model, ["layer4", ""])
    >>> out, feats = taps(x)            # feats["layer4"]: (B, 512, 7, 7); feats[""] is ``out``

    Args:
        model: the network.
        addresses: tap addresses (see the module docstring; no ``*`` — expand first).
        multi_call: module paths known (from the dry run) to run several times per forward; their value is the
            tuple of their call outputs.
    """

    def __init__(self, model: nn.Module, addresses: Iterable[str], multi_call: Iterable[str] = ()) -> None:
        self.model = model
        self.addresses = {a: TapAddress.parse(a) for a in dict.fromkeys(addresses)}
        for text, addr in self.addresses.items():
            if addr.expands:
                raise ValueError(f"tap {text!r}: expand '{EXPAND}' into concrete entries before tapping")
        self.paths = list(dict.fromkeys(a.path for a in self.addresses.values()))
        self.multi_call = set(multi_call)
        self._store: dict[str, list[Any]] = {}
        self._handles: list[RemovableHandle] = [model.register_forward_pre_hook(_ClearHook(self._store))]
        modules = dict(model.named_modules())
        for p in self.paths:
            if p == OUTPUT:
                continue
            if module_of(p) not in modules:
                raise module_path_error(model, module_of(p))
            self._handles.append(modules[module_of(p)].register_forward_hook(_TapHook(self._store, p)))

    def __call__(self, *args: Any, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        return self.collect(self.model(*args, **kwargs))

    def clear(self) -> None:
        self._store.clear()

    def collect(self, output: Any) -> tuple[Any, dict[str, Any]]:
        """After a forward of ``model`` (or of its submodules) run elsewhere: (output, {address: value})."""
        store = dict(self._store)
        self._store.clear()
        missing = [p for p in self.paths if p != OUTPUT and p not in store]
        if missing:
            hint = (
                " The model is compiled: torch.compile did not keep these forward hooks — use model.compile=heads"
                if getattr(self.model, "_compiled_call_impl", None) is not None
                else ""
            )
            raise RuntimeError(f"modules {missing} did not run in this forward; they can't be distilled.{hint}")
        feats: dict[str, Any] = {}
        for text, addr in self.addresses.items():
            if addr.path == OUTPUT:
                value, multi = output, False
            else:
                outs = store[addr.path]
                multi = addr.path in self.multi_call
                if not multi and len(outs) > 1:
                    raise RuntimeError(
                        f"module {addr.path!r} ran {len(outs)} times in this forward but once in the dry run; "
                        f"tap its calls with '{addr.path}:*'"
                    )
                value = tuple(outs) if multi else outs[0]
            feats[text] = select(value, addr, multi) if (addr.selectors or multi) else _first_tensor(value)
        return output, feats

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def expand_address(run: DryRun, address: TapAddress) -> list[tuple[str, TapAddress]]:
    """``[(entry name, concrete address)]`` for an address with one ``*`` (each entry of the value at that
    position), or ``[("", address)]`` for a concrete one."""
    if not address.expands:
        return [("", address)]
    star = address.selectors.index(EXPAND)
    if EXPAND in address.selectors[star + 1 :]:
        raise ValueError(f"tap {address}: only one '{EXPAND}' per address")
    value, multi = run.value(address.path)
    prefix = TapAddress(address.path, address.selectors[:star])
    if prefix.selectors:
        value = select(value, prefix, multi)
        multi = False
    keys = entries(value) if (multi or not isinstance(value, Tensor)) else None
    if not keys:
        raise ValueError(f"tap {address}: {prefix} is {_describe(value)}; '{EXPAND}' needs a dict, tuple or list")
    rest = address.selectors[star + 1 :]
    return [(k, TapAddress(address.path, (*prefix.selectors, k, *rest))) for k in keys]
