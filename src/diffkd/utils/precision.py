"""The trainer's default precision, from the hardware it runs on: ``${diffkd.auto_precision:${trainer.accelerator}}``.

Lightning picks the accelerator, the devices and the strategy by itself (``auto``) but has no ``auto`` precision.
This resolver gives one (conf/trainer/default.yaml):

* GPUs (accelerator ``gpu``/``cuda``, or ``auto`` where CUDA GPUs are visible) of compute capability 8.0 or more
  (Ampere on: A100, H100, RTX 30xx…): ``bf16-mixed``;
* older GPUs (Turing: T4, RTX 20xx): ``32-true``. They have no bf16 units, and fp16 (``16-mixed``) is not the
  default: its loss scaler skips the steps whose gradients overflow, without a word, and the diffusion and feature
  losses have not been validated in fp16's range. Opt in with ``trainer.precision=16-mixed``;
* the CPU (and anything else): ``32-true``.

The resolver is registered when ``diffkd`` is imported, so a run folder's ``.hydra/config.yaml`` (stored unresolved)
loads anywhere diffkd is installed; it resolves where the run runs (a SLURM job: on its GPU node).
"""

from __future__ import annotations

import functools
import subprocess
import sys

from omegaconf import OmegaConf

__all__ = ["RESOLVER", "auto_precision", "register_resolvers"]

RESOLVER = "diffkd.auto_precision"

_GPU_ACCELERATORS = ("gpu", "cuda")


@functools.lru_cache(maxsize=1)
def _cuda_computes_in_bf16() -> bool:
    """Whether GPU 0 has bf16 units (compute capability ≥ 8.0).

    Asked in a child process unless CUDA is already initialised here: initialising it in this process would make
    Lightning's fork-based strategies (``ddp_fork``/``ddp_notebook``, what ``strategy: auto`` picks for several
    devices in a notebook) refuse to start.
    """
    import torch

    if torch.cuda.is_initialized():
        return torch.cuda.get_device_capability(0)[0] >= 8
    code = "import torch; print(torch.cuda.get_device_capability(0)[0])"
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired):
        return False
    major = done.stdout.strip().splitlines()[-1:] if done.returncode == 0 else []
    return bool(major) and major[0].isdigit() and int(major[0]) >= 8


def auto_precision(accelerator: str = "auto") -> str:
    """The Lightning precision for ``accelerator`` on this machine: ``bf16-mixed`` on GPUs with bf16 units,
    ``32-true`` elsewhere (see the module's docstring)."""
    accelerator = str(accelerator).lower()
    if accelerator not in (*_GPU_ACCELERATORS, "auto"):
        return "32-true"
    # Lightning's check: NVML-based (PYTORCH_NVML_BASED_CUDA_CHECK, set by lightning.fabric), it initialises nothing
    from lightning.fabric.accelerators.cuda import is_cuda_available

    if not is_cuda_available():
        # accelerator=gpu without a visible GPU: Lightning stops on the accelerator itself; name the GPU precision
        # so that a config composed on a login node reads as it will run
        return "bf16-mixed" if accelerator in _GPU_ACCELERATORS else "32-true"
    return "bf16-mixed" if _cuda_computes_in_bf16() else "32-true"


def register_resolvers() -> None:
    """Register ``${diffkd.auto_precision:<accelerator>}`` with OmegaConf (once; later calls do nothing)."""
    if not OmegaConf.has_resolver(RESOLVER):
        # not cached in the config: a config composed on a login node and pickled to a SLURM job resolves on the
        # job's node
        OmegaConf.register_new_resolver(RESOLVER, auto_precision)
