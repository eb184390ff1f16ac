"""What a run folder and a resumed run must be: one run per folder, and a resume that trains what its config says.

- :func:`check_run_dir`: a run that would write checkpoints into a folder already holding another run's is refused
  before anything is written (a resume of a checkpoint of that folder is the one exception); :class:`RunDirGuard`
  makes the same check in Hydra, before Hydra writes the run's ``.hydra/`` over the other run's.
- :func:`resume_changes` / :func:`check_resume`: a resume compares the checkpoint's stored config with the new one.
  A change to what shapes training stops the run with the changed keys listed, unless ``resume_changes=apply``
  says to apply them for real (the task module then rebuilds the optimizer's hyper-parameters and the schedule from
  the new config at the restored step: :meth:`diffkd.tasks.base.DistillationModule.apply_resume_changes`).

What shapes training: the ``data``, ``model``, ``distill`` and ``optim`` sections, ``seed``, and the trainer keys in
:data:`TRAINER_KEYS`. Not compared — they say where things are or how fast they run, not what is trained:
:data:`IGNORED` (loader workers, data paths, compilation, the guard's cadence) and the initial-weight keys of
:data:`FROM_CHECKPOINT` (on resume every weight, the teacher's included, comes from the checkpoint; the resumed run's
stored config keeps the values the weights were first read from).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

__all__ = [
    "Change",
    "ResumeConfigError",
    "RunDirGuard",
    "RunDirInUseError",
    "check_resume",
    "check_run_dir",
    "resume_changes",
]

log = logging.getLogger(__name__)

SECTIONS = ("data", "model", "distill", "optim", "seed")
TRAINER_KEYS = (
    "accumulate_grad_batches",
    "gradient_clip_val",
    "gradient_clip_algorithm",
    "precision",
    "devices",
    "num_nodes",
)
#: Dotted keys (a trailing ``*`` matches any key below) that say where or how fast, not what is trained.
IGNORED = (
    "data.num_workers",
    "data.pin_memory",
    "data.persistent_workers",
    "data.prefetch_factor",
    "data.root",
    "data.data_dir",
    "data.download",
    "data.verify",
    "data.cache",
    "data.val_batch_size",
    "model.compile",
    "model.compile_mode",
    "model.nonfinite_check_every",
)
#: Initial-weight keys: on resume the checkpoint holds every weight, so these are not used.
FROM_CHECKPOINT = (
    "model.student.weights",
    "model.student.pretrained",
    "model.student.weights_backbone",
    "model.teacher.weights",
    "model.teacher.key",
    "model.teacher.pretrained",
    "model.teacher.weights_backbone",
)
_ABSENT = "<absent>"


class RunDirInUseError(FileExistsError):
    """The run folder already holds another run's checkpoints (or Hydra files)."""


class ResumeConfigError(ValueError):
    """A resume whose config changes what shapes training, without ``resume_changes=apply``."""


# ---------------------------------------------------------------------------------------------------- run folders
def _rank() -> int:
    """This process's global rank as the launcher set it (``RANK``, ``LOCAL_RANK``, ``SLURM_PROCID``; 0 alone)."""
    from lightning.fabric.utilities.rank_zero import _get_rank

    return int(_get_rank() or 0)


def _checkpoint_dirs(cfg: DictConfig) -> list[Path]:
    """The folders this run's checkpoint callbacks write to (``<output_dir>/checkpoints`` by default)."""
    dirs = []
    for cb in (cfg.get("callbacks") or {}).values():
        if isinstance(cb, Mapping) and cb.get("dirpath"):
            dirs.append(Path(str(cb["dirpath"])))
    if not dirs:
        dirs.append(Path(str(cfg.paths.output_dir)) / "checkpoints")
    return sorted(set(dirs))


def _inside(path: str | Path | None, folder: Path) -> bool:
    if path is None:
        return False
    try:
        return Path(path).resolve().is_relative_to(folder.resolve())
    except OSError:
        return False


def _refusal(folder: Path, found: list[str], resume_hint: Path | None) -> RunDirInUseError:
    shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
    resume = f"ckpt_path={resume_hint}" if resume_hint is not None else "ckpt_path=<its checkpoint>"
    return RunDirInUseError(
        f"{folder} already holds another run ({shown}): this run would overwrite or mix with its files. Start this "
        f"run in a new folder (leave hydra.run.dir and paths.output_dir to their timestamped defaults, or give a "
        f"new one), or resume that run: {resume}"
    )


def check_run_dir(cfg: DictConfig, ckpt_path: str | None) -> None:
    """Refuse a training run whose checkpoint folders already hold ``*.ckpt`` files, unless it resumes one of them.

    Raises:
        RunDirInUseError: naming the folder, what is in it and the two ways on.
    """
    if not cfg.get("train", True) or _rank() > 0:  # ranks > 0 share rank 0's folder, checked there
        return
    for folder in _checkpoint_dirs(cfg):
        found = sorted(p.name for p in folder.glob("*.ckpt")) if folder.is_dir() else []
        if found and not _inside(ckpt_path, folder):
            last = folder / "last.ckpt"
            raise _refusal(folder, found, last if last.is_file() else folder / found[-1])


class RunDirGuard(Callback):
    """Hydra callback: refuse ``python -m diffkd.train`` in a run folder that holds another run, or a resume there
    whose config changed (exit status 1), before Hydra writes its ``.hydra/`` there (a multirun's job folders are new
    by construction; :func:`check_run_dir` and :func:`check_resume` still run in each job)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if _rank() > 0:  # strategy=ddp re-runs the command for ranks > 0, in rank 0's folder
            return
        run_dir = Path(str(OmegaConf.select(config, "hydra.run.dir")))
        if not run_dir.is_dir() or not config.get("train", True):
            return
        ckpt = config.get("ckpt_path")
        if ckpt is not None and (str(ckpt) == "last" or _inside(str(ckpt), run_dir)):
            # resuming (`last` is this folder's own last.ckpt when it has one): a refused resume must not leave its
            # config in .hydra/ either, so the comparison runs here too
            own = run_dir / "checkpoints" / "last.ckpt" if str(ckpt) == "last" else Path(str(ckpt))
            if own.is_file() and str(config.get("resume_changes") or "refuse") == "refuse":
                self._check_resume(config, own)
            return
        found = sorted(str(p.relative_to(run_dir)) for p in (*run_dir.glob("checkpoints/*.ckpt"), run_dir / ".hydra"))
        found = [f for f in found if (run_dir / f).exists()]
        if found:
            last = run_dir / "checkpoints" / "last.ckpt"
            # Hydra turns a callback's exception into a warning and runs on: exit instead (the message on stderr)
            raise SystemExit(f"Error: {_refusal(run_dir, found, last if last.is_file() else None)}")

    @staticmethod
    def _check_resume(config: DictConfig, ckpt: Path) -> None:
        import torch
        from hydra.core.hydra_config import HydraConfig

        try:
            HydraConfig.instance().set_config(config)  # what run_job does next; the `hydra:` resolver reads it
            new = {
                k: OmegaConf.to_container(config[k], resolve=True) if isinstance(config[k], DictConfig) else config[k]
                for k in (*SECTIONS, "trainer")
                if k in config
            }
            stored = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True).get("diffkd") or {}
        except Exception as err:  # unresolvable before the job starts, or unreadable: train() checks it later
            log.debug("resume check deferred to the job: %s", err)
            return
        try:
            check_resume(stored.get("config"), new, str(ckpt))
        except (ResumeConfigError, ValueError) as err:
            raise SystemExit(f"Error: {err}") from None


# ---------------------------------------------------------------------------------------------------- resume
@dataclass(frozen=True)
class Change:
    """One config key whose value differs between the checkpoint's run and this one."""

    key: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.key}: {_show(self.old)} → {_show(self.new)}"


def _show(value: Any) -> str:
    return value if value is _ABSENT else repr(value)


def _flatten(obj: Any, prefix: str) -> dict[str, Any]:
    if isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out if out or not prefix else {prefix: {}}
    return {prefix: obj}


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in patterns)


def _shaping(config: Mapping[str, Any]) -> dict[str, Any]:
    """The dotted keys of ``config`` that shape training, with their values."""
    flat: dict[str, Any] = {}
    for section in SECTIONS:
        if section in config:
            flat.update(_flatten(config[section], section))
    trainer = config.get("trainer") or {}
    for key in TRAINER_KEYS:
        if key in trainer:
            flat[f"trainer.{key}"] = trainer[key]
    return {k: v for k, v in flat.items() if not _matches(k, IGNORED + FROM_CHECKPOINT)}


def resume_changes(stored: Mapping[str, Any], new: Mapping[str, Any]) -> list[Change]:
    """The training-shaping keys whose values differ between ``stored`` (the checkpoint's resolved config) and
    ``new`` (this run's), in key order."""
    old_flat, new_flat = _shaping(stored), _shaping(new)
    changes = []
    for key in sorted(set(old_flat) | set(new_flat)):
        old, value = old_flat.get(key, _ABSENT), new_flat.get(key, _ABSENT)
        if old != value:
            changes.append(Change(key, old, value))
    return changes


def _override(key: str, value: Any) -> str:
    if value is _ABSENT:
        return f"~{key}"
    return f"{key}={OmegaConf.to_yaml({'v': value}).strip().removeprefix('v: ').replace(chr(10), ' ')}"


def check_resume(
    stored: Mapping[str, Any] | None, new: Mapping[str, Any], ckpt_path: str, mode: str = "refuse"
) -> list[Change]:
    """Compare the checkpoint's config with this run's; returns the changes to apply (``mode="apply"``).

    Raises:
        ResumeConfigError: changes and ``mode="refuse"`` — the keys with both values and the two ways on.
        ValueError: an unknown ``mode``.
    """
    if mode not in ("refuse", "apply"):
        raise ValueError(f"resume_changes={mode!r}; choose refuse (the default) or apply")
    if stored is None:
        log.warning("%s carries no diffkd config: the resumed run's config cannot be compared with it", ckpt_path)
        return []
    changes = resume_changes(stored, new)
    if not changes:
        return []
    listed = "\n".join(f"  {c}" for c in changes[:30])
    more = f"\n  ... and {len(changes) - 30} more" if len(changes) > 30 else ""
    if mode == "apply":
        log.warning("resume_changes=apply: resuming %s with these changes, applied from here on:\n%s%s", ckpt_path,
                    listed, more)  # fmt: skip
        return changes
    back = " ".join(_override(c.key, c.old) for c in changes[:8])
    raise ResumeConfigError(
        f"ckpt_path={ckpt_path}: this run's config differs from the checkpoint's in what shapes training:\n{listed}"
        f"{more}\nResumed as is, the restored optimizer and schedule would train with the old values while the "
        f"run's config said the new ones. Either resume unchanged (drop these overrides, or give the checkpoint's "
        f"values: {back}), or apply the new values from here on with resume_changes=apply (the optimizer's "
        "hyper-parameters and the schedule are rebuilt from the new config at the restored step, said in the log, "
        "and the run's stored config records them)"
    )


def from_checkpoint_values(stored: Mapping[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """``new`` (a resumed run's resolved config) with the initial-weight keys of :data:`FROM_CHECKPOINT` set back
    to the stored run's: the resumed weights came from there, whatever this run's config says."""
    if not stored:
        return new
    for key in FROM_CHECKPOINT:
        *parents, leaf = key.split(".")
        src: Any = stored
        dst: Any = new
        for part in parents:
            src = src.get(part) if isinstance(src, Mapping) else None
            dst = dst.get(part) if isinstance(dst, dict) else None
        if isinstance(src, Mapping) and isinstance(dst, dict) and leaf in src:
            dst[leaf] = src[leaf]
    return new
