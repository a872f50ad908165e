"""The reference backend: the page pool in host memory, the math in vectorized numpy.

It runs everywhere (CI uses it) and is what the GPU kernels are tested against. No Python
loop runs per token or per head; the only loops are over the items of a batch and over the
chunks of an item's queries that bound its memory (``SCORE_CHUNK_BYTES``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from q8kv import format as q8

from .base import QBLOCK, AttendItem, Backend

# Most float32 attention scores one chunk of an item's queries holds at once (see _attend):
# without chunks a 16k-token prefill built [KVH, G*n, L] scores, ~18 GiB.
SCORE_CHUNK_BYTES = 64 * 1024 * 1024


class NumpyBackend(Backend):
    name = "numpy"
    score_chunk_bytes = SCORE_CHUNK_BYTES

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
        """Attention of the item's queries over its layer, in chunks of query rows.

        Memory bound (host RAM, per item): the layer's cache read back as float32 K and V
        (about 6 bytes per cached value with the raw codes read from the pages), plus, per
        chunk, at most ``score_chunk_bytes`` of float32 scores/weights (computed in place)
        and a boolean causal mask a quarter of that per kv head. A chunk is a block of kv
        heads times a block of (token, group member) rows, sized so that
        rows x visible keys x 4 bytes <= score_chunk_bytes; one row is at most
        4 bytes x max_len (2**24) = 64 MiB, so the default bound always holds. Rows are
        independent, so chunking changes no result beyond float32 rounding of the matmuls.
        """
        layout, n, start = item.layout, item.n, item.start
        kvh, g, d = layout.num_kv_heads, layout.group, layout.head_dim
        total = start + n
        codes, scales = self.read_tokens(layout, item.page_ids, 0, total)
        keys, values = q8.dequantize(codes, scales)  # each [KVH, total, D]
        del codes, scales
        # Rows of one kv head's query matrix are (new token, group member): [KVH, n*G, D],
        # so a block of rows is a block of tokens and sees a prefix of the keys.
        q = item.q.astype(np.float32).reshape(n, kvh, g, d).transpose(1, 0, 2, 3)
        q = q.reshape(kvh, n * g, d)
        rows = n * g
        row_budget = max(1, self.score_chunk_bytes // (4 * total))
        row_block = min(rows, row_budget)
        head_block = max(1, min(kvh, row_budget // row_block))
        out = np.empty((kvh, rows, d), dtype=np.float32)
        scale = np.float32(item.softmax_scale)
        for h0 in range(0, kvh, head_block):
            heads = slice(h0, h0 + head_block)
            for r0 in range(0, rows, row_block):
                r1 = min(rows, r0 + row_block)
                token = start + np.arange(r0, r1) // g  # cache position of each row's token
                width = int(token[-1]) + 1  # keys any row of the block may see
                scores = q[heads, r0:r1] @ keys[heads, :width].transpose(0, 2, 1)
                scores *= scale
                # Causal: the new token at cache position p sees positions [0, p].
                hidden = np.arange(width)[None, :] > token[:, None]
                np.copyto(scores, np.float32(-np.inf), where=hidden[None])
                scores -= scores.max(axis=-1, keepdims=True)
                np.exp(scores, out=scores)
                scores /= scores.sum(axis=-1, keepdims=True)
                out[heads, r0:r1] = scores @ values[heads, :width]
        out = out.reshape(kvh, n, g, d).transpose(1, 0, 2, 3)
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

    def copy_page(self, source: int, target: int) -> None:
        self.codes[target] = self.codes[source]
        self.scales[target] = self.scales[source]
