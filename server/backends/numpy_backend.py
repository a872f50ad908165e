"""The reference backend: the page pool in host memory, the math in vectorized numpy.

It runs everywhere (CI uses it) and is what the GPU kernels are tested against. No Python
loop runs per token or per head; the only loop is over the items of a batch.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from q8kv import format as q8

from .base import QBLOCK, AttendItem, Backend


class NumpyBackend(Backend):
    name = "numpy"

    def __init__(self, num_pages: int, page_code_bytes: int = 64 * 1024) -> None:
        super().__init__(num_pages, page_code_bytes)
        # np.zeros maps untouched memory lazily, so a large budget costs nothing until used.
        self.codes = np.zeros((num_pages, page_code_bytes), dtype=np.int8)
        self.scales = np.zeros((num_pages, page_code_bytes // QBLOCK), dtype=np.float32)

    # -- Backend ---------------------------------------------------------------------------

    def _append(self, item: AttendItem) -> None:
        kv = np.stack([item.k, item.v]).astype(np.float32)  # [2, n, KVH, D]
        codes, scales = q8.quantize(kv)
        self.write_tokens(
            item.layout, item.page_ids, item.start,
            codes.transpose(0, 2, 1, 3), scales.transpose(0, 2, 1, 3),
        )

    def write_tokens(self, layout, page_ids, start, codes, scales) -> None:
        """Raw Q8 tokens [2, KVH, n, D] (codes) / [..., D/32] (scales) into their pages,
        one slice assignment per page touched."""
        kvh, t, n = layout.num_kv_heads, layout.tokens_per_page, codes.shape[2]
        widths = (layout.head_dim, layout.blocks)
        done = 0
        while done < n:
            position = start + done
            page, slot = int(page_ids[position // t]), position % t
            take = min(n - done, t - slot)
            pools = zip((self.codes, self.scales), (codes, scales), widths, strict=True)
            for pool, tokens, width in pools:
                view = pool[page, : 2 * kvh * t * width].reshape(2, kvh, t, width)
                view[:, :, slot : slot + take] = tokens[:, :, done : done + take]
            done += take

    def _attend(self, item: AttendItem) -> np.ndarray:
        layout, n, start = item.layout, item.n, item.start
        kvh, g, d = layout.num_kv_heads, layout.group, layout.head_dim
        total = start + n
        codes, scales = self.read_tokens(layout, item.page_ids, 0, total)
        keys, values = q8.dequantize(codes, scales)  # each [KVH, total, D]
        # Rows of one kv head's query matrix are (group member, new token): [KVH, G*n, D].
        q = item.q.astype(np.float32).reshape(n, kvh, g, d).transpose(1, 2, 0, 3)
        q = q.reshape(kvh, g * n, d)
        scores = (q @ keys.transpose(0, 2, 1)) * np.float32(item.softmax_scale)
        # Causal among the new tokens: new token i sees cache positions [0, start + i].
        token = np.arange(g * n) % n
        visible = np.arange(total)[None, :] <= (start + token)[:, None]
        scores = np.where(visible[None], scores, np.float32(-np.inf))
        scores -= scores.max(axis=-1, keepdims=True)
        weights = np.exp(scores, dtype=np.float32)
        weights /= weights.sum(axis=-1, keepdims=True)
        out = (weights @ values).reshape(kvh, g, n, d).transpose(2, 0, 1, 3)
        return np.ascontiguousarray(out.reshape(n, kvh * g, d), dtype=np.float32)

    def _timed(self, kernel: str, started: float) -> None:
        # On the CPU, enqueueing and running are one: both figures are the op's wall time.
        elapsed = time.perf_counter() - started
        self.on_kernel(kernel, elapsed, elapsed)

    def append_and_attend(self, items: Sequence[AttendItem]) -> list[np.ndarray]:
        started = time.perf_counter()
        for item in items:
            self._append(item)
        self._timed("quantize_append", started)
        started = time.perf_counter()
        outputs = [self._attend(item) for item in items]
        self._timed("attention", started)
        return outputs

    def dequantize(self, layout, page_ids, start, end):
        started = time.perf_counter()
        codes, scales = self.read_tokens(layout, page_ids, start, end)
        values = q8.dequantize(codes, scales)
        k, v = np.ascontiguousarray(values[0]), np.ascontiguousarray(values[1])
        self._timed("dequantize", started)
        return k, v

    def read_pages(self, page_ids):
        return self.codes[page_ids].copy(), self.scales[page_ids].copy()

    def write_pages(self, page_ids, codes, scales):
        self.codes[page_ids] = codes
        self.scales[page_ids] = scales
