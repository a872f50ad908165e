"""GPU prefill (issue 14): the CuPy backend's attention for n > 1 against the numpy backend,
float64 attention over the same dequantized cache, and torch SDPA on the GPU.

Routes (``takes_prefill_kernel`` in server/backends/cupy/planning.py): a float16 or bfloat16
item with n >= 2 and n * group >= 64 query rows runs on the 16-bit tensor-core prefill
kernel (q exact from the wire, K and V dequantized to the wire's 16-bit type, QK^T and PV
on tensor cores with float32 accumulation, P rounded to 16 bits, online softmax in
float32); everything else (float32 wire, decode n = 1, fewer than 64 query rows) runs on
the float32-grade kernel.

Tolerances, relative L2 ``||out - ref|| / ||ref||`` of each item's float32 output against
the numpy backend AND against float64 attention over the same dequantized cache
(tests/reference.py), checked per item by its route (tests/gpu/gpu_pairs.py):
- float32-grade route: 1e-5 (as tests/gpu/test_gpu_backend.py);
- 16-bit route: 2e-3 for float16, 1.6e-2 for bfloat16;
- and against torch SDPA on the GPU in the same 16-bit type (H = 32, KVH = 8, D = 64 and
  128, (start, n) = (0, 512) and (3000, 700); q as sent, K and V the dequantized cache
  cast to 16 bits, the bottom-right causal mask, the item's softmax_scale):
  err_q8kv <= 1.25 * err_sdpa, both against float64 (printed; run with -s to see them).
Codes and scales written: bit-identical to the numpy backend's.

Every input is fresh random data (never zeros); the device outputs are poisoned with NaN
before every launch, so an unwritten element fails. n = 1, 7, 33, 500, 2048; cache lengths
0, 1, T - 1, T, T + 1 (T tokens per page) and a few thousand; GQA 32/8 and 8/2, MQA 8/1,
MHA 4/4; D = 64, 128, 256; float32, float16, bfloat16; batches mixing prefill and decode
items, head_dims and dtypes, one (session, layer) several times in one batch; items on
both sides of the route threshold; K and V at the edge of the wire type's range. Marked
``gpu``; the module skips where CuPy or a CUDA device is missing.
"""

from __future__ import annotations

import zlib

import ml_dtypes
import numpy as np
import pytest
from reference import rel_l2

from q8kv.server.backends import cuda_available
from q8kv.server.backends.base import AttendItem

pytest.importorskip("cupy", reason="CuPy is not installed: GPU backend tests skipped")
if not cuda_available():
    pytest.skip("no CUDA device visible to CuPy: GPU tests skipped", allow_module_level=True)

import torch  # noqa: E402
from gpu_pairs import (  # noqa: E402
    DTYPES,
    Pair,
    case,
    on_16bit_route,
    rand,
    run_and_check,
    takes_prefill_kernel,
)
from harness.sdpa import sdpa_over_cache  # noqa: E402

from q8kv.server.backends import GpuTuning  # noqa: E402
from q8kv.server.backends.cupy import kernels  # noqa: E402

pytestmark = pytest.mark.gpu

PCB = 16384  # page code bytes: 4 (32/8, D = 256) to 128 (8/1, D = 64) tokens per page
HEADS = [(32, 8), (8, 2), (8, 1), (4, 4)]
HEAD_IDS = ["g4-32", "g4-8", "mqa", "mha"]
DIMS = [64, 128, 256]
DTYPE_IDS = ["f32", "f16", "bf16"]
TORCH_DTYPE = {np.dtype(np.float16): torch.float16, np.dtype(ml_dtypes.bfloat16): torch.bfloat16}
SDPA_DEVICE = "cuda"


@pytest.fixture
def rng(request) -> np.random.Generator:
    # crc32, not hash(): str hashes are salted per process, and a failing case must replay.
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))


def new_item(pair, rng, lay, ids, start, n, dtype, scale=None) -> AttendItem:
    """Random q (spread 0), k, v for n new tokens after ``start`` on pages ``ids``."""
    h, kvh, d = lay.num_heads, lay.num_kv_heads, lay.head_dim
    q = rand(rng, (n, h, d), dtype, spread=0)
    k, v = rand(rng, (n, kvh, d), dtype), rand(rng, (n, kvh, d), dtype)
    return AttendItem(lay, scale or d**-0.5, ids, start, q, k, v)


def sessions(pair, rng, lay, specs) -> tuple[list[AttendItem], list[np.ndarray]]:
    """One session per (start, n, dtype) of ``specs``: ``start`` random tokens cached, and an
    item of n new ones; returns the items and each session's pages."""
    items, pages = [], []
    for start, n, dtype in specs:
        ids = pair.pages(lay, start + n)
        pair.prefill(lay, ids, start, rng, dtype)
        items.append(new_item(pair, rng, lay, ids, start, n, dtype))
        pages.append(ids)
    return items, pages


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("h,kvh", HEADS, ids=HEAD_IDS)
@pytest.mark.parametrize("n", [1, 7, 33, 500])
def test_prefill_across_page_boundaries(n, h, kvh, dtype, rng):
    """Six sessions in one batch, n new tokens after 0, 1, T - 1, T, T + 1 and 2,500 cached.
    D rotates with the other parameters so every (n, heads) meets every D and dtype."""
    d = DIMS[([1, 7, 33, 500].index(n) + HEADS.index((h, kvh)) + DTYPES.index(dtype)) % 3]
    pair = Pair(4096, PCB, rng)
    try:
        t = pair.layout(h, kvh, d).tokens_per_page
        items, pages = case(pair, rng, h, kvh, d, [0, 1, t - 1, t, t + 1, 2500], n, dtype)
        run_and_check(pair, items, pages)
    finally:
        pair.close()


@pytest.mark.parametrize(
    "dtype,h,kvh,d,lengths",
    [
        (np.float16, 32, 8, 128, [0, 17]),
        (ml_dtypes.bfloat16, 8, 1, 256, [31, 3000]),
        (np.float32, 4, 4, 64, [33, 2500]),
    ],
    ids=DTYPE_IDS[1:] + DTYPE_IDS[:1],
)
def test_prefill_of_2048_tokens(dtype, h, kvh, d, lengths, rng):
    """n = 2,048 (the float64 reference is the slow part: few such cases)."""
    pair = Pair(2048, PCB, rng)
    try:
        items, pages = case(pair, rng, h, kvh, d, lengths, 2048, dtype)
        run_and_check(pair, items, pages)
    finally:
        pair.close()


def test_one_batch_of_prefills_decodes_head_dims_and_dtypes(rng):
    """Prefill and decode items of three head_dims and three dtypes in one call, on both
    routes, with two sessions appended to several times in the batch: each later item
    reads the tokens the earlier ones wrote (a 16-bit prefill after a 16-bit prefill, a
    decode between them)."""
    pair = Pair(4096, PCB, rng)
    try:
        g128, g64 = pair.layout(32, 8, 128), pair.layout(8, 2, 64)
        mha, mqa = pair.layout(4, 4, 256), pair.layout(8, 1, 256)
        twice = pair.layout(8, 2, 128)
        items, pages = [], []

        def session(lay, start, total, dtype) -> np.ndarray:
            ids = pair.pages(lay, total)
            pair.prefill(lay, ids, start, rng, dtype)
            pages.append(ids)
            return ids

        a = session(twice, 100, 100 + 200 + 1 + 40, np.float16)
        b = session(mha, 0, 70 + 500, ml_dtypes.bfloat16)
        singles = [
            (g128, 1000, 500, np.float16),  # 16-bit route
            (g128, 2000, 1, np.float16),  # decode
            (g64, g64.tokens_per_page, 33, ml_dtypes.bfloat16),  # 132 rows: 16-bit
            (g64, 0, 500, np.float32),
            (mha, mha.tokens_per_page - 1, 7, np.float16),  # 7 rows: float32-grade
            (mqa, 300, 64, ml_dtypes.bfloat16),
            (mqa, 5, 1, np.float32),
        ]
        for lay, start, n, dtype in singles:
            ids = session(lay, start, start + n, dtype)
            items.append(new_item(pair, rng, lay, ids, start, n, dtype))
        repeated = [
            new_item(pair, rng, twice, a, 100, 200, np.float16),
            new_item(pair, rng, mha, b, 0, 70, ml_dtypes.bfloat16),  # 70 rows: 16-bit
            new_item(pair, rng, twice, a, 300, 1, np.float16),
            new_item(pair, rng, twice, a, 301, 40, np.float16),
            new_item(pair, rng, mha, b, 70, 500, ml_dtypes.bfloat16),
        ]
        batch = []  # interleaved; each session's repeated items stay in order
        for i, single in enumerate(items):
            batch += [single, *repeated[i : i + 1]]
        assert len(batch) == len(singles) + len(repeated)
        assert {on_16bit_route(it) for it in batch} == {True, False}
        run_and_check(pair, batch, pages)
    finally:
        pair.close()


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16], ids=["f16", "bf16"])
def test_prefill_with_and_without_the_16bit_tile_scratch(dtype, rng):
    """At head_dim 128 on an H100/H200 a prefill launch first dequantizes its K/V into 16-bit
    tiles in a device scratch (q8_prefill_ws.cu); a launch whose tiles would pass
    --gpu-prefill-scratch-bytes runs on the kernel that dequantizes in its loop. Three
    items of different lengths in one launch (each its own tiles), both ways: each within
    the route's tolerance, the scratch used (or not) as the cap says, the pool unchanged."""
    specs = [(0, 300), (777, 129), (2 * 4096 + 5, 64)]  # (start, n)
    outs = []
    for cap in (GpuTuning().prefill_scratch_bytes, 0):
        tuning = GpuTuning(prefill_scratch_bytes=cap)
        pair = Pair(1024, PCB, np.random.default_rng(5), tuning=tuning)
        try:
            lay = pair.layout(16, 4, 128)
            data = np.random.default_rng(6)
            items, pages = sessions(pair, data, lay, [(s, n, dtype) for s, n in specs])
            assert all(on_16bit_route(it) for it in items)
            checked = run_and_check(pair, items, pages)
            outs.append([out for out, _ in checked])
            tiles = pair.gpu._tiles.buffer
            if cap and kernels.uses_ws(kernels.compute_capability(pair.gpu._dev_id), 128):
                pairs = sum(4 * -(-(s + n) // kernels.PREFILL_TILE) for s, n in specs)
                assert tiles is not None and tiles.size >= pairs * kernels.ws_tile_bytes(128)
            else:
                assert tiles is None
        finally:
            pair.close()
    for a, b in zip(*outs, strict=True):  # the same inputs both ways: the same answer
        assert rel_l2(a, b) < (2e-3 if dtype == np.float16 else 1.6e-2)


def test_stale_tiles_never_reach_an_output(rng):
    """The 16-bit tile scratch is shared by every call (and tenant). Filled with NaN between
    two calls, the second must not read any of it: q8_append rewrites the new tokens' tiles
    and zeroes past each item's last token, q8_kv_tiles the cached ones. Two launches (a
    float16 and a bfloat16 item, each its own pairs of the scratch), partial last tiles."""
    pair = Pair(1024, PCB, rng)
    try:
        lay = pair.layout(16, 4, 128)
        calls = [[(0, 100, np.float16), (130, 77, ml_dtypes.bfloat16)],
                 [(64, 200, np.float16), (1, 70, ml_dtypes.bfloat16), (500, 33, np.float16)]]
        for call, specs in enumerate(calls):
            items, pages = sessions(pair, rng, lay, specs)
            assert all(on_16bit_route(it) for it in items)
            if call and kernels.uses_ws(kernels.compute_capability(pair.gpu._dev_id), 128):
                assert pair.gpu._tiles.buffer is not None, "the first call used no tiles"
                with pair.gpu.stream:  # ordered before the next call's launches
                    pair.gpu._tiles.buffer.fill(0xFF)  # NaN in float16 and bfloat16
            run_and_check(pair, items, pages)  # finite, and right
    finally:
        pair.close()


def test_items_on_both_sides_of_the_route_threshold(rng):
    """n * group = 63 and 64, n = 2 with group 32, n = 64 with group 1: the smallest items
    of the 16-bit route next to the largest of the float32-grade route, in one batch."""
    pair = Pair(2048, PCB, rng)
    try:
        cases = [  # (h, kvh, d, n, dtype, 16-bit route)
            (8, 2, 128, 16, np.float16, True),
            (8, 2, 128, 15, np.float16, False),
            (32, 1, 64, 2, ml_dtypes.bfloat16, True),
            (4, 4, 64, 64, ml_dtypes.bfloat16, True),
            (4, 4, 64, 63, ml_dtypes.bfloat16, False),
            (21, 1, 64, 3, np.float16, False),  # 63 rows
            (16, 1, 64, 4, np.float32, False),
        ]
        items, pages = [], []
        for h, kvh, d, n, dtype, route in cases:
            assert bool(takes_prefill_kernel(n, h // kvh, np.dtype(dtype))) == route
            lay = pair.layout(h, kvh, d)
            start = int(rng.integers(1, 3 * lay.tokens_per_page))
            ids = pair.pages(lay, start + n)
            pair.prefill(lay, ids, start, rng, dtype)
            items.append(new_item(pair, rng, lay, ids, start, n, dtype))
            pages.append(ids)
        run_and_check(pair, items, pages)
    finally:
        pair.close()


@pytest.mark.parametrize(
    "dtype,big", [(np.float16, 65504.0), (ml_dtypes.bfloat16, 2.0**100)], ids=["f16", "bf16"]
)
def test_16bit_route_at_the_edge_of_the_wire_range(dtype, big, rng):
    """Every new K and V row peaks at ``big`` (float16: its largest finite value), q small
    enough that scores stay near 1. Dequantizing to 16 bits must not overflow (a scale
    rounded to float16 first would: float16(65504 / 127) * 127 > 65519 is inf); the output
    stays finite and within the route's tolerance."""
    pair = Pair(1024, PCB, rng)
    try:
        lay = pair.layout(8, 2, 128)
        start, n = lay.tokens_per_page + 7, 200
        ids = pair.pages(lay, start + n)
        pair.prefill(lay, ids, start, rng, dtype)

        def peaking(shape) -> np.ndarray:
            x = rand(rng, shape, np.float32)
            return (x / np.abs(x).max(axis=-1, keepdims=True) * np.float32(big)).astype(dtype)

        k, v = peaking((n, 2, 128)), peaking((n, 2, 128))
        assert np.abs(v.astype(np.float32)).max() == np.float32(big)
        q = (rand(rng, (n, 8, 128), np.float32, spread=0) * np.float32(4 / big)).astype(dtype)
        item = AttendItem(lay, 128**-0.5, ids, start, q, k, v)
        assert on_16bit_route(item)
        run_and_check(pair, [item], [ids])
    finally:
        pair.close()


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16], ids=["f16", "bf16"])
def test_no_worse_than_torch_sdpa(dtype, d, rng):
    """err_q8kv <= 1.25 * err_sdpa against float64, SDPA in the same 16-bit type over the
    same dequantized cache (K and V cast to it), q as sent."""
    pair = Pair(2048, PCB, rng)
    try:
        lay = pair.layout(32, 8, d)
        items, pages = sessions(pair, rng, lay, [(0, 512, dtype), (3000, 700, dtype)])
        assert all(on_16bit_route(it) for it in items)
        checked = run_and_check(pair, items, pages)
        for it, (out, ref64) in zip(items, checked, strict=True):
            keys, values = pair.ref.dequantize(lay, it.page_ids, 0, it.start + it.n)
            sdpa = sdpa_over_cache(
                it.q, keys, values, it.start, it.softmax_scale,
                TORCH_DTYPE[np.dtype(dtype)], SDPA_DEVICE,
            )  # fmt: skip
            err_q8kv, err_sdpa = rel_l2(out, ref64), rel_l2(sdpa, ref64)
            line = (
                f"{np.dtype(dtype)} D={d} start={it.start} n={it.n}: vs float64 "
                f"q8kv {err_q8kv:.3e}, torch SDPA {err_sdpa:.3e} ({err_q8kv / err_sdpa:.2f}x)"
            )
            print(line)
            assert err_sdpa > 0 and err_q8kv <= 1.25 * err_sdpa, line
    finally:
        pair.close()
