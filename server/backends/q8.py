"""The Q8 block format in numpy: the definition every backend must match bit for bit.

Per block of 32 values along head_dim, in float32: ``d = max|x| / 127``, ``id = 1/d`` (0
where d = 0), ``q = roundf(x * id)`` (half away from zero, as C ``roundf``) clamped to
[-127, 127]; the value read back is ``q * d``. These are GGML's Q8_0 codes (GGML keeps d
as fp16; we keep float32). Where 1/d overflows float32 (max|x| < ~3.7e-37, undefined
behaviour in GGML's C), the codes are ``roundf(x / d)`` instead.
"""

from __future__ import annotations

import numpy as np

from .base import QBLOCK


def roundf(y: np.ndarray) -> np.ndarray:
    """C ``roundf`` on float32: nearest integer, ties away from zero.

    ``floor(|y| + 0.5)`` is wrong in float32 (0.49999997 + 0.5 rounds up to 1.0), so round
    half-to-even and move the exact ties away from zero instead.
    """
    trunc = np.trunc(y)
    tie = np.abs(y - trunc) == np.float32(0.5)  # exact for |y| < 2**23
    return np.where(tie, trunc + np.sign(y), np.rint(y))


def quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float values [..., D] -> (int8 codes [..., D], float32 scales [..., D // 32])."""
    x = np.asarray(x, dtype=np.float32)
    if x.shape[-1] % QBLOCK:
        raise ValueError(f"last dimension must be a multiple of {QBLOCK}, got {x.shape[-1]}")
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // QBLOCK, QBLOCK)
    d = np.max(np.abs(blocks), axis=-1) / np.float32(127.0)
    with np.errstate(over="ignore"):
        inv = np.divide(np.float32(1.0), d, out=np.zeros_like(d), where=d != 0)
    # Where max|x| < ~3.7e-37, d is subnormal and 1/d overflows to inf: x * id would give
    # +-127 for every nonzero value and NaN for zeros (undefined in GGML's C too). Divide by
    # d there instead, so |q * d - x| <= d / 2 still holds. Normal blocks are unaffected.
    huge = np.isinf(inv)
    y = blocks * np.where(huge, np.float32(0), inv)[..., None]
    if huge.any():
        y = np.where(huge[..., None], blocks / np.where(huge, d, np.float32(1))[..., None], y)
    codes = np.clip(roundf(y), -127, 127).astype(np.int8)
    return codes.reshape(x.shape), d.astype(np.float32)


def dequantize(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """(int8 codes [..., D], float32 scales [..., D // 32]) -> float32 [..., D]."""
    blocks = codes.reshape(*codes.shape[:-1], codes.shape[-1] // QBLOCK, QBLOCK)
    values = blocks.astype(np.float32)
    values *= scales[..., None]  # in place: one float32 copy of the cache, not two
    return values.reshape(codes.shape)
