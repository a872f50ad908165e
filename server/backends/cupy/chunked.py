"""One large prefill item through the device in token chunks, so that the host's copy of a
chunk's q/k/v overlaps the device's work on the chunk before it and the copy back of that
chunk's output.

A large call is bound by the host, not by PCIe: the request's bytes are in pageable memory
and reach the device through a copy into pinned memory at 17-29 GB/s on the H200 machine,
against 52 GB/s over PCIe (transfers.Uploader). Done whole, the device waits for every
byte before it starts, and the host waits for the device before the answer comes back.
In chunks, with three streams:

- copy stream: chunk c's head and q/k/v pieces, H2D as each piece lands (Uploader);
- the backend's stream: chunk c's quantize-append and attention once its copy is in,
  then its output narrowed to the wire's 16-bit type;
- back stream: chunk c's output, D2H into the answer's pinned block, once narrowed.

Chunk c is the same item with ``start + a`` and the new tokens [a, b): its queries see the
tokens the chunks before it appended, so the chunks together compute exactly the whole
call (causal attention), as the server's chunked prefill does. Each chunk has its own
pinned and device input buffers (kept for the next call), so no copy overwrites bytes a
transfer still reads.
"""

from __future__ import annotations

import time
from dataclasses import replace

import cupy as cp
import ml_dtypes
import numpy as np

from ..base import AttendItem
from .packing import Batch, pack
from .planning import chunk_bounds, input_bytes
from .transfers import NARROW, Pinned, grow, pooled_pinned


class ChunkedPrefill:
    """The per-chunk buffers and the two extra streams, kept across calls."""

    def __init__(self) -> None:
        self._hosts: list[Pinned] = []
        self._devs: list[cp.ndarray | None] = []
        self._copy: cp.cuda.Stream | None = None
        self._back: cp.cuda.Stream | None = None

    def close(self) -> None:
        self._hosts, self._devs = [], []
        self._copy = self._back = None

    def _buffers(self, c: int) -> Pinned:
        while len(self._hosts) <= c:
            self._hosts.append(Pinned())
            self._devs.append(None)
        return self._hosts[c]

    def run(self, backend, item: AttendItem) -> np.ndarray:
        """The item's output [n, H, D] in its out_dtype (a pooled pinned block, the caller's
        own); ``backend`` is the CupyBackend whose pool, kernels and stream it uses."""
        if self._copy is None:
            self._copy = cp.cuda.Stream(non_blocking=True)
            self._back = cp.cuda.Stream(non_blocking=True)
        lay, out_dtype = item.layout, np.dtype(item.out_dtype)
        row = lay.num_heads * lay.head_dim  # output floats per token
        narrow = out_dtype in NARROW
        width = 2 if narrow else 4
        answer = pooled_pinned(item.n * row * width)
        main = backend.stream
        launch_s = [0.0, 0.0]
        marks: list[tuple[cp.cuda.Event, cp.cuda.Event, cp.cuda.Event]] = []
        out = backend._dev_out = grow(backend._dev_out, item.n * row, cp.float32)
        if narrow:
            backend._dev_narrow = grow(backend._dev_narrow, item.n * row, cp.uint16)
        with main:
            if backend.poison_outputs:  # once: a chunk's fill must not meet another's copy
                out.fill(np.nan)
        # Pack every chunk and start its copies first: the threads copy chunk after chunk
        # without waiting, while this thread sends and launches each as it lands.
        chunks = []
        for c, (a, b) in enumerate(chunk_bounds(item.n, input_bytes(item))):
            part = replace(item, start=item.start + a, q=item.q[a:b], k=item.k[a:b],
                           v=item.v[a:b])  # fmt: skip
            host = self._buffers(c)
            batch = pack([part], host.get, backend._attn_kernel, backend._policy(),
                         defer_copies=True)  # fmt: skip
            self._devs[c] = batch.dev = grow(self._devs[c], batch.nbytes, cp.uint8)
            chunks.append((a, b, batch, host, backend._uploader.start(batch, host)))
        for a, b, batch, host, copies in chunks:
            backend._uploader.send(copies, batch, host, batch.dev, self._copy)
            main.wait_event(self._copy.record())
            marks.append(self._launch(backend, batch, out, a * row, (b - a) * row, launch_s))
            self._send_back(backend, main, a * row, (b - a) * row, narrow, out_dtype, answer)
        self._back.synchronize()
        backend.report_chunks(launch_s, marks)
        flat = answer[: item.n * row * width].view(np.float32 if not narrow else out_dtype)
        result = flat.reshape(item.n, lay.num_heads, lay.head_dim)
        return result if result.dtype == out_dtype else result.astype(out_dtype)

    @staticmethod
    def _launch(backend, batch: Batch, out, first: int, count: int, launch_s: list[float]):
        """The chunk's append and attention on the backend's stream, its output at float
        ``first`` of ``out``; events around each, host launch seconds added up."""
        e = (cp.cuda.Event(), cp.cuda.Event(), cp.cuda.Event())
        main = backend.stream
        e[0].record(main)
        t0 = time.perf_counter()
        backend.launch_append(batch)
        t1 = time.perf_counter()
        e[1].record(main)
        backend.launch_attention(batch, out=out[first : first + count])
        launch_s[0] += t1 - t0
        launch_s[1] += time.perf_counter() - t1
        e[2].record(main)
        return e

    def _send_back(self, backend, main, first: int, count: int, narrow: bool, dtype,
                   answer: np.ndarray) -> None:  # fmt: skip
        """The chunk's output (narrowed on the backend's stream) D2H on the back stream into
        ``answer`` at the chunk's place."""
        if narrow:
            backend.narrow(first, count, dtype == ml_dtypes.bfloat16)
            src, width = backend._dev_narrow, 2
        else:
            src, width = backend._dev_out, 4
        self._back.wait_event(main.record())
        host_ptr = answer.ctypes.data + first * width
        (src.data + first * width).copy_to_host_async(host_ptr, count * width, self._back)


