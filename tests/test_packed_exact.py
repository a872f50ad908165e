"""The numpy backend's packed path (attend_packed) against its per-item path
(append_and_attend) at the benchmark's geometry (H = 32, KVH = 8, D = 128): the same output
bits and the same pool bytes, on random batches of equal and unequal lengths, caches that
cross page boundaries, n = 1 and n > 1, each wire dtype, with the memory bounds at their
defaults and tight enough to split groups by kv heads. Also the float16 cast it uses."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from harness.packed import fill_random_pool, packed_batch
from harness.tensors import random_tensor

from q8kv.format import LayerLayout, tokens_per_page
from q8kv.server.backends import halfcast
from q8kv.server.backends.base import PackedItems
from q8kv.server.backends.numpy_backend import NumpyBackend

H, KVH, D = 32, 8, 128
PAGE = 16 * 1024  # 8 tokens per page at this geometry: caches cross many page boundaries
NUM_PAGES = 384
DTYPES = [np.float16, np.float32, ml_dtypes.bfloat16]


def twin_backends(seed: int) -> tuple[NumpyBackend, NumpyBackend]:
    """Two backends whose pools hold the same random codes and scales."""
    twins = NumpyBackend(NUM_PAGES, PAGE), NumpyBackend(NUM_PAGES, PAGE)
    for backend in twins:
        fill_random_pool(backend, np.random.default_rng(seed))
    return twins


def batch_of(rng: np.random.Generator, starts: list[int], n: int, dtype) -> PackedItems:
    layout = LayerLayout(H, KVH, D, tokens_per_page(PAGE, KVH, D))
    return packed_batch(rng, layout, NUM_PAGES, starts, n, dtype)


def assert_packed_equals_per_item(ours: NumpyBackend, theirs: NumpyBackend, batch) -> None:
    got = ours.attend_packed(batch)
    expected = np.stack(theirs.append_and_attend(batch.items()), dtype=batch.out_dtype,
                        casting="unsafe")  # fmt: skip
    assert got.dtype == expected.dtype and got.shape == expected.shape
    np.testing.assert_array_equal(got.view(np.uint8), expected.view(np.uint8))
    np.testing.assert_array_equal(ours.codes, theirs.codes)
    np.testing.assert_array_equal(ours.scales.view(np.uint32), theirs.scales.view(np.uint32))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("lengths", ["equal", "unequal"])
def test_packed_is_the_per_item_path_bit_for_bit(dtype, n: int, lengths: str) -> None:
    seed = DTYPES.index(dtype) * 10 + n + (lengths == "equal") * 100
    rng = np.random.default_rng(seed)
    b = int(rng.integers(9, 20))
    if lengths == "equal":  # one group per length run; a start just before a page boundary
        starts = [int(rng.choice([0, 7, 15, 30]))] * b
    else:
        starts = [int(s) for s in rng.choice([0, 5, 7, 8, 16, 23, 41], size=b)]
    batch = batch_of(rng, starts, n, dtype)
    assert_packed_equals_per_item(*twin_backends(seed), batch)


@pytest.mark.parametrize("group_cache_bytes", [1, 40_000, 300_000])
def test_groups_split_by_sessions_and_kv_heads_keep_the_bits(group_cache_bytes: int) -> None:
    """Tight bounds: one session per group, its kv heads a block at a time (1 byte: one
    head at a time), or several sessions and all heads."""
    rng = np.random.default_rng(group_cache_bytes)
    batch = batch_of(rng, [40, 40, 40, 3, 3, 17, 0], 2, np.float16)
    ours, theirs = twin_backends(5)
    ours.group_cache_bytes = group_cache_bytes
    assert_packed_equals_per_item(ours, theirs, batch)


def test_a_decode_batch_of_64_at_the_benchmark_shape() -> None:
    rng = np.random.default_rng(64)
    batch = batch_of(rng, [16] * 64, 1, np.float16)
    assert_packed_equals_per_item(*twin_backends(64), batch)


def test_float16_to_float32_is_numpys_cast_for_every_float16() -> None:
    every = np.arange(1 << 16, dtype=np.uint16).view(np.float16)  # Inf and NaN included
    got = halfcast.to_float32(every)
    np.testing.assert_array_equal(got.view(np.uint32), every.astype(np.float32).view(np.uint32))
    finite = every[np.isfinite(every)]  # the fast path only (no Inf/NaN fallback)
    got = halfcast.to_float32(finite)
    np.testing.assert_array_equal(got.view(np.uint32), finite.astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: np.dtype(t).name)
def test_float32_cast_of_views_and_into_out(dtype) -> None:
    rng = np.random.default_rng(3)
    values = random_tensor(rng, (6, 40, 3, 64), dtype)[:, ::2]  # strided, 23k values
    out = np.full((6, 40, 3, 64), np.nan, np.float32)[:, 1::2]  # strided too
    result = halfcast.to_float32(values, out)
    assert result is out
    np.testing.assert_array_equal(out, values.astype(np.float32))
    np.testing.assert_array_equal(halfcast.to_float32(values), values.astype(np.float32))
