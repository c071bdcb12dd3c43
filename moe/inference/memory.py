"""Keep freed expert memory from lingering in the process.

glibc raises its mmap threshold each time a large mmapped block is freed, so after a few page-outs the
megabyte-sized tensors of paged experts are carved from the heap instead, where small long-lived objects
pin them and the heap can not shrink: resident memory creeps past the pager's budget. A fixed threshold
keeps every large allocation in a mapping of its own, returned to the system when freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_MMAP_THRESHOLD = -3


@functools.cache
def fix_mmap_threshold(threshold: int = 64 << 10) -> bool:
    """Set glibc's mmap threshold once per process; False where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return bool(libc and libc.mallopt(M_MMAP_THRESHOLD, threshold) == 1)
    except (OSError, AttributeError):
        return False
