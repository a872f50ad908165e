"""The GPU backend's packed packing (packing.pack_packed), on any machine: for random packed
batches it must give the kernels what the per-item packing (packing.pack) gives them for
the same items, byte for byte: every meta column (q/k/v offsets aside: each points at the
same bytes), the page table, the q/k/v bytes, the launch plan and the buffer sizes."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from harness.kernel_plans import fake_kernel
from harness.packed import packed_batch
from harness.tensors import random_tensor

from q8kv.format import LayerLayout, tokens_per_page
from q8kv.server.backends.base import PackedItems
from q8kv.server.backends.cupy import packing
from q8kv.server.backends.cupy.meta import M_K, M_Q, M_V, META

DTYPES = [np.float32, np.float16, ml_dtypes.bfloat16]
OFFSETS = (M_Q, M_K, M_V)


def random_packed(rng: np.random.Generator) -> PackedItems:
    kvh, group = int(rng.choice([1, 2, 8])), int(rng.choice([1, 4, 5]))
    d = int(rng.choice([64, 128, 256]))
    layout = LayerLayout(kvh * group, kvh, d, tokens_per_page(65536, kvh, d))
    b, n = int(rng.integers(1, 40)), int(rng.choice([1, 3, 17, 40]))
    pool = rng.choice([0, 1, 31, 1024, 5000, 40_000], size=4)  # some lengths repeat
    starts = np.where(rng.random(b) < 0.5, rng.choice(pool, b), rng.integers(0, 40_000, b))
    free = rng.permutation(1 << 20).astype(np.int32)
    tables, used = [], 0
    for start in starts:
        count = -(-(int(start) + n) // layout.tokens_per_page)
        tables.append(free[used : used + count])
        used += count
    dtypes = [DTYPES[rng.integers(3)]] * 3
    if rng.random() < 0.2:  # mixed dtypes travel as float32
        dtypes = [DTYPES[rng.integers(3)] for _ in range(3)]
    shapes = [(b, n, layout.num_heads, d), (b, n, kvh, d), (b, n, kvh, d)]
    q, k, v = (random_tensor(rng, s, t) for s, t in zip(shapes, dtypes, strict=True))
    scales = rng.uniform(0.01, 0.5, b)
    return PackedItems(layout, scales, tables, starts.astype(np.int64), q, k, v)


def stored_dtype(batch: PackedItems) -> np.dtype:
    """What the kernels read: the inputs' one dtype, or float32 for mixed dtypes."""
    same = batch.q.dtype == batch.k.dtype == batch.v.dtype
    return batch.q.dtype if same else np.dtype(np.float32)


def noise(nbytes: int) -> np.ndarray:
    """A host buffer that starts as noise: a byte the packing fails to write shows."""
    return np.random.default_rng(1).integers(0, 256, nbytes + 64, np.uint8)


def packed_both_ways(batch: PackedItems, policy: packing.SplitPolicy):
    """(per-item Batch, its buffer, packed Batch, its buffer)."""
    old_host: list[np.ndarray] = []
    new_host: list[np.ndarray] = []
    old = packing.pack(batch.items(), lambda nb: old_host.append(noise(nb)) or old_host[-1],
                       fake_kernel, policy)
    new = packing.pack_packed(batch, lambda nb: new_host.append(noise(nb)) or new_host[-1],
                              fake_kernel, policy)
    # A large batch leaves its q/k/v copies to the uploader (both ways alike): do them here.
    assert bool(old.pending) == bool(new.pending)
    old.finish_copies(old_host[0])
    new.finish_copies(new_host[0])
    return old, old_host[0], new, new_host[0]


def launches(batch: packing.Batch) -> list[tuple]:
    return [(ln.meta_row, ln.nitems, ln.units, ln.head_dim, ln.kernel.tok, ln.tile_pairs)
            for ln in batch.launches]  # fmt: skip


@pytest.mark.parametrize(
    "policy",
    [packing.SplitPolicy(132, 1.0, 48), packing.SplitPolicy(16, 2.5, 4),
     packing.SplitPolicy(132, 0.5, 1)],
    ids=["h100", "small", "nosplit"],
)
def test_packed_packing_gives_the_kernels_the_same_inputs(policy) -> None:
    rng = np.random.default_rng(21)
    for _ in range(40):
        assert_same_inputs(random_packed(rng), policy)


@pytest.mark.parametrize(
    "lengths",
    [[2999, 1001], [3000, 1000], [3001, 999], [1024] * 64, [1] * 7, [5000, 3000, 17, 2]],
    ids=["below-1.5", "at-1.5", "above-1.5", "lockstep", "first-token", "mixed"],
)
def test_one_split_per_row_where_split_gives_one(lengths) -> None:
    """Cache lengths after the step around round(longest / ideal) = 1.5 (half to even: 2
    splits), with ideal = (3000 + 1000) / 2 here (one kv head, one row tile, 2 slots): the
    packed packing's shortcut for one split per row must plan what split() plans."""
    rng = np.random.default_rng(23)
    layout = LayerLayout(1, 1, 64, tokens_per_page(65536, 1, 64))
    starts = [length - 1 for length in lengths]
    batch = packed_batch(rng, layout, 1 << 16, starts, 1, np.float16, softmax_scales=(0.01, 0.5))
    for policy in (packing.SplitPolicy(1, 1.0, 48), packing.SplitPolicy(132, 1.0, 48)):
        assert_same_inputs(batch, policy)


def assert_same_inputs(batch: PackedItems, policy: packing.SplitPolicy) -> None:
    old, old_host, new, new_host = packed_both_ways(batch, policy)
    b = batch.size
    for name in ("nitems", "ptab_off", "q_blocks", "out_floats", "part_floats", "counters"):
        assert getattr(new, name) == getattr(old, name), name
    assert new.nbytes <= old.nbytes
    assert launches(new) == launches(old)
    old_meta = old_host[: b * META * 4].view(np.int32).reshape(b, META)
    new_meta = new_host[: b * META * 4].view(np.int32).reshape(b, META)
    others = [c for c in range(META) if c not in OFFSETS]
    np.testing.assert_array_equal(new_meta[:, others], old_meta[:, others])
    pages = sum(len(ids) for ids in batch.page_ids)
    table = slice(old.ptab_off, old.ptab_off + 4 * pages)
    np.testing.assert_array_equal(new_host[table], old_host[table])
    sizes = [a[0].astype(stored_dtype(batch)).nbytes for a in (batch.q, batch.k, batch.v)]
    for row in range(b):
        for col, size in zip(OFFSETS, sizes, strict=True):
            o_old, o_new = int(old_meta[row, col]), int(new_meta[row, col])
            assert o_new % 16 == 0 and o_new + size <= new.nbytes
            np.testing.assert_array_equal(
                new_host[o_new : o_new + size], old_host[o_old : o_old + size]
            )
    # The per-item outputs sit back to back: the packed output is one [B, n, H, D].
    per = batch.n * batch.layout.num_heads * batch.layout.head_dim
    assert [off for off, _ in old.outputs] == [row * per for row in range(b)]


def test_rows_do_not_overlap_and_cover_the_inputs() -> None:
    """Each row's q, k and v byte ranges are disjoint and hold that session's values."""
    rng = np.random.default_rng(22)
    for _ in range(10):
        batch = random_packed(rng)
        _, _, new, host = packed_both_ways(batch, packing.SplitPolicy(132, 1.0, 48))
        meta = host[: batch.size * META * 4].view(np.int32).reshape(batch.size, META)
        spans = []
        for col, array in zip(OFFSETS, (batch.q, batch.k, batch.v), strict=True):
            for row in range(batch.size):
                item = array[row].astype(stored_dtype(batch))
                at = int(meta[row, col])
                got = host[at : at + item.nbytes].view(item.dtype).reshape(item.shape)
                np.testing.assert_array_equal(got, item)
                spans.append((at, at + item.nbytes))
        spans.sort()
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))
        assert spans[0][0] >= new.ptab_off + 4 * sum(len(i) for i in batch.page_ids)
