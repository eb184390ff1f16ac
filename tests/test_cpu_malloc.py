"""glibc malloc keeps freed CPU memory for reuse (`callbacks.cpu_malloc`, `python -m diffkd.bench --cpu-malloc`)."""

import platform
import subprocess
import sys

import pytest

from diffkd.callbacks import CpuMallocCallback
from diffkd.utils.cpu_malloc import configure_cpu_malloc

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")

# A fresh process: the setting is process-wide and cannot be taken back by the test that makes it.
_PROBE = """
import ctypes, torch
from diffkd.utils.cpu_malloc import configure_cpu_malloc

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2

def mmapped_bytes_of_a_64mb_tensor():
    before = libc.mallinfo2().hblkhd
    x = torch.empty(16 * 2**20)  # 64 MiB of float32: above glibc's largest mmap threshold
    during = libc.mallinfo2().hblkhd
    del x
    return during - before

print(mmapped_bytes_of_a_64mb_tensor(), configure_cpu_malloc("keep"), mmapped_bytes_of_a_64mb_tensor())
"""


@glibc
def test_keep_serves_large_tensors_from_the_heap_instead_of_fresh_mappings():
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True, timeout=120)
    default_mmapped, applied, kept_mmapped = out.stdout.split()
    assert int(default_mmapped) >= 64 * 2**20  # glibc's default: a fresh mapping, page-faulted on first touch
    assert applied == "True"
    assert int(kept_mmapped) == 0  # now from the heap, which is never trimmed: its pages stay mapped for reuse


def test_default_leaves_malloc_alone_and_bad_modes_list_the_choices():
    assert configure_cpu_malloc("default") is False
    with pytest.raises(ValueError, match="cpu_malloc must be one of keep, default; got 'off'"):
        configure_cpu_malloc("off")
    with pytest.raises(ValueError, match="keep, default"):
        CpuMallocCallback("never")


@glibc
def test_the_default_callbacks_keep_freed_memory_on_a_cpu_trainer(cifar_cfg):
    from diffkd.train import train

    _metrics, objs = train(cifar_cfg("cifar_wrn40_wrn16", "distill=kd", "test=false"))
    (callback,) = [c for c in objs["trainer"].callbacks if isinstance(c, CpuMallocCallback)]
    assert callback.mode == "keep" and callback.applied
