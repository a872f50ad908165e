"""The reference backend: the page pool in host memory, the math in vectorized numpy.

It runs everywhere (CI uses it) and is what the GPU kernels are tested against. No Python
loop runs per token or per head; the only loops are over the items of a batch and over the
chunks of an item's queries that bound its memory (``SCORE_CHUNK_BYTES``). A packed batch
(``attend_packed``) loops over groups of sessions of one length instead
(``GROUP_CACHE_BYTES``; a group whose K/V outgrow it, over blocks of its kv heads), with the
same result bit for bit.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from q8kv import format as q8

from . import halfcast
from .base import QBLOCK, AttendItem, Backend, LayerLayout, PackedItems

# Most float32 attention scores one chunk of an item's queries holds at once (see _attend):
# without chunks a 16k-token prefill built [KVH, G*n, L] scores, ~18 GiB.
SCORE_CHUNK_BYTES = 64 * 1024 * 1024
# Most cache read back at once when sessions of a packed batch are attended together: a
# group's K/V must stay in the CPU's caches (measured, 2 vCPUs: 4 MiB groups 1.1x faster
# than per item at 64 x 200 tokens; 128 MiB groups 1.8x slower).
GROUP_CACHE_BYTES = 4 * 1024 * 1024
# Query blocks of at most this many rows (a decode step: the GQA group) take their scores as
# keys @ q^T (see _scores).
KEYS_FIRST_ROWS = 64


class NumpyBackend(Backend):
    name = "numpy"
    score_chunk_bytes = SCORE_CHUNK_BYTES
    group_cache_bytes = GROUP_CACHE_BYTES

    def __init__(self, num_pages: int, page_code_bytes: int = 64 * 1024) -> None:
        super().__init__(num_pages, page_code_bytes)
        # np.zeros maps untouched memory lazily, so a large budget costs nothing until used.
        self.codes = np.zeros((num_pages, page_code_bytes), dtype=np.int8)
        self.scales = np.zeros((num_pages, page_code_bytes // QBLOCK), dtype=np.float32)
        self._views: dict[tuple[int, int, int], tuple[np.ndarray, np.ndarray]] = {}

    def _pool_views(self, layout: LayerLayout) -> tuple[np.ndarray, np.ndarray]:
        """Codes and scales as [page, kind, KVH, T, width] views of the pools, per layout:
        built once (building them costs about as much as a decode step's write)."""
        kvh, t, d = layout.num_kv_heads, layout.tokens_per_page, layout.head_dim
        views = self._views.get((kvh, t, d))
        if views is None:
            # Views (copy=False raises otherwise): stores must land in the pool.
            codes, scales = (
                pool[:, : 2 * kvh * t * width].reshape(len(pool), 2, kvh, t, width, copy=False)
                for pool, width in ((self.codes, d), (self.scales, layout.blocks))
            )
            views = self._views[kvh, t, d] = (codes, scales)
        return views

    # -- Backend ---------------------------------------------------------------------------

    def _append(self, item: AttendItem) -> None:
        codes, scales = q8.quantize(_stacked_float32(item.k, item.v))  # [2, n, KVH, D]
        self.write_tokens(
            item.layout, item.page_ids, item.start,
            codes.transpose(0, 2, 1, 3), scales.transpose(0, 2, 1, 3),
        )

    def write_tokens(self, layout, page_ids, start, codes, scales) -> None:
        """Raw Q8 tokens [2, KVH, n, D] (codes) / [..., D/32] (scales) into their pages,
        one slice assignment per page touched."""
        t, n = layout.tokens_per_page, codes.shape[2]
        code_pages, scale_pages = self._pool_views(layout)
        done = 0
        while done < n:
            position = start + done
            page, slot = int(page_ids[position // t]), position % t
            take = min(n - done, t - slot)
            code_pages[page, :, :, slot : slot + take] = codes[:, :, done : done + take]
            scale_pages[page, :, :, slot : slot + take] = scales[:, :, done : done + take]
            done += take

    def _layer_tokens(
        self, layout: LayerLayout, page_ids: np.ndarray, total: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Codes int8 [2, KVH, total, D] and scales float32 [..., D/32] of a layer's first
        ``total`` tokens, read for attention: views of the pool when they fit one page (a
        decode step's short cache), else ``_gather_tokens``' copy."""
        if total <= layout.tokens_per_page:
            page = int(page_ids[0])
            codes, scales = (view[page, :, :, :total] for view in self._pool_views(layout))
            return codes, scales
        codes, scales = self._gather_tokens(layout, [page_ids], total, slice(None))
        return codes[0], scales[0]

    def _attend(self, item: AttendItem, dtype: np.dtype | type = np.float32) -> np.ndarray:
        """Attention of the item's queries over its layer, in chunks of query rows: [n, H, D]
        computed in float32, returned in ``dtype``.

        Memory bound (host RAM, per item): the layer's cache read back as float32 K and V
        (about 6 bytes per cached value with the raw codes read from the pages), plus, per
        chunk, at most ``score_chunk_bytes`` of float32 scores/weights (computed in place;
        twice that for a moment in a block of at most KEYS_FIRST_ROWS rows: see _scores)
        and a boolean causal mask a quarter of that per kv head. A chunk is a block of kv
        heads times a block of (token, group member) rows, sized so that
        rows x visible keys x 4 bytes <= score_chunk_bytes; one row is at most
        4 bytes x max_len (2**24) = 64 MiB, so the default bound always holds. Rows are
        independent, so chunking changes no result beyond float32 rounding of the matmuls.
        """
        layout, n, start = item.layout, item.n, item.start
        kvh, g, d = layout.num_kv_heads, layout.group, layout.head_dim
        total = start + n
        codes, scales = self._layer_tokens(layout, item.page_ids, total)
        keys, values = q8.dequantize(codes, scales)  # each [KVH, total, D]
        del codes, scales
        # Rows of one kv head's query matrix are (new token, group member): [KVH, n*G, D],
        # so a block of rows is a block of tokens and sees a prefix of the keys.
        q = halfcast.to_float32(item.q).reshape(n, kvh, g, d).transpose(1, 0, 2, 3)
        q = q.reshape(kvh, n * g, d)
        rows = n * g
        row_budget = max(1, self.score_chunk_bytes // (4 * total))
        row_block = min(rows, row_budget)
        head_block = max(1, min(kvh, row_budget // row_block))
        scale = np.float32(item.softmax_scale)
        if head_block == kvh and row_block == rows:  # one block (a decode step): no copy
            out = _attend_rows(q, keys, values, start, g, 0, rows, scale)
        else:
            out = np.empty((kvh, rows, d), dtype=np.float32)
            for h0 in range(0, kvh, head_block):
                heads = slice(h0, h0 + head_block)
                for r0 in range(0, rows, row_block):
                    r1 = min(rows, r0 + row_block)
                    out[heads, r0:r1] = _attend_rows(
                        q[heads], keys[heads], values[heads], start, g, r0, r1, scale
                    )
        out = out.reshape(kvh, n, g, d).transpose(1, 0, 2, 3)
        # Cast once, straight into the answer's dtype (float32 by default, as computed).
        return np.ascontiguousarray(out.reshape(n, kvh * g, d), dtype=dtype)

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
        outputs = [self._attend(item, item.out_dtype) for item in items]
        self._timed("attention", started)
        return outputs

    def attend_packed(self, batch: PackedItems) -> np.ndarray:
        """One quantize and one scattered write for the whole batch; attention batched over
        sessions of equal length (equal lengths mean equal starts, so one causal mask), in
        groups that hold the memory bound of ``_attend``. Bit for bit the per-item result:
        per session the same matmul shapes, the same reductions."""
        started = time.perf_counter()
        self._append_packed(batch)
        self._timed("quantize_append", started)
        started = time.perf_counter()
        lay, n = batch.layout, batch.n
        out = np.empty((batch.size, n, lay.num_heads, lay.head_dim), batch.out_dtype)
        for rows, length in self._groups(batch):
            if length < 0:  # a long prefill: _attend chunks its rows
                out[rows] = self._attend(batch.item(int(rows)))
            else:
                q = halfcast.to_float32(batch.q[rows])
                out[rows] = self._attend_same_length(batch, q, rows, length)
        self._timed("attention", started)
        return out

    def _groups(self, batch: PackedItems) -> list[tuple[slice | np.ndarray | int, int]]:
        """(sessions, their common length) to attend together, within the memory bounds;
        length -1 for a session whose scores alone exceed ``score_chunk_bytes``."""
        lay, n = batch.layout, batch.n
        lengths = batch.starts + n
        # One session's scores in one piece (as _attend computes them when they fit), and
        # its K and V read back: raw pages, token-major codes, float32 values.
        scores = 4 * lay.num_heads * n * lengths
        cache = 16 * lay.num_kv_heads * lay.head_dim * lengths

        def runs(rows: np.ndarray | None, first: int) -> list:
            step = max(1, min(self.score_chunk_bytes // int(scores[first]),
                              self.group_cache_bytes // int(cache[first])))
            length = int(lengths[first])
            if rows is None:  # every session: slices (views, no fancy-index copies)
                return [(slice(i, i + step), length) for i in range(0, batch.size, step)]
            return [(rows[i : i + step], length) for i in range(0, len(rows), step)]

        if lengths.min() == lengths.max() and scores[0] <= self.score_chunk_bytes:
            return runs(None, 0)  # a decode step of sessions in lockstep: the common case
        fit = scores <= self.score_chunk_bytes
        groups: list = [(int(b), -1) for b in np.flatnonzero(~fit)]
        for length in np.unique(lengths[fit]):
            same = np.flatnonzero(lengths == length)
            groups += runs(same, int(same[0]))
        return groups

    def _append_packed(self, batch: PackedItems) -> None:
        """Quantize every session's new k/v at once, then one scattered store per pool."""
        lay, n = batch.layout, batch.n
        kvh, t = lay.num_kv_heads, lay.tokens_per_page
        codes, scales = q8.quantize(_stacked_float32(batch.k, batch.v))
        # Each new token's page and slot: [B, n] -> flat over (session, token).
        position = batch.starts[:, None] + np.arange(n)
        tables, counts = batch.page_table()
        first_page = np.cumsum(counts) - counts
        pages = tables[first_page[:, None] + position // t].reshape(-1)
        slots = (position % t).reshape(-1)
        for pool, tokens, width in ((self.codes, codes, lay.head_dim),
                                    (self.scales, scales, lay.blocks)):
            used = 2 * kvh * t * width
            # A view (copy=False raises otherwise): the store must land in the pool.
            view = pool[:, :used].reshape(len(pool), 2, kvh, t, width, copy=False)
            # tokens [2, B, n, KVH, w] -> [(B, n), 2, KVH, w], the order of the indices.
            view[pages, :, :, slots] = tokens.transpose(1, 2, 0, 3, 4).reshape(-1, 2, kvh, width)

    def _attend_same_length(
        self, batch: PackedItems, q: np.ndarray, rows: slice | np.ndarray, total: int
    ) -> np.ndarray:
        """Attention of sessions ``rows`` (all holding ``total`` tokens after the append;
        their queries ``q``, float32 [R, n, H, D]), batched over sessions: [R, n, H, D]
        float32. A block of kv heads at a time when the group's K/V would not stay in the
        CPU's caches (long caches)."""
        lay, n = batch.layout, batch.n
        kvh, g, d = lay.num_kv_heads, lay.group, lay.head_dim
        chosen = range(batch.size)[rows] if isinstance(rows, slice) else rows
        count, tables = len(chosen), [batch.page_ids[b] for b in chosen]
        # Rows of one kv head's query matrix are (new token, group member), as in _attend.
        q = q.reshape(count, n, kvh, g, d)
        q = (q.transpose(0, 2, 1, 3, 4) if n > 1 else q).reshape(count, kvh, n * g, d)
        scale = batch.softmax_scales[rows].astype(np.float32)[:, None, None, None]
        per_head = 16 * d * total * count  # the group's K/V of one kv head (see _groups)
        step = max(1, min(kvh, self.group_cache_bytes // per_head))
        out = np.empty((count, kvh, n * g, d), np.float32)
        for h0 in range(0, kvh, step):
            heads = slice(h0, min(kvh, h0 + step))
            keys, values = self._dequantized(lay, tables, total, heads)
            out[:, heads] = _attend_sessions(q[:, heads], keys, values, scale, total - n, g)
        out = out.reshape(count, kvh, n, g, d).transpose(0, 2, 1, 3, 4)
        return out.reshape(count, n, kvh * g, d)

    def _dequantized(
        self, layout: LayerLayout, tables: list[np.ndarray], total: int, heads: slice
    ) -> tuple[np.ndarray, np.ndarray]:
        """K and V of the first ``total`` tokens of R layers, kv heads ``heads``: float32
        [R, heads, total, D] each, the values ``q8.dequantize`` gives."""
        codes, scales = self._gather_tokens(layout, tables, total, heads)
        values = q8.dequantize(codes, scales)  # [R, 2, heads, total, D]
        return values[:, 0], values[:, 1]

    def _gather_tokens(
        self, layout: LayerLayout, tables: list[np.ndarray], total: int, heads: slice
    ) -> tuple[np.ndarray, np.ndarray]:
        """The first ``total`` tokens of R layers, kv heads ``heads``: codes int8
        [R, 2, heads, total, D] and scales float32 [..., D/32], one advanced index per pool:
        each (session, kind, head) copies its run of tokens of a page whole (a short cache:
        just the tokens held; a longer one: whole pages, cut to ``total`` as a view)."""
        t = layout.tokens_per_page
        pages = -(-total // t)
        ids = np.array([table[:pages] for table in tables], dtype=np.intp)  # [R, P]
        kind, head = np.arange(2)[:, None], np.arange(layout.num_kv_heads)[heads]
        gathered = []
        for view in self._pool_views(layout):
            if pages == 1:  # [R, 2, heads] runs of the first `total` slots of one page
                gathered.append(view[ids[:, :1, None], kind, head, :total])
            else:  # [R, 2, heads, P] runs of T slots: one run of P * T tokens per head
                whole = view[ids[:, None, None, :], kind[..., None], head[:, None]]
                gathered.append(
                    whole.reshape(*whole.shape[:3], pages * t, -1)[:, :, :, :total]
                )
        return gathered[0], gathered[1]

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


def _stacked_float32(k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """[k, v] as one float32 array, filled rather than np.stack'ed: k and v may differ in
    dtype (float16 and bfloat16 have no common type), and one cast each costs less than a
    stack and a cast."""
    kv = np.empty((2, *k.shape), np.float32)
    halfcast.to_float32(k, kv[0])
    halfcast.to_float32(v, kv[1])
    return kv


def _attend_rows(q, keys, values, start: int, g: int, r0: int, r1: int, scale) -> np.ndarray:
    """Softmax attention of query rows [r0, r1) of q [heads, rows, D] (row r: new token
    ``start + r // g``) over the keys and values [heads, cache, D] each may see."""
    width = start + (r1 - 1) // g + 1  # keys any row of the block may see
    scores = _scores(q[:, r0:r1], keys[:, :width])
    return _weighted(scores, values[:, :width], scale, start, g, r0)


def _attend_sessions(q, keys, values, scale, start: int, g: int) -> np.ndarray:
    """Softmax attention of R sessions' query rows q [R, heads, n*G, D] (row r: new token
    ``start + r // g``) over their keys and values [R, heads, start + n, D]: per session
    and head the matmuls and reductions of ``_attend_rows``, so the same bits."""
    return _weighted(_scores(q, keys), values, scale, start, g, 0)


def _weighted(scores, values, scale, start: int, g: int, r0: int) -> np.ndarray:
    """softmax(scores * scale) @ values, in place on ``scores`` [..., rows, width], row r
    being query row r0 + r (new token ``start + (r0 + r) // g``, causal)."""
    rows, width = scores.shape[-2:]
    scores *= scale
    if start + r0 // g + 1 < width:  # rows of several tokens (else none is hidden)
        # Causal: the new token at cache position p sees positions [0, p].
        token = start + np.arange(r0, r0 + rows) // g  # cache position of each row
        np.copyto(scores, np.float32(-np.inf), where=np.arange(width) > token[:, None])
    # The ufuncs' reduce: the same reductions as .max/.sum, without their Python wrappers.
    scores -= np.maximum.reduce(scores, axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= np.add.reduce(scores, axis=-1, keepdims=True)
    return scores @ values


def _scores(q: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """q [..., M, D] @ keys [..., N, D]^T: float32 [..., M, N], C-contiguous. With at most
    KEYS_FIRST_ROWS rows, computed as keys @ q^T and transposed back (one copy of the
    scores): OpenBLAS's kernel for few rows against a transposed B is up to ~2x slower
    (dev VM: 773 vs 405 us for 8 heads x 4 rows x 1,025 keys), and the dot products are
    the same (equal bits in 600 random shapes of <= 64 rows on the dev VM). Both paths
    take this one rule on the same per-session shapes, so they agree whatever the BLAS."""
    if q.shape[-2] <= KEYS_FIRST_ROWS:
        return np.ascontiguousarray((keys @ q.swapaxes(-1, -2)).swapaxes(-1, -2))
    return q @ keys.swapaxes(-1, -2)
