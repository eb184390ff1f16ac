"""glibc ``malloc`` settings that keep a CPU training step's freed activations for the next step.

By default glibc serves large blocks (from 128 KiB, and always from 32 MiB) with ``mmap`` and hands them back to
the kernel on ``free``, and it trims the top of its heap. A training step frees and allocates the same
activations every step, so the kernel zero-fills and maps those pages again each step (one page fault per 4 KiB;
on a virtual machine a ResNet-18 step at 224², batch 32, spends a large share of its time there). With ``mmap``
off and trimming off, freed blocks stay in the process and are reused: the arithmetic is unchanged, only page
faults go. The price is memory: the process keeps its peak heap, which fragmentation can make larger (ResNet-34 →
ResNet-18 KD at batch 32: 2.2 GB → 2.6 GB peak RSS on the CPU; BENCHMARKS.md has the table).

Applies to the calling process and the processes it forks afterwards (data-loader workers). Blocks that cannot
come from an arena's heap still fall back to ``mmap`` in glibc, so no allocation fails because of it.
"""

from __future__ import annotations

import ctypes
import logging
import platform
from typing import Literal

__all__ = ["CPU_MALLOC_MODES", "CpuMalloc", "check_cpu_malloc", "configure_cpu_malloc"]

log = logging.getLogger(__name__)

CpuMalloc = Literal["keep", "default"]
CPU_MALLOC_MODES: tuple[str, ...] = ("keep", "default")

_M_TRIM_THRESHOLD = -1  # <malloc.h> parameter numbers
_M_MMAP_MAX = -4
_NEVER_TRIM = 2**31 - 1  # mallopt takes a C int


def check_cpu_malloc(mode: str) -> CpuMalloc:
    """``mode`` if it is one of :data:`CPU_MALLOC_MODES`, else a ValueError that lists them."""
    if mode not in CPU_MALLOC_MODES:
        raise ValueError(f"cpu_malloc must be one of {', '.join(CPU_MALLOC_MODES)}; got {mode!r}")
    return mode  # type: ignore[return-value]


def configure_cpu_malloc(mode: CpuMalloc) -> bool:
    """``keep``: no glibc ``mmap`` blocks and no heap trimming in this process; ``default``: malloc left as it is.

    Returns True when ``keep`` took effect; False for ``default``, or where the C library is not glibc (macOS,
    musl), which is logged rather than silently skipped.
    """
    if check_cpu_malloc(mode) == "default":
        return False
    libc_name, _version = platform.libc_ver()
    if libc_name != "glibc":
        log.info("cpu_malloc=keep needs glibc (found %r): malloc left as it is", libc_name or platform.system())
        return False
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    if libc.mallopt(_M_MMAP_MAX, 0) != 1 or libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM) != 1:
        log.warning("cpu_malloc=keep: glibc's mallopt refused the settings; malloc left as it is")
        return False
    log.info("cpu_malloc=keep: freed CPU memory stays in the process for reuse (no mmap blocks, no heap trimming)")
    return True
