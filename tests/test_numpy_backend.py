"""The numpy backend's decode-step shortcuts, each against the general path it stands in for:
the cache read straight from the pool against ``Backend.read_tokens`` (the page copies),
the cached pool views against writes through ``Backend.write_tokens``, one attention block
against the reference, and k and v of different dtypes against the same values in float32.
Random pools and page tables, bit for bit where the result must not change."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from harness.packed import fill_random_pool
from harness.tensors import random_tensor
from reference import attention_ref, rel_l2

from q8kv.format import LayerLayout, tokens_per_page
from q8kv.server.backends.base import AttendItem, Backend, PackedItems
from q8kv.server.backends.numpy_backend import NumpyBackend

PAGE = 4096
NUM_PAGES = 64
BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)


def random_pool(rng: np.random.Generator, kvh: int, d: int) -> tuple[NumpyBackend, LayerLayout]:
    backend = NumpyBackend(NUM_PAGES, PAGE)
    fill_random_pool(backend, rng)
    return backend, LayerLayout(kvh * 2, kvh, d, tokens_per_page(PAGE, kvh, d))


@pytest.mark.parametrize("seed", range(6))
def test_cache_read_for_attention_equals_the_page_copies(seed: int) -> None:
    """One page (views of the pool) and several (one gather), any table order and length."""
    rng = np.random.default_rng(seed)
    kvh, d = int(rng.choice([1, 2, 4])), int(rng.choice([32, 64]))
    backend, layout = random_pool(rng, kvh, d)
    t = layout.tokens_per_page
    for total in (1, t - 1, t, t + 1, 3 * t + int(rng.integers(1, t))):
        table = rng.permutation(NUM_PAGES)[: -(-total // t)].astype(np.int32)
        codes, scales = backend._layer_tokens(layout, table, total)
        want_codes, want_scales = Backend.read_tokens(backend, layout, table, 0, total)
        np.testing.assert_array_equal(codes, want_codes)
        np.testing.assert_array_equal(scales.view(np.uint32), want_scales.view(np.uint32))


@pytest.mark.parametrize("seed", range(4))
def test_writes_through_the_pool_views_land_where_the_page_copies_put_them(seed: int) -> None:
    """Token runs across page boundaries, written by the numpy backend and by the base
    class's read-modify-write of whole pages: the same pools after each write."""
    rng = np.random.default_rng(seed)
    fast, layout = random_pool(rng, int(rng.choice([1, 2])), 32)
    slow = NumpyBackend(NUM_PAGES, PAGE)
    slow.codes[:], slow.scales[:] = fast.codes, fast.scales
    t = layout.tokens_per_page
    table = rng.permutation(NUM_PAGES)[:8].astype(np.int32)
    for _ in range(10):
        n = int(rng.integers(1, 3 * t))
        start = int(rng.integers(0, 8 * t - n))
        shape = (2, layout.num_kv_heads, n)
        codes = rng.integers(-127, 128, (*shape, layout.head_dim), dtype=np.int8)
        scales = rng.uniform(1e-3, 1.0, (*shape, layout.blocks)).astype(np.float32)
        fast.write_tokens(layout, table, start, codes, scales)
        Backend.write_tokens(slow, layout, table, start, codes, scales)
        np.testing.assert_array_equal(fast.codes, slow.codes)
        np.testing.assert_array_equal(fast.scales, slow.scales)


@pytest.mark.parametrize("start", [0, 1, 16, 200])
@pytest.mark.parametrize("n", [1, 3])
def test_decode_steps_match_the_reference(start: int, n: int) -> None:
    """A step of n new tokens over a start-token cache (one attention block, the causal
    mask only between new tokens), against float64 attention over the dequantized cache."""
    rng = np.random.default_rng(start * 10 + n)
    layout = LayerLayout(8, 2, 64, tokens_per_page(PAGE, 2, 64))
    pages = -(-(start + n) // layout.tokens_per_page)
    backend = NumpyBackend(pages, PAGE)
    table = rng.permutation(pages).astype(np.int32)
    if start:
        q, k, v = (random_tensor(rng, (start, h, 64)) for h in (8, 2, 2))
        backend.append_and_attend([AttendItem(layout, 0.125, table, 0, q, k, v)])
    q, k, v = (random_tensor(rng, (n, h, 64)) for h in (8, 2, 2))
    (out,) = backend.append_and_attend([AttendItem(layout, 0.125, table, start, q, k, v)])
    keys, values = backend.dequantize(layout, table, 0, start + n)
    assert out.dtype == np.float32 and out.shape == q.shape
    assert rel_l2(out, attention_ref(q, keys, values, start, 0.125)) < 1e-5


@pytest.mark.parametrize("k_dtype,v_dtype", [(F16, BF16), (BF16, F16), (BF16, np.float32)])
def test_k_and_v_of_different_dtypes_append_their_values(k_dtype, v_dtype) -> None:
    """float16 and bfloat16 have no common numpy type (np.stack of the two raised, an
    INTERNAL answer): each is cast to float32 on its own, exactly, so the item appends and
    attends as its values in float32 do, bit for bit."""
    rng = np.random.default_rng(7)
    layout = LayerLayout(8, 2, 64, tokens_per_page(PAGE, 2, 64))
    table = np.arange(3, dtype=np.int32)
    q, k, v = (random_tensor(rng, (20, h, 64)) for h in (8, 2, 2))
    k, v = k.astype(k_dtype), v.astype(v_dtype)
    mixed, same = NumpyBackend(4, PAGE), NumpyBackend(4, PAGE)
    (got,) = mixed.append_and_attend([AttendItem(layout, 0.125, table, 0, q, k, v)])
    exact = (k.astype(np.float32), v.astype(np.float32))
    (want,) = same.append_and_attend([AttendItem(layout, 0.125, table, 0, q, *exact)])
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(mixed.codes, same.codes)
    np.testing.assert_array_equal(mixed.scales, same.scales)


def test_packed_batch_of_float16_k_and_bfloat16_v() -> None:
    """The packed path's one quantize of a whole batch: the same rule."""
    rng = np.random.default_rng(8)
    layout = LayerLayout(8, 2, 64, tokens_per_page(PAGE, 2, 64))
    q, k, v = (random_tensor(rng, (3, 2, h, 64)) for h in (8, 2, 2))
    scales = rng.uniform(0.1, 0.2, 3)

    def run(k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, NumpyBackend]:
        backend = NumpyBackend(4, PAGE)
        tables = [np.array([b], dtype=np.int32) for b in range(3)]
        batch = PackedItems(layout, scales, tables, np.zeros(3, np.int64), q, k, v)
        return backend.attend_packed(batch), backend

    got, mixed = run(k.astype(F16), v.astype(BF16))
    want, same = run(k.astype(F16).astype(np.float32), v.astype(BF16).astype(np.float32))
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(mixed.codes, same.codes)
    np.testing.assert_array_equal(mixed.scales, same.scales)
