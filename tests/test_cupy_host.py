"""The GPU backend's host side, on any machine (no CuPy needed): the tuning knobs from flags
and environment, their limits, and the packing of a batch into the one input buffer the
kernels read (checked field by field against the items, on random batches)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from harness.kernel_plans import fake_kernel
from harness.tensors import qkv

from q8kv.format import LayerLayout, tokens_per_page
from q8kv.server.backends import GpuTuning
from q8kv.server.backends.base import AttendItem
from q8kv.server.backends.cupy import kernels, meta, packing, planning
from q8kv.server.backends.cupy.meta import META
from q8kv.server.config import load_config

DTYPES = [np.float32, np.float16, ml_dtypes.bfloat16]
H200_SMEM_OPTIN = 227 * 1024


# -- tuning ---------------------------------------------------------------------------------


def test_tuning_from_flags_then_environment_then_defaults() -> None:
    env = {"Q8KV_GPU_TC_NSTAGES": "3", "Q8KV_GPU_MAX_SPLITS": "7"}
    config = load_config(["--gpu-max-splits", "12", "--gpu-split-waves", "1.5"], environ=env)
    assert GpuTuning.from_config(config) == GpuTuning(max_splits=12, split_waves=1.5, tc_nstages=3)
    assert GpuTuning.from_config(load_config([], environ={})) == GpuTuning()


@pytest.mark.parametrize(
    ("argv", "env", "needle"),
    [
        (["--gpu-max-splits", "0"], {}, "--gpu-max-splits: expected >= 1, got 0"),
        (["--gpu-split-waves", "-1"], {}, "--gpu-split-waves: expected > 0, got -1.0"),
        ([], {"Q8KV_GPU_TC_NSTAGES": "1"}, "--gpu-tc-nstages: expected >= 2, got 1"),
        (["--gpu-tc-minblocks", "17"], {}, "--gpu-tc-minblocks: expected 1..16, got 17"),
        ([], {"Q8KV_GPU_TC_MINBLOCKS": "two"}, "Q8KV_GPU_TC_MINBLOCKS='two'"),
        (["--gpu-tc-stage-bytes", "lots"], {}, "expected a size like 4GiB"),
    ],
)
def test_bad_tuning_exits_with_a_clear_message(argv, env, needle, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        load_config(argv, environ=env)
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


def test_a_pipeline_too_big_for_shared_memory_is_refused_up_front() -> None:
    kernels.check_tuning(GpuTuning(), H200_SMEM_OPTIN)  # the defaults fit
    with pytest.raises(ValueError, match="--gpu-tc-nstages 8 x --gpu-tc-stage-bytes 32768"):
        kernels.check_tuning(GpuTuning(tc_nstages=8), H200_SMEM_OPTIN)


def test_the_head_dim_limit_reaches_the_kernel_as_a_define() -> None:
    opts = kernels.attention_options(128, GpuTuning())
    assert f"-DMAX_HEAD_DIM={kernels.MAX_HEAD_DIM}" in opts
    assert "D <= MAX_HEAD_DIM" in kernels.source("q8_attention_tc.cu")


def test_the_host_and_the_kernels_agree_on_the_16bit_tiles() -> None:
    """The tile pairs the host plans and launches q8_kv_tiles for are the kernels' own: the
    tokens per tile and the blocks per pair are written on both sides."""
    source = kernels.source("q8_prefill_ws.cu")
    assert f"#define PF_TILE {kernels.PREFILL_TILE} " in source
    assert f"constexpr int TILE_PARTS = {kernels.TILE_PARTS};" in source
    assert f"#define PF_TILE {kernels.PREFILL_TILE} " in kernels.source("q8_pages.cu")


def test_past_d_128_the_q_digits_live_in_shared_memory() -> None:
    # In registers they spilled 388 bytes at D = 256 (tests/test_kernel_build.py checks).
    assert "-DQD_SMEM=0" in kernels.attention_options(128, GpuTuning())
    assert "-DQD_SMEM=1" in kernels.attention_options(160, GpuTuning())


# -- packing --------------------------------------------------------------------------------


def random_item(rng: np.random.Generator, head_dim: int, n: int) -> AttendItem:
    kvh, group = int(rng.choice([1, 2, 8])), int(rng.choice([1, 4]))
    layout = LayerLayout(kvh * group, kvh, head_dim, tokens_per_page(65536, kvh, head_dim))
    start = int(rng.integers(0, 40_000))
    pages = rng.permutation(1 << 16)[: -(-(start + n) // layout.tokens_per_page)]
    dtype = DTYPES[rng.integers(3)]
    q, k, v = qkv(rng, n, layout, dtype)
    return AttendItem(layout, float(rng.uniform(0.05, 0.2)), pages, start, q, k, v)


def route_of(item: AttendItem) -> int:
    return planning.route(item.n, item.layout.group, item.q.dtype)


def pack(items: list[AttendItem], policy: packing.SplitPolicy) -> tuple[packing.Batch, np.ndarray]:
    buffers = []

    def host_buffer(nbytes: int) -> np.ndarray:
        buffers.append(np.random.default_rng(0).integers(0, 256, nbytes + 64, dtype=np.uint8))
        return buffers[-1]

    batch = packing.pack(items, host_buffer, fake_kernel, policy)
    return batch, buffers[0]


def check_row(host: np.ndarray, m: np.ndarray, item: AttendItem, ptab_off: int) -> None:
    """The row points at the item's own bytes, page ids and geometry."""
    for col, array in ((meta.M_Q, item.q), (meta.M_K, item.k), (meta.M_V, item.v)):
        assert m[col] % 16 == 0
        stored = host[m[col] : m[col] + array.nbytes].view(array.dtype).reshape(array.shape)
        np.testing.assert_array_equal(stored, array)
    assert m[meta.M_DT] == packing.DTYPE_CODE[item.q.dtype]
    ids = host[ptab_off + 4 * m[meta.M_PT] :].view(np.int32)[: len(item.page_ids)]
    np.testing.assert_array_equal(ids, item.page_ids)
    assert (m[meta.M_START], m[meta.M_N], m[meta.M_D]) == (
        item.start,
        item.n,
        item.layout.head_dim,
    )


def check_splits(m: np.ndarray, item: AttendItem, tok: int) -> None:
    """The splits cover the sequence once, in whole stages, each with few enough pages for
    the kernel's shared-memory page table."""
    length, nsplit, chunk = item.start + item.n, m[meta.M_NSPLIT], m[meta.M_CHUNK]
    assert chunk % tok == 0 and (nsplit - 1) * chunk < length <= nsplit * chunk
    assert -(-chunk // item.layout.tokens_per_page) + 1 <= kernels.MAXP
    assert m[meta.M_RT] == -(-item.n * item.layout.group // kernels.ROWS_PER_TILE)


def check_prefixes(ln: planning.Launch, rows: np.ndarray, live: list[int],
                   items: list[AttendItem]) -> None:  # fmt: skip
    """Within a launch, work units and split counters are prefix sums over its rows; a
    prefill launch has one unit per (kv head, row tile of the kernel's rows) and no splits,
    and a kernel over 16-bit tiles a tile pair per (kv head, tile of the item's length),
    numbered on from the launches before it (every other row: -1, none)."""
    units = cnt = 0
    pairs = ln.first_pair
    for m, j in zip(rows, live[ln.meta_row : ln.meta_row + len(rows)], strict=True):
        it = items[j]
        tiles = it.layout.num_kv_heads * m[meta.M_RT]
        if route_of(it) != planning.DECODE:
            assert m[meta.M_RT] == -(-it.n * it.layout.group // ln.kernel.gt)
            assert m[meta.M_UNIT] == units
            units += tiles
            if ln.kernel.tiles is None:
                assert m[meta.M_TILES] == -1
                continue
            assert m[meta.M_TILES] == pairs
            pairs += it.layout.num_kv_heads * -(-(it.start + it.n) // ln.kernel.tok)
            continue
        assert (m[meta.M_UNIT], m[meta.M_CNT], m[meta.M_TILES]) == (units, cnt, -1)
        units += tiles * m[meta.M_NSPLIT]
        cnt += tiles
    assert ln.units == units
    assert ln.tile_pairs == pairs - ln.first_pair
    assert ln.cached == any(items[j].start > 0 for j in live[ln.meta_row : ln.meta_row + len(rows)])


def test_pack_lays_out_every_item_and_plans_one_launch_per_head_dim_and_kernel() -> None:
    rng = np.random.default_rng(11)
    policy = packing.SplitPolicy(sm_count=132, split_waves=1.0, max_splits=48)
    for _ in range(30):
        items = [
            random_item(rng, int(rng.choice([64, 128, 256])), int(rng.choice([0, 1, 17, 70])))
            for _ in range(int(rng.integers(1, 7)))
        ]
        batch, host = pack(items, policy)
        live = sorted(
            (j for j, it in enumerate(items) if it.n),
            key=lambda j: (items[j].layout.head_dim, route_of(items[j])),
        )
        meta = host[: len(live) * META * 4].view(np.int32).reshape(len(live), META)
        for row, j in enumerate(live):
            check_row(host, meta[row], items[j], batch.ptab_off)
            if route_of(items[j]) == planning.DECODE:
                check_splits(meta[row], items[j], fake_kernel(items[j].layout.head_dim).tok)
        launch_keys = sorted({(items[j].layout.head_dim, route_of(items[j])) for j in live})
        assert [(ln.head_dim, ln.kernel.prefill) for ln in batch.launches] == [
            (d, r != planning.DECODE) for d, r in launch_keys
        ]
        pairs = 0
        for ln in batch.launches:
            check_prefixes(ln, meta[ln.meta_row : ln.meta_row + ln.nitems], live, items)
            if ln.tile_pairs:  # the batch's launches share one scratch, in turn
                assert ln.first_pair == pairs
                pairs += ln.tile_pairs
        assert batch.tile_bytes == pairs * kernels.ws_tile_bytes(128)
        for j, it in enumerate(items):
            assert batch.outputs[j][1] == (it.n, it.layout.num_heads, it.layout.head_dim)
            assert (batch.outputs[j][0] < 0) == (it.n == 0)


def test_a_large_batch_leaves_its_input_copies_to_the_uploader(monkeypatch) -> None:
    """Past DEFER_BYTES of q/k/v, pack writes meta rows and page ids but lists the q/k/v
    copies (the backend runs them on threads, chunk by chunk, into the same buffer); done,
    the buffer is byte for byte what an immediate pack writes."""
    rng = np.random.default_rng(14)
    items = [random_item(rng, int(rng.choice([64, 128])), int(n)) for n in (70, 0, 1, 17)]
    policy = packing.SplitPolicy(132, 1.0, 48)
    now, now_host = pack(items, policy)
    assert not now.pending
    monkeypatch.setattr(packing, "DEFER_BYTES", 1)
    later, later_host = pack(items, policy)
    total = sum(a.nbytes for it in items for a in (it.q, it.k, it.v))
    assert later.pending and sum(src.size for _, src in later.pending) == total
    head = min(off for off, _ in later.pending)
    np.testing.assert_array_equal(later_host[:head], now_host[:head])  # meta and page ids
    assert not np.array_equal(later_host[head : now.nbytes], now_host[head : now.nbytes])
    later.finish_copies(later_host)  # both buffers started as the same noise
    assert not later.pending
    np.testing.assert_array_equal(later_host[: now.nbytes], now_host[: now.nbytes])


def test_mixed_dtypes_in_one_item_travel_as_float32() -> None:
    rng = np.random.default_rng(12)
    item = random_item(rng, 64, 3)
    item.k = item.k.astype(np.float16)
    item.q = item.q.astype(ml_dtypes.bfloat16)
    _, host = pack([item], packing.SplitPolicy(132, 1.0, 48))
    m = host[: META * 4].view(np.int32)
    assert m[meta.M_DT] == packing.DTYPE_CODE[np.dtype(np.float32)]
    stored = (
        host[m[meta.M_K] : m[meta.M_K] + item.k.size * 4]
        .view(np.float32)
        .reshape(item.k.shape)
    )
    np.testing.assert_array_equal(stored, item.k.astype(np.float32))


@pytest.mark.parametrize(
    ("head_dim", "tokens", "needle"),
    [
        (288, 16, "head_dim: expected a multiple of 32 up to 256, got 288"),
        (64, 12, "tokens_per_page: expected a power of two, got 12"),
    ],
)
def test_layouts_the_kernels_cannot_take_are_refused(head_dim, tokens, needle) -> None:
    rng = np.random.default_rng(13)
    item = random_item(rng, 64, 1)
    layout = LayerLayout(1, 1, head_dim, tokens)
    q, k, _ = qkv(rng, 1, layout)
    bad = AttendItem(layout, 0.1, item.page_ids, 0, q, k, k.copy())
    with pytest.raises(ValueError, match=needle):
        pack([item, bad], packing.SplitPolicy(132, 1.0, 48))


def test_outputs_come_back_in_each_items_dtype() -> None:
    """transfers: one 16-bit dtype for every live item means narrowing on the device;
    otherwise float32 comes back and is cast per item. Outputs of a buffer the caller owns
    are views, of the reused buffer copies."""
    transfers = pytest.importorskip("q8kv.server.backends.cupy.transfers")
    rng = np.random.default_rng(15)
    f16, bf16, f32 = (np.dtype(t) for t in (np.float16, ml_dtypes.bfloat16, np.float32))
    items = [random_item(rng, 64, n) for n in (3, 0, 2)]
    for it, dt in zip(items, (f16, bf16, f16), strict=True):
        it.out_dtype = dt
    assert transfers.one_narrow_dtype(items) == f16  # the empty item does not count
    assert transfers.one_narrow_dtype([items[0], items[2], random_item(rng, 64, 1)]) is None
    shapes = [(it.n, it.layout.num_heads, it.layout.head_dim) for it in items]
    sizes = [a * b * c for a, b, c in shapes]
    outputs = [(0, shapes[0]), (-1, shapes[1]), (sizes[0], shapes[2])]
    flat = rng.standard_normal(sizes[0] + sizes[2]).astype(f32)
    for fresh in (True, False):
        got = transfers.split_outputs(outputs, items, flat, fresh)
        assert [g.dtype for g in got] == [f16, bf16, f16]
        assert [g.shape for g in got] == shapes
        np.testing.assert_array_equal(got[2], flat[sizes[0] :].reshape(shapes[2]).astype(f16))
    narrow = flat.astype(f16)
    owned = transfers.split_outputs(outputs, items, narrow, True)
    reused = transfers.split_outputs(outputs, items, narrow, False)
    assert np.shares_memory(owned[0], narrow) and not np.shares_memory(reused[0], narrow)
