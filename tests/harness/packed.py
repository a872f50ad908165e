"""Random page pools and packed batches for the backend tests: a pool's codes and scales
stand for the tokens the caches already hold; a batch is one step of B sessions of one
layout, each on its own scattered pages of the pool."""

from __future__ import annotations

import numpy as np

from q8kv.format import LayerLayout
from q8kv.server.backends.base import PackedItems

from .tensors import Tensor, random_tensor


def fill_random_pool(backend, rng: np.random.Generator) -> None:
    """Random codes in [-127, 127] and scales in [1e-3, 3e-2] (values of order 1) in every
    page of ``backend``'s pool (anything with ``codes`` and ``scales`` arrays)."""
    backend.codes[:] = rng.integers(-127, 128, backend.codes.shape, dtype=np.int8)
    backend.scales[:] = rng.uniform(1e-3, 3e-2, backend.scales.shape).astype(np.float32)


def packed_batch(
    rng: np.random.Generator,
    layout: LayerLayout,
    num_pages: int,
    starts: list[int],
    n: int,
    dtype,
    softmax_scales: tuple[float, float] = (0.05, 0.2),
    values: Tensor = random_tensor,
) -> PackedItems:
    """Sessions that hold ``starts`` tokens and get ``n`` new ones: pages drawn without
    repeats from a pool of ``num_pages``, random softmax scales, q/k/v from ``values``."""
    free = list(rng.permutation(num_pages))
    tables = []
    for start in starts:
        count = -(-(start + n) // layout.tokens_per_page)
        tables.append(np.array([free.pop() for _ in range(count)], dtype=np.int32))
    b, h, kvh, d = len(starts), layout.num_heads, layout.num_kv_heads, layout.head_dim
    return PackedItems(
        layout,
        rng.uniform(*softmax_scales, b),
        tables,
        np.array(starts, dtype=np.int64),
        values(rng, (b, n, h, d), dtype),
        values(rng, (b, n, kvh, d), dtype),
        values(rng, (b, n, kvh, d), dtype),
        out_dtype=np.dtype(dtype),
    )
