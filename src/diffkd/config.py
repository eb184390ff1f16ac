"""The one config layer of the command-line tools: ``conf/`` composed as ``python -m diffkd.train`` composes it, a
run's stored config, Hydra's override grammar applied to either, and the task of a data config.

``python -m diffkd.train`` is a Hydra app on :data:`CONFIG_DIR` (primary config ``train.yaml``, the resolvers
``import diffkd`` registers). ``evaluate``, ``data.check``, ``export`` and the benchmarks compose the same
``train.yaml`` with :func:`compose` (Hydra's compose API, so the same grammar: ``key=value``, ``+key=value``,
``++key=value``, ``~key``, ``group=option``, ``data=<config>``). A run that already ran has its config stored
(``.hydra/config.yaml`` in its run folder, ``checkpoint["diffkd"]["config"]`` in its checkpoints):
:func:`run_config` reads it and :func:`apply_overrides` applies the same grammar on it.

Nothing under ``diffkd.data`` imports this module: the data layer knows no config files.
"""

from __future__ import annotations

import difflib
import inspect
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

__all__ = [
    "CONFIG_DIR",
    "PRIMARY_CONFIG",
    "Change",
    "ConfigError",
    "absolute",
    "accepts",
    "add_set_option",
    "apply_overrides",
    "compose",
    "compose_packaged",
    "config_name_of",
    "data_config_name",
    "declares",
    "packaged_config",
    "run_config",
    "stored_config",
    "task_of_data",
]

CONFIG_DIR = Path(__file__).resolve().parent / "conf"
PRIMARY_CONFIG = "train"
_MISSING = object()


class ConfigError(ValueError):
    """A config or an override that cannot be used; the message names the problem and the fix."""


# ------------------------------------------------------------------------------------------------- composing


@contextmanager
def packaged_config(config_dir: str | Path = CONFIG_DIR, keep_running_app: bool = False) -> Iterator[None]:
    """Hydra's compose API initialised on the packaged ``conf/`` (or ``config_dir``): ``hydra.compose(config_name=
    "train", ...)`` works inside. Hydra's global state is cleared before and after — unless ``keep_running_app``
    and a Hydra app is running (``python -m diffkd.train`` composing the demo's runs): then the app's own state is
    used as it is."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if keep_running_app and GlobalHydra.instance().is_initialized():
        yield
        return
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            yield
    finally:
        GlobalHydra.instance().clear()


def compose(overrides: Sequence[str] = (), tool: str = "train") -> DictConfig:
    """``train.yaml`` of the packaged ``conf/`` with ``overrides`` (Hydra's grammar), outside a Hydra app.

    ``paths`` resolve from ``DIFFKD_ROOT`` or the working folder (the defaults read ``${hydra:runtime...}``, which only
    exists inside an app); the output folder is ``logs/<tool>``. Hydra's own errors (an unknown key or option) are
    raised as they are."""
    from hydra import compose as hydra_compose

    base = os.environ.get("DIFFKD_ROOT", os.getcwd())
    paths = [f"paths.root_dir={base}", f"paths.output_dir={base}/logs/{tool}"]
    with packaged_config():
        return hydra_compose(config_name=PRIMARY_CONFIG, overrides=[*paths, *overrides])


def compose_packaged(overrides: Sequence[str], tool: str) -> DictConfig:
    """:func:`compose` (the name the tools and benchmarks have used)."""
    return compose(overrides, tool)


def data_config_name(data: str) -> tuple[str, str | None]:
    """``(data config name, image_folder root or None)`` of a tool's ``data`` argument: a ``conf/data/<name>.yaml``
    name, or a folder of class folders (``image_folder``). Raises :class:`ConfigError` (a ``ValueError``) listing
    the configs."""
    if (CONFIG_DIR / "data" / f"{data}.yaml").is_file():
        return data, None
    if Path(data).is_dir():
        return "image_folder", data
    known = ", ".join(sorted(p.stem for p in (CONFIG_DIR / "data").glob("*.yaml")))
    raise ConfigError(f"{data!r} is neither a data config ({known}) nor a folder")


def _class_of(target: str) -> Any:
    import hydra

    try:
        return hydra.utils.get_class(target)
    except Exception:
        return target


def config_name_of(group: str, target: str) -> str | None:
    """The ``conf/<group>/<name>.yaml`` whose ``_target_`` is ``target``'s class (two import paths of one class,
    ``diffkd.tasks.DetectionModule`` and ``diffkd.tasks.detection.DetectionModule``, match), or ``None``."""
    cls = _class_of(target)
    for path in sorted((CONFIG_DIR / group).glob("*.yaml")):
        if _class_of(str(OmegaConf.load(path).get("_target_", ""))) == cls:
            return path.stem
    return None


# ------------------------------------------------------------------------------------------------- data configs


def _data_class(data_cfg: Mapping[str, Any] | DictConfig) -> type:
    import hydra

    target = data_cfg.get("_target_")
    if not target:
        raise ConfigError("the data config has no _target_ (the data module class to build)")
    try:
        return hydra.utils.get_class(str(target))
    except Exception as err:
        raise ConfigError(f"the data config's _target_ {target} is no importable class ({err})") from None


def task_of_data(data_cfg: Mapping[str, Any] | DictConfig) -> str:
    """The task (``conf/model/<task>.yaml``: ``classification``, ``detection``, ``segmentation``) whose module
    consumes the batches of the data config's data module: the class's own ``task`` attribute."""
    cls = _data_class(data_cfg)
    task = getattr(cls, "task", None)
    if not isinstance(task, str) or not task:
        raise ConfigError(
            f"the data module {cls.__module__}.{cls.__qualname__} declares no task: give the class a "
            "`task: ClassVar[str]` attribute naming the conf/model/<task>.yaml its batches feed "
            "(classification, detection, segmentation)"
        )
    if not (CONFIG_DIR / "model" / f"{task}.yaml").is_file():
        known = ", ".join(sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml")))
        raise ConfigError(f"{cls.__qualname__}.task = {task!r} names no conf/model/<task>.yaml ({known})")
    return task


def accepts(data_cfg: Mapping[str, Any] | DictConfig, key: str) -> bool:
    """Whether the config's ``_target_`` class takes the keyword ``key`` (an entry its config file may leave out)."""
    try:
        params = inspect.signature(_data_class(data_cfg)).parameters
    except (ConfigError, TypeError, ValueError):
        return False
    return key in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def declares(node: Any, key: str) -> bool:
    """Whether a config node has ``key``, even as ``???`` (``key in node`` and ``select`` treat that as absent)."""
    return isinstance(node, DictConfig) and key in list(node)


# -------------------------------------------------------------------------------------------------- stored configs


def stored_config(checkpoint: Mapping[str, Any], complete: bool = True) -> dict[str, Any] | None:
    """The composed run config a diffkd checkpoint stores (``checkpoint["diffkd"]["config"]``, written by the task
    module's ``on_save_checkpoint``), or ``None``: not a Lightning checkpoint, written without one, or (``complete``)
    one without its ``model`` and ``data``."""
    if "state_dict" not in checkpoint:
        return None
    config = (checkpoint.get("diffkd") or {}).get("config")
    if not isinstance(config, Mapping) or (complete and not (config.get("model") and config.get("data"))):
        return None
    return dict(config)


def _resolved_with(cfg: DictConfig, hydra_cfg: DictConfig) -> DictConfig:
    """``cfg`` resolved with Hydra's ``${hydra:...}`` reading the run's own Hydra config (as inside its app)."""
    from hydra.conf import HydraConf
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.utils import setup_globals

    setup_globals()  # the ${hydra:...} and ${now:...} resolvers, as a Hydra app registers them
    holder = HydraConfig.instance()
    before = holder.cfg
    try:
        schema = OmegaConf.structured(HydraConf)
        OmegaConf.set_struct(schema, False)  # the run's Hydra may carry keys of its plugins (hydra.env, ...)
        holder.set_config(OmegaConf.create({"hydra": OmegaConf.merge(schema, hydra_cfg.get("hydra") or {})}))
        return OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    finally:
        holder.cfg = before


def run_config(path: str | Path) -> DictConfig:
    """The config a run ran with: from its run folder (``<run>/.hydra/config.yaml``), that file itself, or one of its
    checkpoints (``.ckpt``). ``${hydra:...}`` entries of ``.hydra/config.yaml`` resolve from the run's
    ``.hydra/hydra.yaml``."""
    path = Path(path)
    if path.is_dir():
        path = path / ".hydra" / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"no such file: {path} (give a run folder, its .hydra/config.yaml or a checkpoint)")
    if path.suffix in (".yaml", ".yml"):
        cfg = OmegaConf.load(path)
        hydra_file = path.with_name("hydra.yaml")
        if hydra_file.is_file():
            cfg = _resolved_with(cfg, OmegaConf.load(hydra_file))
        if not isinstance(cfg, DictConfig):
            raise ConfigError(f"{path} holds no config mapping")
        return cfg
    from diffkd.models.checkpoint import read_checkpoint

    config = stored_config(read_checkpoint(path))
    if config is None:
        raise ConfigError(f"{path} carries no diffkd run config (an older or foreign checkpoint)")
    return OmegaConf.create(config)


# ------------------------------------------------------------------------------------------------------ overrides


def absolute(override: str, cfg: DictConfig, under: str = "data") -> str:
    """``override`` with its key made absolute: a key whose first part is no config group (a node of ``cfg``) is
    relative to ``under`` (``crop_pct=0.95`` → ``data.crop_pct=0.95``)."""
    prefix = override[: len(override) - len(override.lstrip("~+"))]
    body = override[len(prefix) :]
    first = body.split("=", 1)[0].split(".", 1)[0]
    if isinstance(cfg.get(first), DictConfig):
        return override
    return f"{prefix}{under}.{body}"


@dataclass
class Change:
    """One override applied by :func:`apply_overrides`.

    Attributes:
        override: the override as applied (key made absolute).
        key: the key it set or deleted.
        old: the value it replaced (resolved), ``None`` where there was none.
        new: the value it set (``None`` for a deletion).
    """

    override: str
    key: str
    old: Any
    new: Any


def _plain(value: Any) -> Any:
    if not isinstance(value, (DictConfig, ListConfig)):
        return value
    try:
        return OmegaConf.to_container(value, resolve=True)
    except Exception:  # an interpolation that resolves only inside a Hydra app
        return OmegaConf.to_container(value, resolve=False)


def apply_overrides(
    cfg: DictConfig,
    overrides: Sequence[str],
    under: str | None = "data",
    flag: str = "",
    node_hints: Mapping[str, str] | None = None,
) -> list[Change]:
    """Apply Hydra overrides (``key=value``, ``+key=value``, ``++key=value``, ``~key``) to a config that is already
    composed or stored, in place, with the checks Hydra makes when composing: ``key=`` needs the key, ``+key=`` needs
    it absent, ``~key`` needs it present, one value per key (no sweeps).

    Args:
        cfg: the config (changed in place).
        overrides: the overrides, in order.
        under: keys whose first part is no config group are relative to this node (``None``: all keys absolute).
        flag: how the user gives an override (``"--set "``), for the fixes the messages suggest.
        node_hints: per key, what to do instead when a whole node is given a plain value (default: set its entries).

    Returns:
        what each override changed. Raises :class:`ConfigError` (``"<override>: <problem>; <fix>"``).
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    changes = []
    for raw in overrides:
        text = absolute(raw, cfg, under) if under else raw
        try:
            (override,) = parser.parse_overrides([text])
        except HydraException as err:
            raise ConfigError(f"{raw}: {err}") from None
        if override.is_sweep_override():
            raise ConfigError(f"{raw}: one value per key (no sweeps)")
        key = override.key_or_group
        current = OmegaConf.select(cfg, key, default=_MISSING)
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent, default=None) if parent else cfg
        present = current is not _MISSING or declares(node, leaf)
        value = None if override.is_delete() else override.value()
        if isinstance(current, DictConfig) and not override.is_delete() and not isinstance(value, dict):
            hint = (node_hints or {}).get(key, f"set its entries ({key}.<entry>=...)")
            raise ConfigError(f"{raw}: {key} is a config node, not a value: {hint}")
        old = None if current is _MISSING else _plain(current)
        if override.is_delete():
            if not present:
                raise ConfigError(f"{raw}: the config has no {key} to delete")
            del node[leaf]
        elif override.is_add() or override.is_force_add():
            if override.is_add() and present:
                raise ConfigError(f"{raw}: {key} is already set; override it without '+' (or with '++')")
            OmegaConf.update(cfg, key, value, merge=True, force_add=True)
        else:
            if not present:
                near = difflib.get_close_matches(leaf, list(node) if isinstance(node, DictConfig) else [], n=3)
                hint = f" (did you mean {' or '.join(f'{parent}.{k}' if parent else k for k in near)}?)" if near else ""
                raise ConfigError(f"{raw}: the config has no {key}; add it with {flag}+{key}=...{hint}")
            OmegaConf.update(cfg, key, value, merge=True)
        changes.append(Change(text, key, old, value))
    return changes


def add_set_option(parser: Any, example: str) -> None:
    """The tools' ``--set KEY=VALUE`` option (repeatable, into ``args.overrides``), ``parser`` an
    ``argparse.ArgumentParser``."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"Hydra override of the config, e.g. --set {example} (repeatable; +key= adds, ~key deletes; a key not "
        "starting with a config group is relative to data)",
    )
