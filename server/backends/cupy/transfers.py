"""Host <-> device transfers of the GPU backend: page-locked staging buffers, the upload of a
packed batch (threaded, chunked and overlapped with PCIe when large), and the outputs handed
back without a host copy when large. CuPy only for pinned memory and the copies."""

from __future__ import annotations

import ctypes
import os
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
UPLOAD_CHUNK_BYTES = 4 << 20  # a deferred input copy crosses PCIe in pieces of this size
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


class Uploader:
    """Inputs to the device. A batch without pending copies goes in one H2D copy; a large
    one (packing left its q/k/v copies pending) sends its head (meta rows, page ids) first,
    then threads copy its q/k/v into the pinned buffer in chunks, and each chunk is sent as
    it lands, so the copies and PCIe overlap. On the H200 machine's Xeon one thread copied
    ~11 GB/s into pinned memory, eight ~29 GB/s, and PCIe from pinned memory ran ~52 GB/s
    (2026-11-30, `cd benchmarks && python3 prefill.py --host-phases --shapes 0+2048`)."""

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
        if self._pool is None:
            self._pool = ThreadPoolExecutor(min(8, os.cpu_count() or 1), "q8kv-copy")
        view = host.view
        copies = [
            self._pool.submit(np.copyto, view[off : off + src.size], src) for off, src in chunks
        ]
        for (off, src), done in zip(chunks, copies, strict=True):
            done.result()  # numpy copies release the GIL: the threads run in parallel
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
