"""CupyBackend.attend_packed against the same batch run as items (append_and_attend) on a
second GPU backend holding the same pages: the kernels read identical inputs, so outputs
(in the wire dtype) and the pages written must be equal bit for bit; and against the numpy
backend's packed path within the attention tolerance. Marked ``gpu``; skips without CUDA."""

from __future__ import annotations

import zlib

import ml_dtypes
import numpy as np
import pytest
from harness.packed import fill_random_pool, packed_batch
from reference import rel_l2

from q8kv.format import LayerLayout, tokens_per_page
from q8kv.server.backends import cuda_available
from q8kv.server.backends.base import PackedItems
from q8kv.server.backends.numpy_backend import NumpyBackend

pytest.importorskip("cupy", reason="CuPy is not installed: GPU backend tests skipped")
if not cuda_available():
    pytest.skip("no CUDA device visible to CuPy: GPU tests skipped", allow_module_level=True)

from q8kv.server.backends.cupy.backend import CupyBackend  # noqa: E402

pytestmark = pytest.mark.gpu

PAGE, PAGES = 65536, 4096
DTYPES = [np.float32, np.float16, ml_dtypes.bfloat16]


@pytest.fixture
def rng(request) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))


def backends(rng: np.random.Generator):
    """Two GPU backends and a numpy one whose pools hold the same random codes/scales."""
    ref = NumpyBackend(PAGES, PAGE)
    fill_random_pool(ref, rng)
    gpus = [CupyBackend(PAGES, PAGE), CupyBackend(PAGES, PAGE)]
    ids = np.arange(PAGES, dtype=np.int32)
    for gpu in gpus:
        gpu.poison_outputs = True
        gpu.write_pages(ids, ref.codes, ref.scales)
    return ref, gpus


def standard_normal(rng: np.random.Generator, shape: tuple[int, ...], dtype) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32).astype(dtype)


def random_batch(rng, h, kvh, d, starts, n, dtype) -> PackedItems:
    layout = LayerLayout(h, kvh, d, tokens_per_page(PAGE, kvh, d))
    return packed_batch(rng, layout, PAGES, starts, n, dtype, values=standard_normal)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize(
    "h,kvh,d,n", [(32, 8, 128, 1), (8, 2, 64, 17), (4, 4, 256, 1)], ids=["g4", "prefill", "mha"]
)
def test_packed_equals_items_bit_for_bit(dtype, h, kvh, d, n, rng):
    ref, (packed_gpu, items_gpu) = backends(rng)
    starts = list(rng.choice([0, 1, 1023, 1024, 5000], size=9)) + [777] * 8
    batch = random_batch(rng, h, kvh, d, starts, n, dtype)
    out = packed_gpu.attend_packed(batch)
    items = np.stack(
        items_gpu.append_and_attend(batch.items()), dtype=batch.out_dtype, casting="unsafe"
    )
    assert out.dtype == batch.out_dtype and out.shape == batch.q.shape
    np.testing.assert_array_equal(out.view(np.uint8), items.view(np.uint8))
    touched = np.concatenate(batch.page_ids)
    for a, b in zip(packed_gpu.read_pages(touched), items_gpu.read_pages(touched), strict=True):
        np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))
    expected = ref.attend_packed(batch).astype(np.float32)
    tolerance = 1e-5 if dtype == np.float32 else 1e-2  # the output's rounding
    assert rel_l2(out.astype(np.float32), expected) <= tolerance
    for backend in (packed_gpu, items_gpu):
        backend.close()


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16], ids=["f16", "bf16"])
def test_the_device_narrowing_rounds_as_numpy_does(dtype, rng):
    """q8_narrow (the packed output's float32 -> 16-bit wire dtype on the device) equals the
    host's astype bit for bit on random values, exact ties, values that overflow or fall
    into the 16-bit subnormals, signed zeros and infinities; NaN stays NaN."""
    import cupy as cp

    gpu = CupyBackend(8, 4096)
    tie16 = np.float32(1 + 2**-11)  # halfway between two float16 values
    tie_bf = np.float32(1 + 2**-8)  # halfway between two bfloat16 values
    special = np.array([0.0, -0.0, tie16, -tie16, tie_bf, -tie_bf, 65504.0, 65520.0, 7e4,
                        3.4e38, 1e-6, -3e-8, 6e-8, 1e-40, np.inf, -np.inf], np.float32)  # fmt: skip
    values = np.concatenate([special, rng.standard_normal(10_000).astype(np.float32) * 1e3])

    def narrow(x: np.ndarray) -> np.ndarray:
        out = cp.empty(x.size, cp.uint16)
        bf16 = np.int32(dtype == ml_dtypes.bfloat16)
        gpu._narrow_k((-(-x.size // 256),), (256,), (cp.asarray(x), out, np.int64(x.size), bf16))
        return out.get().view(dtype)

    np.testing.assert_array_equal(
        narrow(values).view(np.uint16), values.astype(dtype).view(np.uint16)
    )
    assert np.all(np.isnan(narrow(np.array([np.nan, -np.nan], np.float32)).astype(np.float32)))
    gpu.close()


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16], ids=["f16", "bf16"])
def test_16bit_outputs_wait_for_a_long_attention(dtype, rng):
    """A 16-bit wire's outputs are narrowed on the backend's (non-blocking) stream, after
    the attention. The narrowing once ran on CuPy's default stream, which does not wait for
    that stream: a call whose attention ran longer than a launch got back the previous
    call's outputs (another tenant's, through the service) or the NaN poison. Long caches
    and several calls in a row, packed and as items, each against the numpy backend."""
    ref, (packed_gpu, items_gpu) = backends(rng)
    for _ in range(3):
        starts = list(rng.integers(6000, 8000, size=8))
        batch = random_batch(rng, 32, 8, 128, starts, 1, dtype)
        packed = packed_gpu.attend_packed(batch).astype(np.float32)
        items = np.stack(items_gpu.append_and_attend(batch.items())).astype(np.float32)
        expected = ref.attend_packed(batch).astype(np.float32)
        assert rel_l2(packed, expected) <= 1e-2  # the output's rounding
        assert rel_l2(items, expected) <= 1e-2
    for backend in (packed_gpu, items_gpu):
        backend.close()
