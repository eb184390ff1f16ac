"""``python -m diffkd.train [experiment=<name>] [overrides]`` — compose the Hydra config and train.

With no arguments it runs the embedded demo (``experiment=demo``): Fashion-MNIST, offline, on the CPU.
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig, OmegaConf

from diffkd.training import train
from diffkd.utils.instantiate import build_module

__all__ = ["build_module", "main", "train"]

log = logging.getLogger("diffkd.train")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    if cfg.get("print_config"):
        log.info("config:\n%s", OmegaConf.to_yaml(cfg))
    if cfg.get("pipeline") == "demo":
        from diffkd.demo import run_demo

        return run_demo(cfg)
    metrics, _ = train(cfg)
    name = cfg.get("optimized_metric")
    if name and name not in metrics:
        log.warning("optimized_metric %r was not logged; available: %s", name, sorted(metrics))
    return metrics.get(name) if name else None


if __name__ == "__main__":
    main()
