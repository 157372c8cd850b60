"""The C library's heap in long-running processes (the server; bench/soak.py).

glibc serves a large allocation with its own mmap at first, but each time such a block is freed it
raises its "mmap threshold" to that block's size (up to 32 MiB), so that later blocks of that size come
from the heap arenas instead, where freed memory mostly stays with the process. A Session's operations
allocate and free blocks of many sizes up to a few MiB per call (logits, activations, per-chunk KV) from
several threads, i.e. several arenas: in bench/soak.py (8 threads, one Session) RSS then grew by
~27 MiB/min while the memory in use stayed flat (glibc's free heap grew instead; no leak:
bench/results/soak_diag_*.json). fix_mmap_threshold() pins the threshold, which also turns the dynamic
raise off: blocks above it always come from mmap and go back to the system when freed.
"""
from __future__ import annotations

import ctypes
import os

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
DEFAULT_THRESHOLD = 256 * 1024


def fix_mmap_threshold(nbytes: int = DEFAULT_THRESHOLD) -> bool:
    """Have glibc serve every allocation of nbytes or more with its own mmap, returned to the system on
    free (for the whole process). Left alone when MALLOC_MMAP_THRESHOLD_ is set in the environment (the
    user chose). Returns whether the threshold is now fixed (False on a C library other than glibc)."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return True  # glibc read it at start-up, which also turned the dynamic threshold off
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, int(nbytes)))
