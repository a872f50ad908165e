"""The CuPy backend against the numpy reference and a float64 computation.

Tolerances (written here, checked below):
- quantize-append: codes and scales bit-identical to the numpy backend (all three dtypes,
  including exact .5 ties and all-zero blocks).
- dequantize: exactly equal to the numpy backend (``code * scale`` in float32 both sides).
- attention: relative L2 error ``||out - ref|| / ||ref||`` against the numpy backend's output
  AND against float64 attention over the same dequantized cache, per item by the kernel
  that serves it (``gpu_pairs.tolerance``): 1e-5 on the float32-grade kernel (float32 wire,
  n = 1, fewer than 64 query rows); 2e-3 (float16) and 1.6e-2 (bfloat16) where
  ``takes_prefill_kernel`` sends a 16-bit item with n * group >= 64 to the tensor-core
  prefill kernel (tests/gpu/test_gpu_prefill.py covers that route in depth).
- read_pages / write_pages: exact round trip.

Every input is fresh random data (never zeros); the device output buffer and the split
partials are poisoned with NaN before every launch, so an unwritten element fails.
Geometries: D = 64/128/256, H/KVH = 1/4/8, n = 1 and 17, cache lengths from 1 to 33,000
crossing page and split boundaries, batches of mixed lengths and of one (session, layer)
twice. Every test is marked ``gpu`` and the module skips where CuPy or a CUDA device is
missing.
"""

from __future__ import annotations

import zlib

import ml_dtypes
import numpy as np
import pytest

from q8kv.server.backends import GpuTuning, cuda_available
from q8kv.server.backends.base import AttendItem

pytest.importorskip("cupy", reason="CuPy is not installed: GPU backend tests skipped")
if not cuda_available():
    pytest.skip("no CUDA device visible to CuPy: GPU tests skipped", allow_module_level=True)

from gpu_pairs import DTYPES, Pair, case, rand, run_and_check  # noqa: E402

from q8kv.server.backends.cupy.backend import CupyBackend  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.fixture
def rng(request) -> np.random.Generator:
    # crc32, not hash(): str hashes are salted per process, and a failing case must replay.
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f16", "bf16"])
def test_append_codes_bit_identical(dtype, rng):
    pair = Pair(512, 8192, rng)
    try:
        items, pages = [], []
        for h, kvh, d, n, start in [
            (4, 4, 64, 17, 0),
            (8, 2, 128, 1, 5),
            (8, 1, 256, 40, 3),
            (2, 2, 32, 9, 30),
        ]:
            lay = pair.layout(h, kvh, d)
            ids = pair.pages(lay, start + n)
            pair.prefill(lay, ids, start, rng, dtype)
            k, v = rand(rng, (n, kvh, d), dtype), rand(rng, (n, kvh, d), dtype)
            # Exact ties (x * id = k + 0.5 with d = 1) and an all-zero block.
            tie = np.array([127, 0.5, -0.5, 1.5, -2.5, 3.5, -126.5, 0] * 4, np.float32)
            k[0, 0, :32] = tie.astype(dtype)
            v[-1, -1, -32:] = 0
            if dtype == np.float32 and d >= 64:
                # A block so small that 1/d overflows float32: q8kv.format divides by d there.
                k[0, 0, 32:64] = rng.standard_normal(32).astype(np.float32) * np.float32(1e-38)
            q = rand(rng, (n, h, d), dtype, spread=0)
            items.append(AttendItem(lay, d**-0.5, ids, start, q, k, v))
            pages.append(ids)
        run_and_check(pair, items, pages)
    finally:
        pair.close()


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("h,kvh", [(4, 4), (8, 2), (16, 2)], ids=["mha", "g4", "g8"])
@pytest.mark.parametrize("n", [1, 17])
def test_attention_mixed_lengths(d, h, kvh, n, rng):
    pair = Pair(4096, 8192, rng)
    try:
        dtype = DTYPES[(d // 64 + h + n) % 3]
        t = pair.layout(h, kvh, d).tokens_per_page
        lengths = [0, 1, t - 1, t, t + 1, 3 * t + 5, 700, 2049]
        items, pages = case(pair, rng, h, kvh, d, lengths, n, dtype)
        run_and_check(pair, items, pages)
    finally:
        pair.close()


@pytest.mark.parametrize("waves", [0.01, 2, 1000], ids=["one-split", "default", "max-splits"])
def test_attention_split_counts(waves, rng):
    pair = Pair(4096, 8192, rng)
    try:
        pair.gpu.split_waves = waves
        items, pages = case(pair, rng, 8, 2, 128, [5, 63, 64, 65, 1500, 4100], 1, np.float16)
        run_and_check(pair, items, pages)
    finally:
        pair.close()


@pytest.mark.parametrize(
    "tuning",
    [
        GpuTuning(max_splits=4, tc_nstages=3, tc_stage_bytes=16384, tc_minblocks=1),
        GpuTuning(split_waves=4, tc_stage_bytes=65536),
    ],
    ids=["3x16k-4splits", "2x64k"],
)
def test_attention_with_other_tuning(tuning, rng):
    """The --gpu-* knobs reach the kernel (its own compile) and keep the results exact."""
    pair = Pair(4096, 8192, rng, tuning)
    try:
        assert pair.gpu.split_waves == tuning.split_waves
        items, pages = case(pair, rng, 8, 2, 128, [5, 64, 700, 4100], 17, np.float16)
        run_and_check(pair, items, pages)
    finally:
        pair.close()


def test_a_pipeline_too_big_for_the_device_is_refused():
    with pytest.raises(ValueError, match="--gpu-tc-nstages 16"):
        CupyBackend(4, 4096, tuning=GpuTuning(tc_nstages=16))


@pytest.mark.parametrize("h,kvh,n", [(32, 8, 1), (32, 8, 17), (8, 1, 1)])
def test_attention_long_context(h, kvh, n, rng):
    """33,000 tokens (past 32K), default page size, one session filling the GPU alone."""
    pair = Pair(-(-33100 // 32) * 2 + 64, 64 * 1024, rng)
    try:
        items, pages = case(pair, rng, h, kvh, 128, [33000 - n], n, ml_dtypes.bfloat16)
        run_and_check(pair, items, pages)
    finally:
        pair.close()


def test_same_layer_twice_in_one_batch(rng):
    """Two appends to one (session, layer) in one batch: the second sees the first."""
    pair = Pair(1024, 8192, rng)
    try:
        lay = pair.layout(8, 2, 128)
        ids = pair.pages(lay, 300 + 17 + 1)
        pair.prefill(lay, ids, 300, rng)
        items = []
        start = 300
        for n in (17, 1):
            q, k, v = (rand(rng, (n, x, 128), np.float32, s) for x, s in ((8, 0), (2, 2), (2, 2)))
            items.append(AttendItem(lay, 0.1, ids, start, q, k, v))
            start += n
        other, other_pages = case(pair, rng, 8, 2, 128, [40], 1, np.float32)
        run_and_check(pair, [items[0], other[0], items[1]], [ids, *other_pages])
    finally:
        pair.close()


def test_dequantize_exact(rng):
    pair = Pair(1024, 8192, rng)
    try:
        lay = pair.layout(8, 4, 64)
        ids = pair.pages(lay, 1000)
        pair.prefill(lay, ids, 1000, rng, np.float16)
        for start, end in [(0, 1000), (7, 993), (31, 33), (500, 500)]:
            gk, gv = pair.gpu.dequantize(lay, ids, start, end)
            rk, rv = pair.ref.dequantize(lay, ids, start, end)
            assert gk.shape == rk.shape == (4, end - start, 64)
            np.testing.assert_array_equal(gk, rk)
            np.testing.assert_array_equal(gv, rv)
    finally:
        pair.close()


def test_read_write_pages_round_trip(rng):
    pair = Pair(64, 4096, rng)
    try:
        ids = np.array([3, 17, 0, 63], np.int32)
        codes = rng.integers(-127, 128, size=(4, 4096), dtype=np.int8)
        scales = rng.random((4, 4096 // 32), dtype=np.float32)
        pair.gpu.write_pages(ids, codes, scales)
        c, s = pair.gpu.read_pages(ids)
        np.testing.assert_array_equal(c, codes)
        np.testing.assert_array_equal(s, scales)
        c2, s2 = pair.gpu.read_pages(ids[::-1])
        np.testing.assert_array_equal(c2, codes[::-1])
        np.testing.assert_array_equal(s2, scales[::-1])
    finally:
        pair.close()


def test_device_helpers():
    free = CupyBackend.free_device_bytes()
    assert free > 0
    backend = CupyBackend(4, 4096)
    try:
        assert backend.device_name and backend.device_name != "cpu"
        assert backend.append_and_attend([]) == []
    finally:
        backend.close()
