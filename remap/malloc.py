"""glibc's allocator tuned for the processes remap starts (server, node, cores), which free and
allocate MiB-sized buffers (frames, pickles, arguments) all the time.

By default every MiB buffer is a fresh ``mmap`` faulting in 256 pages (~0.3-1 ms a MiB on a
busy machine); keeping freed heap and serving allocations up to :data:`MMAP_BYTES` from it
reuses mapped pages, at the cost of up to :data:`TRIM_BYTES` held while unused.
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: freed heap memory kept for reuse before any is returned to the system
TRIM_BYTES = 64 * 1024 * 1024
#: allocations up to this size come from the heap (larger ones are mapped and unmapped alone)
MMAP_BYTES = 32 * 1024 * 1024
#: glibc's own environment knobs: when one is set, the user's tuning wins
ENVIRONMENT = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")


def keep_freed_memory() -> bool:
    """Tune this process's allocator (see the module); False where there is nothing to tune
    (not glibc) or the environment already tunes it."""
    if any(os.environ.get(name) for name in ENVIRONMENT):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_BYTES)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_BYTES)
    )
