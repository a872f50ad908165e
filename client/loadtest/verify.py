"""``q8kv-loadtest --verify``: recompute attention outputs locally and compare.

The load generator keeps a float32 copy of every k/v it sent to each session-layer. When a
call is picked for verification, the not yet quantized part of that copy is run through
``q8kv.format`` (the format's definition, bit-identical to the server's codes)
and replaced by its dequantized values, so the copy is exactly the server's dequantized
cache; attention over it is computed in float64 and compared by relative L2 error. The
quantization is lazy (only up to what a verification needs), so ``--verify 0.01`` costs
the client little.
"""

from __future__ import annotations

import numpy as np

from q8kv import format as q8

# Relative L2 error allowed between the server's output and the float64 reference on the
# dequantized cache. The server accumulates in float32 (errors ~1e-6 at these lengths), and
# a float16 output is rounded to 11 significant bits (~5e-4): both stay well inside these.
DEFAULT_TOLERANCE = {"float32": 1e-4, "float16": 1e-2}


class LayerCopy:
    """What one session-layer holds: k and v as [max_len, KVH, D] float32, in token order."""

    def __init__(self, max_len: int, kv_heads: int, head_dim: int) -> None:
        self.k = np.empty((max_len, kv_heads, head_dim), dtype=np.float32)
        self.v = np.empty_like(self.k)
        self.length = 0
        self.quantized = 0  # tokens [0, quantized) already hold their dequantized values

    def append(self, k: np.ndarray, v: np.ndarray) -> None:
        n = k.shape[0]
        self.k[self.length : self.length + n] = k
        self.v[self.length : self.length + n] = v
        self.length += n

    def reset(self) -> None:
        self.length = self.quantized = 0

    def dequantized(self) -> tuple[np.ndarray, np.ndarray]:
        """K and V of the whole layer as the server's cache holds them, [length, KVH, D]."""
        lo, hi = self.quantized, self.length
        if hi > lo:
            for buffer in (self.k, self.v):
                codes, scales = q8.quantize(buffer[lo:hi])
                buffer[lo:hi] = q8.dequantize(codes, scales)
            self.quantized = hi
        return self.k[: self.length], self.v[: self.length]


def attention_f64(q: np.ndarray, keys: np.ndarray, values: np.ndarray, start: int,
                  scale: float) -> np.ndarray:
    """softmax(q_i . K[:start+i+1]^T * scale) . V[:start+i+1] in float64 (GQA: query head h
    reads kv head h // (H // KVH)). q [n, H, D]; keys/values [>= start + n, KVH, D]."""
    q64 = np.asarray(q, dtype=np.float64)
    n, heads, _ = q64.shape
    total = start + n
    kv_heads = keys.shape[1]
    head_of = np.arange(heads) // (heads // kv_heads)
    k64 = np.asarray(keys[:total], dtype=np.float64)[:, head_of]  # [T, H, D]
    v64 = np.asarray(values[:total], dtype=np.float64)[:, head_of]
    scores = np.einsum("nhd,thd->nht", q64, k64) * scale
    visible = np.arange(total)[None, :] <= (start + np.arange(n))[:, None]  # [n, T]
    scores = np.where(visible[:, None, :], scores, -np.inf)
    scores -= scores.max(axis=-1, keepdims=True)
    weights = np.exp(scores)
    weights /= weights.sum(axis=-1, keepdims=True)
    return np.einsum("nht,thd->nhd", weights, v64)


def rel_l2(actual: np.ndarray, expected: np.ndarray) -> float:
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    norm = np.linalg.norm(e)
    diff = np.linalg.norm(a - e)
    return float(diff / norm) if norm else float(diff)


def check(layer: LayerCopy, q: np.ndarray, output: np.ndarray, scale: float) -> float:
    """Relative L2 error of ``output`` for query ``q`` whose k/v were the layer's last
    ``len(q)`` tokens (call it right after ``append``)."""
    keys, values = layer.dequantized()
    expected = attention_f64(q, keys, values, layer.length - q.shape[0], scale)
    if output.shape != expected.shape:
        return float("inf")
    return rel_l2(output, expected)
