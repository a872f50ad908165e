"""How much freed host memory glibc keeps for reuse (``--malloc-retain-bytes``).

A decode call's request, its decoded tensors and its answer are a few buffers of hundreds
of KiB each (a packed 64-session step: about 4 MB in all). glibc returns the top of its heap
to the kernel once more than its trim threshold is free there, and by default that
threshold follows the largest buffer freed so far (about twice it): so after every call
those megabytes went back to the kernel and the next call faulted them in again, page by
page. Measured with ``benchmarks/batch_path.py --canned-backend`` at B = 64 on a 2-CPU VM:
about 980 minor page faults and 2.3 ms of kernel time a call in the server, against 3 to 29
faults for a bare gRPC echo of the same bytes; with the memory retained, under one fault a
call and 2.2 ms less CPU a call. The cost: up to that many freed bytes stay resident in
each of glibc's malloc arenas (the main one, and one per thread that allocates heavily:
the engine's worker, gRPC's threads) instead of going back to the kernel."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

from .observability.logs import event

log = logging.getLogger("q8kv.server")

# mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# glibc refuses an mmap threshold above HEAP_MAX_SIZE / 2 (32 MiB on 64-bit): larger
# buffers keep their own mappings, which is what a rare huge message should do.
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024


def retain_freed_memory(retain_bytes: int) -> bool:
    """Keep up to ``retain_bytes`` of freed memory at the top of glibc's heaps, and serve
    buffers up to min(retain_bytes, 32 MiB) from them instead of fresh mappings. 0 leaves
    glibc's defaults. Returns whether the settings took (False off glibc)."""
    if retain_bytes <= 0:
        return False
    if platform.libc_ver()[0] != "glibc":
        event(log, "malloc_retain_skipped", reason="not glibc", libc=platform.libc_ver()[0])
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mmap_threshold = min(retain_bytes, MMAP_THRESHOLD_MAX)
    ok = bool(libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(mmap_threshold))) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(min(retain_bytes, 2**31 - 1)))
    )
    event(
        log,
        "malloc_retain",
        level=logging.DEBUG if ok else logging.WARNING,
        retain_bytes=retain_bytes,
        mmap_threshold=mmap_threshold,
        applied=ok,
    )
    return ok
