"""One prefill must not exhaust host memory on the numpy backend. Attention runs over
chunks of query rows whose float32 scores stay within ``score_chunk_bytes`` (64 MiB by
default), with results equal to unchunked attention within float32 rounding."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from harness.tensors import random_tensor
from reference import attention_ref, rel_l2

from q8kv.server.backends.base import AttendItem, LayerLayout, tokens_per_page
from q8kv.server.backends.numpy_backend import SCORE_CHUNK_BYTES, NumpyBackend

PCB = 64 * 1024


def prefill(rng, heads: int, kv_heads: int, dim: int, start: int, n: int, scale=0.125):
    """A backend holding ``start`` cached tokens and an item appending ``n`` more."""
    t = tokens_per_page(PCB, kv_heads, dim)
    pages = -(-(start + n) // t)
    backend = NumpyBackend(pages, PCB)
    layout = LayerLayout(heads, kv_heads, dim, t)
    table = np.asarray(rng.permutation(pages), dtype=np.int32)
    keys = random_tensor(rng, (start + n, kv_heads, dim), np.float32)
    values = random_tensor(rng, (start + n, kv_heads, dim), np.float32)
    if start:
        warm = AttendItem(layout, scale, table, 0,
                          random_tensor(rng, (start, heads, dim), np.float32),
                          keys[:start], values[:start])
        backend.append_and_attend([warm])
    q = random_tensor(rng, (n, heads, dim), np.float32)
    item = AttendItem(layout, scale, table, start, q, keys[start:], values[start:])
    return backend, item


def peak_bytes(fn) -> tuple[int, object]:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        result = fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, result


def test_default_chunk_bound_is_64_mib() -> None:
    assert SCORE_CHUNK_BYTES == NumpyBackend.score_chunk_bytes == 64 * 1024 * 1024


@pytest.mark.parametrize("start", [0, 300])
def test_prefill_peak_memory_follows_the_chunk_bound(start: int) -> None:
    """With a 1 MiB score budget, a 1,024-token prefill over 8 heads (16+ MiB of scores
    unchunked, three such arrays at once before the fix) peaks at a few MiB, and its output
    matches the float64 reference and the unchunked run."""
    rng = np.random.default_rng(start)
    backend, item = prefill(rng, heads=8, kv_heads=2, dim=64, start=start, n=1024)
    unchunked_scores = 4 * 8 * 1024 * (start + 1024)
    backend.score_chunk_bytes = 1 << 20
    peak, (out,) = peak_bytes(lambda: backend.append_and_attend([item]))
    # K and V as float32 (+ the codes read back) and the item's own tensors: ~4 MiB here.
    kv_and_io = 6 * 2 * 2 * 64 * (start + 1024) + 3 * 4 * 8 * 64 * 1024
    assert peak < kv_and_io + 3 * (1 << 20), (peak, kv_and_io)
    assert peak < unchunked_scores / 2
    keys, values = backend.dequantize(item.layout, item.page_ids, 0, start + 1024)
    want = attention_ref(item.q, keys, values, start, item.softmax_scale)
    assert rel_l2(out, want) < 1e-5
    backend.score_chunk_bytes = 1 << 40  # one chunk: the computation before chunking
    whole = backend._attend(item)
    assert rel_l2(out, whole) < 1e-6  # float32 rounding of other summation orders


@pytest.mark.parametrize(
    "heads,kv_heads,n,budget",
    [(8, 2, 37, 4 * 64), (4, 4, 5, 4 * 1000), (16, 1, 3, 4 * 20 * 100), (2, 2, 1, 1)],
)
def test_odd_chunkings_match_the_reference(heads, kv_heads, n, budget) -> None:
    """Budgets smaller than one row, or splitting kv heads, tokens and group members at
    odd places, give the same attention."""
    rng = np.random.default_rng(heads * 100 + n)
    backend, item = prefill(rng, heads=heads, kv_heads=kv_heads, dim=32, start=61, n=n)
    backend.score_chunk_bytes = budget
    (out,) = backend.append_and_attend([item])
    keys, values = backend.dequantize(item.layout, item.page_ids, 0, 61 + n)
    assert rel_l2(out, attention_ref(item.q, keys, values, 61, item.softmax_scale)) < 1e-5
    backend.score_chunk_bytes = 1 << 40
    assert rel_l2(out, backend._attend(item)) < 1e-6
