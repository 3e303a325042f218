"""glibc's allocator tuned for the processes remap starts (server, node, cores), which free and
allocate MiB-sized buffers (frames, pickles, arguments) all the time.

By default glibc gives freed memory at the top of its heap back to the system at once and
serves large allocations with fresh ``mmap``s: every MiB buffer then faults in 256 new pages
(~480 faults for a MiB received and copied once), ~0.3-1 ms a MiB on a busy machine. Keeping
up to :data:`TRIM_BYTES` of freed heap and taking allocations up to :data:`MMAP_BYTES` from the
heap reuses pages already mapped (0 faults once warm). The cost: a process may hold up to
:data:`TRIM_BYTES` of freed memory it is not using.
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
