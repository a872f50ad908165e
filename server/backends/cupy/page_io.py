"""The GPU backend's page reads and writes beside attention: the Dequantize RPC (pages ->
float32 K/V on the device, then to the host), and whole pages out and in (export, import,
fork's copies). A mixin of CupyBackend: it uses the backend's pool (``codes``, ``scales``),
device, stream, dequantize kernel and events."""

from __future__ import annotations

import time

import cupy as cp
import numpy as np

from q8kv.format import LayerLayout


class PageIO:
    def dequantize_device(self, layout: LayerLayout, page_ids, start: int, end: int) -> cp.ndarray:
        """K and V of tokens [start, end) as a device float32 array [2, KVH, end-start, D].

        ``page_ids`` may be a numpy or a device int32 array. Runs on the backend's stream.
        """
        kvh, d = layout.num_kv_heads, layout.head_dim
        length = max(0, end - start)
        with self._device, self._stream:
            ptab = cp.asarray(page_ids, dtype=cp.int32)
            out = cp.empty((2, kvh, length, d), cp.float32)
            total = 2 * kvh * length * (d // 16)
            if total:
                self._dequant_k(
                    (-(-total // 256),),
                    (256,),
                    (
                        ptab,
                        np.int32(layout.tokens_per_page.bit_length() - 1),
                        np.int32(kvh),
                        np.int32(d),
                        np.int32(start),
                        np.int32(length),
                        self.codes,
                        self.scales,
                        np.int32(self.page_code_bytes),
                        out,
                    ),
                )
        return out

    def dequantize(
        self, layout: LayerLayout, page_ids: np.ndarray, start: int, end: int
    ) -> tuple[np.ndarray, np.ndarray]:
        marks = self._marks
        with self._device:
            marks[0].record(self._stream)
        started = time.perf_counter()
        out = self.dequantize_device(layout, np.asarray(page_ids, dtype=np.int32), start, end)
        launched = time.perf_counter()
        with self._device:
            marks[1].record(self._stream)
            host = out.get(stream=self._stream)
            # An empty read copies nothing and so does not wait for the stream.
            marks[1].synchronize()
        seconds = cp.cuda.get_elapsed_time(marks[0], marks[1]) / 1e3
        self.on_kernel("dequantize", launched - started, seconds)
        return np.ascontiguousarray(host[0]), np.ascontiguousarray(host[1])

    def read_pages(self, page_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with self._device, self._stream:
            ids = cp.asarray(np.asarray(page_ids, dtype=np.int64))
            return self.codes[ids].get(stream=self._stream), self.scales[ids].get(
                stream=self._stream
            )

    def write_pages(self, page_ids: np.ndarray, codes: np.ndarray, scales: np.ndarray) -> None:
        with self._device, self._stream:
            ids = cp.asarray(np.asarray(page_ids, dtype=np.int64))
            self.codes[ids] = cp.asarray(np.asarray(codes, dtype=np.int8))
            self.scales[ids] = cp.asarray(np.asarray(scales, dtype=np.float32))
            self._stream.synchronize()
