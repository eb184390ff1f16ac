"""``python -m diffkd.train [experiment=<name>] [overrides]`` — compose the Hydra config and train.

With no arguments it runs the embedded demo (``experiment=demo``): Fashion-MNIST, offline, on the CPU.
"""

from __future__ import annotations

import importlib
import logging
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from diffkd.config import CONFIG_DIR, PRIMARY_CONFIG
from diffkd.training import train
from diffkd.utils.instantiate import build_module

__all__ = ["build_module", "main", "train"]

log = logging.getLogger("diffkd.train")

#: ``pipeline: <name>`` → the function that runs it with the composed config (``train`` is :func:`train` itself).
PIPELINES = {
    "demo": "diffkd.demo:run_demo",
    "demo_detection": "diffkd.demos.detection:run_demo",
    "demo_segmentation": "diffkd.demos.segmentation:run_demo",
}


# the Hydra app every other tool composes like (diffkd.config.compose): the packaged conf/, train.yaml
@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name=PRIMARY_CONFIG)
def main(cfg: DictConfig) -> float | None:
    if cfg.get("print_config"):
        log.info("config:\n%s", OmegaConf.to_yaml(cfg))
    pipeline = cfg.get("pipeline", "train")
    if pipeline != "train":
        if pipeline not in PIPELINES:
            raise ValueError(f"pipeline={pipeline!r}; choose train or one of {sorted(PIPELINES)}")
        module, function = PIPELINES[pipeline].split(":")
        return getattr(importlib.import_module(module), function)(cfg)
    metrics, _ = train(cfg)
    name = cfg.get("optimized_metric")
    if name and name not in metrics:
        log.warning("optimized_metric %r was not logged; available: %s", name, sorted(metrics))
    return metrics.get(name) if name else None


def cli() -> None:
    """``python -m diffkd.train`` / ``diffkd-train``: Hydra's app, plus "did you mean" for a misspelled key."""
    try:
        main()
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            from diffkd.utils.overrides import unknown_key_hint

            hint = unknown_key_hint([a for a in sys.argv[1:] if not a.startswith("-")], CONFIG_DIR)
            if hint:
                print(hint, file=sys.stderr)
        raise


if __name__ == "__main__":
    cli()
