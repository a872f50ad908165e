"""The Q8 block format and the page layout: the definition every backend (and the client's
``--verify``) must match bit for bit. It imports nothing else of q8kv.

Per block of 32 values along head_dim, in float32: ``d = max|x| / 127``, ``id = 1/d`` (0
where d = 0), ``q = roundf(x * id)`` (half away from zero, as C ``roundf``) clamped to
[-127, 127]; the value read back is ``q * d``. These are GGML's Q8_0 codes (GGML keeps d
as fp16; we keep float32). Where 1/d overflows float32 (max|x| < ~3.7e-37, undefined
behaviour in GGML's C), the codes are ``roundf(x / d)`` instead.

The cache of all sessions lives in one pool of fixed-size pages, held by a backend as two
arrays (codes and scales are kept apart so the codes stay 16-byte aligned for wide loads):

    codes  : int8    [num_pages, page_code_bytes]
    scales : float32 [num_pages, page_code_bytes // 32]

A page belongs to one (session, layer) and holds ``T = tokens_per_page`` consecutive tokens
of K and V for every kv head of that layer. Inside a page, for kind 0 = K and 1 = V:

    codes [page, ((kind * KVH + head) * T + slot) * D + dim]
    scales[page, ((kind * KVH + head) * T + slot) * (D // 32) + block]

Token ``t`` of a layer lives in page ``page_ids[t // T]`` at slot ``t % T``. T is the
largest power of two with ``2 * KVH * D * T <= page_code_bytes`` (a shift, not a division,
in the kernels). The rest of a page, if any, is unused.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

QBLOCK = 32  # values per quantization block (one float32 scale each)
BYTES_PER_BLOCK = QBLOCK + 4  # 32 int8 codes + 1 float32 scale
DEFAULT_PAGE_CODE_BYTES = 64 * 1024


def roundf(y: np.ndarray) -> np.ndarray:
    """C ``roundf`` on float32: nearest integer, ties away from zero.

    ``floor(|y| + 0.5)`` is wrong in float32 (0.49999997 + 0.5 rounds up to 1.0), so round
    half-to-even and move the exact ties away from zero instead.
    """
    rounded = np.rint(y)
    # y - rint(y) is exact for |y| < 2**23 (and 0 above, where y is an integer already), at
    # most 0.5: a tie exists iff its largest magnitude is 0.5. One reduction finds that (no
    # boolean array and .any(): 1.4x faster on a packed step's codes); a NaN in y makes the
    # reduction NaN, and then each value is looked at.
    off = y - rounded
    np.abs(off, out=off)
    largest = np.maximum.reduce(off, axis=None) if off.size else np.float32(0)
    if largest == np.float32(0.5) or largest != largest:  # a tie, or a NaN hiding one
        tie = off == np.float32(0.5)  # rare; np.where over every value costs ~10x a pass
        rounded[tie] = np.trunc(y[tie]) + np.sign(y[tie])
    return rounded


def _absmax(blocks: np.ndarray) -> np.ndarray:
    """max |x| over the last axis: the same values as np.max(axis=-1) (max is exact), taken
    over the bits as int32. Non-negative floats order like their bits (NaN's above +Inf, so
    a NaN still comes out NaN), and numpy's integer reduction over a short last axis is 2-3x
    faster than its float one (which checks every element for NaN): 2-vCPU dev VM, 284 vs
    168 us for a packed step's 131k values, 15 vs 5.5 us for a decode step's 2k."""
    magnitude = np.abs(blocks)
    bits = np.maximum.reduce(magnitude.view(np.int32), axis=-1)
    return bits.view(np.float32)


def quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float values [..., D] -> (int8 codes [..., D], float32 scales [..., D // 32])."""
    x = np.asarray(x, dtype=np.float32)
    if x.shape[-1] % QBLOCK:
        raise ValueError(f"last dimension must be a multiple of {QBLOCK}, got {x.shape[-1]}")
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // QBLOCK, QBLOCK)
    d = _absmax(blocks) / np.float32(127.0)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        inv = np.float32(1.0) / d  # inf where d is 0 or 1/d overflows, NaN for NaN input
    if inv.size and np.maximum.reduce(inv, axis=None) < np.inf:
        # Every block's 1/d is finite (the common case; no zero-block or where passes).
        # Then |y| <= 127 (1 + 2**-22)^3 < 127.5 (d may be subnormal, relative error up to
        # 2**-22), so the codes need no clamp: the same codes as the general case below.
        return roundf(blocks * inv[..., None]).astype(np.int8).reshape(x.shape), d
    inv[d == 0] = 0
    # Where max|x| < ~3.7e-37, d is subnormal and 1/d overflows to inf: x * id would give
    # +-127 for every nonzero value and NaN for zeros (undefined in GGML's C too). Divide by
    # d there instead, so |q * d - x| <= d / 2 still holds. Normal blocks are unaffected.
    huge = np.isinf(inv)
    y = blocks * np.where(huge, np.float32(0), inv)[..., None]
    if huge.any():
        y = np.where(huge[..., None], blocks / np.where(huge, d, np.float32(1))[..., None], y)
    codes = np.clip(roundf(y), -127, 127).astype(np.int8)
    return codes.reshape(x.shape), d


def dequantize(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """(int8 codes [..., D], float32 scales [..., D // 32]) -> float32 [..., D]."""
    blocks = codes.reshape(*codes.shape[:-1], codes.shape[-1] // QBLOCK, QBLOCK)
    values = blocks.astype(np.float32)
    values *= scales[..., None]  # in place: one float32 copy of the cache, not two
    return values.reshape(codes.shape)


# -- the page layout -----------------------------------------------------------------------


def tokens_per_page(page_code_bytes: int, num_kv_heads: int, head_dim: int) -> int:
    """Tokens of one layer (K and V, all kv heads) that fit a page; 0 if not even one."""
    per_token = 2 * num_kv_heads * head_dim
    if per_token > page_code_bytes:
        return 0
    t = 1
    while t * 2 * per_token <= page_code_bytes:
        t *= 2
    return t


def page_bytes(page_code_bytes: int) -> int:
    """Device bytes of one page: its codes plus its float32 scales."""
    return page_code_bytes + page_code_bytes // QBLOCK * 4


MAX_LEN = 1 << 24  # the largest max_len a session may declare (tokens per layer)


@dataclass(frozen=True, slots=True)
class Geometry:
    """A session's shape: what CreateSession declares, the same for every layer."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_len: int

    def token_bytes(self) -> int:
        """Q8 bytes (codes + scales, K and V) of one token of one layer."""
        return 2 * self.num_kv_heads * self.head_dim // QBLOCK * BYTES_PER_BLOCK


@dataclass(frozen=True)
class LayerLayout:
    """How one session's layer sits in the pages; the same for all layers of a session."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    tokens_per_page: int

    @property
    def group(self) -> int:
        """Query heads per kv head (GQA group size)."""
        return self.num_heads // self.num_kv_heads

    @property
    def blocks(self) -> int:
        """Quantization blocks per head vector."""
        return self.head_dim // QBLOCK
