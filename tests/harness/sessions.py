"""Client sessions filled with random tokens and read back for bit-exact comparison."""

from __future__ import annotations

import numpy as np

from harness.geometry import GEOM, Geo
from harness.tensors import qkv


def fill(session, rng: np.random.Generator, lengths: list[int], geo: Geo = GEOM) -> None:
    """Append ``lengths[layer]`` tokens to each layer (in two calls where possible)."""
    for layer, n in enumerate(lengths):
        for part in (n // 2, n - n // 2):
            if part:
                session.append_and_attend(layer, *qkv(rng, part, geo))


def caches(session, layers: int) -> list[tuple[bytes, bytes]]:
    """Dequantized (K, V) of every layer, as raw bytes for bit-exact comparison."""
    return [tuple(a.tobytes() for a in session.dequantize(layer)) for layer in range(layers)]
