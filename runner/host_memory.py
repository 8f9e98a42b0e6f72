"""Keeping freed host memory in the process, so that the next tensor of the same size does not fault it in again.

glibc's malloc serves every block above its mmap threshold (128 KiB, rising to at most 32 MiB as large blocks
are freed) with a fresh `mmap` and gives it back with `munmap` on free. A StyleGAN2 step on the CPU allocates
and frees the same large temporaries again and again: the modulated weights alone are
[batch, out, in, 3, 3] floats, 151 MB per layer at the cifar shapes. Each fresh mapping is faulted in page by
page (4 KiB each, zeroed by the kernel) on first write, and on a virtual machine every fault also goes
through the hypervisor. Measured on this project's 2-core EPYC VM (`bench/vs_official.py`, README *Speed
against the official code*), those faults were about half of the time of a generator forward pass.

Raising the mmap threshold (so large blocks come from the heap) and the trim threshold (so the heap keeps
them after free) makes every later allocation of a size seen before a reuse of memory already faulted in. The
numbers computed do not change, only where the bytes live; the cost is that the process keeps its peak heap
instead of returning it to the system between steps.

Each process of a run calls keep_freed_memory() once, before its work (runner.launch and calc_metrics for
every rank, the sampling scripts in main). `STYLEGAN_HOST_MALLOC=system` leaves malloc as it is (the test
suite does, so that its one long-lived process behaves like any other Python program). Only glibc has
mallopt's thresholds; elsewhere this does nothing.
"""

import ctypes
import os
import platform
from typing import Optional

from .errors import UserError

ENV_VAR = 'STYLEGAN_HOST_MALLOC'
CHOICES = ('keep', 'system')

# mallopt's parameter numbers (<malloc.h>) and its largest value: the parameter is a C int.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_LARGEST = 2**31 - 1


def host_malloc_choice() -> str:
    """'keep' (the default) or 'system', from $STYLEGAN_HOST_MALLOC; another value is a UserError."""
    choice = os.environ.get(ENV_VAR, '').strip().lower() or 'keep'
    if choice not in CHOICES:
        raise UserError(f'${ENV_VAR}={choice!r} is not valid; use {" or ".join(CHOICES)}')
    return choice


def _glibc() -> Optional[ctypes.CDLL]:
    """The C library of this process if it is glibc (the only one whose mallopt has these thresholds)."""
    if platform.libc_ver()[0] != 'glibc':
        return None
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


def keep_freed_memory() -> bool:
    """Make this process's malloc keep large freed blocks for reuse (see the module docstring). Returns whether
    the thresholds were set: False with $STYLEGAN_HOST_MALLOC=system or without glibc."""
    if host_malloc_choice() == 'system':
        return False
    libc = _glibc()
    if libc is None or not hasattr(libc, 'mallopt'):
        return False
    # Both, or a large block would come from the heap and still be trimmed off its top when freed.
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, _LARGEST)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _LARGEST))
