"""The process's C allocator, set for training steps that allocate the same large buffers at
every call: glibc's malloc keeps and reuses freed memory instead of handing it back.

XLA:CPU allocates an executable's temporary buffer anew at every call (110 MiB for the MNIST
step). Above glibc's mmap threshold, and in a thread's arena whose heaps stop at 64 MiB, each
call maps fresh pages and faults every one of them in: 27,000 minor page faults a Flax MNIST
step. With one arena, no mmap below 1 GiB and no trimming, the freed buffer is reused
(2-core AMD EPYC, bench/train_step.py, background trainings paused): Flax MNIST step 99.3 ->
85.1 ms with no page faults, and PyTorch's eager step in the same process 81.2 -> 71.3 ms.
The price: the process keeps the memory it freed, as a training process would reuse anyway.
"""
from __future__ import annotations

import ctypes
import sys

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep and reuse freed memory: one arena, no mmap below 1 GiB, no
    trimming. Returns whether it took effect (only glibc; elsewhere a no-op).

    Call it before JAX creates its CPU client (the first jax.devices() or array): the
    client's threads keep the arena they first allocated from (called after it, the Flax
    step's faults fell only from 27.8k to 24.8k)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(param, value) == 1 for param, value in (
        (_M_ARENA_MAX, 1), (_M_MMAP_THRESHOLD, 1 << 30), (_M_TRIM_THRESHOLD, (1 << 31) - 1)))
