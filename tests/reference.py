"""Float64 reference for the Q8 format and for attention, shared by the CPU and GPU tests.

Import it as ``from reference import ...`` (pytest puts ``tests/`` on ``sys.path``).

The quantizer follows docs/design.md step by step in float64 and rounds each step to float32
where the format says the step is a float32 operation. For ``/`` and ``*`` of two float32
values, the float64 result rounded to float32 is the correctly rounded float32 result
(53 >= 2 * 24 + 2 bits, so the double rounding is innocuous): the reference is exact, and a
backend must match it bit for bit.
"""

from __future__ import annotations

import numpy as np

QBLOCK = 32
F32 = np.float32
# Largest |q * d - x| beyond d / 2 that float32 allows: x * id is x / d to a few ulps (at
# most 127 * 4 ulps of d), and a subnormal d is off by up to half of 2**-149 per code.
REL_SLACK = 1e-4
ABS_SLACK = 127 * 2.0**-149


def roundf_ref(y: np.ndarray) -> np.ndarray:
    """C ``roundf`` in float64 (ties away from zero); exact for every float32 ``y``."""
    y = np.asarray(y, dtype=np.float64)
    return np.sign(y) * np.floor(np.abs(y) + 0.5)


def quantize_ref(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float values [..., D] -> (int8 codes [..., D], float32 scales [..., D // 32]).

    Each float32 step of the format computed in float64, then rounded to float32.
    """
    x32 = np.asarray(x, dtype=F32)
    assert x32.shape[-1] % QBLOCK == 0, x32.shape
    blocks = x32.reshape(*x32.shape[:-1], x32.shape[-1] // QBLOCK, QBLOCK).astype(np.float64)
    amax = np.max(np.abs(blocks), axis=-1)  # exact
    d = (amax / 127.0).astype(F32)
    d64 = d.astype(np.float64)
    with np.errstate(divide="ignore", over="ignore"):
        inv = np.where(d64 == 0, 0.0, 1.0 / np.where(d64 == 0, 1.0, d64)).astype(F32)
    huge = np.isinf(inv)  # 1/d overflows float32: the format divides by d instead
    inv64 = np.where(huge, 0.0, inv.astype(np.float64))
    y = (blocks * inv64[..., None]).astype(F32)
    y_div = (blocks / np.where(huge, d64, 1.0)[..., None]).astype(F32)
    y = np.where(huge[..., None], y_div, y)
    codes = np.clip(roundf_ref(y), -127, 127).astype(np.int8)
    return codes.reshape(x32.shape), d


def dequantize_ref(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Exact float64 ``q * d`` [..., D] (a float32 backend returns this rounded to float32)."""
    c = codes.astype(np.float64)
    blocks = c.reshape(*c.shape[:-1], c.shape[-1] // QBLOCK, QBLOCK)
    return (blocks * scales.astype(np.float64)[..., None]).reshape(c.shape)


def roundtrip_bound(scales: np.ndarray, dim: int) -> np.ndarray:
    """Per element bound on |dequant - x|: d / 2 * (1 + REL_SLACK) + ABS_SLACK, [..., dim]."""
    d = np.repeat(scales.astype(np.float64), QBLOCK, axis=-1)
    assert d.shape[-1] == dim
    return d / 2 * (1 + REL_SLACK) + ABS_SLACK


def attention_ref(
    q: np.ndarray, keys: np.ndarray, values: np.ndarray, start: int, scale: float
) -> np.ndarray:
    """softmax(q_i . K[:start+i+1]^T * scale) . V[:start+i+1] in float64.

    q [n, H, D] (any float dtype), keys / values [KVH, >= start + n, D] (the dequantized
    cache); query head h reads kv head h // (H // KVH). Returns float64 [n, H, D].
    Float64 matmuls (BLAS) over chunks of queries: a prefill of thousands of tokens over
    thousands cached takes a second, not minutes, in bounded memory.
    """
    q64 = np.asarray(q).astype(np.float64)
    n, h, d = q64.shape
    kvh = keys.shape[0]
    group = h // kvh
    total = start + n
    k64 = np.asarray(keys, dtype=np.float64)[:, :total]  # [KVH, total, D]
    v64 = np.asarray(values, dtype=np.float64)[:, :total]
    # [KVH, group, n, D]: query head h = g * group + j reads kv head g.
    qg = q64.transpose(1, 0, 2).reshape(kvh, group, n, d)
    out = np.empty((kvh, group, n, d))
    step = max(1, 2**24 // (h * total))  # queries per chunk: ~128 MiB of float64 scores
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        scores = (qg[:, :, lo:hi] @ k64[:, None].transpose(0, 1, 3, 2)) * float(scale)
        visible = np.arange(total)[None, :] <= (start + np.arange(lo, hi))[:, None]
        scores = np.where(visible, scores, -np.inf)  # [KVH, group, hi - lo, total]
        scores -= scores.max(axis=-1, keepdims=True)
        weights = np.exp(scores)
        weights /= weights.sum(axis=-1, keepdims=True)
        out[:, :, lo:hi] = weights @ v64[:, None]
    return out.reshape(h, n, d).transpose(1, 0, 2)


def rel_l2(actual: np.ndarray, expected: np.ndarray) -> float:
    """||actual - expected|| / ||expected|| in float64."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    return float(np.linalg.norm(a - e) / np.linalg.norm(e))
