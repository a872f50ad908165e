"""Backend.attend_packed (one layer of one step for B sessions, inputs stacked) against the
same work as B separate items, on random pools and random batches: the numpy backend's
vectorized path must give the same outputs and leave the same pages, bit for bit."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from harness.packed import fill_random_pool, packed_batch

from q8kv.format import LayerLayout, tokens_per_page
from q8kv.server.backends.base import Backend, PackedItems
from q8kv.server.backends.numpy_backend import NumpyBackend

DTYPES = [np.float32, np.float16, ml_dtypes.bfloat16]
PAGE = 16384
NUM_PAGES = 512


def random_backend(seed: int) -> NumpyBackend:
    """A backend whose pool holds random codes and scales (the caches' existing tokens)."""
    backend = NumpyBackend(NUM_PAGES, PAGE)
    fill_random_pool(backend, np.random.default_rng(seed))
    return backend


def random_batch(rng: np.random.Generator, starts: list[int], n: int, dtype) -> PackedItems:
    kvh, group, d = int(rng.choice([1, 2, 4])), int(rng.choice([1, 3])), int(rng.choice([32, 64]))
    layout = LayerLayout(kvh * group, kvh, d, tokens_per_page(PAGE, kvh, d))
    return packed_batch(rng, layout, NUM_PAGES, starts, n, dtype, softmax_scales=(0.05, 0.3))


def per_item(backend: Backend, batch: PackedItems) -> np.ndarray:
    outputs = backend.append_and_attend(batch.items())
    return np.stack(outputs, dtype=batch.out_dtype, casting="unsafe")


def assert_same(got: np.ndarray, expected: np.ndarray) -> None:
    assert got.dtype == expected.dtype and got.shape == expected.shape
    np.testing.assert_array_equal(got.view(np.uint8), expected.view(np.uint8))


@pytest.mark.parametrize("seed", range(6))
def test_numpy_packed_equals_per_item_bit_for_bit(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for case in range(4):
        b = int(rng.integers(1, 12))
        n = int(rng.choice([1, 1, 3, 9]))
        if case % 2:  # equal lengths: one batched computation
            starts = [int(rng.integers(0, 300))] * b
        else:  # a mix, some equal
            starts = list(rng.choice([0, 5, 40, 41, 130], size=b))
        batch = random_batch(rng, starts, n, DTYPES[int(rng.integers(3))])
        ours, theirs = random_backend(seed), random_backend(seed)
        assert_same(ours.attend_packed(batch), per_item(theirs, batch))
        np.testing.assert_array_equal(ours.codes, theirs.codes)
        np.testing.assert_array_equal(ours.scales, theirs.scales)


def test_numpy_packed_keeps_the_memory_bounds_and_the_result() -> None:
    """Tiny bounds: long sessions go alone (their rows chunked), the rest in small groups."""
    rng = np.random.default_rng(7)
    batch = random_batch(rng, [200, 200, 200, 200, 3, 3, 3, 500], 2, np.float16)
    ours, theirs = random_backend(7), random_backend(7)
    for backend in (ours, theirs):
        backend.score_chunk_bytes = 4 * batch.layout.num_heads * 2 * 300
    ours.group_cache_bytes = 16 * batch.layout.num_kv_heads * batch.layout.head_dim * 202 * 2
    assert_same(ours.attend_packed(batch), per_item(theirs, batch))
    np.testing.assert_array_equal(ours.codes, theirs.codes)


def test_the_default_runs_any_backend_item_by_item() -> None:
    rng = np.random.default_rng(8)
    batch = random_batch(rng, [4, 0, 77], 2, ml_dtypes.bfloat16)
    ours, theirs = random_backend(8), random_backend(8)
    assert_same(Backend.attend_packed(ours, batch), per_item(theirs, batch))


def test_a_part_is_the_chunk_of_sessions_and_tokens_it_names() -> None:
    rng = np.random.default_rng(9)
    batch = random_batch(rng, [30, 0, 61], 40, np.float32)
    part = batch.part(slice(1, 3), slice(8, 20))
    t = batch.layout.tokens_per_page
    assert part.size == 2 and part.n == 12
    assert list(part.starts) == [8, 69]
    np.testing.assert_array_equal(part.q, batch.q[1:3, 8:20])
    np.testing.assert_array_equal(part.v, batch.v[1:3, 8:20])
    for ids, full, start in zip(part.page_ids, batch.page_ids[1:3], [0, 61], strict=True):
        np.testing.assert_array_equal(ids, full[: -(-(start + 20) // t)])
