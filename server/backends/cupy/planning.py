"""Launch planning for the GPU backend: which kernel serves each item, and the work units of
each launch (the meta columns M_UNIT, M_RT, M_NSPLIT, M_CHUNK, M_CNT).

Two attention kernels:

- ``q8_attend`` (q8_attention_tc.cu): float32-grade, rows of 8 per tile, long caches split
  across blocks (flash-decoding) and merged by the last block. Decode, float32 wires, and
  prefills too small to fill a tile of the other kernel.
- ``q8_prefill`` (q8_prefill_wg.cu on compute capability 9.0 at head_dim 128, else
  q8_prefill.cu): flash-attention tiling on 16-bit tensor cores, 128 query rows per block,
  one unit per (item, kv head, row tile). An item takes it when its wire is float16 or
  bfloat16, n >= 2 and it has at least 64 query rows, n * group (``takes_prefill_kernel``).
  Where the kernel would not fit the device's shared memory, the backend hands back
  ``q8_attend`` for the route and the items are planned as decode.

Host arithmetic only: no CuPy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from ..base import AttendItem, LayerLayout
from .kernels import PREFILL_ROWS, AttnKernel
from .meta import M_CHUNK, M_CNT, M_NSPLIT, M_RT, M_TILES, M_UNIT

# Routes: the kernel an item runs on. 0: q8_attend; 1, 2: q8_prefill in float16, bfloat16.
DECODE, PREFILL_F16, PREFILL_BF16 = 0, 1, 2
_PREFILL_ROUTE = {np.dtype(np.float16): PREFILL_F16, np.dtype(ml_dtypes.bfloat16): PREFILL_BF16}

# A kernel for (head_dim, route).
KernelFor = Callable[[int, int], AttnKernel]


def takes_prefill_kernel(n: int, group: int, dtype) -> bool:
    """True where an item runs on the 16-bit tensor-core prefill kernel: a float16 or bfloat16
    wire, n >= 2 and n * group >= 64 query rows (fewer would leave most of a tile idle)."""
    return np.dtype(dtype) in _PREFILL_ROUTE and n >= 2 and n * group >= PREFILL_ROWS


def route(n: int, group: int, dtype) -> int:
    """The kernel of an item with n new tokens, ``group`` query heads per kv head and q/k/v
    of ``dtype`` as the kernels read them."""
    return _PREFILL_ROUTE[np.dtype(dtype)] if takes_prefill_kernel(n, group, dtype) else DECODE


@dataclass
class Launch:
    """One attention launch: the items of one (head_dim, route), adjacent in the meta rows."""

    kernel: AttnKernel
    meta_row: int  # first meta row of the launch
    nitems: int
    units: int  # work units = blocks
    head_dim: int
    # kernel.tiles: the launch's K/V tile pairs in the batch's scratch, [first_pair,
    # first_pair + tile_pairs) (its items' M_TILES; q8_append writes the new tokens').
    tile_pairs: int = 0
    first_pair: int = 0
    cached: bool = True  # some item has tokens cached before the call (q8_kv_tiles' work)


@dataclass(frozen=True)
class SplitPolicy:
    """How long sequences are split across blocks (flash-decoding)."""

    sm_count: int
    split_waves: float  # splits per launch aim at this many waves of resident blocks
    max_splits: int  # splits per row tile at most


def split(
    length: int, ideal: int, tok: int, tokens_per_page: int, max_splits: int, max_pages: int
) -> tuple[int, int]:
    """(splits, tokens per split) of one row tile's ``length`` tokens: about ``ideal`` each,
    a multiple of the stage, balanced, and few enough pages per split (``max_pages``) for
    shared memory."""
    max_chunk = max(tok, ((max_pages - 1) * tokens_per_page // tok) * tok)
    nsplit = min(max_splits, max(1, round(length / ideal)))
    nsplit = max(nsplit, -(-length // max_chunk))  # page ids must fit smem
    chunk = -(-math.ceil(length / nsplit) // tok) * tok  # balanced splits
    return -(-length // chunk), chunk


def plan_launch(
    rows: Sequence[AttendItem],
    meta: np.ndarray,
    first_row: int,
    kern: AttnKernel,
    policy: SplitPolicy,
) -> tuple[Launch, int]:
    """Splits, work units and counter prefixes of one head_dim's rows (``meta`` holds just
    their meta rows); returns the launch and the split counters it needs."""
    gt, tok = kern.gt, kern.tok
    row_tiles = [-(-it.n * it.layout.group // gt) for it in rows]
    tiles = [it.layout.num_kv_heads * rt for it, rt in zip(rows, row_tiles, strict=True)]
    lens = [it.start + it.n for it in rows]
    work = sum(t * n for t, n in zip(tiles, lens, strict=True))
    slots = policy.sm_count * kern.blocks_per_sm * policy.split_waves
    # Splits as short as one stage: at batch 1 the per-stage compute latency, not the
    # merge, dominates (4-stage minimum measured 21 us vs 16 us at 1 x 1024).
    ideal = max(tok, math.ceil(work / slots))
    units = cnt = 0
    for r, it in enumerate(rows):
        nsplit, chunk = split(
            lens[r], ideal, tok, it.layout.tokens_per_page, policy.max_splits, kern.max_pages
        )
        m = meta[r]
        m[M_RT] = row_tiles[r]
        m[M_NSPLIT], m[M_CHUNK] = nsplit, chunk
        m[M_UNIT], m[M_CNT] = units, cnt
        units += tiles[r] * nsplit
        cnt += tiles[r]
    head_dim = rows[0].layout.head_dim
    return Launch(kern, first_row, len(rows), units, head_dim), cnt


def tile_pairs(starts, n: int, tok: int, kv_heads: int):
    """An item's 16-bit K/V tile pairs in a prefill batch's scratch: ceil((start + n) / tok)
    per kv head (``pairs_per_head`` in q8_common.cuh counts the same on the device); for an
    int start or, elementwise, an int64 array of them."""
    return (starts + (n + tok - 1)) // tok * kv_heads


def plan_prefill(
    rows: Sequence[AttendItem],
    meta: np.ndarray,
    first_row: int,
    kern: AttnKernel,
    first_pair: int = 0,
) -> Launch:
    """Work units of one (head_dim, 16-bit) run of prefill rows: KVH x row tiles per item;
    and, for a kernel over 16-bit tiles, each item's first tile pair in the batch's scratch
    (KVH x its length in tiles per item, from ``first_pair``; other kernels leave -1)."""
    units, pairs = 0, first_pair
    for r, it in enumerate(rows):
        row_tiles = -(-it.n * it.layout.group // kern.gt)
        meta[r, M_RT], meta[r, M_UNIT] = row_tiles, units
        units += it.layout.num_kv_heads * row_tiles
        if kern.tiles is not None:
            meta[r, M_TILES] = pairs
            pairs += tile_pairs(it.start, it.n, kern.tok, it.layout.num_kv_heads)
    launch = Launch(kern, first_row, len(rows), units, rows[0].layout.head_dim)
    launch.first_pair, launch.tile_pairs = first_pair, pairs - first_pair
    launch.cached = any(it.start > 0 for it in rows)
    return launch


def plan_attention(
    rows: Sequence[AttendItem],
    routes: Sequence[int],
    meta: np.ndarray,
    kernel_for: KernelFor,
    policy: SplitPolicy,
) -> tuple[list[Launch], int, int]:
    """One launch per run of equal (head_dim, route) in ``rows`` (in meta-row order);
    returns the launches, the floats of split partials and the split counters the largest
    needs."""
    launches: list[Launch] = []
    part_floats = max_counters = pairs = 0
    tile_bytes: set[int] = set()
    start = 0
    while start < len(rows):
        key = (rows[start].layout.head_dim, routes[start])
        end = start
        while end < len(rows) and (rows[end].layout.head_dim, routes[end]) == key:
            end += 1
        head_dim, kind = key
        kern = kernel_for(head_dim, kind)
        if kern.prefill:
            launch = plan_prefill(rows[start:end], meta[start:end], start, kern, pairs)
            launches.append(launch)
            if launch.tile_pairs:  # pairs count in one size across the batch's launches
                tile_bytes.add(kern.tile_bytes)
                assert len(tile_bytes) == 1, "16-bit tile pairs of two sizes in one batch"
                pairs += launch.tile_pairs
        else:
            launch, counters = plan_launch(
                rows[start:end], meta[start:end], start, kern, policy
            )
            launches.append(launch)
            part_floats = max(part_floats, launch.units * kern.gt * (head_dim + 2))
            max_counters = max(max_counters, counters)
        start = end
    return launches, part_floats, max_counters


def plan_packed(
    lay: LayerLayout,
    n: int,
    starts: np.ndarray,
    kern: AttnKernel,
    policy: SplitPolicy,
    base: list[int],
    step: list[int],
) -> tuple[Launch, int, list[tuple[int, np.ndarray]]]:
    """``plan_launch`` (or ``plan_prefill``) over arrays, for B rows of ``n`` new tokens
    after ``starts``: every row has the same row tiles; splits per length. Sets the columns
    that are the same in every row (``base``) or grow by a step per row (``step``); returns
    the launch, the split counters it needs and the other columns, (column, values)."""
    gt, tok, t = kern.gt, kern.tok, lay.tokens_per_page
    count = len(starts)
    row_tiles = -(-n * lay.group // gt)
    tiles = lay.num_kv_heads * row_tiles
    base[M_RT] = row_tiles
    if kern.prefill:
        step[M_UNIT] = tiles
        launch = Launch(kern, 0, count, count * tiles, lay.head_dim)
        if kern.tiles is None:
            return launch, 0, []
        pairs = tile_pairs(starts, n, kern.tok, lay.num_kv_heads)
        launch.tile_pairs = int(np.add.reduce(pairs))
        launch.cached = int(np.maximum.reduce(starts)) > 0
        return launch, 0, [(M_TILES, np.cumsum(pairs) - pairs)]
    step[M_CNT] = tiles
    # The ufuncs' reduce, not .sum() or .max(): their Python wrappers cost more here.
    slots = policy.sm_count * kern.blocks_per_sm * policy.split_waves
    ideal = max(tok, math.ceil(tiles * (int(np.add.reduce(starts)) + count * n) / slots))
    max_chunk = max(tok, ((kern.max_pages - 1) * t // tok) * tok)
    top = int(np.maximum.reduce(starts)) + n  # the longest row's length
    # One split each where split() gives that to the longest row (so to every row): its
    # round(top / ideal) <= 1, exactly 2 * top < 3 * ideal (1.5 rounds to 2), or
    # max_splits 1; and its page ids fit. The chunk is then its length, in whole stages.
    if top <= max_chunk and (policy.max_splits == 1 or 2 * top < 3 * ideal):
        base[M_NSPLIT], step[M_UNIT] = 1, tiles
        chunk = starts + (n + tok - 1)
        chunk //= tok
        chunk *= tok
        launch = Launch(kern, 0, count, count * tiles, lay.head_dim)
        return launch, count * tiles, [(M_CHUNK, chunk)]
    lens = starts + n
    # split(), vectorized: np.rint rounds half to even, as Python's round().
    nsplit = np.minimum(policy.max_splits, np.maximum(1, np.rint(lens / ideal))).astype(np.int64)
    nsplit = np.maximum(nsplit, -(-lens // max_chunk))
    chunk = -(-np.ceil(lens / nsplit).astype(np.int64) // tok) * tok
    nsplit = -(-lens // chunk)
    units = tiles * nsplit
    columns = [(M_NSPLIT, nsplit), (M_CHUNK, chunk), (M_UNIT, np.cumsum(units) - units)]
    return Launch(kern, 0, count, int(units.sum()), lay.head_dim), count * tiles, columns
