"""Host <-> device transfers of the GPU backend: page-locked staging buffers, the upload of a
packed batch (threaded, chunked and overlapped with PCIe when large), and the outputs handed
back without a host copy when large. CuPy only for pinned memory and the copies."""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import cupy as cp
import ml_dtypes
import numpy as np

from ..base import AttendItem
from .packing import Batch


class Pinned:
    """A growing page-locked host buffer (viewed as uint8)."""

    def __init__(self) -> None:
        self.mem = None
        self.view = np.empty(0, np.uint8)

    def get(self, nbytes: int) -> np.ndarray:
        if nbytes > self.view.size:
            size = max(nbytes, 2 * self.view.size, 1 << 20)
            self.mem = cp.cuda.alloc_pinned_memory(size)
            self.view = np.frombuffer(self.mem, dtype=np.uint8, count=size)
        return self.view


# Outputs from this many bytes come back in a page-locked block of CuPy's pinned pool that
# the caller keeps (it returns to the pool when the arrays die): no host copy of a large
# output. Smaller ones are copied out of the reused buffer. The break-even, H200 host
# (2026-11-30, benchmarks/pinned_outputs.py): a pool block costs 1.6 us to take and give
# back, a copy 2.2 us at 64 KiB, 3.9 at 128 KiB, 14.4 at 512 KiB (a B = 64 float16 answer).
FRESH_OUTPUT_BYTES = 128 << 10
# A deferred input copy crosses PCIe in pieces of this size, copied into the pinned buffer by
# one thread per COPY_THREAD_BYTES of the call, UPLOAD_THREADS at most. On the H200 machine's
# Xeon, 6 MiB copied in 317 us by 4 threads and 522 by 8, 96 MiB in 4.4 ms by 4 and 1.8 ms
# by 8 (`python3 benchmarks/host_copies.py`, host_copies-h200.json, 2026-11-30); in a call,
# 12 or 16 threads were slower than 8 (docs/design.md, "Prefill on the GPU").
UPLOAD_CHUNK_BYTES = 1 << 20
COPY_THREAD_BYTES = 3 << 19
UPLOAD_THREADS = 8
NARROW = (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))


def pooled_pinned(nbytes: int) -> np.ndarray:
    """uint8 [nbytes] over a block of CuPy's pinned memory pool, freed with the array."""
    mem = cp.cuda.alloc_pinned_memory(max(nbytes, 1))
    return np.frombuffer(mem, np.uint8, count=max(nbytes, 1))


def grow(arr: cp.ndarray | None, size: int, dtype, zero: bool = False) -> cp.ndarray:
    if arr is not None and arr.size >= size:
        return arr
    size = max(size, 2 * (arr.size if arr is not None else 0), 1024)
    return cp.zeros(size, dtype) if zero else cp.empty(size, dtype)


class Scratch:
    """A growing device buffer (uint8) within a cap: the 16-bit K/V tiles of a prefill."""

    def __init__(self) -> None:
        self.buffer: cp.ndarray | None = None

    def take(self, need: int, cap: int) -> int:
        """Device address of at least ``need`` bytes (grown to twice the old size, within
        ``cap``; the old buffer back to the current stream's pool first), or 0 where ``need``
        passes ``cap`` or the device has no memory for it."""
        if need > cap:
            return 0
        if self.buffer is None or self.buffer.size < need:
            old = 0 if self.buffer is None else self.buffer.size
            self.buffer = None
            try:
                self.buffer = cp.empty(min(max(need, 2 * old), cap), cp.uint8)
            except cp.cuda.memory.OutOfMemoryError:
                return 0
        return self.buffer.data.ptr


class Uploader:
    """Inputs to the device. A batch without pending copies goes in one H2D copy; a large
    one (packing left its q/k/v copies pending) sends its head (meta rows, page ids) first,
    then threads copy its q/k/v into the pinned buffer in chunks, and each chunk is sent as
    it lands, so the copies and PCIe overlap. On the H200 machine's Xeon the threads copy
    20 GB/s (6 MiB) to 57 GB/s (96 MiB) into pinned memory, less while PCIe reads it, and
    PCIe from pinned memory runs 48-55 GB/s: the host copy, not PCIe, bounds a call. Pinning
    the request's own memory in place instead (cudaHostRegister, H2D, unregister) took 601 us
    for 6 MiB: no faster than the copy (`python3 benchmarks/host_copies.py`, 2026-11-30)."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None

    def upload(self, batch: Batch, host: Pinned, dev: cp.ndarray, stream) -> None:
        def h2d(offset: int, nbytes: int) -> None:
            if nbytes:
                (dev.data + offset).copy_from_host_async(
                    ctypes.c_void_p(host.mem.ptr + offset), nbytes, stream
                )

        if not batch.pending:
            h2d(0, batch.nbytes)
            return
        h2d(0, min(off for off, _ in batch.pending))
        chunks = [
            (off + i, src[i : i + UPLOAD_CHUNK_BYTES])
            for off, src in batch.pending
            for i in range(0, src.size, UPLOAD_CHUNK_BYTES)
        ]
        limit = min(UPLOAD_THREADS, os.cpu_count() or 1)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(limit, "q8kv-copy")
        total = sum(src.size for _, src in chunks)
        workers = max(1, min(limit, len(chunks), -(-total // COPY_THREAD_BYTES)))
        view = host.view
        landed = [threading.Event() for _ in chunks]

        def copy_every(first: int) -> None:  # chunks first, first + workers, ...: in turn
            for c in range(first, len(chunks), workers):
                off, src = chunks[c]
                np.copyto(view[off : off + src.size], src)  # releases the GIL
                landed[c].set()

        tasks = [self._pool.submit(copy_every, w) for w in range(workers)]
        for c, (off, src) in enumerate(chunks):
            while not landed[c].wait(0.05):
                if tasks[c % workers].done():  # it failed before this chunk: its error
                    tasks[c % workers].result()
                    raise RuntimeError("an input copy thread stopped before its chunk")
            h2d(off, src.size)
        batch.pending = []

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


def one_narrow_dtype(items: Sequence[AttendItem]) -> np.dtype | None:
    """The 16-bit out dtype every live item shares (outputs narrowed on the device), or
    None (float32, or mixed: float32 back, cast on the host)."""
    dtypes = {np.dtype(it.out_dtype) for it in items if it.n}
    one = dtypes.pop() if len(dtypes) == 1 else None
    return one if one in NARROW else None


def split_outputs(
    outputs: Sequence[tuple[int, tuple[int, int, int]]],
    items: Sequence[AttendItem],
    flat: np.ndarray,
    fresh: bool,
) -> list[np.ndarray]:
    """Each item's [n, H, D] output in its out_dtype from the downloaded ``flat`` outputs:
    views where ``flat`` is the caller's own, copies where it is the reused buffer."""
    result = []
    for (off, shape), it in zip(outputs, items, strict=True):
        if off < 0:
            result.append(np.empty(shape, it.out_dtype))
            continue
        view = flat[off : off + shape[0] * shape[1] * shape[2]].reshape(shape)
        if view.dtype != it.out_dtype:
            result.append(view.astype(it.out_dtype))
        else:
            result.append(view if fresh else view.copy())
    return result
