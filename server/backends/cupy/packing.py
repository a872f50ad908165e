"""Batch preparation for the GPU backend: one AppendAndAttend batch -> one packed host buffer
(one H2D copy) and the plan of its kernel launches (planning.py).

The buffer, all int32 rows and 16-byte aligned arrays:

    meta   [nitems, META]   one row per item (the M_* columns, q8_common.cuh)
    ptab   [sum of pages]   every item's page ids, back to back
    q k v  per item         raw bytes in the item's dtype (float32, float16 or bfloat16)

Items are ordered by (head_dim, kernel route): one attention launch per run; empty items
(n = 0) get no row. From DEFER_BYTES of q/k/v, the q/k/v copies are listed in
``Batch.pending`` instead of made, for the uploader to run on threads in chunks. A packed
batch (``pack_packed``: B sessions of one layout, q/k/v stacked) is laid out as all q, all
k, all v, one copy each, item b at base + b * item bytes; its meta rows are one base row
plus a step per row and a few columns of their own (two numpy passes and a handful of
column writes, not one per column), and hold what ``pack`` writes for the same items.
Host work only: the backend does the copies and the launches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import numpy as np

from q8kv.format import QBLOCK, LayerLayout

from ..base import AttendItem, PackedItems
from .kernels import MAX_HEAD_DIM
from .meta import (
    M_D,
    M_DT,
    M_G,
    M_H,
    M_K,
    M_KVH,
    M_LOGT,
    M_N,
    M_OUT,
    M_PT,
    M_Q,
    M_QB,
    M_SCALE,
    M_START,
    M_TILES,
    M_V,
    META,
)  # fmt: skip
from .planning import KernelFor, Launch, SplitPolicy, plan_attention, plan_packed, route

_LOG2E = 1.4426950408889634
DTYPE_CODE = {np.dtype(np.float32): 0, np.dtype(np.float16): 1, np.dtype(ml_dtypes.bfloat16): 2}
MAX_BATCH_BYTES = 2**31  # the kernels address the input buffer with int32 offsets


@dataclass
class Batch:
    """A packed batch: host buffer layout, kernel launches and where each output lands."""

    nbytes: int
    nitems: int
    ptab_off: int
    q_blocks: int  # q8_append's threads (append_threads, summed)
    launches: list[Launch]
    outputs: list[tuple[int, tuple[int, int, int]]]  # (float offset, shape) per caller item
    out_floats: int
    part_floats: int
    counters: int
    dev: Any = None  # own device copy of the inputs (cupy.ndarray, benchmarks)
    tiles_at: int = 0  # device address of the 16-bit K/V tiles' scratch (0: none), at append
    extra: dict = field(default_factory=dict)
    # Input copies left to the uploader (a large batch: threads copy them in chunks while
    # the earlier chunks cross PCIe): (byte offset in the buffer, the source bytes).
    pending: list[tuple[int, np.ndarray]] = field(default_factory=list)

    @property
    def tile_bytes(self) -> int:
        """Device scratch the launches' 16-bit K/V tile pairs need (q8_prefill_ws.cu)."""
        return sum(ln.tile_pairs * ln.kernel.tile_bytes for ln in self.launches)

    def finish_copies(self, host: np.ndarray) -> None:
        """Do the pending copies here and now (tests, benchmarks' own device copies)."""
        for off, src in self.pending:
            host[off : off + src.size] = src
        self.pending = []


def append_threads(n: int, kv_heads: int, blocks: int) -> int:
    """q8_append's threads for an item of n new tokens: one per 32-value block of each
    (kind, token, kv head); from 8 tokens on, in whole octets of tokens (the kernel gives 8
    consecutive tokens adjacent threads, so their 16-bit tile rows are written together)."""
    tokens = n if n < 8 else -(-n // 8) * 8
    return 2 * tokens * kv_heads * blocks


# From this many bytes of q/k/v, a batch's input copies are left to the uploader.
DEFER_BYTES = 4 << 20


@dataclass(frozen=True)
class BufferLayout:
    """Byte offsets in the packed input buffer."""

    meta_bytes: int
    ptab_off: int
    inputs: list[tuple[int, int, int]]  # q, k, v offsets per row
    nbytes: int


@dataclass
class _Cursor:
    """Running totals while rows are written: output floats, quantization blocks, page ids."""

    out: int = 0
    qb: int = 0
    pt: int = 0


def check_layout(lay: LayerLayout) -> None:
    """What the kernels take: head_dim a multiple of 32 up to MAX_HEAD_DIM, and a power of
    two tokens per page (a shift in the kernels)."""
    if lay.head_dim % QBLOCK or not 0 < lay.head_dim <= MAX_HEAD_DIM:
        raise ValueError(
            f"cupy backend: head_dim: expected a multiple of {QBLOCK} up to "
            f"{MAX_HEAD_DIM}, got {lay.head_dim}"
        )
    t = lay.tokens_per_page
    if t <= 0 or t & (t - 1):
        raise ValueError(f"cupy backend: tokens_per_page: expected a power of two, got {t}")


def device_arrays(item: AttendItem) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """q, k, v as the kernels read them: C-contiguous, one dtype the kernels know (mixed
    dtypes in one item fall back to float32 on the host)."""
    q, k, v = item.q, item.k, item.v
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in DTYPE_CODE:
        q, k, v = (a.astype(np.float32) for a in (q, k, v))
    q, k, v = (np.ascontiguousarray(a) for a in (q, k, v))
    return q, k, v


def buffer_layout(
    arrays: Sequence[Sequence[np.ndarray]], page_counts: Sequence[int]
) -> BufferLayout:
    """Offsets of the meta rows, the page ids and each row's q/k/v (16-byte aligned)."""
    meta_bytes = len(arrays) * META * 4
    off = meta_bytes + 4 * sum(page_counts)
    inputs = []
    for qkv in arrays:
        offs = []
        for a in qkv:
            off = -(-off // 16) * 16
            offs.append(off)
            off += a.nbytes
        inputs.append((offs[0], offs[1], offs[2]))
    nbytes = -(-off // 16) * 16
    if nbytes >= MAX_BATCH_BYTES:
        raise ValueError(
            f"batch too large for one launch: expected < {MAX_BATCH_BYTES} bytes "
            f"of inputs, got {nbytes}"
        )
    return BufferLayout(meta_bytes, meta_bytes, inputs, nbytes)


def _copy_inputs(
    host: np.ndarray,
    qkv: Sequence[np.ndarray],
    offs: tuple[int, int, int],
    ids: np.ndarray,
    ptab_at: int,
    pending: list | None,
) -> None:
    """The page ids now; q/k/v now, or into ``pending`` (a deferred large batch)."""
    for a, o in zip(qkv, offs, strict=True):
        src = a.reshape(-1).view(np.uint8)
        if pending is None:
            host[o : o + a.nbytes] = src
        else:
            pending.append((o, src))
    host[ptab_at : ptab_at + 4 * ids.size] = ids.view(np.uint8)


def _fill_meta(
    m: np.ndarray, item: AttendItem, offs: tuple[int, int, int], dtype: np.dtype, cur: _Cursor
) -> None:
    """One item's meta row (the attention split columns come later, from the plan)."""
    lay = item.layout
    m[M_Q], m[M_K], m[M_V] = offs
    m[M_DT] = DTYPE_CODE[dtype]
    m[M_PT] = cur.pt
    m[M_START], m[M_N] = item.start, item.n
    m[M_H], m[M_KVH] = lay.num_heads, lay.num_kv_heads
    m[M_LOGT] = lay.tokens_per_page.bit_length() - 1
    m[M_OUT] = cur.out
    m[M_SCALE] = np.float32(item.softmax_scale * _LOG2E).view(np.int32)
    m[M_G] = lay.group
    m[M_QB] = cur.qb
    m[M_D] = lay.head_dim
    m[M_TILES] = -1  # no 16-bit tiles (plan_prefill sets the rows of a kernel over them)


def write_rows(
    host: np.ndarray,
    meta: np.ndarray,
    items: Sequence[AttendItem],
    order: Sequence[int],
    arrays: Sequence[Sequence[np.ndarray]],
    layout: BufferLayout,
    pending: list | None = None,
) -> tuple[list[tuple[int, tuple[int, int, int]]], _Cursor]:
    """Copy every row's inputs (or list them in ``pending``) and page ids, fill its meta
    row; returns where each caller item's output lands ((-1, shape) for empty items) and
    the totals."""
    outputs: list[tuple[int, tuple[int, int, int]]] = [
        (-1, (0, it.layout.num_heads, it.layout.head_dim)) for it in items
    ]
    cur = _Cursor()
    for row, j in enumerate(order):
        it, lay = items[j], items[j].layout
        ids = np.asarray(it.page_ids, dtype=np.int32)
        ptab_at = layout.ptab_off + 4 * cur.pt
        _copy_inputs(host, arrays[row], layout.inputs[row], ids, ptab_at, pending)
        _fill_meta(meta[row], it, layout.inputs[row], arrays[row][0].dtype, cur)
        outputs[j] = (cur.out, (it.n, lay.num_heads, lay.head_dim))
        cur.out += it.n * lay.num_heads * lay.head_dim
        cur.qb += append_threads(it.n, lay.num_kv_heads, lay.blocks)
        cur.pt += ids.size
    return outputs, cur


def pack(
    items: Sequence[AttendItem],
    host_buffer: Callable[[int], np.ndarray],
    kernel_for: KernelFor,
    policy: SplitPolicy,
) -> Batch:
    """Pack ``items`` into the buffer ``host_buffer(nbytes)`` returns (uint8, at least
    nbytes) and plan the launches; ``kernel_for(head_dim, route)`` gives each launch's
    kernel."""
    live = [j for j, it in enumerate(items) if it.n > 0]
    for j in live:
        check_layout(items[j].layout)
    inputs = {j: device_arrays(items[j]) for j in live}
    kind = {j: route(items[j].n, items[j].layout.group, inputs[j][0].dtype) for j in live}
    # One launch per (head_dim, kernel).
    order = sorted(live, key=lambda j: (items[j].layout.head_dim, kind[j]))
    arrays = [inputs[j] for j in order]
    layout = buffer_layout(arrays, [len(items[j].page_ids) for j in order])
    host = host_buffer(layout.nbytes)
    meta = host[: layout.meta_bytes].view(np.int32).reshape(len(order), META)
    meta[:] = 0
    big = sum(a.nbytes for qkv in arrays for a in qkv) >= DEFER_BYTES
    pending: list | None = [] if big else None
    outputs, cur = write_rows(host, meta, items, order, arrays, layout, pending)
    rows = [items[j] for j in order]
    routes = [kind[j] for j in order]
    launches, part_floats, counters = plan_attention(rows, routes, meta, kernel_for, policy)
    return Batch(
        nbytes=layout.nbytes,
        nitems=len(order),
        ptab_off=layout.ptab_off,
        q_blocks=cur.qb,
        launches=launches,
        outputs=outputs,
        out_floats=cur.out,
        part_floats=part_floats,
        counters=counters,
        pending=pending or [],
    )


def pack_packed(
    batch: PackedItems,
    host_buffer: Callable[[int], np.ndarray],
    kernel_for: KernelFor,
    policy: SplitPolicy,
) -> Batch:
    """``pack`` for a packed batch (n >= 1), without a Python step per item: the same meta
    rows (but the q/k/v offsets), page ids and input bytes the kernels read. The caller
    reads the output as one [B, n, H, D] float32 array at float offset 0."""
    lay, count, n = batch.layout, batch.size, batch.n
    check_layout(lay)
    q, k, v = batch.q, batch.k, batch.v
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in DTYPE_CODE:
        q, k, v = (a.astype(np.float32) for a in (q, k, v))  # as device_arrays does
    q, k, v = (np.ascontiguousarray(a) for a in (q, k, v))
    ids, counts = batch.page_table()
    meta_bytes = count * META * 4
    offsets, off = [], meta_bytes + 4 * ids.size
    for a in (q, k, v):
        off = -(-off // 16) * 16
        offsets.append(off)
        off += a.nbytes
    nbytes = -(-off // 16) * 16
    if nbytes >= MAX_BATCH_BYTES:
        raise ValueError(
            f"batch too large for one launch: expected < {MAX_BATCH_BYTES} bytes "
            f"of inputs, got {nbytes}"
        )
    host = host_buffer(nbytes)
    pending = []
    big = q.nbytes + k.nbytes + v.nbytes >= DEFER_BYTES  # the uploader copies them (as pack)
    for a, o in zip((q, k, v), offsets, strict=True):
        if big:
            pending.append((o, a.reshape(-1).view(np.uint8)))
        else:
            host[o : o + a.nbytes] = a.reshape(-1).view(np.uint8)
    host[meta_bytes : meta_bytes + 4 * ids.size] = ids.view(np.uint8)
    # Every column but a few is the same in every row or grows by a step per row: the
    # rows are base + row * step, two passes over the rows, not one per column.
    base, step = [0] * META, [0] * META
    for col, a, o in zip((M_Q, M_K, M_V), (q, k, v), offsets, strict=True):
        base[col], step[col] = o, a.nbytes // count
    base[M_DT], base[M_N] = DTYPE_CODE[q.dtype], n
    base[M_H], base[M_KVH], base[M_G], base[M_D] = (
        lay.num_heads, lay.num_kv_heads, lay.group, lay.head_dim)  # fmt: skip
    base[M_LOGT] = lay.tokens_per_page.bit_length() - 1
    base[M_TILES] = -1  # none, unless the plan's prefill kernel reads 16-bit tiles
    step[M_OUT] = out_floats = n * lay.num_heads * lay.head_dim
    step[M_QB] = q_blocks = append_threads(n, lay.num_kv_heads, lay.blocks)
    kern = kernel_for(lay.head_dim, route(n, lay.group, q.dtype))
    launch, counters, columns = plan_packed(lay, n, batch.starts, kern, policy, base, step)
    meta = host[:meta_bytes].view(np.int32).reshape(count, META)
    np.multiply(np.arange(count, dtype=np.int32)[:, None], np.array(step, np.int32), out=meta)
    meta += np.array(base, np.int32)
    # The rest: each row's own.
    np.add.accumulate(counts[:-1], out=meta[1:, M_PT])  # row 0's is 0
    meta[:, M_START] = batch.starts
    # float64 product, rounded once to float32 (as pack's np.float32(scale * _LOG2E)).
    scales = meta.view(np.float32)[:, M_SCALE]
    np.multiply(np.asarray(batch.softmax_scales, np.float64), _LOG2E, out=scales,
                casting="same_kind")  # fmt: skip
    for col, values in columns:
        meta[:, col] = values
    return Batch(
        nbytes=nbytes, nitems=count, ptab_off=meta_bytes, q_blocks=count * q_blocks,
        launches=[launch], outputs=[], out_floats=count * out_floats,
        part_floats=0 if kern.prefill else launch.units * kern.gt * (lay.head_dim + 2),
        counters=counters, pending=pending,
    )
