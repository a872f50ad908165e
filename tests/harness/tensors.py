"""Random tensors for the tests: standard normal values (nonzero with probability 1) at
varied magnitudes, never zeros."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np

Tensor = Callable[[np.random.Generator, tuple[int, ...], type], np.ndarray]


class Heads(Protocol):
    """What q/k/v shapes need of a geometry (the tests' Geo and the server's Geometry)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int


def normal(rng: np.random.Generator, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    """Standard normal values times one factor from [0.5, 2) for the whole tensor, as
    ``dtype``: calls differ in magnitude, the values inside one call do not."""
    return (rng.standard_normal(shape) * rng.uniform(0.5, 2.0)).astype(dtype)


def random_tensor(rng: np.random.Generator, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    """Standard normal values, each row (all but the last axis) times its own factor from
    [0.25, 4), as ``dtype``.

    Per-row factors vary the per-block Q8 scale so tests do not only see blocks of one
    magnitude.
    """
    x = rng.standard_normal(shape) * rng.uniform(0.25, 4.0, size=shape[:-1] + (1,))
    x = np.asarray(x, dtype=dtype)
    assert np.all(np.isfinite(x.astype(np.float32)))
    return x


def qkv(
    rng: np.random.Generator, n: int, geo: Heads, dtype=np.float32, tensor: Tensor = normal
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """q [n, H, D], k and v [n, KVH, D] for ``geo``, each drawn by ``tensor``."""
    return (
        tensor(rng, (n, geo.num_heads, geo.head_dim), dtype),
        tensor(rng, (n, geo.num_kv_heads, geo.head_dim), dtype),
        tensor(rng, (n, geo.num_kv_heads, geo.head_dim), dtype),
    )
